"""``fedadapt server start``: the federation's Flower SuperLink, with TLS and SuperNode
authentication on."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedadapt.deploy.commands import (ISOLATIONS, SUPERLINK_PORT, SuperLinkOptions, shell_line,
                             superlink_command)
from fedadapt.layout import CA_CERT


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fedadapt server`` and its subcommands to the CLI."""
    p = sub.add_parser("server", help="run the federation's SuperLink (TLS + site auth)")
    ss = p.add_subparsers(dest="server_command", required=True, metavar="SUBCOMMAND")
    s = ss.add_parser("start", help="run flower-superlink with TLS and SuperNode auth",
                      description="Runs flower-superlink with the certificates of `fedadapt "
                      "certs` and SuperNode authentication: register each site with "
                      "`flwr supernode register certs/sites/NAME/auth.pub CONNECTION`.")
    s.add_argument("--certs", required=True, type=Path,
                   help="folder written by `fedadapt certs` (ca.pem, superlink.pem/.key)")
    s.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=SUPERLINK_PORT,
                   help=f"port of the Fleet, Control and Runtime APIs (default "
                   f"{SUPERLINK_PORT})")
    s.add_argument("--database", default="superlink-state.db",
                   help="SQLite file of runs and registered sites (default "
                   "superlink-state.db)")
    s.add_argument("--isolation", default="subprocess", choices=ISOLATIONS,
                   help="subprocess: the SuperLink runs the ServerApp; process: a separate "
                   "flower-superexec does (docker-compose)")
    s.add_argument("--no-supernode-auth", action="store_true",
                   help="let any SuperNode with the CA certificate join (not for hospitals)")
    s.add_argument("--health-server-address", default="",
                   help="gRPC health endpoint HOST:PORT for probes (default: none)")
    s.add_argument("--dry-run", action="store_true", help="print the command only")
    s.set_defaults(func=_start)


def connection_toml(name: str, address: str, ca: Path) -> str:
    """The ``$FLWR_HOME/config.toml`` block that lets ``flwr`` talk to this SuperLink."""
    return (f"[superlink.{name}]\naddress = \"{address}\"\n"
            f"root-certificates = \"{ca.resolve()}\"\n")


def _start(args: argparse.Namespace) -> int:
    opts = SuperLinkOptions(certs=args.certs, host=args.host, port=args.port,
                            database=args.database, isolation=args.isolation,
                            supernode_auth=not args.no_supernode_auth,
                            health_server_address=args.health_server_address)
    cmd = superlink_command(opts)
    if args.dry_run:
        print(shell_line(cmd))
        return 0
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"SuperLink: {shell_line(cmd)}\nFor `flwr`, add to $FLWR_HOME/config.toml "
          f"(default ~/.flwr/config.toml):\n"
          f"{connection_toml('hospitals', f'{host}:{args.port}', args.certs / CA_CERT)}",
          file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)  # the SuperLink takes over this PID; returns only on error
    return 1  # pragma: no cover
