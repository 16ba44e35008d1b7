"""``fedadapt audit``: verify privacy ledgers, or audit a site's training path empirically.

* ``fedadapt audit LEDGER...``: verify hash chains and recompute ε independently.
* ``fedadapt audit --empirical [--run-config K=V ...] [--site-dir DIR]``: one-run canary
  audit (``fedadapt.cmd_audit_empirical``), ε_lower vs ε_claimed.

Both take ``--json`` and ``--plot FILE.png``; both exit 1 when the audit fails.
"""

from __future__ import annotations

import argparse
import json

from fedadapt.cmd_audit_empirical import EMPIRICAL_ONLY, add_empirical_args, run_empirical
from fedadapt.privacy.audit import audit_ledger, format_table, plot


def build_audit_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Create the ``audit`` parser (other modules may add flags to it)."""
    p = sub.add_parser("audit", help="verify privacy ledgers (hash chain, epsilon, caps), or "
                       "--empirical: audit a site's DP training path with canaries",
                       description="Verify privacy ledgers, or with --empirical run a "
                       "one-run canary audit of a site's real training path and compare "
                       "the empirical lower bound on epsilon with the claimed epsilon.")
    p.add_argument("ledgers", nargs="*", metavar="LEDGER", help="ledger .jsonl files")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="plot epsilon over rounds per ledger; with --empirical: "
                   "histogram of included vs excluded canary scores")
    add_empirical_args(p)
    p.set_defaults(func=run_audit)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    build_audit_parser(sub)


def run_audit(args: argparse.Namespace) -> int:
    """Dispatch: ledgers or ``--empirical``; mixing them is an error."""
    given = [f"--{k.replace('_', '-')}" for k in EMPIRICAL_ONLY if getattr(args, k) is not None]
    if args.empirical:
        if args.ledgers:
            raise ValueError(f"--empirical audits a site's training path and reads no ledgers, "
                             f"but ledgers were given ({args.ledgers[0]}...); run "
                             f"`fedadapt audit LEDGER...` separately")
        return run_empirical(args)
    if given:
        raise ValueError(f"{', '.join(given)}: option(s) of the empirical audit only; add "
                         f"--empirical, or drop them to verify ledgers")
    if not args.ledgers:
        raise ValueError("nothing to audit: give ledger .jsonl files (fedadapt audit "
                         "LEDGER...) or --empirical to audit a site's training path")
    audits = [audit_ledger(path) for path in args.ledgers]
    if args.json:
        print(json.dumps([a.to_dict() for a in audits], indent=2))
    else:
        print(format_table(audits))
    if args.plot:
        plot(audits, args.plot)
    return 0 if all(a.ok for a in audits) else 1
