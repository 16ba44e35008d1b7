"""Drift tests (client/drift.py): exact BH decisions, MMD/KS power and false alarms."""

import numpy as np
import pytest
import torch

from fedadapt.client.drift import (DriftConfig, benjamini_hochberg, drift_test,
                                   mmd_permutation_test, prediction_drift)

CFG = DriftConfig(alpha=0.05, permutations=99)


def test_benjamini_hochberg_reference_decisions():
    # thresholds k*alpha/m = .0125, .025, .0375, .05 (Benjamini & Hochberg 1995)
    assert benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.2]), 0.05).tolist() == [
        True, False, False, False]
    assert benjamini_hochberg(np.array([0.04, 0.01, 0.03, 0.02]), 0.05).all()
    assert not benjamini_hochberg(np.array([0.3, 0.6]), 0.05).any()


def test_mmd_identical_vs_shifted():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 4, generator=g), torch.randn(60, 4, generator=g)
    _, p_same = mmd_permutation_test(x, y, permutations=99, generator=g)
    mmd2, p_shift = mmd_permutation_test(x, y + 1.0, permutations=99, generator=g)
    assert p_same > 0.05 and mmd2 > 0 and p_shift == pytest.approx(1 / 100)
    with pytest.raises(ValueError, match="two"):
        mmd_permutation_test(x, torch.randn(5, 3), permutations=19, generator=g)


def test_no_shift_false_alarms_at_most_the_level_and_shift_always_alerts():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(100, 8, generator=g)
    alarms = sum(drift_test(ref, torch.randn(100, 8, generator=g), CFG, generator=g).alert
                 for _ in range(20))
    assert alarms <= 1  # 20 windows at alpha = 0.05
    shift = torch.zeros(8)
    shift[:2] = 1.0  # a scanner change moves a few embedding dimensions
    results = [drift_test(ref, torch.randn(100, 8, generator=g) + shift, CFG, generator=g)
               for _ in range(5)]
    assert all(r.alert for r in results)
    assert all({0, 1} <= set(r.ks_rejected) for r in results)  # BH: FDR, not FWER


def test_prediction_drift():
    assert prediction_drift(np.array([30, 30, 40]), np.array([30, 30, 40])) == pytest.approx(1.0)
    assert prediction_drift(np.array([30, 30, 40]), np.array([90, 5, 5])) < 1e-6


def test_config_validation():
    with pytest.raises(ValueError, match="DriftConfig.alpha"):
        DriftConfig(alpha=1.5)
