"""Adapter strategies and update validation on real Flower Messages (no simulation)."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.strategies import lora_math as lm
from fedadapt.strategies import wire
from fedadapt.strategies.factory import build_strategy
from fedadapt.strategies.validation import Validated
from tests.flower_helpers import FakeGrid

A, B = "m.qkv.lora_A.default.weight", "m.qkv.lora_B.default.weight"
HEAD = "head.modules_to_save.default.weight"


pytestmark = pytest.mark.usefixtures("task_identity")


def _state(g, r=4):
    return {A: torch.randn(r, 16, generator=g), B: torch.randn(12, r, generator=g),
            HEAD: torch.randn(3, 16, generator=g)}


def _round(name, states, weights, sent, **cfg_kw):
    cfg = RunConfig(num_sites=len(states), lora_rank=12, dp=False, strategy=name, **cfg_kw)
    strategy = build_strategy(name, cfg)
    msgs = list(strategy.configure_train(1, ArrayRecord(sent), ConfigRecord({}),
                                         FakeGrid(len(states))))
    replies = []
    for msg, state, w in zip(msgs, states, weights):
        content = RecordDict({keys.ARRAYS: ArrayRecord(state),
                              keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: w}),
                              keys.STATUS: ConfigRecord({keys.SITE_ID: f"site-{w}",
                                                         keys.STATE: keys.STATE_OK})})
        replies.append(Message(content, reply_to=msg))
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, (arrays.to_torch_state_dict() if arrays is not None else None)


def _target(states, weights):
    return lm.product_sum([s[B] for s in states], [s[A] for s in states], weights)


def test_exact_and_ffa_reproduce_sum_fedavg_does_not():
    g = torch.Generator().manual_seed(1)
    states, w = [_state(g) for _ in range(3)], [10, 20, 40]
    sent = _state(g)
    _, agg = _round("exact", states, w, sent)
    assert lm.relative_error(agg[B] @ agg[A], _target(states, w)) < 1e-5
    _, agg = _round("fedavg", states, w, sent)
    assert lm.relative_error(agg[B] @ agg[A], _target(states, w)) > 0.1
    for s in states:  # FFA-LoRA: A shared, only B + head travel
        s[A] = sent[A]
    only_b = [{n: t for n, t in s.items() if n != A} for s in states]
    _, agg = _round("ffa-lora", only_b, w, {n: t for n, t in sent.items() if n != A})
    assert set(agg) == {B, HEAD}
    assert lm.relative_error(agg[B] @ sent[A], _target(states, w)) < 1e-5


def test_validation_rejects_nan_and_scaled_update_and_keeps_the_rest():
    g = torch.Generator().manual_seed(2)
    sent = _state(g)
    states = [{n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in sent.items()}
              for _ in range(5)]
    states[0] = {n: t.clone() for n, t in states[0].items()}
    states[0][B][0, 0] = math.nan
    states[1] = {n: sent[n] + 100 * (t - sent[n]) for n, t in states[1].items()}
    strategy, agg = _round("fedavg", states, [1, 2, 3, 4, 5], sent)
    reasons = {r["site"]: r["reason"] for r in strategy.rejected[1]}
    assert set(reasons) == {"site-1", "site-2"}
    assert "non-finite" in reasons["site-1"] and "median" in reasons["site-2"]
    clean = lm.weighted_mean(states[2:], [3, 4, 5])
    for n in agg:
        torch.testing.assert_close(agg[n], clean[n])


def test_validation_rejects_wrong_names_shapes_dtypes():
    g = torch.Generator().manual_seed(3)
    sent = _state(g)
    bad_name = {**sent, "extra.weight": torch.zeros(2)}
    bad_shape = {**sent, B: torch.zeros(12, 5)}
    bad_dtype = {**sent, HEAD: sent[HEAD].double()}
    strategy, agg = _round("median", [bad_name, bad_shape, bad_dtype, sent], [1, 2, 3, 4], sent)
    assert len(strategy.rejected[1]) == 3
    for n in sent:
        torch.testing.assert_close(agg[n], sent[n])


def test_validation_rejects_replies_in_another_wire_dtype():
    # The run asks for bfloat16 on the wire: a reply in float32, float16 or float64, or
    # with a truncated payload, is rejected before decoding (which would hide the dtype).
    g = torch.Generator().manual_seed(5)
    sent = _state(g)
    states = [{n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in sent.items()}
              for _ in range(6)]
    short = wire.encode(states[4], "bfloat16")
    short[HEAD].data = short[HEAD].data[:-2]
    records = [wire.encode(states[0], "bfloat16"), wire.encode(states[1], "float32"),
               wire.encode(states[2], "float16"),
               ArrayRecord({**states[3], A: states[3][A].double()}), short,
               wire.encode(states[5], "bfloat16")]
    strategy = build_strategy("fedavg", RunConfig(num_sites=6, lora_rank=12, dp=False,
                                                  wire_dtype="bfloat16"))
    msgs = list(strategy.configure_train(1, ArrayRecord(sent), ConfigRecord({}), FakeGrid(6)))
    replies = [Message(RecordDict({
        keys.ARRAYS: rec, keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1}),
        keys.STATUS: ConfigRecord({keys.SITE_ID: f"site-{i}", keys.STATE: keys.STATE_OK})}),
        reply_to=m) for i, (m, rec) in enumerate(zip(msgs, records))]
    agg = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()
    why = {r["site"]: r["reason"] for r in strategy.rejected[1]}
    assert set(why) == {"site-1", "site-2", "site-3", "site-4"}, why
    assert "sent as float32 on the wire, the run's wire-dtype is bfloat16" in why["site-1"]
    assert "float16" in why["site-2"] and "float64" in why["site-3"]
    assert f"{HEAD}: 94 bytes" in why["site-4"] and "expected 96" in why["site-4"]
    valid = [wire.decode(records[i]) for i in (0, 5)]  # bf16 values, accumulated in fp32
    for n in agg:
        assert agg[n].dtype == torch.float32
        torch.testing.assert_close(agg[n], (valid[0][n] + valid[1][n]) / 2)


def test_float32_run_rejects_float64_reply_that_decoding_would_hide():
    g = torch.Generator().manual_seed(6)
    sent = _state(g)
    strategy = build_strategy("fedavg", RunConfig(num_sites=3, lora_rank=12, dp=False))
    msgs = list(strategy.configure_train(1, ArrayRecord(sent), ConfigRecord({}), FakeGrid(3)))
    f64 = {n: t.double() for n, t in sent.items()}
    replies = [Message(RecordDict({keys.ARRAYS: ArrayRecord(s), keys.METRICS: MetricRecord(
        {keys.NUM_EXAMPLES: 1})}), reply_to=m) for m, s in zip(msgs, [sent, f64, sent])]
    strategy.aggregate_train(1, replies)
    [rej] = strategy.rejected[1]
    assert rej["site"] == f"node-{replies[1].metadata.src_node_id}"
    assert "sent as float64 on the wire, the run's wire-dtype is float32" in rej["reason"]


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_robust_rules_neutralise_scaled_update_without_validation(name):
    g = torch.Generator().manual_seed(4)
    sent = _state(g)
    states = [{n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in sent.items()}
              for _ in range(5)]
    states[0] = {n: sent[n] + 100 * (t - sent[n]) for n, t in states[0].items()}
    strategy = build_strategy(name, RunConfig(num_sites=5, dp=False), validate=False)
    assert not isinstance(strategy, Validated)
    msgs = list(strategy.configure_train(1, ArrayRecord(sent), ConfigRecord({}), FakeGrid(5)))
    replies = [Message(RecordDict({keys.ARRAYS: ArrayRecord(s), keys.METRICS: MetricRecord(
        {keys.NUM_EXAMPLES: 1})}), reply_to=m) for m, s in zip(msgs, states)]
    agg = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()
    for n in agg:
        assert float((agg[n] - sent[n]).norm()) < 0.1 * float((states[0][n] - sent[n]).norm())


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="strategy"):
        RunConfig(strategy="nope")
    with pytest.raises(ValueError, match="unknown"):
        build_strategy("nope", RunConfig())


@pytest.mark.parametrize("name, flower_eta", [("fedadam", 0.1), ("fedyogi", 0.01)])
def test_server_lr_is_the_server_optimisers_step(name, flower_eta):
    """A first server-optimiser step is η × (a function of the sites' mean delta):
    ``server-lr`` scales it linearly, and 0 keeps Flower's default η."""
    g = torch.Generator().manual_seed(2)
    states, w, sent = [_state(g) for _ in range(3)], [10, 20, 40], _state(g)

    def step(**kw):
        _, agg = _round(name, [dict(st) for st in states], w, dict(sent), **kw)
        return {n: agg[n] - sent[n] for n in sent}

    one, two, default, flower = (step(server_lr=1e-3), step(server_lr=2e-3), step(),
                                 step(server_lr=flower_eta))
    for n in sent:
        assert one[n].abs().max() > 0
        torch.testing.assert_close(two[n], 2 * one[n], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(default[n], flower[n])
        torch.testing.assert_close(flower[n], flower_eta / 1e-3 * one[n], rtol=1e-4,
                                   atol=1e-6)


def test_server_lr_needs_a_server_optimiser():
    from fedadapt.config import ConfigError

    with pytest.raises(ConfigError, match="server-lr.*'fedavg' has no server optimiser"):
        RunConfig(server_lr=0.01)
    with pytest.raises(ConfigError, match="server-lr"):
        RunConfig(strategy="fedadam", server_lr=-1.0)
    assert RunConfig(strategy="fedyogi", server_lr=0.003).server_lr == 0.003
