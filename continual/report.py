"""The ``continual`` section of summary.json and the R heatmap PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedadapt import atomic
from fedadapt.continual.metrics import as_matrix, summarize

__all__ = ["continual_section", "write_heatmap"]


def continual_section(
    r: Sequence[Sequence[float]] | np.ndarray,
    *,
    method: str,
    scenario: str,
    baseline: Sequence[float] | None = None,
) -> dict[str, object]:
    """JSON-ready {R, ACC, BWT, FWT, forgetting, method, scenario}.

    Args:
        r: T×T matrix, ``r[i][j]`` = score on phase j's test sets after phase i.
        method: the continual method (naive, ewc, lwf, replay, olora).
        scenario: the scenario name.
        baseline: the initial model's score per phase (for FWT), or None.
    """
    out = summarize(r, baseline)
    out.update(method=method, scenario=scenario)
    return out


def write_heatmap(r: Sequence[Sequence[float]] | np.ndarray, path: Path, *, title: str = "") -> Path:
    """Write R as an annotated heatmap PNG (rows: phase trained, cols: phase tested)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = as_matrix(r)
    t = m.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 * t + 2, 1.2 * t + 1.5))
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(t):
        for j in range(t):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center",
                    color="white" if m[i, j] < 0.6 else "black")
    ax.set_xticks(range(t), [f"test {j + 1}" for j in range(t)])
    ax.set_yticks(range(t), [f"after {i + 1}" for i in range(t)])
    ax.set_xlabel("phase evaluated")
    ax.set_ylabel("phase trained")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    atomic.write_figure(path, fig, dpi=100)
    plt.close(fig)
    return path
