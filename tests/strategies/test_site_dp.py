"""Site-level DP at the server (DP-FedAvg) on real Flower Messages: clipping, noise
scale and the site-level accountant, pinned against independent computations."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants import RDPAccountant

from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.strategies.factory import build_strategy
from fedadapt.strategies.site_dp import SiteLevelDP, clip_update
from tests.flower_helpers import FakeGrid

A, B = "m.qkv.lora_A.default.weight", "m.qkv.lora_B.default.weight"


pytestmark = pytest.mark.usefixtures("task_identity")


def test_clip_update_bounds_norm_and_keeps_direction():
    u = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # norm 5
    c, norm = clip_update(u, 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(c["a"], torch.tensor([0.6, 0.0])) and torch.allclose(c["b"], torch.tensor([[0.8]]))
    same, _ = clip_update(u, 10.0)
    assert all(torch.equal(same[k], u[k]) for k in u)


def _run(cfg, states, sent, rounds=1):
    strategy = build_strategy("fedavg", cfg)
    out = None
    for rnd in range(1, rounds + 1):
        # cfg.num_sites nodes are asked; only len(states) of them reply.
        msgs = list(strategy.configure_train(rnd, ArrayRecord(sent), ConfigRecord({}),
                                             FakeGrid(cfg.num_sites)))
        replies = [Message(RecordDict({
            keys.ARRAYS: ArrayRecord(s), keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10 * (i + 1)}),
            keys.STATUS: ConfigRecord({keys.SITE_ID: f"s{i}", keys.STATE: keys.STATE_OK})}),
            reply_to=m) for i, (m, s) in enumerate(zip(msgs, states))]
        arrays, _ = strategy.aggregate_train(rnd, replies)
        out = arrays.to_torch_state_dict()
    return strategy, out


def test_aggregate_is_uniform_mean_of_clipped_updates_plus_calibrated_noise():
    sent = {A: torch.zeros(4, 2000), B: torch.zeros(8, 4)}
    # site 0 moves far (norm 40), site 1 a little (norm 0.5)
    states = [{A: torch.full((4, 2000), 40.0 / math.sqrt(8000)), B: torch.zeros(8, 4)},
              {A: torch.zeros(4, 2000), B: torch.full((8, 4), 0.5 / math.sqrt(32))}]
    cfg = RunConfig(num_sites=2, dp=False, site_dp=True, site_noise_multiplier=2.0,
                    site_clip_norm=1.0, seed=3)
    strategy, out = _run(cfg, states, sent)
    # Expected mean (equal weights, site 0 clipped to norm 1): A = c/2, B = b/2.
    mean_a = 1.0 / math.sqrt(8000) / 2
    noise = out[A] - mean_a
    # noise std must be z * S / k = 2 * 1 / 2 = 1 (8000 draws: ±4% at 3 sigma)
    assert noise.std().item() == pytest.approx(1.0, rel=0.05)
    assert abs(noise.mean().item()) < 0.05
    rep = strategy.site_level_report()
    assert rep["update_norms"]["1"] == {"s0": pytest.approx(40.0, rel=1e-5),
                                       "s1": pytest.approx(0.5, rel=1e-5)}
    assert rep["rounds"] == 1 and rep["sample_rates"] == [1.0]


def test_without_noise_budget_the_clipped_mean_is_exact():
    """With a tiny z the result is the equal-weight mean of clipped updates."""
    sent = {A: torch.ones(2, 3), B: torch.zeros(3, 2)}
    states = [{A: torch.ones(2, 3) + 3.0, B: torch.zeros(3, 2)},
              {A: torch.ones(2, 3), B: torch.zeros(3, 2) + 0.1}]
    cfg = RunConfig(num_sites=2, dp=False, site_dp=True, site_noise_multiplier=1e-9,
                    site_clip_norm=1.0)
    _, out = _run(cfg, states, sent)
    d0 = 3.0 / math.sqrt(54.0)  # site 0: every entry 3.0, norm sqrt(54), clipped to norm 1
    assert torch.allclose(out[A], torch.ones(2, 3) + d0 / 2, atol=1e-6)
    assert torch.allclose(out[B], torch.zeros(3, 2) + 0.05, atol=1e-6)


def test_site_level_epsilon_matches_opacus_rdp():
    sent = {A: torch.zeros(2, 3), B: torch.zeros(3, 2)}
    states = [{A: torch.randn(2, 3), B: torch.randn(3, 2)} for _ in range(3)]
    cfg = RunConfig(num_sites=4, dp=False, site_dp=True, site_noise_multiplier=1.3,
                    site_clip_norm=0.5, delta=1e-3)
    strategy, _ = _run(cfg, states, sent, rounds=5)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=3 / 4, noise_multiplier=1.3, steps=5, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-3)
    assert strategy.site_level_report()["epsilon"] == pytest.approx(eps, rel=1e-9)
    assert strategy.site_level_report()["sample_rates"] == [0.75] * 5


def test_bad_site_dp_config_is_an_error():
    with pytest.raises(ValueError, match="site-noise-multiplier"):
        RunConfig(site_dp=True, site_noise_multiplier=0.0)
    with pytest.raises(ValueError, match="clip norm"):
        SiteLevelDP(build_strategy("fedavg", RunConfig(), validate=False),
                    noise_multiplier=1.0, clip_norm=0.0, num_sites=3, delta=1e-5)
