"""Drift tests at a site: frozen-backbone embeddings and predictions against a reference
window the site keeps.

* MMD two-sample permutation test (Gretton et al., JMLR 2012, "A Kernel Two-Sample
  Test"): unbiased MMD² with a Gaussian kernel, bandwidth by the median heuristic on the
  pooled sample, p-value from permutations of the pooled sample.
* Per-dimension Kolmogorov-Smirnov tests (``scipy.stats.ks_2samp``) with the
  Benjamini-Hochberg procedure (JRSS-B 1995) controlling the false discovery rate.
* Prediction-distribution drift: chi-square test of the predicted-class counts.

``drift_test`` raises one alert when either embedding test rejects, each run at α/2
(Bonferroni), so the false-alarm rate without shift is at most α.

Library code only: wiring into the site's reply, ``summary.json`` and the report is not
done yet; a p-value or alert bit that leaves the site is a function of private data
(a known leak unless released under DP and recorded in the ledger).
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


@dataclass(frozen=True)
class DriftResult:
    """One window's test result (what could leave the site is ``alert`` or the p-values)."""

    mmd2: float
    mmd_p: float
    ks_rejected: tuple[int, ...]
    ks_min_p: float
    alert: bool


def drift_test(reference: torch.Tensor, current: torch.Tensor, cfg: DriftConfig = DriftConfig(),
               *, generator: torch.Generator) -> DriftResult:
    """Test a window of embeddings against the site's reference window.

    Args:
        reference: (n, d) embeddings of the reference window.
        current: (m, d) embeddings of the current window.
        cfg: Level, permutations, subsample size.
        generator: Seeds the subsampling and the permutations.

    Returns:
        The result; ``alert`` when MMD (at α/2) or KS + BH (FDR α/2) rejects.
    """
    def sub(z: torch.Tensor) -> torch.Tensor:
        if len(z) <= cfg.max_samples:
            return z
        return z[torch.randperm(len(z), generator=generator)[: cfg.max_samples]]

    ref, cur = sub(reference.detach().cpu()), sub(current.detach().cpu())
    mmd2, p = mmd_permutation_test(ref, cur, permutations=cfg.permutations, generator=generator)
    ks = ks_per_dimension(ref, cur)
    rejected = benjamini_hochberg(ks, cfg.alpha / 2)
    return DriftResult(mmd2, p, tuple(int(i) for i in np.nonzero(rejected)[0]),
                       float(ks.min()), bool(p <= cfg.alpha / 2 or rejected.any()))
