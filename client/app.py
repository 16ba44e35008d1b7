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
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedadapt.client.budget import dataset_budgets, planned_round, site_dir
from fedadapt.client.continual import ContinualRound, dp_diagonal_fisher, end_round, plan, rehearsal
from fedadapt.client.memory import SiteMemory, memory_folder
from fedadapt.client.replies import digest, load_reply, reply_folder, save_reply
from fedadapt.client.site import Site, set_threads, site_from_context
from fedadapt.client.train import evaluate, evaluate_metrics, resolve_device, train
from fedadapt import keys
from fedadapt.imaging.backbones import build_model, load_trainable, trainable_state
from fedadapt.imaging.local import check_digest
from fedadapt.imaging.tasks import task_loss
from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.dp import DPRequest
from fedadapt.privacy.guard import Decision, TrainRequest, is_budget_refusal, noise_for_target
from fedadapt.privacy.record_budget import RecordBudget
from fedadapt.strategies import wire
from fedadapt.strategies.lora_math import change_rank


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


def _reply_state(site: Site, model) -> dict:
    """The trained tensors at the global rank (zero-padded from the site's own: exact)."""
    state = trainable_state(model)
    if site.lora_rank != site.run.lora_rank:
        state, _ = change_rank(state, site.run.lora_rank, site.lora_rank)
    return state


def _model(site: Site, msg: Message, *, personal: bool = True):
    req = msg.content.config_records.get(keys.CONFIG)
    spec = site.model_spec()
    if spec.backbone_path:  # the same checkpoint as the server's, or no training at all
        check_digest(spec.backbone_path, "" if req is None else
                     str(req.get(keys.BACKBONE_SHA256, "")), site=site.name)
    model = build_model(spec)
    if req is not None and bool(req.get(keys.FREEZE_LORA_A, False)):
        # FFA-LoRA (Sun et al., ICLR 2024): A stays at the seed shared by all sites, so
        # it is neither trained nor sent, and averaging B alone is exact.
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    received = _received(msg)
    if site.lora_rank != site.run.lora_rank:  # heterogeneous ranks: at this site's own rank
        received, _ = change_rank(received, site.lora_rank, site.run.lora_rank)
    # FedPer / FedBN-style personalisation: the site's own tensors for its personal keys.
    load_trainable(model, site.personalise(received) if personal else received)
    return model


def _refusal(msg: Message, site: Site, decision: Decision, cap: float) -> Message:
    """A structured refusal: no tensors, the reason, and the site's budget state."""
    status = ConfigRecord({
        keys.SITE_ID: site.name, keys.STATE: keys.STATE_REFUSED, keys.REASON: decision.reason,
        keys.EPSILON_SPENT: decision.eps_spent, keys.EPSILON_REMAINING: decision.eps_remaining,
        keys.EPSILON_CAP: cap, keys.BUDGET_SPENT: is_budget_refusal(decision.reason)})
    metrics = MetricRecord({keys.PARTITION_ID: site.index, keys.EPSILON: decision.eps_spent})
    return Message(content=RecordDict({keys.STATUS: status, keys.METRICS: metrics}),
                   reply_to=msg)


class _Refused(Exception):
    def __init__(self, decision: Decision, cap: float) -> None:
        super().__init__(decision.reason)
        self.decision, self.cap = decision, cap


def _idle(msg: Message, site: Site) -> Message:
    """Reply of a site that does not train in this phase (no tensors, no budget spent)."""
    return Message(content=RecordDict({
        keys.STATUS: ConfigRecord({keys.SITE_ID: site.name, keys.STATE: keys.STATE_IDLE}),
        keys.METRICS: MetricRecord({keys.PARTITION_ID: site.index})}), reply_to=msg)


def _teacher(site: Site, msg: Message, anchor: dict):
    """LwF's frozen previous-phase model: the backbone with the anchor's tensors."""
    teacher = _model(site, msg)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name in anchor:
                p.copy_(anchor[name])
            p.requires_grad_(False)
    return teacher.to(resolve_device(site.run.device)).eval()


def _dp_fisher(site: Site, context: Context, model, phase: int, req, *, run_id: str,
               rnd: int) -> tuple[dict, float, RecordBudget]:
    """EWC's Fisher on the site's ``phase`` data, under DP and charged to that data's
    ledger (guard first; a refusal refuses the round).

    Returns:
        The Fisher, the data's total ε after it (0 without DP) and its budget.
    """
    data, _ = site.datasets(phase)
    (budget,) = dataset_budgets(site_dir(site.name, site.run, context.node_config),
                                site.name, [data])
    sigma = float(req[keys.NOISE_MULTIPLIER]) if bool(req[keys.DP_ENABLED]) else 0.0
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
    rec = msg.content.array_records.get(keys.FISHER)
    return None if rec is None else rec.to_torch_state_dict()


def handle_train(msg: Message, context: Context,
                 run_config: Mapping[str, Any] | None = None) -> Message:
    """Train the received adapters on this site's data and reply with the update.

    Before training, the site's budget guard prices the round from the site's own
    policy and ledger (never from the server) and refuses if it would pass the cap or
    asks for less noise than the site's floor. After training, the round is appended
    to the ledger (fsync'ed, under its lock) *before* the update is returned.
    """
    set_threads()
    site = _site(context, run_config)
    req = msg.content[keys.CONFIG]
    rnd = int(req[keys.SERVER_ROUND])
    epochs, batch_size = int(req[keys.LOCAL_EPOCHS]), int(req[keys.BATCH_SIZE])
    phase = int(req.get(keys.PHASE, 0))
    cl = site.continual()
    rehearsing = (cl is not None and cl.name == "site-incremental"
                  and site.run.continual == "replay" and cl.join_phase(site.index) < phase)
    if cl is not None and site.index not in cl.active_sites(phase) and not rehearsing:
        return _idle(msg, site)  # not this site's phase (site-incremental)
    wire_dtype = str(req.get(keys.WIRE_DTYPE, "float32"))
    replies = reply_folder(site_dir(site.name, site.run, context.node_config),
                           str(req.get(keys.RUN_KEY, "")))
    received = digest(_received(msg))
    kept = load_reply(replies, rnd, received)
    if kept is not None:  # asked again after a server resume: already trained and spent
        tensors, kept_metrics, kept_status = kept
        return Message(content=RecordDict({
            keys.ARRAYS: wire.encode(tensors, wire_dtype),
            keys.METRICS: MetricRecord(kept_metrics),
            keys.STATUS: ConfigRecord(kept_status)}), reply_to=msg)
    run_id = str(msg.metadata.run_id)
    dp_on = bool(req[keys.DP_ENABLED])
    clip = float(req[keys.MAX_GRAD_NORM])
    train_set, _ = site.datasets(phase)
    model = _model(site, msg)
    hooks = ContinualRound(train_set)
    memory = None if cl is None else SiteMemory(context, memory_folder(
        site_dir(site.name, site.run, context.node_config), str(req.get(keys.RUN_KEY, ""))))
    if rehearsing:  # site-incremental replay: an earlier site rehearses its reservoir
        hooks = rehearsal(site, site.datasets(cl.join_phase(site.index))[0])
    elif cl is not None:
        try:
            hooks = plan(site.run.continual, site, memory, model, train_set, phase=phase,
                         fisher=lambda: _dp_fisher(site, context, model, phase - 1, req,
                                                   run_id=run_id, rnd=rnd)[0],
                         teacher=lambda anchor: _teacher(site, msg, anchor),
                         shared_fisher=_shared_fisher(msg))
        except _Refused as refused:
            return _refusal(msg, site, refused.decision, refused.cap)
    train_set = hooks.train_set
    n = len(train_set)
    # Charged to the ledger of every dataset whose records the training set holds (a
    # replay union: the current data's and each earlier phase's), so each ledger bounds
    # the ε of its own records and the cap binds per record.
    budgets = _budgets(site, context, hooks.ledgers)
    policy = budgets[0].policy
    q, steps = planned_round(n, batch_size=batch_size, epochs=epochs)
    sigma = float(req[keys.NOISE_MULTIPLIER]) if dp_on else 0.0
    if dp_on and policy.target_epsilon_per_round > 0:
        # The site picks its own σ for its per-round ε target; never less than asked.
        sigma = max(sigma, noise_for_target(policy.target_epsilon_per_round,
                                            delta=policy.delta, sample_rate=q, steps=steps,
                                            accountant=policy.accountant))
    request = TrainRequest(sigma, clip, q, steps)
    for budget in budgets:
        decision = budget.decide(request, run_id=run_id)
        if not decision.allowed:
            return _refusal(msg, site, decision, budget.policy.epsilon_cap)
    dp = DPRequest(sigma, request.clip_norm) if dp_on else None
    result = train(model, train_set, epochs=epochs, lr=float(req[keys.LR]),
                   batch_size=batch_size, device=resolve_device(site.run.device),
                   seed=hash((site.run.seed, site.index, rnd)) % 2**31, dp=dp, amp=site.run.amp,
                   proximal_mu=float(req.get(keys.PROXIMAL_MU, 0.0)),
                   param_penalty=hooks.param_penalty, extra_loss=hooks.extra_loss,
                   loss_fn=task_loss(site.task))
    if memory is not None:
        end_round(memory, phase=phase)
    eps_total = eps_round = 0.0
    if dp is not None:
        if (result.sample_rate, result.steps) != (q, steps):
            raise RuntimeError(  # the guard priced another mechanism: withhold the update
                f"site {site.name}: trained with q={result.sample_rate}, steps={result.steps} "
                f"but the budget guard priced q={q}, steps={steps}; update withheld")
        eps_total = max(b.record(request, run_id=run_id, round=rnd) for b in budgets)
        eps_round = epsilon([Mechanism(sigma, q, steps)], delta=policy.delta,
                            accountant=policy.accountant)
    site.store_personal(trainable_state(model))  # kept at the site for the next round
    metrics = MetricRecord({
        keys.NUM_EXAMPLES: result.num_examples, keys.TRAIN_LOSS: result.loss,
        keys.EPSILON: eps_total, keys.EPSILON_ROUND: eps_round, keys.DELTA: policy.delta,
        keys.EPSILON_CAP: policy.epsilon_cap, keys.NOISE_MULTIPLIER: sigma,
        keys.STEPS: result.steps, keys.SAMPLE_RATE: result.sample_rate,
        keys.PARTITION_ID: site.index, keys.LORA_RANK: site.lora_rank})
    status = ConfigRecord({keys.SITE_ID: site.name, keys.STATE: keys.STATE_OK,
                           keys.ACCOUNTANT: policy.accountant})
    state = _reply_state(site, model)
    save_reply(replies, rnd, state, dict(metrics), dict(status), received)  # before it leaves
    content = RecordDict({keys.ARRAYS: wire.encode(state, wire_dtype), keys.METRICS: metrics,
                          keys.STATUS: status})
    return Message(content=content, reply_to=msg)


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
    req = msg.content[keys.CONFIG]
    phase = int(req[keys.PHASE])  # the phase that ended
    cl = site.continual()
    if cl is None or site.index not in cl.active_sites(phase):
        return _idle(msg, site)
    model = _model(site, msg)
    try:
        fisher, eps, budget = _dp_fisher(site, context, model, phase, req,
                                         run_id=str(msg.metadata.run_id),
                                         rnd=int(req[keys.SERVER_ROUND]))
    except _Refused as refused:
        return _refusal(msg, site, refused.decision, refused.cap)
    data, _ = site.datasets(phase)
    return Message(content=RecordDict({
        keys.ARRAYS: ArrayRecord({n: t.contiguous() for n, t in fisher.items()}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: len(data), keys.EPSILON: eps,
                                    keys.EPSILON_CAP: budget.policy.epsilon_cap,
                                    keys.PARTITION_ID: site.index}),
        keys.STATUS: ConfigRecord({keys.SITE_ID: site.name, keys.STATE: keys.STATE_OK})}),
        reply_to=msg)


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
    req = msg.content.config_records.get(keys.CONFIG)
    phase = int(req.get(keys.PHASE, 0)) if req is not None else 0
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
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(test_set), keys.EVAL_LOSS: loss,
                            keys.EVAL_ACC: acc, keys.PARTITION_ID: site.index,
                            **{keys.EVAL_METRICS[k]: v for k, v in scores.items()
                               if k in keys.EVAL_METRICS}})
    for j in own_phases:
        test_j = test_set if j == phase else site.datasets(j)[1]
        acc_j = acc if j == phase else evaluate(model, test_j, batch_size=site.run.batch_size,
                                                 device=device, amp=site.run.amp)[1]
        metrics[keys.EVAL_ACC_PHASE.format(j)] = acc_j
        metrics[keys.NUM_EXAMPLES_PHASE.format(j)] = len(test_j)
    if site.personalised_keys:
        model = _model(site, msg, personal=True)
        p_loss, p_scores = evaluate_metrics(model, test_set, batch_size=site.run.batch_size,
                                            device=device, amp=site.run.amp, task=site.task)
        metrics[keys.EVAL_LOSS_PERSONAL] = p_loss
        metrics[keys.EVAL_ACC_PERSONAL] = p_scores["accuracy"]
    content = RecordDict({keys.METRICS: metrics, keys.STATUS: ConfigRecord(
        {keys.SITE_ID: site.name, keys.STATE: keys.STATE_OK})})
    return Message(content=content, reply_to=msg)


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

    return client_app


app = build_client_app()
