"""The server's side of a continual run: the accuracy matrix R from federated evaluation.

After the last round of every phase i, each site evaluates the global adapter on every
phase's test set it holds; ``R[i][j]`` is the accuracy on phase j's test sets (weighted
by their sizes across sites). Before the first round the same evaluation of the initial
model gives the baseline b for FWT. Metrics: ``continual.metrics`` (Lopez-Paz & Ranzato
2017; Chaudhry et al. 2018).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from flwr.app import Message

from continual.report import continual_section, write_heatmap
from fedadapt import keys
from fedadapt.config import RunConfig

HEATMAP = "continual_R.png"


def phase_scores(replies: Iterable[Message], num_phases: int) -> list[float | None]:
    """Accuracy per phase, weighted by test-set size over the sites that reported it."""
    hits = [0.0] * num_phases
    sizes = [0] * num_phases
    for reply in replies:
        m = reply.content[keys.METRICS]
        for j in range(num_phases):
            key = keys.EVAL_ACC_PHASE.format(j)
            if key in m:
                n = int(m[keys.NUM_EXAMPLES_PHASE.format(j)])
                hits[j] += float(m[key]) * n
                sizes[j] += n
    return [h / n if n else None for h, n in zip(hits, sizes)]


class ContinualTracker:
    """Fills R row by row as phases end."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.baseline: list[float | None] | None = None
        self.rows: list[list[float | None]] = []

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (so ``--resume`` continues R where it was)."""
        return {"baseline": self.baseline, "rows": self.rows}

    def restore(self, state: dict[str, Any]) -> None:
        self.baseline = state.get("baseline")
        self.rows = [list(r) for r in state.get("rows", [])]

    def phase_ends(self, rnd: int) -> bool:
        return rnd % self.cfg.rounds_per_phase == 0

    def evaluated(self, rnd: int, replies: list[Message]) -> None:
        """Take an evaluation: round 0 is the baseline, a phase's last round a row of R."""
        scores = phase_scores(replies, self.cfg.phases)
        if rnd == 0:
            self.baseline = scores
        elif self.phase_ends(rnd):
            self.rows.append(scores)

    def section(self, run_dir: Path) -> dict[str, Any] | None:
        """The ``continual`` block of ``summary.json`` (and the R heatmap PNG)."""
        if len(self.rows) < 2 or any(v is None for row in self.rows for v in row):
            return {"method": self.cfg.continual, "scenario": self.cfg.scenario,
                    "R": self.rows, "error": "R is incomplete (a phase had no evaluation)"}
        base = self.baseline if self.baseline and None not in self.baseline else None
        out = continual_section(self.rows, method=self.cfg.continual,
                                scenario=self.cfg.scenario, baseline=base)
        write_heatmap(self.rows, run_dir / HEATMAP,
                      title=f"{self.cfg.scenario}, {self.cfg.continual}")
        out["heatmap"] = HEATMAP
        out["baseline"] = self.baseline
        return out
