"""Check every simulated site's data and policy before the federation starts.

Without this, a site whose datalist is missing, whose labels are out of range or whose
split is empty raises inside the running ClientApp every round while the run goes on.
:func:`preflight` reads each site's data as its ClientApp would (the same
:class:`client.site.Site`), checks its privacy policy (with the real record count, so
δ ≤ 1/(10·N) is checked too) and its ledgers' hash chains, and raises :class:`PreflightError` (exit code 2 from the CLI) listing every
problem, each naming the site, the file, the key, what was expected and what was found.

A DP request below a valid policy's noise floor is not an error here: refusing it is the
site's decision, made and reported per round (``privacy.guard``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from fedadapt import keys
from fedadapt.config import ConfigError, RunConfig


class PreflightError(ConfigError):
    """A site's data or policy is unusable; the message lists every problem found."""


def preflight(cfg: RunConfig, sites_dir: Path) -> dict[str, int]:
    """Check each site's data and policy; return the training records per site.

    Args:
        cfg: The run config (its sites, task, image size, DP request).
        sites_dir: Folder of the simulated sites' ``<name>/policy.toml`` and ledgers.

    Raises:
        PreflightError: Listing every problem of every site.
    """
    from fedadapt.client.site import site_from_context

    overrides = cfg.to_mapping()
    problems: list[str] = []
    records: dict[str, int] = {}
    for i in range(cfg.num_sites):
        site = site_from_context(overrides, {keys.NODE_PARTITION_ID: i,
                                             keys.NODE_NUM_PARTITIONS: cfg.num_sites})
        found, n = _site_data_problems(site, cfg)
        problems += [f"site {site.name}: {p}" for p in found]
        if n:
            records[site.name] = n
            problems += [f"site {site.name}: {p}"
                         for p in _policy_problems(Path(sites_dir) / site.name, n)]
    if problems:
        raise PreflightError("the federation was not started; fix these first:\n  "
                             + "\n  ".join(problems))
    return records


def _site_data_problems(site: Any, cfg: RunConfig) -> tuple[list[str], int]:
    """``(problems, training records)`` of one site's data (records 0 on a problem)."""
    from fedadapt.imaging.datacheck import check_datalist
    from fedadapt.imaging.datalist import DataError

    sc = site.scenario
    entry = sc.sites[site.index] if sc is not None else None
    if entry is not None and entry.datalist is not None:
        assert entry.image is not None
        report = check_datalist(entry.datalist, entry.image)
        return list(report.problems), (report.sizes.get("training", 0) if report.ok else 0)
    try:  # generated or package-sourced data: build it as the ClientApp will
        train, test = site.datasets(0)
    except (DataError, ValueError, OSError) as e:
        return [str(e)], 0
    out = [f"split '{name}' is empty; expected at least 1 record"
           for name, ds in (("training", train), ("test", test)) if len(ds) == 0]
    return out, (len(train) if not out else 0)


def _policy_problems(folder: Path, n_records: int) -> list[str]:
    """Problems of a site's ``policy.toml`` (for ``n_records``) and of its ledgers."""
    from fedadapt.privacy.ledger import LedgerError, read_entries
    from fedadapt.privacy.policy import PolicyError, policy_from_dict

    path = folder / "policy.toml"
    try:
        policy_from_dict(tomllib.loads(path.read_text()), n_records=n_records)
    except FileNotFoundError:
        return [f"privacy policy {path} not found; a site refuses to train without one"]
    except (tomllib.TOMLDecodeError, PolicyError, TypeError) as e:
        return [f"privacy policy {path}: {e}"]
    out = []
    for ledger in sorted(folder.glob("**/*.jsonl")):
        try:
            read_entries(ledger)
        except LedgerError as e:
            out.append(f"ledger {ledger}: {e}")
    return out
