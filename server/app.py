"""The fedadapt ServerApp: runs the rounds of a federation on Flower's Grid.

The round loop is the one of Flower's ``Strategy.start`` (configure → send/receive →
aggregate, for training then evaluation), kept here so the server can record every
site's reply, sent bytes and tensor names, and write the run directory as it goes.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model, trainable_state
from fedadapt.server.checkpoint import (EVALUATED, NODE_SITES, resume, save_checkpoint,
                               spent_node_ids)
from fedadapt.server.continual import ContinualTracker, collect_fisher, save_fisher, shares_fisher
from fedadapt.server.cross_site import MAX_SITES, cross_site_eval
from fedadapt.server.progress import Progress
from fedadapt.server.record import RoundLog, RunLog, payload_bytes
from fedadapt.server.rundir import SCHEMA, new_run_dir, save_adapter, write_json_atomic
from fedadapt.server.report_hook import write_report
from fedadapt.server.tracking import track_round
from fedadapt.strategies.factory import build_strategy, freezes_lora_a
from fedadapt.strategies.lora_math import LORA_A
from fedadapt.strategies.wire import bytes_per_element, decode, encode_messages, format_problem

ROUND_TIMEOUT_S = RunConfig.round_timeout  # the default of run config `round-timeout`


def _state(reply: Message) -> str | None:
    """The site's reply state (ok / refused), or None for an error or empty reply."""
    if reply.has_error() or not reply.has_content() or keys.STATUS not in reply.content:
        return None
    return str(reply.content[keys.STATUS][keys.STATE])


def _ok(reply: Message) -> bool:
    return _state(reply) == keys.STATE_OK


def _exchange(grid: Grid, messages: list[Message], rlog: RoundLog, stage: str,
              node_sites: dict[int, str], timeout: float = ROUND_TIMEOUT_S) -> list[Message]:
    """Send ``messages``; return the replies that are not errors, record the others.

    A site that dies mid-round never replies. Flower's SuperLink answers in its place with
    an error (``NODE_UNAVAILABLE``) once the node has missed its heartbeats (every ~20 s,
    offline after 2 × 30 s in flwr 1.41, ``flwr/server/superlink/linkstate/utils.py``); a
    reply still missing after ``timeout`` (run config ``round-timeout``) is a failure too. Both go to
    ``rlog.failures`` with the node the message went to and that site's name when it has
    replied before (``node_sites``, which this fills from every site's status).
    """
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in messages
           if m.metadata.message_id}  # the Grid sets message ids as it pushes
    answered, ok = set(), []
    for reply in replies:
        answered.add(reply.metadata.reply_to_message_id)
        node = dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():  # from the site's ClientApp, or from the SuperLink for it
            rlog.failures.append({"node_id": node, "site": node_sites.get(node),
                                  "stage": stage,
                                  "reason": f"{reply.error.code}: {reply.error.reason}"})
            continue
        if reply.has_content() and keys.STATUS in reply.content:
            node_sites[reply.metadata.src_node_id] = str(
                reply.content[keys.STATUS][keys.SITE_ID])
        ok.append(reply)
    for mid, node in dst.items():
        if mid not in answered:
            rlog.failures.append({"node_id": node, "site": node_sites.get(node),
                                  "stage": stage,
                                  "reason": f"no reply within {timeout:g} s"})
    return ok


def _go_on_without_dead_sites(strategy: Any, fewest: int) -> None:
    """Let later rounds go on with the sites that are online.

    ``build_strategy`` sets Flower's ``min_available_nodes`` to ``num-sites``, so a run
    starts only once every site has joined. Flower's ``sample_nodes`` waits for that many
    online nodes before every round, so a site that dies mid-run (its node marked offline)
    would stall the federation until it rejoins. Once a run's first round is configured,
    a round needs only ``fewest`` (min-train-sites) online sites.
    """
    while strategy is not None:
        if "min_available_nodes" in vars(strategy):
            strategy.min_available_nodes = fewest
        strategy = vars(strategy).get("inner")


def backbone_digest(cfg: RunConfig) -> dict[str, str]:
    """``{keys.BACKBONE_SHA256: sha256}`` of the run's ``backbone-path`` checkpoint (each
    site checks its own copy against it, ``imaging.local.check_digest``); empty without."""
    if not cfg.backbone_path:
        return {}
    from fedadapt.imaging.local import checkpoint_sha256

    return {keys.BACKBONE_SHA256: checkpoint_sha256(cfg.backbone_path)}


def run_key(run_dir: Path) -> str:
    """The federation run's name for the sites (``keys.RUN_KEY``): the run directory's
    name and a random suffix, made once and kept in ``<run_dir>/run-key`` so that a
    resumed run sends the same one and two federations never share one."""
    path = run_dir / "run-key"
    if path.is_file():
        return path.read_text().strip()
    run_dir.mkdir(parents=True, exist_ok=True)
    key = f"{run_dir.name}-{uuid.uuid4().hex[:12]}"
    tmp = path.with_name("run-key.tmp")
    tmp.write_text(key + "\n")
    os.replace(tmp, path)
    return key


def run_federation(grid: Grid, cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Run ``cfg.num_server_rounds`` rounds of FedAvg over adapter tensors.

    Args:
        grid: Flower's Grid (simulation or deployment).
        cfg: The run config.
        run_dir: Where ``summary.json`` and the adapter go.

    Returns:
        The summary that was written to ``run_dir / "summary.json"``.
    """
    started = time.time()
    model = build_model(cfg.model_spec())
    state = trainable_state(model)
    del model
    frozen_a = freezes_lora_a(cfg.strategy)  # FFA-LoRA: A stays at the seed, never travels
    kept_a = {n: t for n, t in state.items() if frozen_a and LORA_A in n}
    arrays = ArrayRecord({n: t for n, t in state.items() if n not in kept_a})
    strategy = build_strategy(cfg.strategy, cfg)
    train_cfg = ConfigRecord({
        keys.LOCAL_EPOCHS: cfg.local_epochs, keys.LR: cfg.lr, keys.BATCH_SIZE: cfg.batch_size,
        keys.DP_ENABLED: cfg.dp, keys.NOISE_MULTIPLIER: cfg.noise_multiplier,
        keys.MAX_GRAD_NORM: cfg.max_grad_norm, keys.FREEZE_LORA_A: frozen_a,
        keys.WIRE_DTYPE: cfg.wire_dtype, **backbone_digest(cfg),
        keys.RUN_KEY: run_key(run_dir)})  # sites keep this run's state under it
    log = RunLog()
    progress = Progress(cfg.num_server_rounds, dp=cfg.dp)
    spent_nodes: set[int] = set()  # sites that refused because their budget is spent
    stopped = ""
    first = 1  # --resume / resume-from: continue after the checkpoint's last round
    ck = None
    if cfg.resume_from:
        arrays, first, ck = resume(cfg, strategy, log)
    # Node id → site name of every site that replied, kept in the checkpoint: a resumed
    # run does not ask again a site whose budget is spent (node ids are stable per
    # registered key; a site that comes back with another id is asked and refuses once).
    node_sites: dict[int, str] = dict(ck.extra.get(NODE_SITES, {})) if ck else {}
    if ck is not None:
        spent_nodes |= spent_node_ids(ck)
    tracker = ContinualTracker(cfg) if cfg.is_continual else None
    if tracker is not None and cfg.resume_from:
        tracker.restore(ck.extra.get("continual", {}))
    # site-incremental ewc: the running sum of earlier phases' DP Fishers (FedCurv-style)
    fisher = tracker.fisher(run_dir) if tracker is not None else None
    last_local: dict[str, ArrayRecord] = {}  # each site's last local model (cross-site eval)
    if tracker is not None and first == 1:  # baseline b of the initial model (FWT)
        base_cfg = ConfigRecord({keys.SERVER_ROUND: 0, keys.FREEZE_LORA_A: frozen_a,
                                 keys.PHASE: 0, **backbone_digest(cfg)})
        tracker.evaluated(0, [r for r in grid.send_and_receive(
            encode_messages(strategy.configure_evaluate(1, arrays, base_cfg, grid),
                            cfg.wire_dtype),
            timeout=cfg.round_timeout) if _ok(r)])

    def evaluate(rnd: int, rlog: RoundLog) -> list[Message]:
        """Evaluate the global adapter after ``rnd`` at every site; record the metrics."""
        eval_cfg = ConfigRecord({keys.SERVER_ROUND: rnd, keys.FREEZE_LORA_A: frozen_a,
                                 keys.PHASE: cfg.phase_of_round(rnd), **backbone_digest(cfg)})
        messages = encode_messages(strategy.configure_evaluate(rnd, arrays, eval_cfg, grid),
                                   cfg.wire_dtype)
        log.sent(rlog, messages)
        evaluated = []
        for reply in _exchange(grid, messages, rlog, "evaluate", node_sites,
                               cfg.round_timeout):
            if _ok(reply):
                log.evaluated(rlog, reply)
                evaluated.append(reply)
            else:
                log.failed(rlog, reply, "evaluate")
        return evaluated

    if ck is not None and not ck.extra.get(EVALUATED, True):
        # The server died after aggregating round ck.round, before evaluating it: its
        # training (and the sites' spending) stands; only its evaluation runs again.
        evaluate(ck.round, log.rounds[-1])
        progress.round(log.rounds[-1])
        track_round(cfg, run_dir, log.rounds[-1])
        save_checkpoint(run_dir, cfg, ck.round, arrays, strategy, log, started=started,
                        extra={NODE_SITES: node_sites})
    for rnd in range(first, cfg.num_server_rounds + 1):
        rlog = log.new_round(rnd)
        train_cfg[keys.SERVER_ROUND] = rnd
        train_cfg[keys.PHASE] = cfg.phase_of_round(rnd)
        # Sites whose budget is spent are not asked again in this run.
        messages = [m for m in strategy.configure_train(rnd, arrays, train_cfg, grid)
                    if m.metadata.dst_node_id not in spent_nodes]
        _go_on_without_dead_sites(strategy, cfg.min_train_sites)  # all sites joined
        messages = encode_messages(messages, cfg.wire_dtype)  # 16-bit transport, if asked
        if fisher is not None:  # sent with every round of the later phases
            fisher_rec = ArrayRecord(fisher)
            for m in messages:
                m.content[keys.FISHER] = fisher_rec
        if not messages:
            stopped = f"every site's privacy budget was spent before round {rnd}"
            log.rounds.pop()
            break
        log.sent(rlog, messages)
        if fisher is not None:
            rlog.bytes_down += payload_bytes(fisher_rec) * len(messages)
        replies = _exchange(grid, messages, rlog, "train", node_sites, cfg.round_timeout)
        good = []
        for reply in replies:
            state = _state(reply)
            if state == keys.STATE_OK:
                log.trained(rlog, reply)  # counts the bytes as they came
                good.append(reply)  # as it came: validation checks its wire dtype, decodes
                update = reply.content[keys.ARRAYS]
                if format_problem(update, cfg.wire_dtype) is None:  # for cross-site eval
                    last_local[log.site_of(reply)] = ArrayRecord(decode(update))
            elif state == keys.STATE_REFUSED:
                if log.refused(rlog, reply):
                    spent_nodes.add(reply.metadata.src_node_id)
            elif state == keys.STATE_IDLE:
                pass  # continual site-incremental: not this site's phase
            else:
                log.failed(rlog, reply, "train")
        if len(good) < cfg.min_train_sites:  # the round fails; the global adapter stays
            rlog.failures.append({"node_id": None, "stage": "round", "reason":
                                  f"{len(good)} site(s) trained, fewer than min-train-sites="
                                  f"{cfg.min_train_sites}; global adapter not updated"})
            good = []
        new_arrays, _ = strategy.aggregate_train(rnd, good) if good else (None, None)
        rlog.rejected.extend(getattr(strategy, "rejected", {}).get(rnd, []))
        if new_arrays is not None:
            arrays = new_arrays
        if tracker is None:  # the sites have spent for rnd: a crash from here resumes after it
            save_checkpoint(run_dir, cfg, rnd, arrays, strategy, log, started=started,
                            extra={NODE_SITES: node_sites, EVALUATED: False})
        evaluated = evaluate(rnd, rlog)
        if tracker is not None:
            tracker.evaluated(rnd, evaluated)
        if (tracker is not None and shares_fisher(cfg) and tracker.phase_ends(rnd)
                and rnd < cfg.num_server_rounds):
            new, report = collect_fisher(
                grid, arrays, cfg=cfg, rnd=rnd, timeout=cfg.round_timeout,
                encode=lambda msgs: encode_messages(msgs, cfg.wire_dtype),
                config=ConfigRecord({keys.SERVER_ROUND: rnd, keys.PHASE: cfg.phase_of_round(rnd),
                                     keys.DP_ENABLED: cfg.dp,
                                     keys.NOISE_MULTIPLIER: cfg.noise_multiplier,
                                     keys.FREEZE_LORA_A: frozen_a, **backbone_digest(cfg)}))
            tracker.fisher_reports.append(report)
            for site, info in report["sites"].items():  # the release's ε is the site's too
                if site in log.sites:
                    log.sites[site].update(epsilon=info["epsilon"], epsilon_remaining=(
                        info["epsilon_cap"] - info["epsilon"]))
            if new is not None:  # online EWC: the sum of the phases' Fishers
                fisher = new if fisher is None else {n: fisher[n] + new[n] for n in fisher}
                tracker.fisher_file = save_fisher(run_dir, fisher, rnd)
        progress.round(rlog)
        track_round(cfg, run_dir, rlog)  # TensorBoard / MLflow, if the run config asks
        save_checkpoint(run_dir, cfg, rnd, arrays, strategy, log, started=started,
                        extra={NODE_SITES: node_sites, **(
                            {"continual": tracker.state()} if tracker is not None else {})})
    cross = None
    if cfg.cross_site_eval and last_local and len(log.sites) <= MAX_SITES:
        cross = cross_site_eval(
            grid, strategy, cfg.num_server_rounds, arrays, last_local,
            ConfigRecord({keys.SERVER_ROUND: cfg.num_server_rounds, keys.FREEZE_LORA_A: frozen_a,
                          keys.PHASE: cfg.phase_of_round(cfg.num_server_rounds),
                          **backbone_digest(cfg)}),
            encode=lambda msgs: encode_messages(msgs, cfg.wire_dtype),
            timeout=cfg.round_timeout, ok=_ok)
    adapter = save_adapter(run_dir, cfg, ArrayRecord(
        {**kept_a, **arrays.to_torch_state_dict()}) if kept_a else arrays)
    summary = {
        "schema": SCHEMA,
        "run_dir": str(run_dir),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started, 3),
        "config": cfg.to_mapping(),
        "privacy": {"unit": "record", "dp": cfg.dp,
                    "accountant": ", ".join(sorted({str(i["accountant"]) for i in
                                                    log.sites.values() if "accountant" in i}))
                    or "none",
                    "noise_multiplier": cfg.noise_multiplier if cfg.dp else 0.0,
                    "max_grad_norm": cfg.max_grad_norm,
                    "note": "each site accounts with its own policy's accountant and delta "
                            "(sites.*.accountant, sites.*.delta) in its own ledger",
                    "refusals": [r for rl in log.rounds for r in rl.refusals],
                    "site_level": (strategy.site_level_report() if cfg.site_dp else None)},
        "stopped_early": stopped,
        "cross_site": cross,
        "continual": tracker.section(run_dir) if tracker is not None else None,
        "strategy": {"name": cfg.strategy,
                     "exact_residual": {str(k): v for k, v in
                                        getattr(strategy, "residuals", {}).items()}},
        "sites": log.sites,
        "rounds": [r.to_json() for r in log.rounds],
        "wire": {"tensor_names": sorted(log.wire_tensors),
                 "num_tensors": len(log.wire_tensors),
                 "dtype": cfg.wire_dtype,
                 "bytes_per_direction_per_site": sum(
                     a.numel() * (bytes_per_element(cfg.wire_dtype) if a.is_floating_point()
                                  else a.element_size())
                     for a in arrays.to_torch_state_dict().values())},
        "adapter_dir": str(adapter.relative_to(run_dir)),
    }
    write_json_atomic(run_dir / "summary.json", summary)
    write_report(run_dir)
    progress.done(summary)
    return summary


def build_server_app(run_config: Mapping[str, Any] | None = None,
                     run_dir: Path | None = None) -> ServerApp:
    """A ServerApp; ``run_config`` overrides ``context.run_config`` (used by ``simulate``)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**context.run_config, **(run_config or {})})
        run_federation(grid, cfg, run_dir or (Path(cfg.resume_from) if cfg.resume_from
                                              else new_run_dir(cfg.out_dir)))

    return server_app


app = build_server_app()
