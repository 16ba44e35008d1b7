"""``fedadapt release``: a signed, verifiable release bundle of a finished run.

* ``fedadapt release RUN_DIR --out DIR --key KEY.pem [--sites-dir DIR]``: model card,
  PEFT adapter, provenance manifest and its Ed25519 signature (``server.release``); the
  key is generated (mode 0600, public half in ``KEY.pem.pub``) when it does not exist.
* ``fedadapt release keygen KEY.pem``: a new signing key.
* ``fedadapt release verify DIR [--ledgers PATH ...] [--public-key KEY.pub] [--json]``:
  recheck signature, every file hash, the base model and the ledgers' heads and ε
  (``server.release_verify``); exit 2 when anything fails, naming each altered file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping

from fedadapt import keys

USAGE = ("fedadapt release RUN_DIR --out DIR --key KEY.pem [--sites-dir DIR]\n"
         "       fedadapt release keygen KEY.pem\n"
         "       fedadapt release verify DIR [--ledgers PATH ...] [--public-key KEY.pub] [--json]")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("release", usage=USAGE, help="a signed release bundle of a run (model "
                       "card, PEFT adapter, provenance); keygen; verify",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("argv", nargs=argparse.REMAINDER, help="RUN_DIR ... | keygen ... | verify ...")
    p.set_defaults(func=run_release)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedadapt release", usage=USAGE.splitlines()[0])
    p.add_argument("run_dir", help="a finished run directory (summary.json, adapter/)")
    p.add_argument("--out", required=True, help="new folder for the bundle")
    p.add_argument("--key", required=True, help="Ed25519 private key PEM; created if absent")
    p.add_argument("--sites-dir", default=None, help="folder of the sites' folders holding "
                   "ledger/*.jsonl (default: the run config's sites-dir)")
    return p


def _keygen_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedadapt release keygen")
    p.add_argument("key", help="path of the new private key (public key: KEY.pub)")
    return p


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedadapt release verify")
    p.add_argument("bundle", help="the release folder")
    p.add_argument("--ledgers", nargs="+", default=[], metavar="PATH",
                   help="ledger .jsonl files or folders holding them (e.g. a sites dir)")
    p.add_argument("--public-key", default=None, help="the expected signer's public key PEM")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-rebuild-base", action="store_true",
                   help="skip rebuilding the base model from its spec")
    return p


def simulated_fingerprints(summary: Mapping, sites_dir: Path
                           ) -> tuple[dict[str, str], dict[str, str]]:
    """Full data fingerprints and declared dataset ids of the run's *simulated* sites,
    regenerated from the run config (their data is deterministic by seed); deployed and
    continual sites are left out (their data is at the site, or one site has several
    datasets)."""
    from fedadapt.client.budget import dataset_fingerprint
    from fedadapt.identity import identity_of
    from fedadapt.client.site import site_from_context
    from fedadapt.config import RunConfig
    from fedadapt.layout import SITE_TOML

    cfg = RunConfig.from_mapping(summary["config"])
    if cfg.is_continual:
        return {}, {}
    out, ids = {}, {}
    for name, info in summary["sites"].items():
        if (sites_dir / name / SITE_TOML).is_file() or "partition_id" not in info:
            continue
        site = site_from_context(summary["config"], {keys.NODE_PARTITION_ID: info["partition_id"],
                                                     keys.NODE_NUM_PARTITIONS: cfg.num_sites})
        if site.name == name:
            train = site.datasets()[0]
            out[name] = dataset_fingerprint(train)
            ids[name] = identity_of(train).dataset_id
    return out, ids


def _build(argv: list[str]) -> int:
    from fedadapt.config import RunConfig
    from fedadapt.server.release import _load_summary, build_release
    from fedadapt.server.signing import generate_key

    args = _build_parser().parse_args(argv)
    summary = _load_summary(Path(args.run_dir))
    cfg = RunConfig.from_mapping(summary["config"])
    sites_dir = Path(args.sites_dir or cfg.sites_dir or Path(args.run_dir) / "sites")
    if not Path(args.key).exists():
        generate_key(args.key)
        print(f"fedadapt release: generated signing key {args.key} (public: {args.key}.pub)")
    fingerprints, dataset_ids = simulated_fingerprints(summary, sites_dir)
    out = build_release(args.run_dir, args.out, key_path=args.key, sites_dir=sites_dir,
                        fingerprints=fingerprints, dataset_ids=dataset_ids)
    print(f"fedadapt release: wrote {out} (model card, adapter, provenance.json, "
          f"provenance.sig); check it with `fedadapt release verify {out} --public-key "
          f"{args.key}.pub --ledgers {sites_dir}`")
    return 0


def _verify(argv: list[str]) -> int:
    from fedadapt.server.release_verify import verify_release

    args = _verify_parser().parse_args(argv)
    report = verify_release(args.bundle, ledgers=args.ledgers, public_key=args.public_key,
                            rebuild_base=not args.no_rebuild_base)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.checked:
            print(f"ok    {line}")
        for line in report.problems:
            print(f"FAIL  {line}", file=sys.stderr)
        if not report.pinned and report.signer:
            print(f"note  signer not pinned: pass --public-key to check the signer is "
                  f"{report.signer}")
        print("release verified" if report.ok else f"release FAILED verification "
              f"({len(report.problems)} problem(s))")
    return 0 if report.ok else 2


def run_release(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if not argv:
        raise ValueError(f"nothing to do; usage:\n{USAGE}")
    if argv[0] == "keygen":
        from fedadapt.server.signing import generate_key

        path = generate_key(_keygen_parser().parse_args(argv[1:]).key)
        print(f"fedadapt release: wrote {path} (mode 0600) and {path}.pub")
        return 0
    if argv[0] == "verify":
        return _verify(argv[1:])
    return _build(argv)
