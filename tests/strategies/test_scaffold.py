"""SCAFFOLD (``strategies/scaffold.py``, ``train``'s ``grad_correction``): the math against
PyTorch's own SGD, the strategy on real Flower Messages, and the correction's place in
DP-SGD (after Opacus' clipping and noise, through momentum)."""

import math
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from fedadapt import keys
from fedadapt.client.site_round import correction_pairs
from fedadapt.client.train import train
from fedadapt.config import ConfigError, RunConfig
from fedadapt.names import SGD_MOMENTUM
from fedadapt.privacy.dp import DPRequest
from fedadapt.strategies import wire
from fedadapt.strategies.factory import build_strategy
from fedadapt.strategies.scaffold import momentum_norm, received_correction, site_variate
from tests.flower_helpers import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")
CPU = torch.device("cpu")


@pytest.mark.parametrize("momentum", [0.0, 0.5, SGD_MOMENTUM])
@pytest.mark.parametrize("steps", [1, 2, 7, 38])
def test_momentum_norm_is_the_distance_torch_sgd_moves_on_a_constant_gradient(steps, momentum):
    w = torch.zeros(3, requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5])
    opt = torch.optim.SGD([w], lr=0.01, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        (w * g).sum().backward()
        opt.step()
    expected = -0.01 * momentum_norm(steps, momentum) * g
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-7)
    closed = sum((1 - momentum ** t) / (1 - momentum) for t in range(1, steps + 1))
    assert momentum_norm(steps, momentum) == pytest.approx(closed, rel=1e-12)


def test_momentum_norm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps=0"):
        momentum_norm(0)
    with pytest.raises(ValueError, match="momentum=1"):
        momentum_norm(3, 1.0)


def _rand(g, shape=(4, 3)):
    return torch.randn(*shape, generator=g)


def test_site_variate_recovers_the_sites_gradient():
    """A site whose gradient is a constant g and that adds d = c − c_i moves by
    −lr·‖a‖₁·(g + d): option II gives back c_i⁺ = g exactly."""
    gen = torch.Generator().manual_seed(0)
    x, g, c, own = ({"w": _rand(gen)} for _ in range(4))
    lr, steps = 0.05, 13
    d = {"w": c["w"] - own["w"]}
    y = {"w": x["w"] - lr * momentum_norm(steps) * (g["w"] + d["w"])}
    out = site_variate(d, x, y, lr=lr, steps=steps)
    torch.testing.assert_close(out["w"], g["w"], rtol=1e-4, atol=1e-5)
    y0 = {"w": x["w"] - lr * steps * (g["w"] + d["w"])}  # momentum 0: the paper's formula
    torch.testing.assert_close(site_variate(d, x, y0, lr=lr, steps=steps, momentum=0.0)["w"],
                               own["w"] - c["w"] + (x["w"] - y0["w"]) / (steps * lr))
    first = site_variate(None, x, {"w": x["w"] - lr * momentum_norm(steps) * g["w"]},
                         lr=lr, steps=steps)  # round 1: nothing sent
    torch.testing.assert_close(first["w"], g["w"], rtol=1e-4, atol=1e-5)


def _replies(msgs, states, weights, steps, extra=None):
    out = []
    for i, (msg, state, w, tau) in enumerate(zip(msgs, states, weights, steps)):
        rec = state if isinstance(state, ArrayRecord) else ArrayRecord(state)
        metrics = {keys.NUM_EXAMPLES: w, keys.STEPS: tau, **((extra or {}).get(i, {}))}
        content = RecordDict({keys.ARRAYS: rec, keys.METRICS: MetricRecord(metrics),
                              keys.STATUS: ConfigRecord({keys.SITE_ID: f"site-{w}",
                                                         keys.STATE: keys.STATE_OK})})
        out.append(Message(content, reply_to=msg))
    return out


class _Renumbered(FakeGrid):
    """The same sites under new node ids (a restart, a resumed simulation)."""

    def get_node_ids(self):
        return [100 + i for i in super().get_node_ids()]


def test_strategy_sends_each_site_c_minus_ci_and_keeps_fedavgs_mean():
    """Three sites with constant gradients g_k and unequal steps: after round 1 the server
    holds c_k = g_k and c = Σ p_k g_k; round 2 sends site k exactly c − g_k, whose
    size-weighted sum is 0; the aggregate itself is FedAvg's weighted mean."""
    lr, weights, steps = 0.01, [120, 64, 40], [4, 2, 2]
    cfg = RunConfig(num_sites=3, dp=False, strategy="scaffold", lr=lr)
    strategy = build_strategy("scaffold", cfg)
    gen = torch.Generator().manual_seed(1)
    x = {"a": _rand(gen), "b": _rand(gen, (5,))}
    grads = [{n: _rand(gen, t.shape) for n, t in x.items()} for _ in weights]
    msgs = list(strategy.configure_train(1, ArrayRecord(x), ConfigRecord({}), FakeGrid(3)))
    assert all(received_correction(m) is None for m in msgs)  # nothing to correct yet
    ys = [{n: x[n] - lr * momentum_norm(tau) * g[n] for n in x}
          for g, tau in zip(grads, steps)]
    agg, _ = strategy.aggregate_train(1, _replies(msgs, ys, weights, steps))
    p = [w / sum(weights) for w in weights]
    mean = agg.to_torch_state_dict()
    for n in x:
        torch.testing.assert_close(mean[n], sum(pk * y[n] for pk, y in zip(p, ys)))
    inner = strategy.inner
    c = {n: sum(pk * g[n] for pk, g in zip(p, grads)) for n in x}
    for w, g in zip(weights, grads):
        for n in x:
            torch.testing.assert_close(inner.site_c[f"site-{w}"][n], g[n], rtol=1e-4, atol=1e-5)
    for n in x:
        torch.testing.assert_close(inner.c[n], c[n], rtol=1e-4, atol=1e-5)
    msgs2 = {m.metadata.dst_node_id: m
             for m in strategy.configure_train(2, agg, ConfigRecord({}), FakeGrid(3))}
    corrections = [received_correction(msgs2[m.metadata.dst_node_id]) for m in msgs]
    for corr, g in zip(corrections, grads):
        for n in x:
            torch.testing.assert_close(corr[n], c[n] - g[n], rtol=1e-4, atol=1e-5)
    for n in x:
        total = sum(pk * corr[n] for pk, corr in zip(p, corrections))
        assert float(total.abs().max()) < 1e-5


def test_sites_keep_their_variates_under_new_node_ids():
    """After a restart the same sites reply under new node ids: until they have, each is
    sent c alone, its next variate subtracts what it was sent, and no stale entry stays."""
    lr, weights, steps = 0.01, [30, 20], [3, 2]
    strategy = build_strategy("scaffold", RunConfig(num_sites=2, dp=False,
                                                    strategy="scaffold", lr=lr))
    gen = torch.Generator().manual_seed(4)
    x = {"w": _rand(gen)}
    grads = [{"w": _rand(gen)} for _ in weights]
    msgs = list(strategy.configure_train(1, ArrayRecord(x), ConfigRecord({}), FakeGrid(2)))
    ys = [{"w": x["w"] - lr * momentum_norm(t) * g["w"]} for g, t in zip(grads, steps)]
    strategy.aggregate_train(1, _replies(msgs, ys, weights, steps))
    inner = strategy.inner
    c = inner.c["w"].clone()
    msgs = list(strategy.configure_train(2, ArrayRecord(x), ConfigRecord({}), _Renumbered(2)))
    for m in msgs:  # unknown node ids: c − 0
        torch.testing.assert_close(received_correction(m)["w"], c)
    new = [{"w": _rand(gen)} for _ in weights]
    ys = [{"w": x["w"] - lr * momentum_norm(t) * (g["w"] + c)} for g, t in zip(new, steps)]
    strategy.aggregate_train(2, _replies(msgs, ys, weights, steps))
    assert sorted(inner.site_c) == ["site-20", "site-30"]
    assert sorted(inner.node_site) == [1, 2, 101, 102]
    for w, g in zip(weights, new):
        torch.testing.assert_close(inner.site_c[f"site-{w}"]["w"], g["w"], rtol=1e-4, atol=1e-5)


def test_a_reply_without_usable_steps_or_at_another_rank_moves_no_variate():
    strategy = build_strategy("scaffold", RunConfig(num_sites=3, dp=False, strategy="scaffold"))
    x = {"w": torch.zeros(4)}
    msgs = list(strategy.configure_train(1, ArrayRecord(x), ConfigRecord({}), FakeGrid(3)))
    ys = [{"w": torch.full((4,), -0.1 * (k + 1))} for k in range(3)]
    agg, _ = strategy.aggregate_train(1, _replies(msgs, ys, [10, 20, 30], [2, 0, 2],
                                                  extra={0: {keys.LORA_RANK: 8}, 1: {keys.LORA_RANK: 8},
                                                         2: {keys.LORA_RANK: 4}}))
    torch.testing.assert_close(agg.to_torch_state_dict()["w"], torch.full((4,), -14 / 60))
    inner = strategy.inner
    assert sorted(inner.site_c) == ["site-10"]
    assert [s["site"] for s in inner.skipped[1]] == ["site-20", "site-30"]
    assert "must be an integer >= 1, got 0" in inner.skipped[1][0]["reason"]
    assert "rank 4, not the run's 8" in inner.skipped[1][1]["reason"]


def test_variates_use_what_the_sites_received_on_a_16_bit_wire():
    """x and c − c_i are rounded to bf16 on the way: the server keeps the rounded ones,
    which the sites trained from and added."""
    cfg = RunConfig(num_sites=2, dp=False, strategy="scaffold", wire_dtype="bfloat16")
    strategy = build_strategy("scaffold", cfg)
    gen = torch.Generator().manual_seed(5)
    x = {"w": _rand(gen, (64,))}
    msgs = list(strategy.configure_train(1, ArrayRecord(x), ConfigRecord({}), FakeGrid(2)))
    inner = strategy.inner
    rounded = wire.decode(wire.encode(x, "bfloat16"))["w"]
    assert torch.equal(inner._sent["w"], rounded) and not torch.equal(rounded, x["w"])
    ys = [{"w": x["w"] - 0.3 * _rand(gen, (64,))} for _ in range(2)]
    strategy.aggregate_train(1, _replies(msgs, [wire.encode(y, "bfloat16") for y in ys],
                                         [10, 10], [3, 3]))
    msgs = list(strategy.configure_train(2, ArrayRecord(x), ConfigRecord({}), FakeGrid(2)))
    for m in msgs:
        rec = m.content.array_records[keys.SCAFFOLD_CORRECTION]
        assert wire.format_problem(rec, "bfloat16") is None
        assert wire.format_problem(rec, "float32") is not None
        assert torch.equal(inner._applied[m.metadata.dst_node_id]["w"], wire.decode(rec)["w"])


def _linear_data(n=40):
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.zeros(n, dtype=torch.long))


def _linear():
    torch.manual_seed(0)
    return nn.Linear(6, 2)


def _linear_loss(logits, y):  # linear in the weights: every step's gradient is fixed
    return logits[:, 0].mean()


def test_correction_goes_through_momentum_without_dp():
    """Zero data gradient: the weights move by −lr·‖a(τ)‖₁·d, the momentum distance."""
    model, d = _linear(), torch.full((2, 6), 0.3)
    w0 = model.weight.detach().clone()
    res = train(model, _linear_data(), epochs=2, lr=0.02, batch_size=16, device=CPU, seed=0,
                loss_fn=lambda logits, y: 0.0 * logits.sum(),
                grad_correction=[(model.weight, d)])
    assert res.steps == 6
    torch.testing.assert_close(model.weight.detach() - w0, -0.02 * momentum_norm(6) * d)


def test_correction_is_added_after_dp_clipping_and_noise():
    """DP-SGD twice with the same seeds (same Poisson batches, same noise) on a loss whose
    gradients do not depend on the weights: the only difference is the correction, moved
    exactly −lr·‖a(τ)‖₁·d, so it was neither clipped nor scaled by Opacus."""
    data, dp = _linear_data(), DPRequest(noise_multiplier=1.0, max_grad_norm=0.5)
    d = torch.full((2,), 5.0)  # far above the clip norm: clipping would shrink it
    runs = []
    for corr in (False, True):
        model = _linear()
        pairs = [(model.bias, d)] if corr else []
        res = train(model, data, epochs=1, lr=0.02, batch_size=8, device=CPU, seed=7, dp=dp,
                    loss_fn=_linear_loss, grad_correction=pairs)
        runs.append((model, res))
    (plain, r0), (corrected, r1) = runs
    assert r0.steps == r1.steps and r0.sample_rate == r1.sample_rate
    torch.testing.assert_close(corrected.weight, plain.weight)
    torch.testing.assert_close(corrected.bias - plain.bias, -0.02 * momentum_norm(r1.steps) * d,
                               rtol=1e-5, atol=1e-6)
    assert not hasattr(corrected, "_forward_counter")  # Opacus removed itself as usual


def test_site_refuses_a_correction_that_does_not_fit():
    model = nn.Linear(3, 2)
    site = SimpleNamespace(name="north", personalised_keys=())
    good = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    assert [p for p, _ in correction_pairs(site, model, good)] == [model.weight, model.bias]
    with pytest.raises(ValueError, match="site north.*other tensors.*'extra'"):
        correction_pairs(site, model, {**good, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(2,\)"):
        correction_pairs(site, model, {**good, "bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="non-finite"):
        correction_pairs(site, model, {**good, "bias": torch.tensor([0.0, math.nan])})
    personal = SimpleNamespace(name="north", personalised_keys=("head",))
    with pytest.raises(ValueError, match="personalises \\['head'\\].*personalised_keys"):
        correction_pairs(personal, model, good)


@pytest.mark.parametrize("changes,match", [
    (dict(site_dp=True), "site-dp"),
    (dict(personal_keys="head"), "personal-keys"),
    (dict(num_sites=2, site_ranks="8,4"), "site-ranks"),
    (dict(scenario="domain-incremental", num_sites=3, num_server_rounds=6), "continual"),
    (dict(secure_aggregation=True, num_sites=3), "needs each site's individual update"),
])
def test_run_config_refuses_what_scaffold_cannot_do(changes, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(strategy="scaffold", **changes)
    RunConfig(strategy="fedavg", **changes)  # the same keys are fine with fedavg
