"""Independent per-record ε for tests: reads ledger files and manifests as plain JSON and
composes with Opacus' RDP accountant directly (no fedadapt accounting code path)."""

from __future__ import annotations

import json
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

from opacus.accountants import RDPAccountant


def rdp_epsilon(mechs: list[tuple[float, float, int]], delta: float) -> float:
    """ε of the composition, from a fresh ``opacus.accountants.RDPAccountant``."""
    return _rdp(tuple(sorted(tuple(m) for m in mechs if m[2] > 0)), delta)


@lru_cache(maxsize=None)
def _rdp(mechs: tuple, delta: float) -> float:
    if not mechs:
        return 0.0
    acc = RDPAccountant()
    acc.history = list(mechs)
    return float(acc.get_epsilon(delta=delta))


def ledger_mechanisms_per_record(ledger_dir: Path) -> dict[str, list[tuple[float, float, int]]]:
    """record id -> mechanisms of every format-2 entry whose manifest names it."""
    out: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for path in sorted(Path(ledger_dir).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            ids = json.loads((Path(ledger_dir) / "manifests" / f"{e['manifest']}.json")
                             .read_text())
            for r in ids:
                out[r].append((e["noise_multiplier"], e["sample_rate"], e["steps"]))
    return out
