"""Segmentation at a site on CPU: one local round of UNETR + LoRA, DP-SGD ÷ plain SGD.

For the first site of the shipped ``segmentation-2d`` (32 px) and
``segmentation-3d-small`` (16^3 voxels) scenarios, builds the run's model
(``imaging.run_spec.run_model_spec``: MONAI UNETR, PEFT LoRA, trainable ``out.conv`` head) and
times one local round exactly as the ClientApp runs it (``client.train.train`` with the
task's MONAI ``DiceCELoss``; the run's default 2 epochs, batch 32, one thread), with
Opacus DP-SGD (σ = 1, C = 1) and without, one after the other in the same process, then
the site's evaluation (MONAI ``DiceMetric``). Process CPU seconds are reported next to
wall seconds because the machine may be shared. The last line is the 2-D DP ratio.

    python benchmarks/bench_segmentation.py [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.utils.data import Subset

from fedadapt.client.site import site_from_context
from fedadapt.client.train import evaluate_metrics, train
from fedadapt import keys
from fedadapt.cmd_simulate import _with_scenario
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model
from fedadapt.imaging.tasks import task_loss
from fedadapt.privacy.dp import DPRequest

CPU = torch.device("cpu")


def _timed(fn) -> tuple[float, float, object]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def measure(scenario: str, quick: bool) -> dict[str, float]:
    """Wall and CPU seconds of one local round (DP and not) and one evaluation."""
    cfg = _with_scenario(RunConfig(device="cpu"), scenario, weights_given=False)
    site = site_from_context(cfg.to_mapping(), {keys.NODE_PARTITION_ID: 0})
    train_set, test_set = site.datasets()
    if quick:
        train_set, test_set = Subset(train_set, range(32)), Subset(test_set, range(8))
    out: dict[str, float] = {"records": len(train_set)}
    for name, dp in (("sgd", None), ("dp", DPRequest(1.0, 1.0))):
        model = build_model(site.model_spec())
        wall, cpu, res = _timed(lambda: train(
            model, train_set, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
            device=CPU, seed=0, dp=dp, loss_fn=task_loss("segmentation")))
        out[f"{name}_wall"], out[f"{name}_cpu"], out[f"{name}_steps"] = wall, cpu, res.steps
    wall, cpu, (_, metrics) = _timed(lambda: evaluate_metrics(
        model, test_set, batch_size=cfg.batch_size, device=CPU, task="segmentation"))
    out.update(eval_wall=wall, eval_cpu=cpu, dice=metrics["dice"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 training records per site")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = {s: measure(s, args.quick) for s in ("segmentation-2d", "segmentation-3d-small")}
    print("| scenario (site 0) | records | DP round wall s (CPU s) | SGD round wall s (CPU s) "
          "| DP ÷ SGD (CPU) | eval wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s, r in rows.items():
        print(f"| {s} | {r['records']:.0f} | {r['dp_wall']:.2f} ({r['dp_cpu']:.2f}) | "
              f"{r['sgd_wall']:.2f} ({r['sgd_cpu']:.2f}) | {r['dp_cpu'] / r['sgd_cpu']:.2f} | "
              f"{r['eval_wall']:.2f} |")
    print(f"segmentation-2d DP-SGD / SGD local round (CPU time): "
          f"{rows['segmentation-2d']['dp_cpu'] / rows['segmentation-2d']['sgd_cpu']:.2f}")


if __name__ == "__main__":
    main()
