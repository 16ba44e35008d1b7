"""Exact-value tests of continual.metrics on hand-made matrices."""

import math

import pytest

from fedadapt.continual.metrics import acc, bwt, forgetting, fwt, summarize

# R[i][j]: score on phase j after training phase i (T = 3).
R = [
    [0.9, 0.1, 0.2],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 0.95],
]
B = [0.1, 0.2, 0.25]

# A matrix where phase 0 first improves (0.6 -> 0.9) then drops to 0.8:
# BWT measures from the diagonal, forgetting from the best earlier score.
R2 = [
    [0.6, 0.0, 0.0],
    [0.9, 0.7, 0.0],
    [0.8, 0.4, 1.0],
]


def test_acc_is_mean_of_last_row():
    # (0.5 + 0.7 + 0.95) / 3 = 2.15 / 3
    assert acc(R) == pytest.approx(2.15 / 3, abs=1e-12)
    # (0.8 + 0.4 + 1.0) / 3 = 2.2 / 3
    assert acc(R2) == pytest.approx(2.2 / 3, abs=1e-12)


def test_bwt_by_hand():
    # ((0.5 - 0.9) + (0.7 - 0.8)) / 2 = (-0.4 - 0.1) / 2 = -0.25
    assert bwt(R) == pytest.approx(-0.25, abs=1e-12)
    # ((0.8 - 0.6) + (0.4 - 0.7)) / 2 = (0.2 - 0.3) / 2 = -0.05
    assert bwt(R2) == pytest.approx(-0.05, abs=1e-12)


def test_fwt_by_hand():
    # j=1: R[0][1] - b1 = 0.1 - 0.2 = -0.1 ; j=2: R[1][2] - b2 = 0.3 - 0.25 = 0.05
    # mean = (-0.1 + 0.05) / 2 = -0.025
    assert fwt(R, B) == pytest.approx(-0.025, abs=1e-12)


def test_forgetting_by_hand():
    # j=0: max(0.9, 0.6) - 0.5 = 0.4 ; j=1: max(0.1, 0.8) - 0.7 = 0.1 ; mean 0.25
    assert forgetting(R) == pytest.approx(0.25, abs=1e-12)
    # j=0: max(0.6, 0.9) - 0.8 = 0.1 ; j=1: max(0.0, 0.7) - 0.4 = 0.3 ; mean 0.2
    assert forgetting(R2) == pytest.approx(0.2, abs=1e-12)


def test_no_forgetting_when_scores_hold():
    r = [[0.7, 0.2], [0.7, 0.9]]
    assert bwt(r) == 0.0
    assert forgetting(r) == 0.0
    assert acc(r) == pytest.approx(0.8, abs=1e-12)


def test_summarize_is_json_ready():
    s = summarize(R, B)
    assert s["R"] == R
    assert math.isclose(s["BWT"], -0.25, abs_tol=1e-12)
    assert summarize(R)["FWT"] is None


@pytest.mark.parametrize(
    "bad",
    [[], [[0.1, 0.2]], [[0.1, float("nan")], [0.2, 0.3]]],
)
def test_bad_matrices_raise(bad):
    with pytest.raises(ValueError, match="R"):
        acc(bad)


def test_single_phase_and_bad_baseline_raise():
    with pytest.raises(ValueError, match="at least 2 phases"):
        bwt([[0.5]])
    with pytest.raises(ValueError, match="length T=3"):
        fwt(R, [0.1, 0.2])
