"""The fedadapt ClientApp: thin Flower glue over ``client.train``.

Each round a site rebuilds the frozen backbone from the shared model spec, loads the
adapter and head tensors it received, checks the round against its own privacy policy
and ledger (refusing if it would pass its cap), trains them (DP-SGD with Opacus unless
DP is off and the site's policy allows that), records the round in its ledger, and
replies with adapter and head tensors only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedadapt.client import runtime, secagg
from fedadapt.client.budget import dataset_budgets, site_dir
from fedadapt.client.continual import ContinualRound, dp_diagonal_fisher, end_round, plan, rehearsal
from fedadapt.client.drift_monitor import MonitorConfig, monitor_round
from fedadapt.client.memory import SiteMemory, memory_folder
from fedadapt.client.replies import digest, load_reply, reply_folder, save_reply
from fedadapt.client.site import Site, set_threads, site_from_context
from fedadapt.client.site_round import Refused, freeze_lora_a, site_round
from fedadapt.client.train import evaluate, evaluate_metrics, resolve_device
from fedadapt import keys
from fedadapt.imaging.backbones import build_model, load_trainable, trainable_state
from fedadapt.imaging.local import check_digest
from fedadapt.messages import (EvaluateConfig, EvaluateReply, FisherConfig, FisherReply, Idle,
                               PhaseScore, Refusal, TrainConfig, TrainReply, received_fisher)
from fedadapt.privacy.guard import Decision, TrainRequest, is_budget_refusal
from fedadapt.privacy.record_budget import RecordBudget
from fedadapt.strategies import wire
from fedadapt.strategies.lora_math import change_rank
from fedadapt.strategies.scaffold import received_correction


def _site(context: Context, run_config: Mapping[str, Any] | None) -> Site:
    merged = {**context.run_config, **(run_config or {})}
    site = site_from_context(merged, context.node_config)
    if site.site_dir is None and site.personalised_keys:
        # A simulated site keeps its personal tensors in its own folder (policy, ledger).
        site = dataclasses.replace(site, site_dir=site_dir(site.name, site.run,
                                                          context.node_config))
    return site


def _received(msg: Message) -> dict:
    """The adapter tensors the server sent, as float32 torch tensors (16-bit transport
    decoded, :mod:`strategies.wire`)."""
    return wire.decode(msg.content[keys.ARRAYS])


def _model(site: Site, msg: Message, *, personal: bool = True, fresh: bool = False):
    """The shared model with the received tensors (and the site's personal ones) loaded:
    the process's kept one (``client.runtime``), or a new one with ``fresh``."""
    spec = site.model_spec()
    config = EvaluateConfig.from_message(msg)
    if spec.backbone_path:  # the same checkpoint as the server's, or no training at all
        check_digest(spec.backbone_path, config.backbone_sha256, site=site.name)
    model = build_model(spec) if fresh else runtime.model_for(spec)
    if config.freeze_lora_a:  # FFA-LoRA: A is not trained
        freeze_lora_a(model)
    received = _received(msg)
    if site.lora_rank != site.run.lora_rank:  # heterogeneous ranks: at this site's own rank
        received, _ = change_rank(received, site.lora_rank, site.run.lora_rank)
    # FedPer / FedBN-style personalisation: the site's own tensors for its personal keys.
    load_trainable(model, site.personalise(received) if personal else received)
    return model


def _refusal(msg: Message, site: Site, decision: Decision, cap: float) -> Message:
    """A structured refusal: no tensors, the reason, and the site's budget state."""
    return Refusal(site_id=site.name, reason=decision.reason,
                   epsilon_spent=decision.eps_spent, epsilon_remaining=decision.eps_remaining,
                   epsilon_cap=cap, budget_spent=is_budget_refusal(decision.reason),
                   partition_id=site.index).to_message(msg)


class _Refused(Exception):
    def __init__(self, decision: Decision, cap: float) -> None:
        super().__init__(decision.reason)
        self.decision, self.cap = decision, cap


def _idle(msg: Message, site: Site) -> Message:
    """Reply of a site that does not train in this phase (no tensors, no budget spent)."""
    return Idle(site.name, site.index).to_message(msg)


def _teacher(site: Site, msg: Message, anchor: dict):
    """LwF's frozen previous-phase model: the backbone with the anchor's tensors."""
    teacher = _model(site, msg, fresh=True)  # beside the student, not the kept model
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name in anchor:
                p.copy_(anchor[name])
            p.requires_grad_(False)
    return teacher.to(resolve_device(site.run.device)).eval()


def _dp_fisher(site: Site, context: Context, model, phase: int, *, dp_enabled: bool,
               noise_multiplier: float, run_id: str, rnd: int
               ) -> tuple[dict, float, RecordBudget]:
    """EWC's Fisher on the site's ``phase`` data, under DP and charged to that data's
    ledger (guard first; a refusal refuses the round).

    Returns:
        The Fisher, the data's total ε after it (0 without DP) and its budget.
    """
    data, _ = site.datasets(phase)
    (budget,) = dataset_budgets(site_dir(site.name, site.run, context.node_config),
                                site.name, [data])
    sigma = noise_multiplier if dp_enabled else 0.0
    request = TrainRequest(sigma, site.run.ewc_clip, 1.0, 1)
    decision = budget.decide(request, run_id=run_id)
    if not decision.allowed:
        raise _Refused(decision, budget.policy.epsilon_cap)
    gen = torch.Generator().manual_seed(hash((site.run.seed, site.index, rnd, 7919)) % 2**31)
    fisher = dp_diagonal_fisher(model, data, clip_norm=request.clip_norm,
                                noise_multiplier=sigma, generator=gen, per_tensor=sigma > 0)
    eps = budget.record(request, run_id=run_id, round=rnd) if sigma > 0 else 0.0
    return fisher, eps, budget


def _budgets(site: Site, context: Context, datasets) -> list[RecordBudget]:
    """The per-record budget of each declared dataset a round draws records from."""
    return dataset_budgets(site_dir(site.name, site.run, context.node_config), site.name,
                           datasets)


def _shared_fisher(msg: Message) -> dict | None:
    """The server's aggregate of earlier phases' DP Fishers (site-incremental ewc)."""
    rec = received_fisher(msg)
    return None if rec is None else rec.to_torch_state_dict()


def _rehearsing(site: Site, phase: int) -> bool:
    """Site-incremental replay: an earlier site rehearses its reservoir in later phases."""
    cl = site.continual()
    return (cl is not None and cl.name == "site-incremental"
            and site.run.continual == "replay" and cl.join_phase(site.index) < phase)


def _idle_in(site: Site, phase: int) -> bool:
    """Whether the site sits ``phase`` out (site-incremental: not its phase)."""
    cl = site.continual()
    return cl is not None and site.index not in cl.active_sites(phase) and not _rehearsing(
        site, phase)


def _memory(site: Site, context: Context, cfg: TrainConfig) -> SiteMemory | None:
    """The continual memory of this run at the site (None outside continual runs)."""
    if site.continual() is None:
        return None
    return SiteMemory(context, memory_folder(site_dir(site.name, site.run, context.node_config),
                                             cfg.run_key))


def _hooks(site: Site, context: Context, msg: Message, cfg: TrainConfig, model,
           memory: SiteMemory | None) -> ContinualRound:
    """The round's training set and continual hooks (EWC's Fisher may refuse the round).

    Raises:
        _Refused: If the guard refuses the DP Fisher EWC needs.
    """
    train_set, _ = site.datasets(cfg.phase)
    cl = site.continual()
    if _rehearsing(site, cfg.phase):  # site-incremental replay: rehearse the reservoir
        return rehearsal(site, site.datasets(cl.join_phase(site.index))[0])
    if cl is None or memory is None:
        return ContinualRound(train_set)
    run_id = str(msg.metadata.run_id)
    return plan(site.run.continual, site, memory, model, train_set, phase=cfg.phase,
                fisher=lambda: _dp_fisher(site, context, model, cfg.phase - 1,
                                          dp_enabled=cfg.dp_enabled,
                                          noise_multiplier=cfg.noise_multiplier,
                                          run_id=run_id, rnd=cfg.server_round)[0],
                teacher=lambda anchor: _teacher(site, msg, anchor),
                shared_fisher=_shared_fisher(msg))


def _monitor(site: Site, context: Context, cfg: TrainConfig):
    """The round's drift monitor (``drift-monitor``), or None."""
    mcfg = MonitorConfig.from_run(site.run)
    if mcfg is None:
        return None
    folder = site_dir(site.name, site.run, context.node_config)
    return lambda model: monitor_round(site, model, mcfg, rnd=cfg.server_round,
                                       run_key=cfg.run_key, site_dir=folder, phase=cfg.phase)


def handle_train(msg: Message, context: Context,
                 run_config: Mapping[str, Any] | None = None) -> Message:
    """Train the received adapters on this site's data and reply with the update.

    Before training, the site's budget guard prices the round from the site's own
    policy and ledger (never from the server) and refuses if it would pass the cap or
    asks for less noise than the site's floor. After training, the round is appended
    to the ledger (fsync'ed, under its lock) *before* the update is returned
    (:func:`client.site_round.site_round`).
    """
    set_threads()
    site = _site(context, run_config)
    cfg = TrainConfig.from_message(msg)
    if _idle_in(site, cfg.phase):
        return _idle(msg, site)  # not this site's phase (site-incremental)
    secure = keys.SECAGG in msg.content  # secure aggregation: its neighbours' key shares
    if secure:  # a tampered share stops the site here, before it trains or spends
        secagg.receive_shares(msg, context)
    replies = reply_folder(site_dir(site.name, site.run, context.node_config), cfg.run_key)
    received = digest(_received(msg))
    kept = load_reply(replies, cfg.server_round, received)
    if kept is not None:  # asked again after a server resume: already trained and spent
        tensors, kept_metrics, kept_status = kept
        kept_reply = TrainReply.from_records(wire.encode(tensors, cfg.wire_dtype),
                                             kept_metrics, kept_status)
        return (secagg.masked_reply(msg, context, kept_reply, _received(msg), tensors)
                if secure else kept_reply.to_message(msg))
    model = _model(site, msg)
    memory = _memory(site, context, cfg)
    try:
        hooks = _hooks(site, context, msg, cfg, model, memory)
    except _Refused as refused:
        return _refusal(msg, site, refused.decision, refused.cap)
    # Charged to the ledger of every dataset whose records the training set holds (a
    # replay union: the current data's and each earlier phase's), so each ledger bounds
    # the ε of its own records and the cap binds per record.
    if secure:  # a weight the masked sum cannot hold is refused before anything is spent
        secagg.check_weight(context, len(hooks.train_set))
    budgets = _budgets(site, context, hooks.ledgers)
    policy = budgets[0].policy
    out = site_round(site, model, hooks.train_set, cfg, budgets=budgets, policy=policy,
                     run_id=str(msg.metadata.run_id), hooks=hooks,
                     monitor=_monitor(site, context, cfg),
                     correction=received_correction(msg))
    if isinstance(out, Refused):
        return _refusal(msg, site, out.decision, out.cap)
    if memory is not None:
        end_round(memory, phase=cfg.phase)
    site.store_personal(trainable_state(model))  # kept at the site for the next round
    res = out.result
    reply = TrainReply(
        site_id=site.name, arrays=wire.encode(out.state, cfg.wire_dtype),
        num_examples=res.num_examples, train_loss=res.loss, epsilon=out.epsilon,
        epsilon_round=out.epsilon_round, delta=policy.delta, steps=res.steps,
        sample_rate=res.sample_rate, partition_id=site.index,
        noise_multiplier=out.request.noise_multiplier, epsilon_cap=policy.epsilon_cap,
        lora_rank=site.lora_rank, accountant=policy.accountant, drift=out.drift)
    save_reply(replies, cfg.server_round, out.state, reply.metrics(), reply.status(),
               received)  # before it leaves
    if secure:  # only the clipped, quantised, masked update leaves the site
        return secagg.masked_reply(msg, context, reply, _received(msg), out.state)
    return reply.to_message(msg)


def handle_fisher(msg: Message, context: Context,
                  run_config: Mapping[str, Any] | None = None) -> Message:
    """The end-of-phase query of site-incremental ``ewc`` (FedCurv-style, Shoham et al.,
    "Overcoming Forgetting in Federated Learning on Non-IID Data", 2019).

    A site of the phase that ended computes the diagonal Fisher of the received global
    adapter on its data under DP (clip + Gaussian noise), records it in that data's
    ledger *before* replying (guard first: a refusal is a structured reply), and sends
    it with its record count. Sites of other phases reply idle.
    """
    set_threads()
    site = _site(context, run_config)
    cfg = FisherConfig.from_record(msg.content[keys.CONFIG])  # phase: the one that ended
    cl = site.continual()
    if cl is None or site.index not in cl.active_sites(cfg.phase):
        return _idle(msg, site)
    model = _model(site, msg)
    try:
        fisher, eps, budget = _dp_fisher(site, context, model, cfg.phase,
                                         dp_enabled=cfg.dp_enabled,
                                         noise_multiplier=cfg.noise_multiplier,
                                         run_id=str(msg.metadata.run_id), rnd=cfg.server_round)
    except _Refused as refused:
        return _refusal(msg, site, refused.decision, refused.cap)
    data, _ = site.datasets(cfg.phase)
    return FisherReply(site_id=site.name,
                       fisher=ArrayRecord({n: t.contiguous() for n, t in fisher.items()}),
                       num_examples=len(data), epsilon=eps,
                       epsilon_cap=budget.policy.epsilon_cap,
                       partition_id=site.index).to_message(msg)


def handle_evaluate(msg: Message, context: Context,
                    run_config: Mapping[str, Any] | None = None) -> Message:
    """Evaluate the received global adapters on this site's held-out split.

    A site with personal keys also evaluates the global model with its own personal
    tensors loaded (FedPer, Arivazhagan et al. 2019) and reports both scores.
    """
    set_threads()
    site = _site(context, run_config)
    model = _model(site, msg, personal=False)
    cl = site.continual()
    phase = EvaluateConfig.from_message(msg).phase
    # Continual: every phase's test set this site holds (site-incremental: only the one
    # of the phase it joins in), so the server can fill the accuracy matrix R.
    own_phases = ([] if cl is None else list(range(cl.num_phases))
                  if cl.name == "domain-incremental" else [cl.join_phase(site.index)])
    if own_phases and phase not in own_phases:
        phase = own_phases[0]
    _, test_set = site.datasets(phase)
    device = resolve_device(site.run.device)
    loss, scores = evaluate_metrics(model, test_set, batch_size=site.run.batch_size,
                                    device=device, amp=site.run.amp, task=site.task)
    acc = scores["accuracy"]  # segmentation: voxel accuracy (Dice is keys.EVAL_METRICS')
    phases = []
    for j in own_phases:
        test_j = test_set if j == phase else site.datasets(j)[1]
        acc_j = acc if j == phase else evaluate(model, test_j, batch_size=site.run.batch_size,
                                                 device=device, amp=site.run.amp)[1]
        phases.append(PhaseScore(j, acc_j, len(test_j)))
    p_loss = p_acc = None
    if site.personalised_keys:
        model = _model(site, msg, personal=True)
        p_loss, p_scores = evaluate_metrics(model, test_set, batch_size=site.run.batch_size,
                                            device=device, amp=site.run.amp, task=site.task)
        p_acc = p_scores["accuracy"]
    return EvaluateReply(site_id=site.name, num_examples=len(test_set), loss=loss,
                         accuracy=acc, partition_id=site.index,
                         scores={k: v for k, v in scores.items() if k in keys.EVAL_METRICS},
                         phases=tuple(phases), loss_personal=p_loss,
                         accuracy_personal=p_acc).to_message(msg)


def build_client_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` overrides ``context.run_config`` (used by ``simulate``)."""
    client_app = ClientApp()

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, run_config)

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, run_config)

    @client_app.query(keys.QUERY_FISHER.split(".", 1)[1])
    def _fisher(msg: Message, context: Context) -> Message:
        return handle_fisher(msg, context, run_config)

    # Secure aggregation's stages other than the train message (client/secagg.py).
    @client_app.query(keys.QUERY_SECAGG_SETUP.split(".", 1)[1])
    def _secagg_setup(msg: Message, context: Context) -> Message:
        return secagg.handle_setup(msg, context)

    @client_app.query(keys.QUERY_SECAGG_SHARE_KEYS.split(".", 1)[1])
    def _secagg_share_keys(msg: Message, context: Context) -> Message:
        return secagg.handle_share_keys(msg, context)

    @client_app.query(keys.QUERY_SECAGG_UNMASK.split(".", 1)[1])
    def _secagg_unmask(msg: Message, context: Context) -> Message:
        return secagg.handle_unmask(msg, context)

    return client_app


app = build_client_app()
