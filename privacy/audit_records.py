"""Audit of a format-2 ledger: ε per record group, the cap checked per record.

A format-2 entry's stored ε is the largest ε, after it, of the records its manifest
names, composed over every entry of the site's ledger folder that touched them at that
time: format-2 entries with a smaller or equal ``seq`` and format-1 entries written no
later (format-1 entries count against every record, ``privacy.record_groups``). The
audit recomputes that from the recorded mechanisms, then reports each record group of
the ledger's records with its ε over the whole folder, and fails when a group is over
the cap, a stored ε disagrees, ``seq`` repeats, or a manifest is missing or altered.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

from fedadapt.privacy.accounting import epsilon
from fedadapt.privacy.ledger import LedgerError
from fedadapt.privacy.record_groups import Touch, site_history

REL_TOL = 1e-6


class _Signatures:
    """Which format-2 entries touched each record, kept incrementally (one integer id
    per distinct set of entries), so the audit costs O(total manifest size) set work
    plus one accountant call per record group and entry, not O(entries² × records)."""

    def __init__(self) -> None:
        self.parent: list[tuple[int, int]] = [(-1, -1)]  # id 0: touched by nothing
        self.memo: dict[tuple[int, int], int] = {}
        self.of: dict[str, int] = {}

    def touch(self, records: frozenset[str], entry: int) -> None:
        for r in records:
            key = (self.of.get(r, 0), entry)
            if key not in self.memo:
                self.memo[key] = len(self.parent)
                self.parent.append(key)
            self.of[r] = self.memo[key]

    def entries(self, sig: int) -> list[int]:
        out = []
        while sig > 0:
            sig, entry = self.parent[sig]
            out.append(entry)
        return out[::-1]


def _eps(history: list[Touch], legacy: list[int], sig_entries: list[int], e: dict) -> float:
    return epsilon([history[j].mechanism for j in (*legacy, *sig_entries)],
                   delta=e["delta"], accountant=e["accountant"])


def _replay(history: list[Touch], own: set[int]) -> tuple[list[float], _Signatures]:
    """ε after each of the ledger's own entries (largest over its manifest's records)."""
    sigs, out = _Signatures(), []
    legacy = [j for j, t in enumerate(history) if t.legacy]
    for i, t in enumerate(history):
        if t.legacy:
            continue
        sigs.touch(t.records or frozenset(), i)
        if i in own:
            before = [j for j in legacy if history[j].entry["time"] <= t.entry["time"]]
            out.append(max(_eps(history, before, sigs.entries(s), t.entry)
                           for s in {sigs.of[r] for r in t.records or ()}))
    return out, sigs


def audit_records(path: Path, cap: float | None,
                  result: Callable[..., object]) -> object:
    """Audit the format-2 ledger ``path``; ``result(ok, error, line, entries, eps_list,
    groups)`` builds the report (``privacy.audit.SiteAudit``)."""
    try:
        history = site_history(path.parent)
    except LedgerError as err:
        return result(False, f"site ledgers of {path.parent}: {err}", err.line, [], [], ())
    own = [i for i, t in enumerate(history) if t.ledger.resolve() == path.resolve()]
    entries = [history[i].entry for i in own]
    seqs = [int(t.entry["seq"]) for t in history if not t.legacy]
    if len(set(seqs)) != len(seqs):
        return result(False, f"{path.parent}: a seq number repeats among the site's format-2 "
                      f"entries (written without the site lock?)", None, entries, [], ())
    if not entries:
        return result(False, f"ledger {path} has no entries", None, entries, [], ())
    bad = next((k for k, i in enumerate(own, start=1) if history[i].legacy), None)
    if bad is not None:
        return result(False, f"line {bad}: a format-1 entry inside a format-2 ledger", bad,
                      entries[:bad - 1], [], ())
    eps_list, sigs = _replay(history, set(own))
    for i, (e, eps) in enumerate(zip(entries, eps_list), start=1):
        if not math.isclose(eps, float(e["epsilon"]), rel_tol=REL_TOL, abs_tol=1e-9):
            return result(False, f"line {i}: stored epsilon {e['epsilon']} disagrees with "
                          f"recomputed {eps} (largest over the records of its manifest)", i,
                          entries[:i], eps_list[:i], ())
        if cap is not None and eps > cap:
            return result(False, f"line {i}: epsilon {eps:.4g} of some records exceeds the "
                          f"site's cap {cap}", i, entries[:i], eps_list[:i], ())
    report = _groups(history, own, sigs, entries)
    over = [r for r in report if cap is not None and r["epsilon"] > cap]
    if over:
        return result(False, f"{sum(r['n_records'] for r in over)} record(s) have epsilon up "
                      f"to {over[0]['epsilon']:.4g}, over the site's cap {cap}", None,
                      entries, eps_list, report)
    return result(True, "", None, entries, eps_list, report)


def _groups(history: list[Touch], own: list[int], sigs: _Signatures,
            entries: list[dict]) -> tuple[dict, ...]:
    """The record groups of the ledger's records over the whole folder, largest ε first
    (δ: the smallest of the ledger's entries; accountant: its last entry's)."""
    members: dict[int, list[str]] = defaultdict(list)
    for r in frozenset().union(*(history[i].records or () for i in own)):
        members[sigs.of[r]].append(r)
    legacy = [j for j, t in enumerate(history) if t.legacy]
    at = {"delta": min(e["delta"] for e in entries), "accountant": entries[-1]["accountant"]}
    rows = []
    for sig, recs in members.items():
        touched = sigs.entries(sig)
        rows.append({"n_records": len(recs), "entries": len(legacy) + len(touched),
                     "legacy_entries": len(legacy), "example_record": min(recs),
                     "epsilon": _eps(history, legacy, touched, at)})
    return tuple(sorted(rows, key=lambda r: (-r["epsilon"], r["example_record"])))
