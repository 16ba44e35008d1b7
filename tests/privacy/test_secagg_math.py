"""Secure aggregation's arithmetic (privacy/secagg.py), the Skellam accountant
(privacy/distributed_dp.py) and the run-config refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.supercore.primitives.asymmetric import (generate_key_pairs, private_key_to_bytes,
                                                  public_key_to_bytes)

from fedadapt.config import ConfigError, RunConfig
from fedadapt.privacy import distributed_dp as ddp
from fedadapt.privacy import secagg as sa


def test_prg_is_deterministic_uniform_and_seed_sensitive():
    a = sa.prg(b"k" * 32, [(1000,), (3, 4)])
    assert [x.shape for x in a] == [(1000,), (3, 4)]
    assert all(np.array_equal(x, y) for x, y in zip(a, sa.prg(b"k" * 32, [(1000,), (3, 4)])))
    assert not np.array_equal(a[0], sa.prg(b"j" * 32, [(1000,)])[0])
    assert a[0].min() >= 0 and a[0].max() < 2**32
    assert abs(a[0].mean() / 2**32 - 0.5) < 0.05  # uniform over the ring
    # Full 32-byte seeds: two seeds that fold to the same 32-bit word still differ.
    s1, s2 = b"\x01\0\0\0" + b"\0" * 28, b"\0" * 28 + b"\x01\0\0\0"
    assert not np.array_equal(sa.prg(s1, [(8,)])[0], sa.prg(s2, [(8,)])[0])


def test_masks_cancel_and_the_mean_decodes_within_the_quantisation_error():
    rng = np.random.default_rng(1)
    params = sa.SecAggParams(clip_norm=1.0, max_weight=100)
    names = ["a", "b"]
    updates = [{"a": torch.randn(5, 2) * 0.1, "b": torch.randn(3) * 0.1} for _ in range(3)]
    weights = [10, 40, 25]
    keys_ = {(0, 1): b"x" * 32, (0, 2): b"y" * 32, (1, 2): b"z" * 32}
    seeds = [bytes([i]) * 32 for i in range(3)]
    total = None
    for i, (u, w) in enumerate(zip(updates, weights)):
        q = sa.quantise(u, names, params, w, rng)
        pair = {j: keys_[tuple(sorted((i, j)))] for j in range(3) if j != i}
        masked = sa.mask(q, seeds[i], i, pair)
        assert not any(np.array_equal(m, x) for m, x in zip(masked, q))
        total = masked if total is None else sa.add(total, masked)
    for seed in seeds:
        total = sa.add(total, sa.prg(seed, sa.shapes_of(total)), -1)
    mean, q_sum = sa.decode_mean(total, names, 3, params)
    assert q_sum == sum(params.factor(w) for w in weights)
    step = 2 * params.clip_norm / params.target_range
    for n in names:
        want = sum(w * u[n] for u, w in zip(updates, weights)) / sum(weights)
        assert float((mean[n] - want).abs().max()) <= 3 * step / (q_sum / params.target_range) \
            + 1e-5


def test_clip_l2_bounds_the_norm_and_keeps_small_updates():
    big = {"a": torch.full((4,), 3.0)}
    clipped, norm = sa.clip_l2(big, 1.0)
    assert norm == pytest.approx(6.0) and float(clipped["a"].norm()) == pytest.approx(1.0)
    small = {"a": torch.full((4,), 0.1)}
    assert torch.equal(sa.clip_l2(small, 1.0)[0]["a"], small["a"])


def test_a_weight_above_max_weight_is_refused():
    with pytest.raises(sa.SecAggError, match="secagg-max-weight"):
        sa.SecAggParams(clip_norm=1.0, max_weight=10).factor(11)
    assert sa.SecAggParams(clip_norm=1.0).factor(12345) == sa.TARGET_RANGE  # equal weights


def test_reconstruct_excludes_a_tampered_share():
    seed = bytes(range(32))
    shares = dict(zip([7, 8, 9], create_shares(seed, 2, 3)))
    verify = sa.seed_verifier(sa.seed_digest(seed))
    assert sa.reconstruct(shares, 2, verify) == (seed, [])
    bad = bytearray(shares[8])
    bad[-1] ^= 1
    assert sa.reconstruct({**shares, 8: bytes(bad)}, 2, verify) == (seed, [8])
    with pytest.raises(sa.SecAggError, match="tampered"):
        sa.reconstruct({7: shares[7], 8: bytes(bad)}, 2, verify)
    with pytest.raises(sa.SecAggError, match="2 needed"):
        sa.reconstruct({7: shares[7]}, 2, verify)


def test_a_private_key_is_checked_against_its_public_key():
    sk, pk = generate_key_pairs()
    other, _ = generate_key_pairs()
    verify = sa.key_verifier(public_key_to_bytes(pk))
    assert verify(private_key_to_bytes(sk)) and not verify(private_key_to_bytes(other))
    assert not verify(b"not a key")


def test_headroom_refuses_a_sum_that_would_wrap():
    params = sa.SecAggParams(clip_norm=1.0)
    sa.check_headroom(50, 1e6, params)
    with pytest.raises(sa.SecAggError, match="wrap"):
        sa.check_headroom(600, 0.0, params)


def test_check_masked_names_the_problem():
    shapes = {"a": (2,)}
    assert sa.check_masked({"a": np.array([1, 2], dtype=np.uint32)}, shapes) is None
    assert "names" in sa.check_masked({"b": np.array([1, 2])}, shapes)
    assert "shape" in sa.check_masked({"a": np.array([1, 2, 3])}, shapes)
    assert "integers" in sa.check_masked({"a": np.array([0.5, 1.0])}, shapes)


# --- distributed DP -------------------------------------------------------------------

def test_skellam_rdp_pinned_values():
    # Agarwal et al. 2021 Thm 3.5 by hand: α=2, Δ2=Δ1=1, μ=10:
    # 2·1/20 + min((3·1 + 6)/(4·100), 3/20) = 0.1 + 0.0225
    assert ddp.skellam_rdp(2, l2=1.0, l1=1.0, variance=10.0) == pytest.approx(0.1225)
    # α=8, Δ2=3, Δ1=9, μ=5: 8·9/10 + min((15·9 + 54)/100, 27/10) = 7.2 + 1.89
    assert ddp.skellam_rdp(8, l2=3.0, l1=9.0, variance=5.0) == pytest.approx(9.09)
    # the second term is the smaller one for small μ: α=2, Δ2=Δ1=1, μ=0.5: 2 + min(9, 3)
    assert ddp.skellam_rdp(2, l2=1.0, l1=1.0, variance=0.5) == pytest.approx(5.0)


def test_skellam_epsilon_pinned_and_tends_to_the_gaussian():
    # One release, Δ2 = 1, Δ1 = 1, variance 4 (std 2), δ = 1e-5: the conversion of
    # Balle et al. 2020 (Opacus's), evaluated here by hand over the same orders.
    def by_hand(l2, l1, var, delta):
        best = math.inf
        for a in ddp.ORDERS:
            rdp = a * l2**2 / (2 * var) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * var**2),
                                              3 * l1 / (2 * var))
            best = min(best, rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a))
                       / (a - 1))
        return best
    eps = ddp.skellam_epsilon([(1.0, 1.0, 4.0)], delta=1e-5)
    assert eps == pytest.approx(by_hand(1.0, 1.0, 4.0, 1e-5), rel=1e-9)
    assert eps == pytest.approx(2.5311, abs=1e-3)  # ≈ the Gaussian σ=2 ε (2.52) + a little
    # Large variance relative to Δ: the Gaussian mechanism's ε at σ = std / Δ2.
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    big = 1e6
    gauss, _ = get_privacy_spent(orders=list(ddp.ORDERS), rdp=compute_rdp(
        q=1.0, noise_multiplier=math.sqrt(big) / 1e3, steps=1, orders=list(ddp.ORDERS)),
        delta=1e-5)
    assert ddp.skellam_epsilon([(1e3, 1e3, big)], delta=1e-5) == pytest.approx(gauss, rel=1e-2)
    assert ddp.skellam_epsilon([(1.0, 1.0, 4.0)] * 2, delta=1e-5) > eps  # rounds compose


def test_skellam_noise_has_its_variance_and_is_an_integer():
    rng = np.random.default_rng(0)
    (noise,) = ddp.skellam_noise([(200_000,)], 50.0, rng)
    assert noise.dtype == np.int64 and abs(noise.mean()) < 0.1
    assert noise.var() == pytest.approx(50.0, rel=0.02)


def test_sensitivity_and_site_variance():
    l2, l1 = ddp.sensitivity(1.0, 2.0**21, 100)
    assert l2 == 2.0**21 + 10 and l1 == pytest.approx(10 * l2)
    assert ddp.site_variance(2.0, l2, 4) == pytest.approx((2 * l2) ** 2 / 4)


# --- run config -----------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(strategy="median"), "needs each site's individual update"),
    (dict(strategy="trimmed-mean"), "needs each site's individual update"),
    (dict(strategy="exact"), "needs each site's individual update"),
    (dict(strategy="fedadam"), "server optimiser"),
    (dict(site_dp=True), "'site-dp'"),
    (dict(num_sites=2), "num-sites' >= 3"),
    (dict(secagg_threshold=1), "secagg-threshold"),
    (dict(secagg_noise="gauss"), "secagg-noise"),
    (dict(scenario="site-incremental", num_server_rounds=3), "continual"),
])
def test_secure_aggregation_refuses_what_needs_individual_updates(change, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(secure_aggregation=True, **change)


def test_noise_without_secure_aggregation_is_refused():
    with pytest.raises(ConfigError, match="needs 'secure-aggregation'"):
        RunConfig(secagg_noise="skellam")
    assert RunConfig.from_mapping({"secure-aggregation": True, "strategy": "ffa-lora",
                                   "secagg-noise": "skellam"}).secure_aggregation
