#!/bin/sh
# Prepare what docker-compose.yml mounts, from the repository root:
#   sh deploy/compose-init.sh && docker compose up --build -d
# Three demo hospitals with synthetic data. For real data, give each site
# `--data data/<file>` (a datalist .json or a MedMNIST .npz) and point
# HOSPITAL_A_DATA (B, C) in .env at the host folder holding it.
set -eu
fedadapt certs certs --sites hospital-a,hospital-b,hospital-c --san superlink --san localhost --san 127.0.0.1
fedadapt site init sites/hospital-a --name hospital-a --data synthetic --partition-id 0 --num-sites 3 --epsilon-cap 8
fedadapt site init sites/hospital-b --name hospital-b --data synthetic --partition-id 1 --num-sites 3 --epsilon-cap 8
fedadapt site init sites/hospital-c --name hospital-c --data synthetic --partition-id 2 --num-sites 3 --epsilon-cap 8
mkdir -p runs state
# Containers run as you, so they can read the keys (mode 600) and write ledgers and runs.
printf 'FEDADAPT_UID=%s\nFEDADAPT_GID=%s\n' "$(id -u)" "$(id -g)" > .env
