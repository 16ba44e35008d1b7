"""``fedadapt audit LEDGER...``: verify privacy ledgers and recompute ε independently."""

from __future__ import annotations

import argparse
import json

from privacy.audit import audit_ledger, format_table, plot


def build_audit_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Create the ``audit`` parser (other modules may add flags to it)."""
    p = sub.add_parser("audit", help="verify privacy ledgers (hash chain, epsilon, caps)")
    p.add_argument("ledgers", nargs="+", metavar="LEDGER", help="ledger .jsonl files")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="plot epsilon over rounds per ledger")
    p.set_defaults(func=run_audit)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    build_audit_parser(sub)


def run_audit(args: argparse.Namespace) -> int:
    audits = [audit_ledger(path) for path in args.ledgers]
    if args.json:
        print(json.dumps([a.to_dict() for a in audits], indent=2))
    else:
        print(format_table(audits))
    if args.plot:
        plot(audits, args.plot)
    return 0 if all(a.ok for a in audits) else 1
