"""Exact values of the audit estimators, checked against independent computations."""

from __future__ import annotations

import math

import pytest
from scipy import optimize, stats

from fedadapt.privacy.audit_bounds import (auroc, clopper_pearson, one_run_epsilon_lower,
                                  one_run_p_value, tpr_fpr_epsilon_lower)


def _independent_eps_delta0(r: int, v: int, confidence: float) -> float:
    """δ = 0: solve P[Binomial(r, q) >= v] = 1 - confidence for q, then ε = logit(q)."""
    q = optimize.brentq(lambda q: stats.binom.sf(v - 1, r, q) - (1 - confidence), 1e-9,
                        1 - 1e-12, xtol=1e-14)
    return math.log(q / (1 - q))


def test_worked_values_from_the_issue() -> None:
    assert one_run_epsilon_lower(1000, 100, 90, delta=0.0, confidence=0.95) == \
        pytest.approx(1.63, abs=0.005)
    assert one_run_epsilon_lower(1000, 100, 100, delta=0.0, confidence=0.95) == \
        pytest.approx(3.49, abs=0.005)


@pytest.mark.parametrize("r,v", [(100, 90), (100, 100), (50, 40), (200, 130), (20, 17)])
def test_matches_direct_binomial_tail(r: int, v: int) -> None:
    ours = one_run_epsilon_lower(1000, r, v, delta=0.0, confidence=0.95)
    assert ours == pytest.approx(_independent_eps_delta0(r, v, 0.95), abs=1e-6)
    # all-correct closed form: q^r = 1 - confidence
    if v == r:
        q = 0.05 ** (1 / r)
        assert ours == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_delta_term_by_hand() -> None:
    m, r, v, eps, delta = 1000, 100, 90, 1.0, 1e-4
    q = 1 / (1 + math.exp(-eps))
    pmf = [stats.binom.pmf(k, r, q) for k in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1))
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(beta + 2 * m * delta * alpha,
                                                                   rel=1e-9)


def test_delta_only_lowers_the_bound_and_chance_gives_zero() -> None:
    base = one_run_epsilon_lower(1000, 100, 90, delta=0.0)
    assert one_run_epsilon_lower(1000, 100, 90, delta=1e-5) < base
    assert one_run_epsilon_lower(1000, 100, 90, delta=1e-3) < \
        one_run_epsilon_lower(1000, 100, 90, delta=1e-5)
    assert one_run_epsilon_lower(1000, 100, 50) == 0.0  # coin flipping proves nothing
    assert one_run_epsilon_lower(1000, 100, 90, confidence=0.99) < base


def test_bad_game_is_refused() -> None:
    with pytest.raises(ValueError, match="correct"):
        one_run_epsilon_lower(10, 20, 5)
    with pytest.raises(ValueError, match="confidence"):
        one_run_epsilon_lower(100, 20, 5, confidence=1.0)


def test_clopper_pearson_exact() -> None:
    lo, hi = clopper_pearson(9, 10, 0.95)
    assert lo == pytest.approx(0.554983, abs=1e-6)  # textbook value for 9/10
    assert hi == pytest.approx(0.997471, abs=1e-6)
    assert clopper_pearson(0, 10, 0.95)[0] == 0.0
    assert clopper_pearson(0, 10, 0.95)[1] == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-9)


def test_tpr_fpr_estimator_exact() -> None:
    scores_in = [float(s) for s in range(10, 20)]  # 10 positives, all above 9.5
    scores_out = [float(s) for s in range(0, 10)]  # 10 negatives, all below
    est = tpr_fpr_epsilon_lower(scores_in, scores_out, threshold=9.5, delta=0.0)
    assert (est.tpr, est.fpr) == (1.0, 0.0)
    tpr_lo = 0.025 ** (1 / 10)
    fpr_hi = 1 - 0.025 ** (1 / 10)
    assert est.epsilon_lower == pytest.approx(math.log(tpr_lo / fpr_hi), rel=1e-9)
    est_d = tpr_fpr_epsilon_lower(scores_in, scores_out, threshold=9.5, delta=0.1)
    assert est_d.epsilon_lower == pytest.approx(math.log((tpr_lo - 0.1) / fpr_hi), rel=1e-9)
    none = tpr_fpr_epsilon_lower(scores_in, scores_out, threshold=100.0)
    assert none.epsilon_lower == 0.0


def test_auroc_exact() -> None:
    assert auroc([3, 4, 5], [1, 2, 3.5]) == pytest.approx(8 / 9)
    assert auroc([1, 2], [1, 2]) == pytest.approx(0.5)
    assert auroc([5, 6], [1, 2]) == 1.0
