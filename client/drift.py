"""Drift tests at a site: frozen-backbone embeddings and predictions against a reference
window the site keeps.

* MMD two-sample permutation test (Gretton et al., JMLR 2012, "A Kernel Two-Sample
  Test"): unbiased MMD² with a Gaussian kernel, bandwidth by the median heuristic on the
  pooled sample, p-value from permutations of the pooled sample.
* Per-dimension Kolmogorov-Smirnov tests (``scipy.stats.ks_2samp``) with the
  Benjamini-Hochberg procedure (JRSS-B 1995) controlling the false discovery rate.
* Prediction-distribution drift: chi-square test of the predicted-class counts
  (:func:`prediction_drift`), or, exact at any window size, a permutation test of the
  chi-square statistic of the two windows' predicted labels
  (:func:`prediction_permutation_test`).

``drift_test`` raises one alert when any of its tests rejects, each run at α/k for its
k tests (Bonferroni: α/2 for the two embedding tests, α/3 with predictions), so the
false-alarm rate without shift is at most α.

The site's monitor (:mod:`client.drift_monitor`) runs these tests in every training
round; the p-values and the alert bit it sends are a documented known leak.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats


@dataclass(frozen=True)
class DriftConfig:
    """Settings of ``drift_test``.

    Attributes:
        alpha: False-alarm level of the combined alert.
        permutations: Permutations of the MMD test.
        max_samples: Each window is subsampled to at most this many rows (MMD is O(n²)).
    """

    alpha: float = 0.05
    permutations: int = 200
    max_samples: int = 500

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"DriftConfig.alpha must be in (0, 1), got {self.alpha}")
        if self.permutations < 19:
            raise ValueError(f"DriftConfig.permutations must be >= 19 (p-values below 0.05 "
                             f"need them), got {self.permutations}")
        if self.max_samples < 4:
            raise ValueError(f"DriftConfig.max_samples must be >= 4, got {self.max_samples}")


def _sq_dists(z: torch.Tensor) -> torch.Tensor:
    sq = (z * z).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)


def _mmd2_batch(k: torch.Tensor, in_x: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² for each row of ``in_x`` (P, N), 1.0 where the pooled row is in X.

    With K' the kernel matrix without its diagonal, MMD²_u = s'K's / (n(n-1)) +
    (1-s)'K'(1-s) / (m(m-1)) - 2 s'K(1-s) / (nm) (Gretton et al. 2012, eq. 3).
    """
    n = in_x[0].sum()
    m = in_x.shape[1] - n
    k0 = k - torch.diag(k.diagonal())
    ks = in_x @ k0  # (P, N)
    sxx = (ks * in_x).sum(1)
    syy = ((1 - in_x) @ k0 * (1 - in_x)).sum(1)
    sxy = (ks * (1 - in_x)).sum(1)  # the diagonal never pairs X with Y
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)


def mmd_permutation_test(x: torch.Tensor, y: torch.Tensor, *, permutations: int,
                         generator: torch.Generator) -> tuple[float, float]:
    """MMD² of samples (n, d) and (m, d) and its permutation p-value.

    Returns:
        ``(mmd2, p)`` with ``p = (1 + #{permuted >= observed}) / (1 + permutations)``.

    Raises:
        ValueError: If a sample has fewer than 2 rows or the widths differ.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"MMD needs two (n >= 2, d) samples of one width, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    z = torch.cat([x, y]).double()
    d2 = _sq_dists(z)
    off = d2[~torch.eye(len(z), dtype=torch.bool)]
    bandwidth = off.median().clamp_min(1e-12)  # median heuristic (Gretton et al. 2012)
    k = torch.exp(-d2 / bandwidth)
    labels = torch.zeros(len(z), dtype=torch.float64)
    labels[: len(x)] = 1.0
    perms = torch.stack([labels[torch.randperm(len(z), generator=generator)]
                         for _ in range(permutations)])
    stat = _mmd2_batch(k, torch.cat([labels[None], perms]))  # (1 + P,)
    hits = int((stat[1:] >= stat[0]).sum())
    return float(stat[0]), (1 + hits) / (1 + permutations)


def benjamini_hochberg(pvalues: np.ndarray, alpha: float) -> np.ndarray:
    """Which hypotheses the Benjamini-Hochberg step-up procedure rejects at FDR ``alpha``."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p)
    below = p[order] <= alpha * np.arange(1, m + 1) / m
    reject = np.zeros(m, dtype=bool)
    if below.any():
        reject[order[: np.nonzero(below)[0].max() + 1]] = True
    return reject


def ks_per_dimension(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Two-sample KS p-value of each embedding dimension: (n, d), (m, d) -> (d,)."""
    a, b = x.detach().cpu().numpy(), y.detach().cpu().numpy()
    return np.array([stats.ks_2samp(a[:, j], b[:, j]).pvalue for j in range(a.shape[1])])


def prediction_drift(reference_counts: np.ndarray, current_counts: np.ndarray) -> float:
    """p-value of a chi-square test that two predicted-class count vectors share one
    distribution (classes predicted in neither window are dropped)."""
    table = np.stack([np.asarray(reference_counts), np.asarray(current_counts)]).astype(float)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(stats.chi2_contingency(table)[1])


def bh_min_adjusted(pvalues: np.ndarray) -> float:
    """The smallest Benjamini-Hochberg adjusted p-value, ``min_k m p_(k) / k`` (at most 1):
    BH at FDR ``q`` rejects some hypothesis iff this is ``<= q``."""
    p = np.sort(np.asarray(pvalues, dtype=float))
    return float(min(1.0, (p * p.size / np.arange(1, p.size + 1)).min()))


def _chi2_stat(a: np.ndarray, b: np.ndarray, num_classes: int) -> np.ndarray:
    """Pearson's chi-square of 2 x K tables: ``a``, ``b`` (P, n), (P, m) labels -> (P,)."""
    ca = np.stack([np.bincount(r, minlength=num_classes) for r in a]).astype(float)
    cb = np.stack([np.bincount(r, minlength=num_classes) for r in b]).astype(float)
    tot = ca + cb
    n, m = a.shape[1], b.shape[1]
    ea, eb = tot * n / (n + m), tot * m / (n + m)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(tot > 0, (ca - ea) ** 2 / ea + (cb - eb) ** 2 / eb, 0.0)
    return terms.sum(1)


def prediction_permutation_test(reference: np.ndarray, current: np.ndarray, *,
                                permutations: int, generator: torch.Generator) -> float:
    """p-value that two windows' predicted labels share one distribution: the chi-square
    statistic of their 2 x K count table against its permutation distribution, so the
    test holds its level for windows too small for the chi-square approximation.

    Args:
        reference: (n,) predicted class of each reference record.
        current: (m,) predicted class of each current record.
        permutations: Permutations of the pooled labels.
        generator: Seeds the permutations.

    Returns:
        ``(1 + #{permuted >= observed}) / (1 + permutations)``.
    """
    ref, cur = np.asarray(reference, dtype=np.int64), np.asarray(current, dtype=np.int64)
    if ref.ndim != 1 or cur.ndim != 1 or min(ref.size, cur.size) < 1 or min(
            ref.min(), cur.min()) < 0:
        raise ValueError(f"prediction test needs two non-empty 1-D windows of class indices, "
                         f"got shapes {ref.shape} and {cur.shape}")
    pooled = np.concatenate([ref, cur])
    k = int(pooled.max()) + 1
    order = torch.stack([torch.randperm(pooled.size, generator=generator)
                         for _ in range(permutations)]).numpy()
    perm = pooled[order]  # (P, n + m)
    observed = _chi2_stat(ref[None], cur[None], k)[0]
    permuted = _chi2_stat(perm[:, : ref.size], perm[:, ref.size:], k)
    return (1 + int((permuted >= observed - 1e-9).sum())) / (1 + permutations)


@dataclass(frozen=True)
class DriftResult:
    """One window's test result (what leaves the site is ``alert`` and the p-values).

    Attributes:
        mmd2: Unbiased MMD² of the two windows' embeddings.
        mmd_p: Its permutation p-value.
        ks_rejected: Embedding dimensions BH rejects.
        ks_min_p: The smallest raw per-dimension KS p-value.
        alert: Whether any test rejected at its share of α.
        ks_p: The smallest BH-adjusted KS p-value (compared with its share of α).
        pred_p: The prediction test's p-value (1.0 when no predictions were given).
        tests: How many tests α was split over (2, or 3 with predictions).
    """

    mmd2: float
    mmd_p: float
    ks_rejected: tuple[int, ...]
    ks_min_p: float
    alert: bool
    ks_p: float = 1.0
    pred_p: float = 1.0
    tests: int = 2


def drift_test(reference: torch.Tensor, current: torch.Tensor, cfg: DriftConfig = DriftConfig(),
               *, generator: torch.Generator, reference_pred: np.ndarray | None = None,
               current_pred: np.ndarray | None = None) -> DriftResult:
    """Test a window of embeddings (and predictions) against the site's reference window.

    Args:
        reference: (n, d) embeddings of the reference window.
        current: (m, d) embeddings of the current window.
        cfg: Level, permutations, subsample size.
        generator: Seeds the subsampling and the permutations.
        reference_pred: (n,) predicted classes of the reference window under the model
            being monitored, or None (no prediction test).
        current_pred: (m,) the same for the current window.

    Returns:
        The result; ``alert`` when MMD or KS + BH (FDR) rejects at α/2 each, or, with
        predictions, when MMD, KS + BH or the prediction test rejects at α/3 each.
    """
    with_pred = reference_pred is not None and current_pred is not None
    tests = 3 if with_pred else 2
    level = cfg.alpha / tests

    def sub(z: torch.Tensor) -> torch.Tensor:
        if len(z) <= cfg.max_samples:
            return z
        return z[torch.randperm(len(z), generator=generator)[: cfg.max_samples]]

    ref, cur = sub(reference.detach().cpu()), sub(current.detach().cpu())
    mmd2, p = mmd_permutation_test(ref, cur, permutations=cfg.permutations, generator=generator)
    ks = ks_per_dimension(ref, cur)
    rejected = benjamini_hochberg(ks, level)
    pred_p = (prediction_permutation_test(reference_pred, current_pred,  # type: ignore[arg-type]
                                          permutations=cfg.permutations, generator=generator)
              if with_pred else 1.0)
    return DriftResult(mmd2, p, tuple(int(i) for i in np.nonzero(rejected)[0]),
                       float(ks.min()), bool(p <= level or rejected.any() or pred_p <= level),
                       ks_p=bh_min_adjusted(ks), pred_p=pred_p, tests=tests)
