"""Independent audit of privacy ledgers.

Verifies each ledger's hash chain, recomputes ε after every entry from the recorded
mechanisms (never trusting the stored ε), and checks the site's cap when a
``policy.toml`` sits next to the ledger directory (``<site>/policy.toml`` for
``<site>/ledger/*.jsonl``). A format-1 ledger (no manifests) is audited alone, as
before; a format-2 ledger is audited per record (``privacy.audit_records``): ε per
record group over every ledger of the site's folder, the cap checked per record, and an
unreadable or altered manifest fails the audit.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from fedadapt import atomic
from fedadapt.layout import policy_path, site_of_ledger
from fedadapt.privacy.accounting import epsilon
from fedadapt.privacy.audit_records import audit_records
from fedadapt.privacy.ledger import LedgerError, mechanism, read_entries

REL_TOL = 1e-6


@dataclass(frozen=True)
class SiteAudit:
    """Audit result for one ledger."""

    ledger: str
    ok: bool
    error: str
    bad_line: int | None
    rounds: int
    runs: int
    eps_spent: float
    cap: float | None
    remaining: float | None
    delta: float | None
    accountant: str | None
    eps_by_entry: tuple[float, ...]
    format: int = 1
    groups: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def _cap_for(path: Path) -> float | None:
    policy = policy_path(site_of_ledger(path))
    if not policy.is_file():
        return None
    with policy.open("rb") as fh:
        cap = tomllib.load(fh).get("epsilon_cap")
    return float(cap) if cap is not None else None


def audit_ledger(path: str | Path) -> SiteAudit:
    """Audit one ledger file; never raises on a bad ledger, reports it instead."""
    path = Path(path)
    cap = None
    try:
        cap = _cap_for(path)
    except (OSError, tomllib.TOMLDecodeError, ValueError):
        cap = None
    eps_list: list[float] = []

    def result(ok: bool, error: str = "", line: int | None = None, entries=(),
               eps=None, groups=(), fmt: int = 1) -> SiteAudit:
        eps = eps_list if eps is None else eps
        spent = max((g["epsilon"] for g in groups), default=eps[-1] if eps else 0.0)
        return SiteAudit(
            str(path), ok, error, line, len(entries), len({e["run_id"] for e in entries}),
            spent, cap, None if cap is None else cap - spent,
            entries[0]["delta"] if entries else None,
            entries[0]["accountant"] if entries else None, tuple(eps), fmt, tuple(groups))

    try:
        entries = read_entries(path)
    except LedgerError as err:
        return result(False, str(err), err.line)
    if not path.exists():
        return result(False, f"ledger {path} not found")
    if any("v" in e for e in entries):
        return audit_records(path, cap, lambda *a: result(*a, fmt=2))  # type: ignore[return-value]
    history = []
    for i, e in enumerate(entries, start=1):
        if e["delta"] != entries[0]["delta"] or e["accountant"] != entries[0]["accountant"]:
            return result(False, f"line {i}: delta/accountant differ from line 1", i,
                          entries[:i - 1])
        try:
            history.append(mechanism(e))
        except (ValueError, TypeError) as exc:
            return result(False, f"line {i}: invalid mechanism ({exc})", i, entries[:i - 1])
        eps = epsilon(history, delta=e["delta"], accountant=e["accountant"])
        eps_list.append(eps)
        if not math.isclose(eps, float(e["epsilon"]), rel_tol=REL_TOL, abs_tol=1e-9):
            return result(False, f"line {i}: stored epsilon {e['epsilon']} disagrees with "
                          f"recomputed {eps}", i, entries[:i])
        if cap is not None and eps > cap:
            return result(False, f"line {i}: epsilon {eps:.4g} exceeds the site's cap {cap}",
                          i, entries[:i])
    return result(True, "", None, entries)


def format_table(audits: list[SiteAudit]) -> str:
    """Human-readable per-ledger table."""
    head = f"{'ledger':40} {'rounds':>6} {'runs':>4} {'eps':>8} {'cap':>8} {'remain':>8} " \
           f"{'delta':>9} {'acct':>4}  status"
    rows = [head]
    for a in audits:
        def f(x):
            return "-" if x is None else f"{x:.4g}"
        rows.append(f"{Path(a.ledger).name[:40]:40} {a.rounds:>6} {a.runs:>4} "
                    f"{a.eps_spent:>8.4g} {f(a.cap):>8} {f(a.remaining):>8} {f(a.delta):>9} "
                    f"{a.accountant or '-':>4}  {'ok' if a.ok else 'FAIL: ' + a.error}")
        for g in a.groups:  # format 2: one line per record group
            rows.append(f"  record group: {g['n_records']} record(s) (e.g. "
                        f"{g['example_record'][:24]}), {g['entries']} entries "
                        f"({g['legacy_entries']} without manifest), eps {g['epsilon']:.4g}")
    return "\n".join(rows)


def plot(audits: list[SiteAudit], out: str | Path) -> None:
    """ε over ledger entries, one line per ledger (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for a in audits:
        ax.plot(range(1, len(a.eps_by_entry) + 1), a.eps_by_entry, marker="o",
                label=Path(a.ledger).parent.parent.name or Path(a.ledger).stem)
        if a.cap is not None:
            ax.axhline(a.cap, linestyle="--", linewidth=0.8)
    ax.set_xlabel("ledger entry (round trained)")
    ax.set_ylabel("record-level epsilon")
    ax.legend()
    fig.tight_layout()
    atomic.write_figure(out, fig)
    plt.close(fig)
