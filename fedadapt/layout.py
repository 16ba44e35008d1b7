"""File and folder names of a site folder, a run directory and a certificate folder.

Defined once here and used by every package (client, privacy, deploy, server, CLI), so
that the site folder a site engineer sets up with ``fedadapt site init`` is the one the
ClientApp, the budget guard and the audit read. The names are part of the on-disk
format: changing one breaks existing site folders and run directories.

A site folder (node config ``site-dir``; in simulation ``<sites-dir>/<site name>``)::

    site.toml            the site's own configuration (deploy.site_config)
    policy.toml          its privacy policy (privacy.policy)
    ledger/              one hash-chained ledger per dataset (privacy.ledger)
    data/                where ``fedadapt site init`` expects the data
    superexec.secret     shared by the SuperNode and its executor
    personal/<site>.safetensors   personalised tensors kept between rounds
    continual/<run key>/ continual-learning memory (client.memory)
    replies/<run key>/   the last replies, re-sent after a server resume (client.replies)
    drift/<run key>/reference.safetensors   the drift monitor's reference window
                         (images and frozen-backbone embeddings; client.drift_monitor)
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

# --- a site folder ------------------------------------------------------------------
SITE_TOML: Final = "site.toml"
POLICY_TOML: Final = "policy.toml"
LEDGER_DIR: Final = "ledger"
DATA_DIR: Final = "data"
SUPEREXEC_SECRET: Final = "superexec.secret"
PERSONAL_DIR: Final = "personal"
MEMORY_DIR: Final = "continual"
REPLY_DIR: Final = "replies"
DRIFT_DIR: Final = "drift"
DRIFT_REFERENCE: Final = "reference.safetensors"

# --- a run directory (server) ----------------------------------------------------------
SUMMARY_JSON: Final = "summary.json"
CHECKPOINT: Final = "checkpoint.pt"
RUN_KEY_FILE: Final = "run-key"
ADAPTER_DIR: Final = "adapter"
REPORT_HTML: Final = "report.html"

# --- a certificate folder (``fedadapt certs``) -----------------------------------------
CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca.key"
SUPERLINK_CERT: Final = "superlink.pem"
SUPERLINK_KEY: Final = "superlink.key"
SITES_DIR: Final = "sites"  # <certs>/sites/<site>/auth.key, auth.pub; a run dir's simulated sites
AUTH_KEY: Final = "auth.key"
AUTH_PUB: Final = "auth.pub"


def policy_path(site_dir: str | Path) -> Path:
    """``<site_dir>/policy.toml``."""
    return Path(site_dir) / POLICY_TOML


def ledger_dir(site_dir: str | Path) -> Path:
    """``<site_dir>/ledger``."""
    return Path(site_dir) / LEDGER_DIR


def site_toml_path(site_dir: str | Path) -> Path:
    """``<site_dir>/site.toml``."""
    return Path(site_dir) / SITE_TOML


def site_of_ledger(ledger_file: str | Path) -> Path:
    """The site folder a ledger file ``<site_dir>/ledger/<name>.jsonl`` belongs to."""
    return Path(ledger_file).parent.parent
