"""Continual-learning metrics on an accuracy matrix R.

``R[i][j]`` is the score on phase j's test set after training phase i
(0-based here; T phases, so R is T×T). Definitions follow Lopez-Paz & Ranzato,
"Gradient Episodic Memory for Continual Learning" (NeurIPS 2017) for ACC, BWT
and FWT, and Chaudhry et al., "Riemannian Walk for Incremental Learning"
(ECCV 2018) for forgetting. All functions are pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["as_matrix", "acc", "bwt", "fwt", "forgetting", "summarize"]


def as_matrix(r: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Validate and return R as a square float64 array.

    Args:
        r: T×T scores, ``r[i][j]`` = score on phase j after training phase i.

    Returns:
        The matrix as ``np.ndarray`` of shape (T, T).

    Raises:
        ValueError: if R is not a non-empty square matrix of finite numbers.
    """
    m = np.asarray(r, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(
            f"R must be a non-empty square T×T matrix (row = phase trained, "
            f"column = phase evaluated); got shape {m.shape}"
        )
    if not np.all(np.isfinite(m)):
        raise ValueError("R contains NaN or infinite scores; evaluate every phase's test set")
    return m


def _need_two(m: np.ndarray, name: str) -> int:
    t = m.shape[0]
    if t < 2:
        raise ValueError(f"{name} needs at least 2 phases; R has T={t}")
    return t


def acc(r: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Average accuracy after the last phase: ACC = (1/T) Σ_j R[T][j]."""
    m = as_matrix(r)
    return float(m[-1].mean())


def bwt(r: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Backward transfer: BWT = 1/(T−1) Σ_{j<T} (R[T][j] − R[j][j]).

    Negative values mean forgetting (Lopez-Paz & Ranzato 2017).

    Raises:
        ValueError: if T < 2.
    """
    m = as_matrix(r)
    t = _need_two(m, "BWT")
    return float(np.mean([m[-1, j] - m[j, j] for j in range(t - 1)]))


def fwt(r: Sequence[Sequence[float]] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Forward transfer: FWT = 1/(T−1) Σ_{j≥2} (R[j−1][j] − b_j).

    Args:
        r: the T×T matrix.
        b: length-T scores of the initial (untrained) model on each phase's test set.

    Raises:
        ValueError: if T < 2 or ``b`` does not have length T.
    """
    m = as_matrix(r)
    t = _need_two(m, "FWT")
    base = np.asarray(b, dtype=np.float64)
    if base.shape != (t,):
        raise ValueError(f"baseline b must have length T={t}; got shape {base.shape}")
    return float(np.mean([m[j - 1, j] - base[j] for j in range(1, t)]))


def forgetting(r: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Average forgetting (Chaudhry et al. 2018).

    f_j = max_{l<T} R[l][j] − R[T][j] for each j < T, averaged over j. Rows l < j
    (before phase j was trained) are included as in the formula; they rarely
    hold the maximum.

    Raises:
        ValueError: if T < 2.
    """
    m = as_matrix(r)
    t = _need_two(m, "forgetting")
    return float(np.mean([m[: t - 1, j].max() - m[-1, j] for j in range(t - 1)]))


def summarize(
    r: Sequence[Sequence[float]] | np.ndarray, b: Sequence[float] | np.ndarray | None = None
) -> dict[str, object]:
    """All metrics as a JSON-ready dict: R, ACC, BWT, FWT (None without b), forgetting."""
    m = as_matrix(r)
    return {
        "R": m.tolist(),
        "ACC": acc(m),
        "BWT": bwt(m),
        "FWT": None if b is None else fwt(m, b),
        "forgetting": forgetting(m),
    }
