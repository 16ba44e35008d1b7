"""Exactness of LoRA aggregation math (strategies/lora_math.py)."""

import pytest
import torch

from fedadapt.strategies import lora_math as lm

A, B = "blk.0.qkv.lora_A.default.weight", "blk.0.qkv.lora_B.default.weight"
HEAD = "head.modules_to_save.default.weight"


def _sites(ranks, out=24, inn=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{A: torch.randn(r, inn, generator=g), B: torch.randn(out, r, generator=g),
             HEAD: torch.randn(3, inn, generator=g)} for r in ranks]


def test_fedavg_of_factors_is_inexact():
    sites, w = _sites([4, 4, 4]), [10, 30, 60]
    target = lm.product_sum([s[B] for s in sites], [s[A] for s in sites], w)
    avg = lm.weighted_mean(sites, w)
    assert lm.relative_error(avg[B] @ avg[A], target) > 0.1


def test_ffa_lora_shared_a_is_exact():
    sites, w = _sites([4, 4, 4]), [10, 30, 60]
    for s in sites:
        s[A] = sites[0][A]
    target = lm.product_sum([s[B] for s in sites], [s[A] for s in sites], w)
    avg = lm.weighted_mean(sites, w)
    assert lm.relative_error(avg[B] @ avg[A], target) < 1e-5


def test_flora_stack_and_exact_svd_reproduce_sum():
    sites, w = _sites([2, 3, 4]), [1, 2, 3]
    target = lm.product_sum([s[B] for s in sites], [s[A] for s in sites], w)
    b, a = lm.flora_stack([s[B] for s in sites], [s[A] for s in sites], w)
    assert lm.relative_error(b @ a, target) < 1e-5
    agg, resid = lm.exact_aggregate(sites, w, rank=9)  # rank of the sum ≤ 2+3+4
    assert agg[A].shape == (9, 20) and agg[B].shape == (24, 9)
    assert lm.relative_error(agg[B] @ agg[A], target) < 1e-5 and resid < 1e-5
    torch.testing.assert_close(agg[HEAD], lm.weighted_mean([{HEAD: s[HEAD]} for s in sites], w)[HEAD])


def test_exact_svd_reports_residual_when_rank_too_small():
    sites, w = _sites([4, 4, 4]), [1, 1, 1]
    target = lm.product_sum([s[B] for s in sites], [s[A] for s in sites], w)
    agg, resid = lm.exact_aggregate(sites, w, rank=4)
    assert 0 < resid < 1
    assert lm.relative_error(agg[B] @ agg[A], target) == pytest.approx(resid, rel=1e-3)


def test_heterogeneous_ranks_round_trip():
    site = _sites([3])[0]
    padded = lm.pad_rank(site, 8)
    assert padded[A].shape[0] == 8 and padded[B].shape[1] == 8
    torch.testing.assert_close(padded[B] @ padded[A], site[B] @ site[A])
    back, resid = lm.to_rank(padded, 3)
    assert back[A].shape == site[A].shape and resid < 1e-5
    torch.testing.assert_close(back[B] @ back[A], site[B] @ site[A], rtol=1e-4, atol=1e-4)


def test_median_and_trimmed_mean_neutralise_scaled_update():
    sites = _sites([4] * 5)
    clean = lm.median(sites)
    sites[0] = {n: 100 * t for n, t in sites[0].items()}
    for agg in (lm.median(sites), lm.trimmed_mean(sites, 0.2)):
        for n in agg:
            assert agg[n].abs().max() < 10 * clean[n].abs().max()
    assert lm.weighted_mean(sites, [1] * 5)[B].abs().max() > 10 * clean[B].abs().max()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="weights"):
        lm.normalise([0, 0])
    with pytest.raises(ValueError, match="trim"):
        lm.trimmed_mean(_sites([2, 2]), 0.5)
    with pytest.raises(ValueError, match="unpaired"):
        lm.lora_pairs({A: torch.zeros(1, 1)})
