"""Forgetting per continual-learning method, each run through the real federation.

Every method (``naive``, ``ewc``, ``lwf``, ``replay``, ``olora``) runs the same
continual scenario with the same seed on Flower's Simulation Engine
(``simulations.runner.simulate``), DP on unless ``--no-dp``; the server's accuracy
matrix R gives ACC, BWT and forgetting (``summary.json``'s ``continual`` block), and each
run's R heatmap is copied next to the table.

Usage::

    python benchmarks/bench_continual.py                          # domain-incremental, DP
    python benchmarks/bench_continual.py --scenario site-incremental --methods naive,lwf,olora
    python benchmarks/bench_continual.py --quick                  # 2 methods, tiny (tests)

The last line printed is BWT of the best method minus BWT of ``naive`` (points).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from fedadapt.config import CONTINUAL_METHODS, RunConfig
from fedadapt.simulations.runner import simulate


def run(method: str, args: argparse.Namespace, out: Path) -> dict:
    cfg = RunConfig(scenario=args.scenario, continual=method, phases=args.phases,
                    num_server_rounds=args.phases * args.rounds_per_phase,
                    num_sites=args.sites, site_train_size=args.train_size,
                    site_test_size=args.test_size, local_epochs=args.local_epochs,
                    replay_size=args.replay_size, dp=not args.no_dp,
                    epsilon_cap=1e6, cross_site_eval=False, seed=args.seed,
                    out_dir=str(out / method))
    summary = json.loads((simulate(cfg) / "summary.json").read_text())
    return summary["continual"] | {"run_dir": summary["run_dir"]}


def grid_figure(rs: dict[str, list[list[float]]], path: Path, title: str) -> Path:
    """One PNG with the accuracy matrix R of every method side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(rs), figsize=(2.6 * len(rs), 3.3), squeeze=False)
    for ax, (method, r) in zip(axes[0], rs.items()):
        m = np.asarray(r, dtype=float)
        ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] < 0.6 else "black")
        t = m.shape[0]
        ax.set_xticks(range(t), [f"{j + 1}" for j in range(t)])
        ax.set_yticks(range(t), [f"{i + 1}" for i in range(t)])
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("phase tested")
    axes[0][0].set_ylabel("after phase")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="domain-incremental",
                   choices=("domain-incremental", "site-incremental"))
    p.add_argument("--methods", default=",".join(CONTINUAL_METHODS))
    p.add_argument("--phases", type=int, default=3)
    p.add_argument("--rounds-per-phase", type=int, default=2)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--train-size", type=int, default=192)
    p.add_argument("--test-size", type=int, default=96)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--replay-size", type=int, default=RunConfig().replay_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dp", action="store_true")
    p.add_argument("--heatmaps", default="", help="folder to copy each method's R heatmap to")
    p.add_argument("--figure", default="", help="PNG with every method's R side by side")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.methods, args.phases, args.rounds_per_phase = "naive,olora", 2, 1
        args.sites, args.train_size, args.test_size = 2, 48, 24
    methods = args.methods.split(",")
    if "naive" not in methods:
        methods.insert(0, "naive")
    out = Path(tempfile.mkdtemp(prefix="bench-continual-"))
    rows = {}
    try:
        for m in methods:
            rows[m] = run(m, args, out)
            if args.heatmaps:
                dst = Path(args.heatmaps)
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy(Path(rows[m]["run_dir"]) / rows[m]["heatmap"],
                            dst / f"continual_{args.scenario}_{m}.png")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"scenario {args.scenario}, {args.phases} phases x {args.rounds_per_phase} rounds, "
          f"{args.sites} sites x {args.train_size} records, {args.local_epochs} local "
          f"epoch(s), replay-size {args.replay_size}, DP {'off' if args.no_dp else 'on'}, "
          f"seed {args.seed}")
    print(f"{'method':8s} {'ACC':>6s} {'BWT':>7s} {'forget':>7s}  R")
    for m, r in rows.items():
        print(f"{m:8s} {100 * r['ACC']:6.1f} {100 * r['BWT']:7.1f} {100 * r['forgetting']:7.1f}  "
              + " | ".join(" ".join(f"{v:.2f}" for v in row) for row in r["R"]))
    if args.figure:
        grid_figure({m: r["R"] for m, r in rows.items()}, Path(args.figure),
                    f"{args.scenario}, DP {'off' if args.no_dp else 'on'}")
    best = max((m for m in rows if m != "naive"), key=lambda m: rows[m]["BWT"], default="naive")
    print(f"best method {best}: BWT {100 * rows[best]['BWT']:.1f} vs naive "
          f"{100 * rows['naive']['BWT']:.1f}; difference {100 * (rows[best]['BWT'] - rows['naive']['BWT']):.1f} points")


if __name__ == "__main__":
    main()
