"""``fedadapt certs DIR --sites a,b,c``: TLS CA, SuperLink certificate and site auth keys."""

from __future__ import annotations

import argparse

from fedadapt.deploy.certs import DEFAULT_SANS, generate


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fedadapt certs`` to the CLI."""
    p = sub.add_parser("certs", help="generate TLS certificates and SuperNode auth keys",
                       description="Write a CA (ca.pem), a SuperLink certificate "
                       "(superlink.pem/.key) and one SuperNode authentication key pair per "
                       "site (sites/NAME/auth.key, auth.pub) into DIR.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--sites", required=True, help="comma-separated site names, e.g. a,b,c")
    p.add_argument("--san", action="append", default=None,
                   help="subject alternative name of the SuperLink (repeatable; "
                   f"default: {', '.join(DEFAULT_SANS)})")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.set_defaults(func=_certs)


def _certs(args: argparse.Namespace) -> int:
    sites = tuple(s.strip() for s in args.sites.split(",") if s.strip())
    paths = generate(args.dir, sites, tuple(args.san) if args.san else DEFAULT_SANS,
                     args.days)
    print(f"CA: {paths.ca_cert}\nSuperLink: {paths.server_cert} {paths.server_key}")
    for site, (priv, pub) in paths.site_keys.items():
        print(f"site {site}: {priv} (register {pub} with `flwr supernode register`)")
    return 0
