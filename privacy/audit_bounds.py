"""Statistical lower bounds on ε from a privacy audit: pure math, no torch.

Two estimators turn the outcome of a membership game on canaries into an ε lower bound
that holds with probability ``confidence``:

* ``one_run_epsilon_lower`` — the one-run audit of Steinke, Nasr & Jagielski (NeurIPS
  2023, "Privacy auditing with one (1) training run", arXiv:2305.08846, the (ε, δ)
  p-value of their Section 5 as computed by Appendix D's ``p_value_DP_audit`` /
  ``get_eps_audit``): m canaries, each included independently with
  probability 1/2; the auditor makes r guesses and v are correct. For an (ε, δ)-DP
  mechanism, P[V ≥ v] ≤ P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2mδ·α(v), so the largest ε
  whose p-value is still below 1 − confidence is a valid lower bound.
* ``tpr_fpr_epsilon_lower`` — the classic threshold estimator (Jagielski et al. 2020,
  "Auditing Differentially Private Machine Learning"): ε ≥ log((TPR_lo − δ) / FPR_hi)
  with Clopper–Pearson bounds on TPR and FPR. Its guarantee is per-example (it
  treats the canaries' outcomes as independent trials of the attack).

``auroc`` summarises the separation of the scores (Mann–Whitney statistic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy import stats

#: Binary-search iterations when scanning ε (resolution below 1e-9 for ε ≤ 100).
_BISECT_STEPS = 60


def _check_game(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of observing ≥ ``v`` correct of ``r`` guesses under (ε, δ)-DP.

    Steinke, Nasr & Jagielski 2023 (Appendix D, ``p_value_DP_audit``): with q = e^ε / (1 + e^ε),
    β = P[Binomial(r, q) ≥ v] and α = max_{1≤i≤v} P[v − i ≤ Binomial(r, q) < v] / i,
    the p-value is min(1, β + 2 m δ α).

    Args:
        m: Canaries in the game.
        r: Guesses made (the rest abstain).
        v: Correct guesses.
        eps: ε of the hypothesis being tested, ≥ 0.
        delta: δ of the hypothesis, in [0, 1].

    Returns:
        The p-value, in [0, 1].
    """
    _check_game(m, r, v)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha, tail = 0.0, 0.0
    for i in range(1, v + 1):
        tail += float(stats.binom.pmf(v - i, r, q))  # P[v - i <= Binomial < v]
        alpha = max(alpha, tail / i)
    return min(1.0, beta + 2.0 * m * delta * alpha)


def one_run_epsilon_lower(m: int, r: int, v: int, *, delta: float = 0.0,
                          confidence: float = 0.95) -> float:
    """Largest ε that ``v`` correct out of ``r`` guesses rejects at ``confidence``.

    Steinke, Nasr & Jagielski 2023: scan ε (bisection; the p-value increases with ε, so
    the rejected ε form an interval [0, ε*)) for the largest ε with p-value
    < 1 − confidence. 0.0 when even ε = 0 is not rejected.

    Args:
        m: Canaries; r: guesses; v: correct guesses.
        delta: δ of the claim being audited.
        confidence: 1 − the failure probability of the bound.

    Returns:
        ε_lower ≥ 0: with probability ≥ ``confidence`` the mechanism is not
        (ε, δ)-DP for any ε < ε_lower.
    """
    _check_game(m, r, v)
    _check_confidence(confidence)
    p = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
        if hi > 1e4:  # v = r with a tiny p: the bound is limited only by r
            return lo
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        if one_run_p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Two-sided Clopper–Pearson interval for a binomial proportion (Clopper & Pearson 1934)."""
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"need 0 <= successes ({successes}) <= trials ({trials}), trials >= 1")
    _check_confidence(confidence)
    a = 1.0 - confidence
    lo = 0.0 if successes == 0 else float(stats.beta.ppf(a / 2, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(stats.beta.ppf(1 - a / 2, successes + 1,
                                                                 trials - successes))
    return lo, hi


@dataclass(frozen=True)
class ThresholdEstimate:
    """The TPR/FPR estimator at one threshold.

    Attributes:
        threshold: Scores ≥ threshold are called "included".
        tpr: Observed true-positive rate; fpr: observed false-positive rate.
        tpr_lower: Clopper–Pearson lower bound on TPR; fpr_upper: upper bound on FPR.
        epsilon_lower: max(0, log((tpr_lower − δ) / fpr_upper)); 0 when TPR_lo ≤ δ.
    """

    threshold: float
    tpr: float
    fpr: float
    tpr_lower: float
    fpr_upper: float
    epsilon_lower: float


def tpr_fpr_epsilon_lower(scores_in: Sequence[float], scores_out: Sequence[float], *,
                          threshold: float, delta: float = 0.0,
                          confidence: float = 0.95) -> ThresholdEstimate:
    """ε ≥ log((TPR_lo − δ) / FPR_hi) at one threshold (Jagielski et al. 2020).

    Each of TPR and FPR gets a two-sided Clopper–Pearson interval at ``confidence``
    (so both hold together with probability ≥ 2·confidence − 1).

    Args:
        scores_in: Scores of canaries that were included (positives).
        scores_out: Scores of canaries that were left out (negatives).
        threshold: Decision threshold; score ≥ threshold → guess "included".
        delta: δ of the claim.
        confidence: Confidence of each Clopper–Pearson interval.
    """
    if not scores_in or not scores_out:
        raise ValueError("need at least one included and one excluded canary")
    tp = sum(1 for s in scores_in if s >= threshold)
    fp = sum(1 for s in scores_out if s >= threshold)
    tpr_lo, _ = clopper_pearson(tp, len(scores_in), confidence)
    _, fpr_hi = clopper_pearson(fp, len(scores_out), confidence)
    eps = math.log((tpr_lo - delta) / fpr_hi) if tpr_lo > delta else 0.0
    return ThresholdEstimate(threshold=threshold, tpr=tp / len(scores_in),
                             fpr=fp / len(scores_out), tpr_lower=tpr_lo, fpr_upper=fpr_hi,
                             epsilon_lower=max(0.0, eps))


def auroc(scores_in: Sequence[float], scores_out: Sequence[float]) -> float:
    """Area under the ROC curve: P[score_in > score_out] + ½ P[tie] (Mann–Whitney U / n1 n0)."""
    if not scores_in or not scores_out:
        raise ValueError("need at least one included and one excluded canary")
    u = stats.mannwhitneyu(list(scores_in), list(scores_out), alternative="two-sided").statistic
    return float(u) / (len(scores_in) * len(scores_out))
