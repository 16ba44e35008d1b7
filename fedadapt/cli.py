"""The ``fedadapt`` command: subcommands that call into the packages.

Each subcommand lives in its own module ``fedadapt/cmd_<name>.py`` with a
``register(subparsers)`` function; add a module to ``COMMANDS`` to add a subcommand.
A subcommand's function returns the exit code; ``ConfigError``/``ValueError`` (bad
input) become exit code 2 with the message on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from fedadapt.config import ConfigError

COMMANDS = (
    "fedadapt.cmd_simulate",
    "fedadapt.cmd_audit",
    "fedadapt.cmd_report",
    "fedadapt.cmd_certs",
    "fedadapt.cmd_site",
    "fedadapt.cmd_server",
    "fedadapt.cmd_pretrain",
    "fedadapt.cmd_release",
    "fedadapt.cmd_tta",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedadapt", description="Federated, private, continual adaptation of medical "
        "imaging foundation models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedadapt`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, ValueError) as err:
        print(f"fedadapt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
