"""``fedadapt report RUN_DIR``: rebuild a run's ``report.html`` and plots from summary.json."""

from __future__ import annotations

import argparse
from pathlib import Path


def _report(args: argparse.Namespace) -> int:
    from fedadapt.report import build_report  # matplotlib only when this command runs

    path = build_report(Path(args.run_dir))
    print(f"report: {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fedadapt report`` to the CLI."""
    p = sub.add_parser("report", help="rebuild a run's report.html",
                       description="Rebuild RUN_DIR/report.html and its PNG plots from "
                       "RUN_DIR/summary.json.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding summary.json")
    p.set_defaults(func=_report)
