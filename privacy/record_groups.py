"""Per-record accounting over a site's ledgers: each record's ε is the composition of
the rounds whose manifest contained it.

A site's ledger folder holds format-1 ledgers (no manifest: a round on *some* records
of the site, which ones is unknown) and format-2 ledgers (``privacy.record_budget``: each
entry names the manifest of records it may have touched). The rule for format 1 is the
conservative one: **an entry without a manifest counts against every record of every
dataset at the site**, so no ε spent before the upgrade is lost.

Records touched by exactly the same entries have the same ε, so they are grouped
("record groups", keyed by the tuple of entry indices); a check costs one accountant
call per group (O(entries × groups)), not one per record.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.ledger import LedgerError, mechanism, read_entries
from fedadapt.privacy.manifests import ManifestStore


@dataclass(frozen=True)
class Touch:
    """One accounted round as the per-record accountant sees it.

    Attributes:
        mechanism: The recorded DP-SGD mechanism (σ, q, steps).
        records: The record ids it may have touched; None for a format-1 entry (every
            record of the site).
        entry: The ledger entry.
        ledger: The ledger file holding it.
    """

    mechanism: Mechanism
    records: frozenset[str] | None
    entry: dict
    ledger: Path

    @property
    def legacy(self) -> bool:
        return self.records is None


@dataclass(frozen=True)
class RecordGroup:
    """Records touched by the same entries.

    Attributes:
        entries: Indices (into the history) of the entries that touched them.
        n_records: How many records.
        example: One record id of the group (for reports).
    """

    entries: tuple[int, ...]
    n_records: int
    example: str


def ledger_files(ledger_dir: str | Path) -> list[Path]:
    """Every ledger of a site's ledger folder (``*.jsonl``), sorted by name."""
    folder = Path(ledger_dir)
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def site_history(ledger_dir: str | Path, store: ManifestStore | None = None) -> list[Touch]:
    """Read and verify every ledger of the folder: format-1 entries first (file order),
    then format-2 entries in their site-wide order (``seq``).

    Raises:
        LedgerError: On any corrupt ledger, a missing or altered manifest, or a manifest
            whose size disagrees with its entry's ``n_records`` (fail closed).
    """
    store = store or ManifestStore(Path(ledger_dir))
    legacy: list[Touch] = []
    current: list[Touch] = []
    for path in ledger_files(ledger_dir):
        for i, e in enumerate(read_entries(path), start=1):
            try:
                mech = mechanism(e)
            except (ValueError, TypeError) as exc:
                raise LedgerError(f"ledger {path}: invalid mechanism ({exc})", line=i) from exc
            if "v" not in e:
                legacy.append(Touch(mech, None, e, path))
                continue
            records = store.get(str(e["manifest"]))
            if len(records) != e["n_records"]:
                raise LedgerError(f"ledger {path}: entry names manifest {e['manifest']} of "
                                  f"{len(records)} records but records n_records="
                                  f"{e['n_records']}", line=i)
            current.append(Touch(mech, records, e, path))
    current.sort(key=lambda t: (int(t.entry["seq"]), t.entry["time"]))
    return legacy + current


def record_groups(records: Iterable[str], history: Sequence[Touch]) -> list[RecordGroup]:
    """Group ``records`` by the set of history entries that touched them."""
    wanted = set(records)
    touched: dict[str, list[int]] = {r: [] for r in wanted}
    for i, t in enumerate(history):
        hits = wanted if t.records is None else (
            t.records & wanted if len(t.records) < len(wanted) else wanted & t.records)
        for r in hits:
            touched[r].append(i)
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for r, idx in touched.items():
        groups[tuple(idx)].append(r)
    return [RecordGroup(k, len(v), min(v)) for k, v in sorted(groups.items())]


def group_epsilons(groups: Sequence[RecordGroup], history: Sequence[Touch],
                   extra: Sequence[Mechanism] = (), *, delta: float,
                   accountant: str) -> list[float]:
    """ε of each group: its entries' mechanisms (plus ``extra``, e.g. the round asked
    for) composed with the policy's accountant at ``delta``."""
    return [epsilon([*(history[i].mechanism for i in g.entries), *extra], delta=delta,
                    accountant=accountant) for g in groups]
