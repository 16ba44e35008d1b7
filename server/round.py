"""One federated round as named steps: configure, exchange, validate + aggregate, evaluate,
record, checkpoint.

The loop of Flower's ``Strategy.start`` (configure → send/receive → aggregate, for
training then evaluation), kept here so the server can record every site's reply, sent
bytes and tensor names, and write the run directory as it goes. What does not change in
a run is a :class:`Federation`; what the rounds change is a :class:`RoundState`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model, trainable_state
from fedadapt.messages import (EvaluateConfig, FisherConfig, TrainConfig, attach_fisher,
                               reply_state)
from fedadapt.server.checkpoint import EVALUATED, NODE_SITES, resume, save_checkpoint, spent_node_ids
from fedadapt.server.continual import ContinualTracker, collect_fisher, save_fisher, shares_fisher
from fedadapt.server.exchange import exchange, go_on_without_dead_sites
from fedadapt.server.progress import Progress
from fedadapt.server.record import RoundLog, RunLog
from fedadapt.server.rundir import run_key
from fedadapt.server import secagg
from fedadapt.privacy.distributed_dp import SkellamAccountant
from fedadapt.privacy.secagg import SecAggError
from fedadapt.server.tracking import track_round
from fedadapt.strategies.factory import build_strategy, freezes_lora_a
from fedadapt.strategies.lora_math import LORA_A
from fedadapt.strategies.wire import decode, encode, encode_messages, format_problem
from fedadapt.imaging.run_spec import run_model_spec


@dataclass(frozen=True)
class Federation:
    """What stays fixed during a run.

    Attributes:
        grid: Flower's Grid (simulation or deployment).
        cfg: The run config.
        run_dir: The run directory.
        strategy: The (wrapped) Flower strategy.
        started: ``time.time()`` at the start (of the first run, after a resume).
        frozen_a: FFA-LoRA: LoRA A stays at the seed and never travels.
        kept_a: Those frozen A tensors (put back into the final adapter).
        run_key: The run's name for the sites (``keys.RUN_KEY``).
        backbone_sha256: sha256 of the ``backbone-path`` checkpoint ('' without one),
            sent with every message so each site checks its own copy.
    """

    grid: Grid
    cfg: RunConfig
    run_dir: Path
    strategy: Any
    started: float
    frozen_a: bool
    kept_a: dict[str, torch.Tensor]
    run_key: str
    backbone_sha256: str = ""

    def encode(self, messages: list[Message]) -> list[Message]:
        """The wire encoding of outgoing messages (16-bit transport, if asked)."""
        return encode_messages(messages, self.cfg.wire_dtype)

    def train_config(self, rnd: int) -> ConfigRecord:
        cfg = self.cfg
        return TrainConfig(server_round=rnd, local_epochs=cfg.local_epochs, lr=cfg.lr,
                           batch_size=cfg.batch_size, dp_enabled=cfg.dp,
                           noise_multiplier=cfg.noise_multiplier,
                           max_grad_norm=cfg.max_grad_norm, freeze_lora_a=self.frozen_a,
                           wire_dtype=cfg.wire_dtype, run_key=self.run_key,
                           phase=cfg.phase_of_round(rnd),
                           backbone_sha256=self.backbone_sha256).to_record()

    def eval_config(self, rnd: int) -> ConfigRecord:
        phase = self.cfg.phase_of_round(rnd) if rnd else 0
        return EvaluateConfig(rnd, self.frozen_a, phase, self.backbone_sha256).to_record()


@dataclass
class RoundState:
    """What the rounds change.

    Attributes:
        arrays: The global adapter tensors that travel.
        log: What the server saw, per round and per site.
        first: The first round to run (after a checkpoint's last one).
        unevaluated: A resumed checkpoint's round whose evaluation did not run, or None.
        node_sites: Node id → site name of every site that replied (kept in the
            checkpoint: a resumed run does not ask again a site whose budget is spent).
        spent_nodes: Nodes whose site refused because its budget is spent for good.
        last_local: Each site's last local update (cross-site evaluation).
        tracker: The continual bookkeeping (accuracy matrix R), or None.
        fisher: Site-incremental EWC: the running sum of earlier phases' DP Fishers.
        stopped: Why the run stopped early, or ''.
        distributed: Secure aggregation with ``secagg-noise``: the site-level accountant
            of the unmasked sums, or None.
    """

    arrays: ArrayRecord
    log: RunLog = field(default_factory=RunLog)
    first: int = 1
    unevaluated: int | None = None
    node_sites: dict[int, str] = field(default_factory=dict)
    spent_nodes: set[int] = field(default_factory=set)
    last_local: dict[str, ArrayRecord] = field(default_factory=dict)
    tracker: ContinualTracker | None = None
    fisher: dict[str, torch.Tensor] | None = None
    stopped: str = ""
    distributed: SkellamAccountant | None = None


SECAGG_DP = "secagg_dp"  # checkpoint extra: the distributed-DP releases so far


def backbone_digest(cfg: RunConfig) -> str:
    """sha256 of the run's ``backbone-path`` checkpoint (each site checks its own copy
    against it, ``imaging.local.check_digest``); '' without one."""
    if not cfg.backbone_path:
        return ""
    from fedadapt.imaging.local import checkpoint_sha256

    return checkpoint_sha256(cfg.backbone_path)


def start(grid: Grid, cfg: RunConfig, run_dir: Path) -> tuple[Federation, RoundState]:
    """The initial adapter and strategy, or the checkpoint of ``cfg.resume_from``."""
    started = time.time()
    state = trainable_state(build_model(run_model_spec(cfg)))
    frozen_a = freezes_lora_a(cfg.strategy)  # FFA-LoRA: A stays at the seed, never travels
    kept_a = {n: t for n, t in state.items() if frozen_a and LORA_A in n}
    fed = Federation(grid=grid, cfg=cfg, run_dir=run_dir,
                     strategy=build_strategy(cfg.strategy, cfg), started=started,
                     frozen_a=frozen_a, kept_a=kept_a,
                     run_key=run_key(run_dir),  # sites keep this run's state under it
                     backbone_sha256=backbone_digest(cfg))
    st = RoundState(arrays=ArrayRecord({n: t for n, t in state.items() if n not in kept_a}))
    if cfg.is_continual:
        st.tracker = ContinualTracker(cfg)
    if cfg.resume_from:
        st.arrays, st.first, ck = resume(cfg, fed.strategy, st.log)
        # Node ids are stable per registered key; a site that comes back with another id
        # is asked and refuses once.
        st.node_sites = dict(ck.extra.get(NODE_SITES, {}))
        st.spent_nodes |= spent_node_ids(ck)
        if st.tracker is not None:
            st.tracker.restore(ck.extra.get("continual", {}))
        if not ck.extra.get(EVALUATED, True):
            st.unevaluated = ck.round
    if st.tracker is not None:  # site-incremental ewc: the phases' DP Fishers so far
        st.fisher = st.tracker.fisher(run_dir)
    if cfg.secure_aggregation and cfg.secagg_noise != "none":
        st.distributed = SkellamAccountant(cfg.secagg_noise_multiplier, cfg.delta)
        if cfg.resume_from:  # ε composes across a resume
            st.distributed.releases = list(ck.extra.get(SECAGG_DP, []))
    return fed, st


def baseline(fed: Federation, st: RoundState) -> None:
    """Continual runs: evaluate the initial model (baseline b of FWT) before round 1."""
    if st.tracker is None or st.first != 1:
        return
    messages = fed.encode(fed.strategy.configure_evaluate(1, st.arrays, fed.eval_config(0),
                                                          fed.grid))
    replies = fed.grid.send_and_receive(messages, timeout=fed.cfg.round_timeout)
    st.tracker.evaluated(0, [r for r in replies if reply_state(r) == keys.STATE_OK])


def configure(fed: Federation, st: RoundState, rnd: int) -> list[Message]:
    """The round's train messages, encoded; none to sites whose budget is spent."""
    messages = [m for m in fed.strategy.configure_train(rnd, st.arrays, fed.train_config(rnd),
                                                        fed.grid)
                if m.metadata.dst_node_id not in st.spent_nodes]
    go_on_without_dead_sites(fed.strategy, fed.cfg.min_train_sites)  # all sites joined
    messages = fed.encode(messages)
    if st.fisher is not None:  # sent with every round of the later phases
        attach_fisher(messages, ArrayRecord(st.fisher))
    return messages


def send_train(fed: Federation, st: RoundState, rlog: RoundLog,
               messages: list[Message]) -> list[Message]:
    """Exchange the train messages; count the bytes down; the replies that came."""
    st.log.sent(rlog, messages)  # counts the Fisher sum / SCAFFOLD correction too
    return exchange(fed.grid, messages, rlog, "train", st.node_sites, fed.cfg.round_timeout)


def sort_train_replies(fed: Federation, st: RoundState, rlog: RoundLog,
                       replies: list[Message]) -> list[Message]:
    """Record each reply (trained, refused, idle or failed); the trained ones, as they came
    (validation checks their wire dtype and decodes). Under secure aggregation a trained
    reply holds a masked vector: nothing is kept for cross-site evaluation."""
    good = []
    for reply in replies:
        state = reply_state(reply)
        if state == keys.STATE_OK:
            st.log.trained(rlog, reply)  # counts the bytes as they came
            good.append(reply)
            update = reply.content[keys.ARRAYS]
            if fed.cfg.secure_aggregation:
                continue
            if format_problem(update, fed.cfg.wire_dtype) is None:  # for cross-site eval
                st.last_local[st.log.site_of(reply)] = ArrayRecord(decode(update))
        elif state == keys.STATE_REFUSED:
            if st.log.refused(rlog, reply):
                st.spent_nodes.add(reply.metadata.src_node_id)
        elif state != keys.STATE_IDLE:  # idle: not this site's phase (site-incremental)
            st.log.failed(rlog, reply, "train")
    return good


def aggregate(fed: Federation, st: RoundState, rnd: int, rlog: RoundLog,
              good: list[Message]) -> None:
    """Validate and aggregate the updates (the strategy's wrappers); too few: no update."""
    fewest = fed.cfg.min_train_sites
    if len(good) < fewest:  # the round fails; the global adapter stays
        rlog.failures.append({"node_id": None, "stage": "round", "reason":
                              f"{len(good)} site(s) trained, fewer than min-train-sites="
                              f"{fewest}; global adapter not updated"})
        good = []
    new_arrays, _ = fed.strategy.aggregate_train(rnd, good) if good else (None, None)
    rlog.rejected.extend(getattr(fed.strategy, "rejected", {}).get(rnd, []))
    if new_arrays is not None:
        st.arrays = new_arrays


def secure_round(fed: Federation, st: RoundState, rnd: int, rlog: RoundLog,
                 messages: list[Message]) -> None:
    """Train and aggregate round ``rnd`` under SecAgg+ (:mod:`server.secagg`): setup and
    share keys, the train messages with the forwarded shares, unmask, the mean update.

    A failure of the protocol (too few sites, shares that cannot rebuild a secret) fails
    the round like too few trained sites do: recorded, global adapter unchanged."""
    cfg = fed.cfg

    def send(msgs: list[Message], stage: str) -> list[Message]:
        rlog.bytes_down += sum(secagg.record_bytes(m.content[keys.SECAGG]) for m in msgs)
        replies = exchange(fed.grid, msgs, rlog, stage, st.node_sites, cfg.round_timeout)
        rlog.bytes_up += sum(secagg.record_bytes(r.content[keys.SECAGG]) for r in replies)
        return replies

    def fail(reason: str) -> None:
        rlog.failures.append({"node_id": None, "stage": "round", "reason": reason})

    # What the sites received (16-bit transport rounds it): the mean update is added to it.
    base = decode(encode(st.arrays, cfg.wire_dtype))
    try:
        session = secagg.new_session(cfg, rnd, base, [m.metadata.dst_node_id for m in messages])
    except SecAggError as err:
        return fail(f"secure aggregation: {err}; global adapter not updated")
    try:
        secagg.setup(session, send, cfg)
        secagg.share_keys(session, send)
        trained = sort_train_replies(fed, st, rlog, send_train(
            fed, st, rlog, [secagg.attach(m, session) for m in messages
                            if m.metadata.dst_node_id in session.shared]))
        total, active = secagg.collect(session, trained)
        fewest = max(cfg.min_train_sites, cfg.secagg_threshold)
        if total is None or len(active) < fewest:
            raise SecAggError(f"{len(active)} masked update(s), fewer than max("
                              f"min-train-sites, secagg-threshold)={fewest}; nothing unmasked")
        mean, n = secagg.unmask(session, send, total, active)
    except SecAggError as err:
        return fail(f"secure aggregation: {err}; global adapter not updated")
    finally:
        rlog.rejected.extend(session.rejected)
    st.arrays = ArrayRecord({name: base[name] + mean[name] for name in session.names})
    if st.distributed is not None:
        st.distributed.record(rnd, num_sites=n, l2=session.sensitivity[0],
                              l1=session.sensitivity[1], site_var=session.noise_variance)


def evaluate(fed: Federation, st: RoundState, rnd: int, rlog: RoundLog) -> list[Message]:
    """Evaluate the global adapter after ``rnd`` at every site; record the metrics."""
    messages = fed.encode(fed.strategy.configure_evaluate(rnd, st.arrays, fed.eval_config(rnd),
                                                          fed.grid))
    st.log.sent(rlog, messages)
    evaluated = []
    for reply in exchange(fed.grid, messages, rlog, "evaluate", st.node_sites,
                          fed.cfg.round_timeout):
        if reply_state(reply) == keys.STATE_OK:
            st.log.evaluated(rlog, reply)
            evaluated.append(reply)
        else:
            st.log.failed(rlog, reply, "evaluate")
    return evaluated


def continual_step(fed: Federation, st: RoundState, rnd: int,
                   evaluated: list[Message]) -> None:
    """Continual runs: a row of R at a phase's end, and (site-incremental EWC) the phase's
    DP Fishers, whose ε each site reports as its own."""
    if st.tracker is None:
        return
    st.tracker.evaluated(rnd, evaluated)
    cfg = fed.cfg
    if not (shares_fisher(cfg) and st.tracker.phase_ends(rnd) and rnd < cfg.num_server_rounds):
        return
    new, report = collect_fisher(
        fed.grid, st.arrays, cfg=cfg, rnd=rnd, timeout=cfg.round_timeout, encode=fed.encode,
        config=FisherConfig(rnd, cfg.phase_of_round(rnd), cfg.dp, cfg.noise_multiplier,
                            fed.frozen_a, fed.backbone_sha256))
    st.tracker.fisher_reports.append(report)
    for site, info in report["sites"].items():  # the release's ε is the site's too
        if site in st.log.sites:
            st.log.sites[site].update(epsilon=info["epsilon"], epsilon_remaining=(
                info["epsilon_cap"] - info["epsilon"]))
    if new is not None:  # online EWC: the sum of the phases' Fishers
        st.fisher = new if st.fisher is None else {n: st.fisher[n] + new[n] for n in st.fisher}
        st.tracker.fisher_file = save_fisher(fed.run_dir, st.fisher, rnd)


def record(fed: Federation, progress: Progress, rlog: RoundLog) -> None:
    """Print the round and send it to TensorBoard / MLflow, if the run config asks."""
    progress.round(rlog)
    track_round(fed.cfg, fed.run_dir, rlog)


def checkpoint(fed: Federation, st: RoundState, rnd: int, *, evaluated: bool) -> None:
    """Write the checkpoint after ``rnd``: before its evaluation (``evaluated`` False: the
    sites have spent for it, so a crash from here resumes after it) or after."""
    extra: dict[str, Any] = {NODE_SITES: st.node_sites}
    if st.distributed is not None:
        extra[SECAGG_DP] = st.distributed.releases
    if not evaluated:
        extra[EVALUATED] = False
    elif st.tracker is not None:
        extra["continual"] = st.tracker.state()
    save_checkpoint(fed.run_dir, fed.cfg, rnd, st.arrays, fed.strategy, st.log,
                    started=fed.started, extra=extra)


def finish_unevaluated(fed: Federation, st: RoundState, progress: Progress) -> None:
    """The server died after aggregating a round, before evaluating it: its training (and
    the sites' spending) stands; only its evaluation runs again."""
    if st.unevaluated is None:
        return
    rlog = st.log.rounds[-1]
    evaluate(fed, st, st.unevaluated, rlog)
    record(fed, progress, rlog)
    checkpoint(fed, st, st.unevaluated, evaluated=True)
    st.unevaluated = None


def run_round(fed: Federation, st: RoundState, rnd: int, progress: Progress) -> bool:
    """Run round ``rnd``; False (and ``st.stopped`` set) when no site can be asked."""
    rlog = st.log.new_round(rnd)
    messages = configure(fed, st, rnd)
    if not messages:
        st.stopped = f"every site's privacy budget was spent before round {rnd}"
        st.log.rounds.pop()
        return False
    if fed.cfg.secure_aggregation:
        secure_round(fed, st, rnd, rlog, messages)
    else:
        replies = send_train(fed, st, rlog, messages)
        aggregate(fed, st, rnd, rlog, sort_train_replies(fed, st, rlog, replies))
    if st.tracker is None:
        checkpoint(fed, st, rnd, evaluated=False)
    continual_step(fed, st, rnd, evaluate(fed, st, rnd, rlog))
    record(fed, progress, rlog)
    checkpoint(fed, st, rnd, evaluated=True)
    return True
