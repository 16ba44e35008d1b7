"""The server's side of a continual run: the accuracy matrix R from federated evaluation.

After the last round of every phase i, each site evaluates the global adapter on every
phase's test set it holds; ``R[i][j]`` is the accuracy on phase j's test sets (weighted
by their sizes across sites). Before the first round the same evaluation of the initial
model gives the baseline b for FWT. Metrics: ``continual.metrics`` (Lopez-Paz & Ranzato
2017; Chaudhry et al. 2018).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from safetensors.torch import load_file, save

from fedadapt.continual.report import continual_section, write_heatmap
from fedadapt import atomic, keys
from fedadapt.config import RunConfig
from fedadapt.messages import (EvaluateReply, FisherConfig, FisherReply, Refusal,
                               query_message, reply_state)

HEATMAP = "continual_R.png"
#: The server's running sum of the phases' DP Fishers (site-incremental ewc) after round
#: N, kept in the run directory (and named in the checkpoint) so ``--resume`` does not ask
#: (and charge) the sites again.
FISHER_FILE = "continual_fisher-r{}.safetensors"


def shares_fisher(cfg: RunConfig) -> bool:
    """Whether the run collects DP Fishers at phase ends (site-incremental ``ewc``)."""
    return cfg.scenario == "site-incremental" and cfg.continual == "ewc"


def collect_fisher(grid: Grid, arrays: ArrayRecord, *, cfg: RunConfig, rnd: int,
                   config: FisherConfig, encode: Callable[[list[Message]], list[Message]],
                   timeout: float) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Ask every node for a DP Fisher of the phase that ended at round ``rnd``.

    FedCurv-style (Shoham et al., 2019): each site of that phase computes the diagonal
    Fisher of the global adapter ``arrays`` on its own data under DP and records it in its
    ledger before replying; sites of other phases reply idle. The phase's Fisher is the
    record-weighted mean of the replies.

    Returns:
        The phase's Fisher (None if no site sent one) and a report of who sent what
        (``sites``: records and ε after the release; ``refused`` and ``failed``).
    """
    messages = [query_message(arrays, config, node_id=node, group_id=str(rnd))
                for node in grid.get_node_ids()]
    total: dict[str, torch.Tensor] = {}
    weight = 0
    report: dict[str, Any] = {"round": rnd, "phase": cfg.phase_of_round(rnd), "sites": {},
                              "refused": [], "failed": []}
    for reply in grid.send_and_receive(encode(messages), timeout=timeout):
        if reply.has_error() or not reply.has_content() or keys.STATUS not in reply.content:
            report["failed"].append({"node_id": reply.metadata.src_node_id, "reason": (
                f"{reply.error.code}: {reply.error.reason}" if reply.has_error()
                else "no content")})
            continue
        state = reply_state(reply)
        if state == keys.STATE_REFUSED:
            refusal = Refusal.from_message(reply)
            report["refused"].append({"site": refusal.site_id, "reason": refusal.reason})
        elif state == keys.STATE_OK:
            got = FisherReply.from_message(reply)
            n = got.num_examples
            for name, t in got.fisher.to_torch_state_dict().items():
                total[name] = total.get(name, 0) + n * t.float()
            weight += n
            report["sites"][got.site_id] = {"num_examples": n, "epsilon": got.epsilon,
                                            "epsilon_cap": got.epsilon_cap}
    if not weight:
        return None, report
    return {name: t / weight for name, t in total.items()}, report


def save_fisher(run_dir: Path, fisher: dict[str, torch.Tensor], rnd: int) -> str:
    """Write the running Fisher after round ``rnd`` atomically, before the checkpoint
    that names it; returns the file name."""
    name = FISHER_FILE.format(rnd)
    atomic.write_bytes(run_dir / name, save({n: t.contiguous() for n, t in fisher.items()}))
    return name


def phase_scores(replies: Iterable[Message], num_phases: int) -> list[float | None]:
    """Accuracy per phase, weighted by test-set size over the sites that reported it."""
    hits = [0.0] * num_phases
    sizes = [0] * num_phases
    for reply in replies:
        for p in EvaluateReply.phase_scores(reply, num_phases):
            hits[p.phase] += p.accuracy * p.num_examples
            sizes[p.phase] += p.num_examples
    return [h / n if n else None for h, n in zip(hits, sizes)]


class ContinualTracker:
    """Fills R row by row as phases end."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.baseline: list[float | None] | None = None
        self.rows: list[list[float | None]] = []
        self.fisher_reports: list[dict[str, Any]] = []  # site-incremental ewc
        self.fisher_file = ""  # the running Fisher's file in the run directory

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (so ``--resume`` continues R where it was)."""
        return {"baseline": self.baseline, "rows": self.rows, "fisher": self.fisher_reports,
                "fisher_file": self.fisher_file}

    def restore(self, state: dict[str, Any]) -> None:
        self.baseline = state.get("baseline")
        self.rows = [list(r) for r in state.get("rows", [])]
        self.fisher_reports = list(state.get("fisher", []))
        self.fisher_file = str(state.get("fisher_file", ""))

    def fisher(self, run_dir: Path) -> dict[str, torch.Tensor] | None:
        """The running Fisher named by the (restored) state, or None."""
        if not self.fisher_file:
            return None
        path = run_dir / self.fisher_file
        if not path.is_file():
            raise FileNotFoundError(f"the checkpoint names the EWC Fisher {path}, which is "
                                    "missing; restore it from a backup or start a new run")
        return load_file(str(path))

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
        if self.fisher_reports:
            out["fisher"] = self.fisher_reports
        return out
