"""``fedadapt site init|check|start``: a hospital's site folder and its Flower SuperNode."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedadapt.deploy.commands import (ISOLATIONS, SUPERNODE_PORT, SuperNodeOptions, shell_line,
                             supernode_command)
from fedadapt.deploy.site_config import ImageReading, SiteConfig
from fedadapt.deploy.site_folder import check_site, init_site
from fedadapt.config import DEVICES


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fedadapt site`` and its subcommands to the CLI."""
    p = sub.add_parser("site", help="set up and start a hospital site (Flower SuperNode)",
                       description="A site folder holds site.toml (data, device, ...), "
                       "policy.toml (the site's privacy policy) and ledger/ (the budget it "
                       "has spent).")
    ss = p.add_subparsers(dest="site_command", required=True, metavar="SUBCOMMAND")

    i = ss.add_parser("init", help="write a site folder (site.toml, policy.toml, ledger/)")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--name", required=True,
                   help="site name; the one its auth key was made for (fedadapt certs --sites)")
    i.add_argument("--data", required=True,
                   help="'synthetic' (demo data), a datalist .json or a MedMNIST .npz "
                   "(relative paths are relative to DIR)")
    i.add_argument("--device", default="auto", choices=DEVICES)
    i.add_argument("--lora-rank", type=int, default=0,
                   help="0: the run's rank (default); else the smaller rank this site trains at")
    i.add_argument("--personalised-keys", default="",
                   help="comma-separated tensor-name substrings kept local, e.g. head")
    i.add_argument("--partition-id", type=int, default=0, help="index of this site (0-based)")
    i.add_argument("--num-sites", type=int, default=1, help="sites in the federation")
    i.add_argument("--intensity", default="scale", help="scale | normalize | none")
    i.add_argument("--epsilon-cap", type=float, required=True,
                   help="total record-level epsilon this site will ever spend on its data")
    i.add_argument("--delta", type=float, default=None,
                   help="delta of the policy (default: 1/(10*N) for N training records)")
    i.add_argument("--min-noise-multiplier", type=float, default=0.5,
                   help="noise floor of the policy (default 0.5)")
    i.add_argument("--max-rounds-per-run", type=int, default=1000)
    i.add_argument("--accountant", default="rdp", choices=("rdp", "prv"))
    i.add_argument("--force", action="store_true",
                   help="rewrite an existing site.toml/policy.toml (the ledger is kept)")
    i.set_defaults(func=_init)

    c = ss.add_parser("check", help="validate a site folder as `site start` does, and read "
                      "every record of its data as training will")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--num-classes", type=int, default=0,
                   help="the federation's classes: labels must lie in 0..K-1 (default: "
                   "only report the labels' range)")
    c.add_argument("--image-size", type=int, default=32,
                   help="the run's image size (default 32)")
    c.add_argument("--task", default="classification",
                   choices=("classification", "multilabel", "segmentation"))
    c.add_argument("--spatial-dims", type=int, default=2, choices=(2, 3))
    c.set_defaults(func=_check)

    s = ss.add_parser("start", help="check the site folder, then run its Flower SuperNode")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    s.add_argument("--root-certificates", required=True, type=Path,
                   help="the federation's CA certificate (ca.pem)")
    s.add_argument("--auth-key", required=True, type=Path,
                   help="this site's private authentication key (sites/NAME/auth.key)")
    s.add_argument("--host", default="127.0.0.1",
                   help="interface of the SuperNode's Runtime API (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=SUPERNODE_PORT,
                   help=f"port of the SuperNode's Runtime API; one per site on a machine "
                   f"(default {SUPERNODE_PORT})")
    s.add_argument("--isolation", default="subprocess", choices=ISOLATIONS,
                   help="subprocess: the SuperNode runs the ClientApp; process: a separate "
                   "flower-superexec does (docker-compose)")
    s.add_argument("--partition-id", type=int, default=None,
                   help="override site.toml's partition_id")
    s.add_argument("--num-partitions", type=int, default=None,
                   help="override site.toml's num_sites")
    s.add_argument("--max-retries", type=int, default=None,
                   help="give up after this many failed connection attempts (default: never)")
    s.add_argument("--health-server-address", default="",
                   help="gRPC health endpoint HOST:PORT for probes (default: none)")
    s.add_argument("--dry-run", action="store_true",
                   help="check the folder and print the flower-supernode command only")
    s.set_defaults(func=_start)


def _init(args: argparse.Namespace) -> int:
    cfg = SiteConfig(
        name=args.name, data=args.data, device=args.device, lora_rank=args.lora_rank,
        personalised_keys=tuple(k.strip() for k in args.personalised_keys.split(",")
                                if k.strip()),
        partition_id=args.partition_id, num_sites=args.num_sites,
        image=ImageReading(intensity=args.intensity))
    policy = {"epsilon_cap": args.epsilon_cap, "min_noise_multiplier":
              args.min_noise_multiplier, "max_rounds_per_run": args.max_rounds_per_run,
              "accountant": args.accountant}
    if args.delta is not None:
        policy["delta"] = args.delta
    folder = init_site(args.dir, cfg, policy, force=args.force)
    print(f"site {cfg.name}: wrote {folder.site_toml} and {folder.policy_toml}; ledger in "
          f"{folder.ledger}/")
    data = cfg.data_path(folder.root)
    if data is not None and not data.is_file():
        print(f"note: data file {data} does not exist yet; `fedadapt site start` will "
              "refuse to start until it does", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> int:
    cfg = check_site(args.dir)
    from fedadapt.deploy.site_data import DataExpectation, check_site_data  # reads images

    expect = DataExpectation(task=args.task, spatial_dims=args.spatial_dims,
                             image_size=args.image_size, num_classes=args.num_classes)
    report = check_site_data(args.dir, cfg, expect)
    print(f"site {cfg.name}: site.toml, policy.toml and ledger/ are valid "
          f"(data: {cfg.data}, device: {cfg.device})")
    if report is not None:
        sizes = ", ".join(f"{k} {v}" for k, v in report.sizes.items())
        labels = "".join(f"; {k} labels {dict(v)}" for k, v in report.labels.items())
        print(f"site {cfg.name}: every record of {report.path} reads ({sizes} records"
              f"{labels})")
    return 0


def _start(args: argparse.Namespace) -> int:
    cfg = check_site(args.dir)  # fail here, at the site, before joining the federation
    opts = SuperNodeOptions(
        superlink=args.superlink, root_certificates=args.root_certificates,
        auth_key=args.auth_key, host=args.host, port=args.port, isolation=args.isolation,
        partition_id=args.partition_id, num_partitions=args.num_partitions,
        max_retries=args.max_retries, health_server_address=args.health_server_address)
    cmd = supernode_command(args.dir, cfg, opts)
    if args.dry_run:
        print(shell_line(cmd))
        return 0
    print(f"site {cfg.name}: {shell_line(cmd)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the SuperNode takes over this PID; returns only on error
    return 1  # pragma: no cover
