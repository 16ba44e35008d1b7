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
from pathlib import Path
from typing import Callable

from fedadapt.privacy.ledger import LedgerError
from fedadapt.privacy.record_groups import Touch, group_epsilons, record_groups, site_history

REL_TOL = 1e-6


def _state(history: list[Touch], at: Touch) -> list[Touch]:
    """The entries that had been recorded when ``at`` was (``at`` included)."""
    return [t for t in history if (t.entry["time"] <= at.entry["time"] if t.legacy
                                   else int(t.entry["seq"]) <= int(at.entry["seq"]))]


def audit_records(path: Path, cap: float | None,
                  result: Callable[..., object]) -> object:
    """Audit the format-2 ledger ``path``; ``result(ok, error, line, entries, eps_list,
    groups)`` builds the report (``privacy.audit.SiteAudit``)."""
    eps_list: list[float] = []
    try:
        history = site_history(path.parent)
    except LedgerError as err:
        return result(False, f"site ledgers of {path.parent}: {err}", err.line, [], eps_list, ())
    own = [t for t in history if t.ledger.resolve() == path.resolve()]
    entries = [t.entry for t in own]
    seqs = [int(t.entry["seq"]) for t in history if not t.legacy]
    if len(set(seqs)) != len(seqs):
        return result(False, f"{path.parent}: a seq number repeats among the site's format-2 "
                      f"entries (written without the site lock?)", None, entries, eps_list, ())
    for i, t in enumerate(own, start=1):
        e = t.entry
        if t.legacy:
            return result(False, f"line {i}: a format-1 entry inside a format-2 ledger", i,
                          entries[:i - 1], eps_list, ())
        state = _state(history, t)
        groups = record_groups(t.records or (), state)
        eps = max(group_epsilons(groups, state, delta=e["delta"], accountant=e["accountant"]))
        eps_list.append(eps)
        if not math.isclose(eps, float(e["epsilon"]), rel_tol=REL_TOL, abs_tol=1e-9):
            return result(False, f"line {i}: stored epsilon {e['epsilon']} disagrees with "
                          f"recomputed {eps} (largest over the records of its manifest)", i,
                          entries[:i], eps_list, ())
        if cap is not None and eps > cap:
            return result(False, f"line {i}: epsilon {eps:.4g} of some records exceeds the "
                          f"site's cap {cap}", i, entries[:i], eps_list, ())
    records = frozenset().union(*(t.records or () for t in own))
    groups = record_groups(records, history)
    delta = min((e["delta"] for e in entries), default=None)
    if delta is None:
        return result(False, f"ledger {path} has no entries", None, entries, eps_list, ())
    eps_g = group_epsilons(groups, history, delta=delta, accountant=entries[-1]["accountant"])
    report = tuple({"n_records": g.n_records, "entries": len(g.entries),
                    "legacy_entries": sum(history[j].legacy for j in g.entries),
                    "example_record": g.example, "epsilon": eps}
                   for g, eps in sorted(zip(groups, eps_g), key=lambda p: -p[1]))
    over = [r for r in report if cap is not None and r["epsilon"] > cap]
    if over:
        return result(False, f"{sum(r['n_records'] for r in over)} record(s) have epsilon up "
                      f"to {over[0]['epsilon']:.4g}, over the site's cap {cap}", None,
                      entries, eps_list, report)
    return result(True, "", None, entries, eps_list, report)
