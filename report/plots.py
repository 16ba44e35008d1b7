"""PNG plots of a run's ``summary.json`` (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedadapt import atomic


def _sites(rounds: list[dict[str, Any]], stage: str) -> list[str]:
    return sorted({s for r in rounds for s in r.get(stage, {})})


def _series(rounds: list[dict[str, Any]], stage: str, site: str,
            metric: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rounds:
        m = r.get(stage, {}).get(site)
        if m is not None and m.get(metric) is not None:
            xs.append(int(r["round"]))
            ys.append(float(m[metric]))
    return xs, ys


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    atomic.write_figure(path, fig, dpi=100)
    plt.close(fig)
    return path


def score_name(summary: dict[str, Any]) -> str:
    """The run's headline metric: ``dice`` for segmentation, else ``accuracy``."""
    return "dice" if any(r.get("dice") is not None for r in summary["rounds"]) else "accuracy"


def plot_metrics(summary: dict[str, Any], out: Path) -> Path:
    """Per-site evaluation score (accuracy, or foreground Dice for segmentation) and
    train/eval loss over rounds."""
    rounds = summary["rounds"]
    score = score_name(summary)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for site in _sites(rounds, "evaluate"):
        ax_acc.plot(*_series(rounds, "evaluate", site, score), marker="o", label=site)
        ax_loss.plot(*_series(rounds, "evaluate", site, "loss"), marker="o", label=f"{site} eval")
    for site in _sites(rounds, "train"):
        ax_loss.plot(*_series(rounds, "train", site, "loss"), ls="--", marker=".",
                     label=f"{site} train")
    acc = [(int(r["round"]), r[score]) for r in rounds if r.get(score) is not None]
    if acc:
        ax_acc.plot(*zip(*acc), color="black", lw=2, label="weighted")
    ax_acc.set(title=f"Evaluation {score} per site", xlabel="round", ylabel=score)
    ax_loss.set(title="Loss per site", xlabel="round", ylabel="loss")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_acc, ax_loss):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, out / "metrics.png")


def _caps(summary: dict[str, Any]) -> dict[str, float]:
    """Per-site ε caps if the summary records them (``sites[s].epsilon_cap`` or ``privacy.caps``)."""
    caps: dict[str, float] = {}
    for site, info in summary.get("sites", {}).items():
        for key in ("epsilon_cap", "cap", "budget"):
            if isinstance(info, dict) and isinstance(info.get(key), (int, float)):
                caps[site] = float(info[key])
    for site, cap in (summary.get("privacy", {}).get("caps") or {}).items():
        if isinstance(cap, (int, float)):
            caps[str(site)] = float(cap)
    return caps


def plot_epsilon(summary: dict[str, Any], out: Path) -> Path:
    """Cumulative ε per site over rounds, with each site's cap when the summary has one."""
    rounds = summary["rounds"]
    caps = _caps(summary)
    fig, ax = plt.subplots(figsize=(6, 4))
    for site in _sites(rounds, "train"):
        (line,) = ax.plot(*_series(rounds, "train", site, "epsilon"), marker="o", label=site)
        if site in caps:
            ax.axhline(caps[site], color=line.get_color(), ls=":", label=f"{site} cap")
    if not summary.get("privacy", {}).get("dp", True):
        ax.set_title("ε per site (DP off: ε = ∞, not plotted)")
    else:
        ax.set_title("Cumulative ε per site")
    ax.set(xlabel="round", ylabel="ε")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out / "epsilon.png")


def plot_bytes(summary: dict[str, Any], out: Path) -> Path:
    """Bytes sent server→sites and sites→server per round."""
    rounds = summary["rounds"]
    xs = [int(r["round"]) for r in rounds]
    down = [r.get("bytes", {}).get("down", 0) / 1e6 for r in rounds]
    up = [r.get("bytes", {}).get("up", 0) / 1e6 for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([x - 0.2 for x in xs], down, width=0.4, label="down (server→sites)")
    ax.bar([x + 0.2 for x in xs], up, width=0.4, label="up (sites→server)")
    ax.set(title="Bytes sent per round", xlabel="round", ylabel="MB")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    return _save(fig, out / "bytes.png")


def _heatmap(matrix: list[list[float]], rows: list[str], cols: list[str], title: str,
             path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(cols), 1.2 + 0.6 * len(rows)))
    data = [[float("nan") if v is None else float(v) for v in row] for row in matrix]
    im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_cross_site(summary: dict[str, Any], out: Path) -> Path | None:
    """Cross-site evaluation matrix (model × test site), if the summary has one.

    Accepts ``cross_site`` as ``{"models": [...], "sites": [...], "accuracy": [[...]]}``
    or as ``{model: {site: accuracy}}``.
    """
    cs = summary.get("cross_site") or summary.get("cross_site_eval")
    if not isinstance(cs, dict) or not cs:
        return None
    if "accuracy" in cs and isinstance(cs["accuracy"], list):
        rows = [str(m) for m in cs.get("models", range(len(cs["accuracy"])))]
        cols = [str(s) for s in cs.get("sites", range(len(cs["accuracy"][0])))]
        matrix = cs["accuracy"]
    else:
        rows = sorted(cs)
        cols = sorted({s for m in cs.values() if isinstance(m, dict) for s in m})
        matrix = [[_acc(cs[m].get(s)) for s in cols] for m in rows]
    return _heatmap(matrix, rows, cols, "Cross-site evaluation (accuracy)", out / "cross_site.png")


def _acc(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("accuracy")
    return None if value is None else float(value)


def plot_continual(summary: dict[str, Any], out: Path) -> Path | None:
    """Continual accuracy matrix R[i][j] (after task i, on task j), if the summary has one."""
    c = summary.get("continual")
    matrix = None
    if isinstance(c, dict):
        matrix = c.get("R") or c.get("accuracy_matrix")
    elif isinstance(c, list):
        matrix = c
    if not matrix:
        return None
    n_rows, n_cols = len(matrix), max(len(r) for r in matrix)
    full = [list(r) + [None] * (n_cols - len(r)) for r in matrix]
    return _heatmap(full, [f"after task {i}" for i in range(n_rows)],
                    [f"task {j}" for j in range(n_cols)], "Continual accuracy matrix R",
                    out / "continual.png")


#: A site's drift plot is ``plots[DRIFT_PLOT + site]``.
DRIFT_PLOT = "drift:"
_DRIFT_TESTS = (("mmd_p", "MMD"), ("ks_p", "KS (BH-adjusted)"), ("pred_p", "predictions"))


def _file_part(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def plot_drift(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    """One plot per site of its drift monitor's p-values over rounds (log scale), with
    each test's level (α/3) and the rounds it raised its alert; none without a monitor."""
    drift = summary.get("drift")
    if not isinstance(drift, dict) or not drift.get("sites"):
        return {}
    level = float(drift.get("alpha", 0.05)) / len(_DRIFT_TESTS)
    plots = {}
    for site, entries in sorted(drift["sites"].items()):
        tested = [e for e in entries if e.get("tested")]
        fig, ax = plt.subplots(figsize=(6, 3))
        for key, label in _DRIFT_TESTS:
            ax.plot([e["round"] for e in tested], [max(float(e[key]), 1e-4) for e in tested],
                    marker="o", label=label)
        ax.axhline(level, color="red", ls=":", label=f"level α/3 = {level:.3g}")
        for e in tested:
            if e.get("alert"):
                ax.axvline(e["round"], color="red", alpha=0.25, lw=6)
        ax.set_yscale("log")
        ax.set(title=f"Drift at {site} (shaded: alert)", xlabel="round",
               ylabel="p-value (floored at 1e-4)",
               ylim=(1e-4 / 2, 1.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        plots[DRIFT_PLOT + site] = _save(fig, out / f"drift-{_file_part(site)}.png")
    return plots


def all_plots(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    """Every plot this summary supports, as ``{name: png path}``."""
    plots = {"metrics": plot_metrics(summary, out), "epsilon": plot_epsilon(summary, out),
             "bytes": plot_bytes(summary, out)}
    for name, fn in (("cross_site", plot_cross_site), ("continual", plot_continual)):
        path = fn(summary, out)
        if path is not None:
            plots[name] = path
    plots.update(plot_drift(summary, out))
    return plots
