"""The fedadapt ClientApp: thin Flower glue over ``client.train``.

Each round a site rebuilds the frozen backbone from the shared model spec, loads the
adapter and head tensors it received, trains them (DP-SGD with Opacus unless DP is off),
accounts the round's privacy cost, and replies with adapter and head tensors only.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import Site, set_threads, site_from_context
from client.train import evaluate, resolve_device, train
from fedadapt import keys
from fedimaging.backbones import build_model, load_trainable, trainable_state
from privacy.accounting import Mechanism, epsilon
from privacy.dp import DPRequest

_HISTORY = "privacy-history"  # context.state record: this site's DP mechanisms so far


def _site(context: Context, run_config: Mapping[str, Any] | None) -> Site:
    merged = {**context.run_config, **(run_config or {})}
    return site_from_context(merged, context.node_config)


def _model(site: Site, msg: Message):
    model = build_model(site.model_spec())
    req = msg.content.config_records.get(keys.CONFIG)
    if req is not None and bool(req.get(keys.FREEZE_LORA_A, False)):
        # FFA-LoRA (Sun et al., ICLR 2024): A stays at the seed shared by all sites, so
        # it is neither trained nor sent, and averaging B alone is exact.
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    load_trainable(model, msg.content[keys.ARRAYS].to_torch_state_dict())
    return model


def _history(context: Context) -> list[Mechanism]:
    rec = context.state.config_records.get(_HISTORY)
    if rec is None:
        return []
    return [Mechanism(s, q, int(n)) for s, q, n in
            zip(rec["sigma"], rec["q"], rec["steps"])]  # type: ignore[arg-type]


def _append_history(context: Context, mech: Mechanism) -> None:
    hist = _history(context) + [mech]
    context.state[_HISTORY] = ConfigRecord({
        "sigma": [m.noise_multiplier for m in hist], "q": [m.sample_rate for m in hist],
        "steps": [m.steps for m in hist]})


def handle_train(msg: Message, context: Context,
                 run_config: Mapping[str, Any] | None = None) -> Message:
    """Train the received adapters on this site's data and reply with the update."""
    set_threads()
    site = _site(context, run_config)
    req = msg.content[keys.CONFIG]
    rnd = int(req[keys.SERVER_ROUND])
    device = resolve_device(site.run.device)
    dp_on = bool(req[keys.DP_ENABLED])
    dp = DPRequest(float(req[keys.NOISE_MULTIPLIER]), float(req[keys.MAX_GRAD_NORM])) \
        if dp_on else None
    model = _model(site, msg)
    train_set, _ = site.datasets()
    result = train(model, train_set, epochs=int(req[keys.LOCAL_EPOCHS]), lr=float(req[keys.LR]),
                   batch_size=int(req[keys.BATCH_SIZE]), device=device,
                   seed=hash((site.run.seed, site.index, rnd)) % 2**31, dp=dp, amp=site.run.amp,
                   proximal_mu=float(req.get(keys.PROXIMAL_MU, 0.0)))
    eps_total = eps_round = 0.0
    if dp is not None:
        mech = Mechanism(dp.noise_multiplier, result.sample_rate, result.steps)
        eps_round = epsilon([mech], delta=site.run.delta)
        _append_history(context, mech)
        eps_total = epsilon(_history(context), delta=site.run.delta)
    metrics = MetricRecord({
        keys.NUM_EXAMPLES: result.num_examples, keys.TRAIN_LOSS: result.loss,
        keys.EPSILON: eps_total, keys.EPSILON_ROUND: eps_round, keys.DELTA: site.run.delta,
        keys.STEPS: result.steps, keys.SAMPLE_RATE: result.sample_rate,
        keys.PARTITION_ID: site.index})
    content = RecordDict({
        keys.ARRAYS: ArrayRecord(trainable_state(model)), keys.METRICS: metrics,
        keys.STATUS: ConfigRecord({keys.SITE_ID: site.name, keys.STATE: keys.STATE_OK})})
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context,
                    run_config: Mapping[str, Any] | None = None) -> Message:
    """Evaluate the received global adapters on this site's held-out split."""
    set_threads()
    site = _site(context, run_config)
    model = _model(site, msg)
    _, test_set = site.datasets()
    loss, acc = evaluate(model, test_set, batch_size=site.run.batch_size,
                         device=resolve_device(site.run.device), amp=site.run.amp)
    metrics = MetricRecord({keys.NUM_EXAMPLES: len(test_set), keys.EVAL_LOSS: loss,
                            keys.EVAL_ACC: acc, keys.PARTITION_ID: site.index})
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

    return client_app


app = build_client_app()
