"""Server checkpoints: what a crashed server needs to continue a run where it stopped.

After every round the server writes ``<run dir>/checkpoint.pt`` atomically (temporary
file, fsync, rename, fsync of the folder): a crash leaves either the previous checkpoint
or the new one, never half of one. It writes it twice a round: once the round's updates
are aggregated (``extra[EVALUATED]`` False: the sites have spent their budget for it, so
a crash during its evaluation must not train it again; a resume only re-runs the
evaluation) and once it is evaluated. It holds

* the run config (a resumed run must use the same one),
* the last completed round and the global adapter arrays after it,
* the strategy's state: FedOpt's moments ``m_t`` / ``v_t`` (Reddi et al., "Adaptive
  Federated Optimization", ICLR 2021), the site-level DP accountant's history and noise
  generator (McMahan et al., "Learning Differentially Private Recurrent Language
  Models", ICLR 2018), SCAFFOLD's control variates (by site name, so a resumed run's sites keep
  theirs under new node ids),
  exact-aggregation residuals and validation rejections,
* the :class:`server.record.RunLog` so far (rounds, sites, refusals, wire tensors),
* the sites whose budget is spent, by site name (node ids change across restarts),
* ``extra``: a free dict for other server state: continual-learning phases, whether
  the round was evaluated (:data:`EVALUATED`), and the site name of each node id that
  replied (:data:`NODE_SITES`), so that a resumed run does not ask again a site whose
  budget is spent.

It is a ``torch.save`` of plain containers and tensors, read back with
``torch.load(weights_only=True)``: loading a checkpoint never runs pickled code.
The sites' ledgers are not in it: they stay with the sites, so the rounds a checkpoint
has completed are already in them and a resumed run never asks for them again.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedadapt import atomic
from fedadapt.config import RunConfig
from fedadapt.layout import CHECKPOINT
from fedadapt.server.record import RoundLog, RunLog

FORMAT = "fedadapt.checkpoint/1"
FILENAME = CHECKPOINT
# Keys a resumed run may change: where it resumes from, and how many rounds it runs in all.
RESUMABLE_KEYS = ("resume-from", "num-server-rounds")
# Keys of ``extra`` the round loop writes (server/app.py).
EVALUATED = "evaluated"  # False: written after aggregation, before the round's evaluation
NODE_SITES = "node_sites"  # {node id: site name} of every site that replied


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to another run config."""


@dataclasses.dataclass
class Checkpoint:
    """A server's state after round ``round`` of the run ``config``."""

    config: dict[str, Any]
    round: int
    arrays: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    log: RunLog
    spent_sites: list[str]
    started: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    """``<run_dir>/checkpoint.pt``."""
    return Path(run_dir) / FILENAME


def _chain(strategy: Any) -> list[Any]:
    """The strategy and every strategy it wraps (Validated → SiteLevelDP → inner)."""
    out = []
    while strategy is not None and all(strategy is not s for s in out):
        out.append(strategy)
        strategy = vars(strategy).get("inner")
    return out


def _np_dict(d: Mapping[str, Any] | None) -> dict[str, torch.Tensor] | None:
    return None if d is None else {k: torch.from_numpy(np.array(v)) for k, v in d.items()}


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The state of ``strategy`` (and of the strategies it wraps) a resume needs."""
    state: dict[str, Any] = {}
    for s in _chain(strategy):
        own = vars(s)
        name = type(s).__name__
        st: dict[str, Any] = {}
        for attr in ("m_t", "v_t"):  # FedOpt family (FedAdam, FedYogi, FedAdagrad)
            if attr in own:
                st[attr] = _np_dict(own[attr])
        if "residuals" in own:  # AdapterAggregation
            st["residuals"] = {int(k): float(v) for k, v in own["residuals"].items()}
        if "rejected" in own:  # Validated
            st["rejected"] = {int(k): list(v) for k, v in own["rejected"].items()}
        if "site_c" in own:  # Scaffold: the control variates (site → c_i) and weights
            st["c"] = dict(own["c"])
            st["site_c"] = {str(k): dict(v) for k, v in own["site_c"].items()}
            st["site_n"] = {str(k): float(v) for k, v in own["site_n"].items()}
            st["node_site"] = {int(k): str(v) for k, v in own["node_site"].items()}
            st["skipped"] = {int(k): list(v) for k, v in own["skipped"].items()}
        if "history" in own and "_gen" in own:  # SiteLevelDP
            st["history"] = [[m.noise_multiplier, m.sample_rate, m.steps] for m in own["history"]]
            st["norms"] = {int(k): dict(v) for k, v in own["norms"].items()}
            st["generator"] = own["_gen"].get_state()
        state[name] = st
    return state


def restore_strategy(strategy: Any, state: Mapping[str, Any]) -> None:
    """Put ``state`` (from :func:`strategy_state`) back into a freshly built ``strategy``.

    Raises:
        CheckpointError: If the strategy chain differs from the checkpoint's.
    """
    chain = _chain(strategy)
    names = [type(s).__name__ for s in chain]
    if sorted(names) != sorted(state):
        raise CheckpointError(f"the checkpoint holds the state of strategies {sorted(state)} "
                              f"but this run builds {sorted(names)}; resume with the run "
                              "config stored in the checkpoint")
    for s in chain:
        st = state[type(s).__name__]
        for attr in ("m_t", "v_t"):
            if attr in st:
                setattr(s, attr, None if st[attr] is None else
                        {k: t.numpy() for k, t in st[attr].items()})
        if "residuals" in st:
            s.residuals = dict(st["residuals"])
        if "rejected" in st:
            s.rejected = {k: list(v) for k, v in st["rejected"].items()}
        if "site_c" in st:
            s.c = dict(st["c"])
            s.site_c = {str(k): dict(v) for k, v in st["site_c"].items()}
            s.site_n = {str(k): float(v) for k, v in st["site_n"].items()}
            s.node_site = {int(k): str(v) for k, v in st["node_site"].items()}
            s.skipped = {int(k): list(v) for k, v in st["skipped"].items()}
        if "history" in st:
            from fedadapt.privacy.accounting import Mechanism

            s.history = [Mechanism(float(z), float(q), int(n)) for z, q, n in st["history"]]
            s.norms = {k: dict(v) for k, v in st["norms"].items()}
            s._gen.set_state(st["generator"])


def _log_state(log: RunLog) -> dict[str, Any]:
    return {"rounds": [dataclasses.asdict(r) for r in log.rounds],
            "wire_tensors": sorted(log.wire_tensors), "sites": log.sites, "drift": log.drift}


def _spent(log: RunLog) -> list[str]:
    return sorted({r["site"] for rl in log.rounds for r in rl.refusals if r["budget_spent"]})


def save_checkpoint(run_dir: Path, cfg: RunConfig, rnd: int, arrays: ArrayRecord,
                    strategy: Any, log: RunLog, *, started: float,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write the checkpoint after round ``rnd`` atomically and return its path.

    Args:
        run_dir: The run directory.
        cfg: The run config.
        rnd: The round just completed.
        arrays: The global adapter arrays after ``rnd``.
        strategy: The (wrapped) strategy, whose state is saved.
        log: The run log so far.
        started: When the run started (``time.time()``).
        extra: Other server state (plain containers and tensors), e.g. continual phases.
    """
    payload = {"format": FORMAT, "written": time.time(),
               "config": {k: v for k, v in cfg.to_mapping().items() if k != "resume-from"},
               "round": int(rnd), "arrays": arrays.to_torch_state_dict(),
               "strategy": strategy_state(strategy), "log": _log_state(log),
               "spent_sites": _spent(log), "started": float(started),
               "extra": dict(extra or {})}
    return atomic.write_torch(checkpoint_path(run_dir), payload)


def load_checkpoint(run_dir: str | os.PathLike[str]) -> Checkpoint:
    """Read and validate ``<run_dir>/checkpoint.pt``.

    Raises:
        CheckpointError: If it is missing, unreadable, of another format, or incomplete.
    """
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: expected the run directory of a run "
                              "that completed at least one round (it writes checkpoint.pt "
                              "after each round)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fedadapt checkpoint "
                              f"({type(e).__name__}: {e}); restore it from a backup or "
                              "start a new run") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"checkpoint {path} has format {found!r}, expected {FORMAT!r}")
    missing = sorted({"config", "round", "arrays", "strategy", "log", "spent_sites",
                      "started", "extra"} - set(raw))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is incomplete")
    rnd = raw["round"]
    if not isinstance(rnd, int) or rnd < 1:
        raise CheckpointError(f"checkpoint {path} has round {rnd!r}, expected an integer >= 1")
    if not raw["arrays"] or not all(isinstance(t, torch.Tensor) for t in raw["arrays"].values()):
        raise CheckpointError(f"checkpoint {path} holds no adapter tensors")
    lg = raw["log"]
    log = RunLog(rounds=[RoundLog(**r) for r in lg["rounds"]],
                 wire_tensors=set(lg["wire_tensors"]), sites=dict(lg["sites"]),
                 drift=dict(lg.get("drift", {})))  # a checkpoint of an earlier version: none
    if [r.round for r in log.rounds] != list(range(1, rnd + 1)):
        raise CheckpointError(f"checkpoint {path} says round {rnd} but logs rounds "
                              f"{[r.round for r in log.rounds]}")
    return Checkpoint(config=dict(raw["config"]), round=rnd, arrays=dict(raw["arrays"]),
                      strategy=dict(raw["strategy"]), log=log,
                      spent_sites=list(raw["spent_sites"]), started=float(raw["started"]),
                      extra=dict(raw["extra"]))


def check_config(ck: Checkpoint, cfg: RunConfig, where: Path) -> None:
    """Raise unless ``cfg`` is the checkpoint's run config (but for :data:`RESUMABLE_KEYS`).

    Raises:
        CheckpointError: Listing every key that differs, with both values.
    """
    now = cfg.to_mapping()
    diff = [f"{k}: checkpoint {ck.config.get(k)!r}, now {now.get(k)!r}"
            for k in sorted(set(ck.config) | set(now))
            if k not in RESUMABLE_KEYS and ck.config.get(k) != now.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {checkpoint_path(where)} was written by another "
                              "run config:\n  " + "\n  ".join(diff) +
                              "\nresume with the config stored in the checkpoint")
    if cfg.num_server_rounds < ck.round:
        raise CheckpointError(f"num-server-rounds={cfg.num_server_rounds} but the checkpoint "
                              f"{checkpoint_path(where)} has already completed round {ck.round}")


def spent_node_ids(ck: Checkpoint) -> set[int]:
    """Node ids (as last seen, :data:`NODE_SITES`) of the sites whose budget is spent.

    Flower 1.41 keys a registered SuperNode's id by its authentication key, so a site
    that restarts keeps its id and a resumed run does not ask it again; a site that comes
    back with another key is asked once, and refuses (its ledger, not this, is binding).
    """
    spent = set(ck.spent_sites)
    return {int(n) for n, site in ck.extra.get(NODE_SITES, {}).items() if site in spent}


def resume(cfg: RunConfig, strategy: Any, log: RunLog) -> tuple[ArrayRecord, int, Checkpoint]:
    """Load ``cfg.resume_from``'s checkpoint into ``strategy`` and ``log``.

    Returns:
        ``(arrays, first round to run, checkpoint)``.

    Raises:
        CheckpointError: If the checkpoint is missing, corrupt or of another run config.
    """
    where = Path(cfg.resume_from)
    ck = load_checkpoint(where)
    check_config(ck, cfg, where)
    restore_strategy(strategy, ck.strategy)
    log.rounds[:] = ck.log.rounds
    log.wire_tensors |= ck.log.wire_tensors
    log.sites.update(ck.log.sites)
    return ArrayRecord(ck.arrays), ck.round + 1, ck
