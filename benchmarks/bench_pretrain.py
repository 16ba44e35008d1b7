"""Pretrained vs random backbone: federated LoRA at equal rounds, same run otherwise.

Runs the real federation (``simulations.runner.simulate``: Flower ServerApp and
ClientApps on the Simulation Engine, DP-SGD as configured) twice with one RunConfig
that differs only in ``backbone-weights``: ``builtin`` (the shipped MAE-pretrained
encoder, ``fedadapt pretrain``) and ``random`` (the same architecture, seeded random
init). Prints held-out accuracy per round and per site for both; the last line is the
final weighted accuracy of the pretrained backbone ÷ that of the random one.

    python benchmarks/bench_pretrain.py [--quick] [--rounds N] [--seed S] [--weights PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fedadapt.config import RunConfig
from fedadapt.simulations.runner import simulate


def run(cfg: RunConfig) -> dict:
    """One federation; its summary.json."""
    run_dir = simulate(cfg)
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: RunConfig)")
    parser.add_argument("--seed", type=int, default=0, help="federation seed (default 0)")
    parser.add_argument("--weights", default="builtin",
                        help="pretrained side: 'builtin' (default) or a checkpoint path")
    parser.add_argument("--no-dp", action="store_true", help="train without DP-SGD")
    args = parser.parse_args()

    base = RunConfig(seed=args.seed, dp=not args.no_dp, device="cpu")
    if args.quick:
        base = base.replace(num_server_rounds=2, num_sites=2, local_epochs=1,
                            site_train_size=96, site_test_size=48)
    if args.rounds:
        base = base.replace(num_server_rounds=args.rounds)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        for label, weights in (("pretrained", args.weights), ("random", "random")):
            cfg = base.replace(backbone_weights=weights, out_dir=str(Path(tmp) / label))
            results[label] = run(cfg)

    print(f"rounds={base.num_server_rounds} sites={base.num_sites} dp={base.dp} "
          f"seed={base.seed} train_size={base.site_train_size} (3 classes: chance 0.33)")
    print(f"{'round':>5}  {'pretrained':>10}  {'random':>10}")
    for a, b in zip(results["pretrained"]["rounds"], results["random"]["rounds"]):
        print(f"{a['round']:>5}  {a['accuracy']:>10.3f}  {b['accuracy']:>10.3f}")
    print(f"{'site':<12}  {'pretrained':>10}  {'random':>10}")
    for site in results["pretrained"]["sites"]:
        pa = results["pretrained"]["sites"][site]["final_accuracy"]
        ra = results["random"]["sites"][site]["final_accuracy"]
        print(f"{site:<12}  {pa:>10.3f}  {ra:>10.3f}")
    final_p = results["pretrained"]["rounds"][-1]["accuracy"]
    final_r = results["random"]["rounds"][-1]["accuracy"]
    print(f"final weighted accuracy pretrained/random: {final_p:.3f}/{final_r:.3f} = "
          f"{final_p / max(final_r, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
