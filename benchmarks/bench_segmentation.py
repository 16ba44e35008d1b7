"""Segmentation at a site on CPU: one local round of UNETR + LoRA, DP-SGD ÷ plain SGD.

For the first site of the shipped ``segmentation-2d`` (32 px) and
``segmentation-3d-small`` (16^3 voxels) scenarios, builds the run's model
(``imaging.run_spec.run_model_spec``: MONAI UNETR, PEFT LoRA, trainable ``out.conv`` head) and
times one local round exactly as the ClientApp runs it (``client.train.train`` with the
task's MONAI ``DiceCELoss``; the run's default 2 epochs, batch 32, one thread), with
Opacus DP-SGD (σ = 1, C = 1) and without, one after the other in the same process, then
the site's evaluation (MONAI ``DiceMetric``). Process CPU seconds are reported next to
wall seconds because the machine may be shared. The last line is the 2-D DP ratio.

``--mni152`` instead compares Dice on the real-volume ``mni152-tissue`` scenario (MNI152
template patches, 3 sites; :mod:`imaging.mni152`): **pooled** (every site's patches in one
run), **federated** (FedAvg of the trainable tensors, weighted by records, each site
training with ``client.train.train`` as its ClientApp does; in this process, not the
Flower engine, to fit a shared CPU: the same site function and FedAvg arithmetic) and
**local** (each site alone), each with and without DP-SGD (one σ for all sites, C = 1),
the same model init and ``rounds × local_epochs`` passes; next to the untrained model
and a two-threshold intensity baseline fitted on the pooled training patches. Dice is
the mean foreground (grey, white matter) Dice on each site's held-out tiles, weighted by
their number (local: each site's own model on its own tiles). ``--decoder`` runs two
variants side by side, LoRA + head (``train-decoder off``) and UNETR's conv
``encoder1``/``decoder*`` blocks trained in full too (``train-decoder on``): every fit of
one right after the same fit of the other, with each variant's trainable values, up-link
bytes per round (float32 wire) and process CPU seconds per optimiser step, DP and not.

    python benchmarks/bench_segmentation.py [--quick]
    python benchmarks/bench_segmentation.py --mni152 [--decoder] [--rounds 3] [--seeds 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import time
import warnings

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from fedadapt.client.site import site_from_context
from fedadapt.client.train import evaluate_metrics, train
from fedadapt import keys
from fedadapt.cmd_simulate import _with_scenario
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model, load_trainable, trainable_state
from fedadapt.imaging.run_spec import run_model_spec
from fedadapt.imaging.scenario import load_scenario, site_data
from fedadapt.imaging.tasks import TaskScores, task_loss
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


def dice(model: torch.nn.Module | None, sets: list[TensorDataset], k: int,
         thresholds: tuple[float, float] = (0.0, 0.0)) -> float:
    """Foreground Dice on ``sets`` (weighted by tiles): the model's, or, with
    ``model=None``, the intensity baseline's (label = number of ``thresholds`` passed)."""
    per = []
    for ds in sets:
        if model is None:
            x = ds.tensors[0]
            pred = (x > thresholds[0]).long() + (x > thresholds[1]).long()  # (N, 1, ...)
            logits = torch.nn.functional.one_hot(pred[:, 0], k).movedim(-1, 1).float()
            s = TaskScores("segmentation", k)
            s.update(logits, ds.tensors[1])
            per.append(s.result()["dice"])
        else:
            per.append(evaluate_metrics(model, ds, batch_size=32, device=CPU,
                                        task="segmentation")[1]["dice"])
    return float(np.average(per, weights=[len(ds) for ds in sets]))


def fit_thresholds(train_sets: list[TensorDataset]) -> tuple[float, float]:
    """The two intensity thresholds (background | grey | white) of best voxel accuracy
    on the pooled training patches, on a grid of quantiles."""
    x = torch.cat([ds.tensors[0].flatten() for ds in train_sets])
    y = torch.cat([ds.tensors[1].flatten() for ds in train_sets])
    grid = torch.quantile(x[::7], torch.linspace(0.02, 0.98, 49)).tolist()
    best, out = -1.0, (0.0, 0.0)
    for i, a in enumerate(grid):
        for b in grid[i + 1:]:
            acc = float(((x > a).long() + (x > b).long() == y).float().mean())
            if acc > best:
                best, out = acc, (a, b)
    return out


VARIANTS = ("lora", "decoder")  # LoRA in the ViT + head; the same + UNETR's conv decoder


class Clock:
    """Process CPU seconds and optimiser steps of every local fit, per (variant, DP)."""

    def __init__(self) -> None:
        self.cpu: dict[tuple[str, bool], float] = {}
        self.steps: dict[tuple[str, bool], int] = {}

    def add(self, key: tuple[str, bool], cpu: float, steps: int) -> None:
        self.cpu[key] = self.cpu.get(key, 0.0) + cpu
        self.steps[key] = self.steps.get(key, 0) + steps

    def per_step(self, key: tuple[str, bool]) -> float:
        return self.cpu[key] / max(self.steps[key], 1)


def _arms(args, cfg, sc, specs, sites, tests, sizes, seed, dp, clock) -> dict[str, dict]:
    """Pooled, local and federated Dice of each variant for one seed and DP setting;
    every fit runs for both variants back to back (interleaved CPU timing)."""
    loss, k = task_loss("segmentation"), sc.num_classes

    def fit_all(models: dict, ds, epochs: int, fit_seed: int) -> None:
        for v, m in models.items():
            c = time.process_time()
            res = train(m, ds, epochs=epochs, lr=args.lr, batch_size=cfg.batch_size,
                        device=CPU, seed=fit_seed, dp=dp, loss_fn=loss)
            clock.add((v, dp is not None), time.process_time() - c, res.steps)

    epochs = args.rounds * cfg.local_epochs
    rows = {v: {"variant": v, "seed": seed, "dp": dp is not None} for v in specs}
    pooled = {v: build_model(s) for v, s in specs.items()}
    fit_all(pooled, ConcatDataset([tr for tr, _ in sites]), epochs, seed)
    local: dict[str, list[float]] = {v: [] for v in specs}
    for i, (tr, te) in enumerate(sites):
        models = {v: build_model(s) for v, s in specs.items()}
        fit_all(models, tr, epochs, seed + 10 * i)
        for v, m in models.items():
            local[v].append(dice(m, [te], k))
    fed = {v: build_model(s) for v, s in specs.items()}
    for rnd in range(args.rounds):
        glob = {v: trainable_state(m) for v, m in fed.items()}
        states: dict[str, list] = {v: [] for v in specs}
        for i, (tr, _) in enumerate(sites):
            for v, m in fed.items():
                load_trainable(m, glob[v])
            fit_all(fed, tr, cfg.local_epochs, seed + 1000 * rnd + 10 * i)
            for v, m in fed.items():
                states[v].append(trainable_state(m))
        for v, m in fed.items():
            load_trainable(m, {n: sum(st[n] * w for st, w in zip(states[v], sizes))
                               / sum(sizes) for n in glob[v]})
    for v, row in rows.items():
        row.update(pooled=dice(pooled[v], tests, k), federated=dice(fed[v], tests, k),
                   local=float(np.average(local[v], weights=[len(te) for te in tests])),
                   local_per_site=local[v])
    return rows


def compare_arms(args: argparse.Namespace) -> list[dict]:
    """Dice of pooled / federated / local, with and without DP, on ``mni152-tissue``,
    for LoRA-only and (``--decoder``) UNETR's conv decoder trained too; with each
    variant's trainable tensors, up-link bytes per round and CPU seconds per step."""
    cfg = _with_scenario(RunConfig(device="cpu"), "mni152-tissue", weights_given=False)
    sc, spec = load_scenario("mni152-tissue"), run_model_spec(cfg)
    specs = {v: dataclasses.replace(spec, train_decoder=v == "decoder")
             for v in (VARIANTS if args.decoder else VARIANTS[:1])}
    sites = [site_data(sc, i) for i in range(len(sc.sites))]
    if args.quick:
        sites = [(Subset(tr, range(16)), te) for tr, te in sites]
    tests, sizes = [te for _, te in sites], [len(tr) for tr, _ in sites]
    thresholds = fit_thresholds([tr.dataset if isinstance(tr, Subset) else tr
                                 for tr, _ in sites])
    rows = [{"arm": "untrained", "dp": False, "dice": dice(build_model(spec), tests,
                                                            sc.num_classes)},
            {"arm": "intensity thresholds", "dp": False,
             "dice": dice(None, tests, sc.num_classes, thresholds)}]
    for v, s in specs.items():
        state = trainable_state(build_model(s))
        n = sum(t.numel() for t in state.values())
        rows.append({"variant": v, "trainable_parameters": n, "tensors": len(state),
                     "uplink_bytes_per_site_round": 4 * n,  # wire-dtype float32
                     "uplink_bytes_per_round": 4 * n * len(sites)})
        print(json.dumps(rows[-1]), flush=True)
    clock = Clock()
    for seed in args.seeds:
        for dp in (None, DPRequest(args.sigma, 1.0)):
            t0 = time.perf_counter()
            for row in _arms(args, cfg, sc, specs, sites, tests, sizes, seed, dp,
                             clock).values():
                row["seconds_both_variants"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    for key in clock.cpu:
        rows.append({"variant": key[0], "dp": key[1], "cpu_s": round(clock.cpu[key], 1),
                     "steps": clock.steps[key], "cpu_s_per_step": clock.per_step(key)})
        print(json.dumps(rows[-1]), flush=True)
    if args.decoder:
        for dp in (False, True):
            r = clock.per_step(("decoder", dp)) / clock.per_step(("lora", dp))
            rows.append({"ratio": "decoder / lora CPU s per step", "dp": dp, "value": r})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 training records per site "
                    "(--mni152: 16)")
    ap.add_argument("--mni152", action="store_true", help="Dice of pooled / federated / "
                    "local training on the mni152-tissue scenario (nilearn installed)")
    ap.add_argument("--rounds", type=int, default=3, help="--mni152: federated rounds")
    ap.add_argument("--lr", type=float, default=0.05, help="--mni152: SGD lr")
    ap.add_argument("--sigma", type=float, default=1.0, help="--mni152: DP noise multiplier")
    ap.add_argument("--decoder", action="store_true", help="--mni152: also train UNETR's "
                    "conv encoder1/decoder blocks (train-decoder on), side by side")
    ap.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0],
                    help="--mni152: seeds, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if args.mni152:
        head = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load": os.getloadavg(), "rounds": args.rounds, "lr": args.lr,
                "sigma": args.sigma}
        print(json.dumps(head), flush=True)
        rows = compare_arms(args)
        base = {r["arm"]: r["dice"] for r in rows if "arm" in r}
        print(f"untrained {base['untrained']:.3f}, intensity thresholds "
              f"{base['intensity thresholds']:.3f}")
        for v in VARIANTS:
            last = [r for r in rows if "federated" in r and not r["dp"] and r["variant"] == v]
            if last:
                print(f"mni152-tissue federated Dice (no DP, {v}): {last[-1]['federated']:.3f}")
        return
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
