"""Real images, real pretrained backbone: Br35H brain MRI (the ``br35h`` scenario) with
EfficientNet-Lite0 (ImageNet weights) vs the same net with random weights.

Arms, each with the same model (``imaging.backbones.build_model``: LoRA r=8 in blocks
14-15 and the head conv, trainable classifier; same seed and init) and the same budget of
``rounds × local_epochs`` passes over every record:

* **federated**: FedAvg of the trainable tensors over the scenario's three sites (weights
  = training records), each site training with ``client.train.train`` (Opacus DP-SGD,
  record-level ε); one σ for all sites, the largest any site needs (as bench_utility);
* **pooled**: every site's training split in one ``client.train.train`` run;
* **local**: each site alone on its own split;
* **federated-iid** (a control, not in the default ``--arms``): the same FedAvg over three
  sites of the same sizes whose training records were shuffled across sites (each image
  keeps its scanner shift), so the gap to *federated* is what label/scanner skew costs and
  the gap to *pooled* is what FedAvg's averaging costs at the same budget.

To fit a 2-core shared CPU this is *not* the Flower engine (bench_utility runs that):
the federation is run in this process with the same site training function and the
FedAvg arithmetic, and the frozen prefix (stem + blocks 0-13, which hold no adapter and
no trainable tensor, with frozen BatchNorm) is computed once per image and cached, so
training runs on the tail only. That is exact: the prefix is a fixed deterministic map.
Accuracy is on each site's held-out split, weighted by its size (local: each site's own
model on its own split). The size-only baseline (``imaging.leakage``) is fitted on the
*raw* file sizes of the same training records and scored on the same held-out records.

    python benchmarks/bench_real.py [--side 64] [--rounds 10] [--seeds 0,1]
        [--epsilons 1,3,8,inf] [--backbones builtin,random] [--fraction 1.0]
        [--lr 0.005] [--lr-dp LR] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset, TensorDataset

from fedadapt.client.train import evaluate, train
from fedadapt.imaging.backbones import ModelSpec, build_model
from fedadapt.imaging.leakage import size_baseline
from fedadapt.imaging.packaged import assign, pool
from fedadapt.imaging.scenario import Scenario, load_scenario, site_data
from fedadapt.privacy.dp import DPRequest

INF = math.inf
PREFIX_BLOCKS = 14  # blocks 0..13: frozen, no LoRA (imaging.efficientnet.LORA_TARGETS)


class Tail(nn.Module):
    """Blocks 14-15, head conv and classifier of a LoRA-injected EfficientNet-Lite0,
    applied to cached prefix features ``(B, 192, h, w)``. Shares the model's modules."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        net = peft_model.base_model.model
        self.blocks = nn.ModuleList(net._blocks[PREFIX_BLOCKS:])
        self.conv_head, self.bn, self.act, self.classifier = (net._conv_head, net._bn1,
                                                              net.act, net.classifier)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            z = b(z)
        z = self.act(self.bn(self.conv_head(z)))
        return self.classifier(z.mean(dim=(2, 3)))


def model_for(sc: Scenario, weights: str, seed: int) -> nn.Module:
    return build_model(ModelSpec(image_size=sc.image_size, num_classes=sc.num_classes,
                                 backbone="efficientnet-lite0", backbone_weights=weights,
                                 seed=seed, task="classification"))


@torch.no_grad()
def cache(model: nn.Module, ds: TensorDataset, batch: int = 128) -> TensorDataset:
    net = model.base_model.model
    x, y = ds.tensors
    z = torch.cat([net.stem(x[i:i + batch], upto=PREFIX_BLOCKS) for i in range(0, len(x),
                                                                                 batch)])
    return TensorDataset(z, y)


def noise_for(eps: float, n: int, batch: int, epochs: int, delta: float) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    b = math.ceil(n / batch)
    return float(get_noise_multiplier(target_epsilon=eps, target_delta=delta,
                                      sample_rate=1.0 / b, steps=epochs * b,
                                      accountant="rdp"))


def trainable(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def load(m: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in state:
                p.copy_(state[n])


def shuffled(sites, seed: int):
    """The sites' training records shuffled across sites (same sizes), tests unchanged."""
    x = torch.cat([tr.tensors[0] for tr, _ in sites])
    y = torch.cat([tr.tensors[1] for tr, _ in sites])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for tr, te in sites:
        idx = perm[start:start + len(tr)]
        start += len(tr)
        out.append((TensorDataset(x[idx], y[idx]), te))
    return out


def lr_for(eps: float, a: argparse.Namespace) -> float:
    """``--lr`` without DP, ``--lr-dp`` (default: ``--lr``) with DP."""
    return a.lr if eps == INF or a.lr_dp is None else a.lr_dp


def run_arm(arm: str, make, sites, eps: float, a: argparse.Namespace) -> float:
    """Weighted held-out accuracy of one arm (``make()`` builds a fresh tail)."""
    epochs, delta, lr = a.rounds * a.local_epochs, 1e-5, lr_for(eps, a)
    if arm == "federated-iid":
        sites = shuffled(sites, a.seed)
    dev = torch.device("cpu")
    sizes = [len(tr) for tr, _ in sites]
    tests = [te for _, te in sites]

    def dp(ns: list[int]) -> DPRequest | None:
        if eps == INF:
            return None
        return DPRequest(noise_multiplier=max(noise_for(eps, n, a.batch, epochs, delta)
                                              for n in ns), max_grad_norm=a.clip)

    def acc(model, ds) -> float:
        return evaluate(model, ds, batch_size=256, device=dev)[1]

    if arm == "pooled":
        m = make()
        pooled = ConcatDataset([tr for tr, _ in sites])
        train(m, pooled, epochs=epochs, lr=lr, batch_size=a.batch, device=dev,
              seed=a.seed, dp=dp([len(pooled)]))
        accs = [acc(m, te) for te in tests]
    elif arm == "local":
        accs = []
        for i, (tr, te) in enumerate(sites):
            m = make()
            train(m, tr, epochs=epochs, lr=lr, batch_size=a.batch, device=dev,
                  seed=a.seed + 10 * i, dp=dp([len(tr)]))
            accs.append(acc(m, te))
    else:
        m = make()
        request = dp(sizes)
        for rnd in range(a.rounds):
            glob, states = trainable(m), []
            for i, (tr, _) in enumerate(sites):
                load(m, glob)
                train(m, tr, epochs=a.local_epochs, lr=lr, batch_size=a.batch, device=dev,
                      seed=a.seed + 1000 * rnd + 10 * i, dp=request)
                states.append(trainable(m))
            total = sum(sizes)
            load(m, {k: sum(s[k] * n for s, n in zip(states, sizes)) / total
                     for k in glob})
        accs = [acc(m, te) for te in tests]
    return sum(x * len(te) for x, te in zip(accs, tests)) / sum(len(te) for te in tests)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.005,
                   help="SGD lr (default 0.005: the pooled ImageNet features have norm ~70; "
                   "0.05 diverges without DP)")
    p.add_argument("--lr-dp", type=float, default=None,
                   help="SGD lr of the DP rows (default: --lr). Per-example clipping at "
                   "--clip makes each DP step about lr x clip in size; over 10 rounds 0.05 "
                   "collapsed pooled DP runs, so BENCHMARKS.md uses --lr for every row")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epsilons", default="1,3,8,inf")
    p.add_argument("--backbones", default="builtin,random")
    p.add_argument("--arms", default="pooled,federated,local")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="share of each site's records to use (a smaller CPU run)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only contend
    sc = load_scenario("br35h")
    sc = dataclasses.replace(sc, image_size=a.side, sites=tuple(
        dataclasses.replace(s, package=dataclasses.replace(
            s.package, size=max(10, int(s.package.size * a.fraction)))) for s in sc.sites))
    t0 = time.perf_counter()
    raw = [site_data(sc, i) for i in range(len(sc.sites))]
    recs = assign([s.package for s in sc.sites], pool(sc.sites[0].package.package,
                                                       sc.sites[0].package.classes), sc.seed)
    base = size_baseline(sum((tr for tr, _ in recs), []), sum((te for _, te in recs), []))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    head = {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load": os.getloadavg(), "side": a.side, "rounds": a.rounds,
            "local_epochs": a.local_epochs, "fraction": a.fraction,
            "lr": a.lr, "lr_dp": a.lr_dp,
            "batch": a.batch, "clip": a.clip,
            "train_sizes": [len(tr) for tr, _ in raw], "test_sizes": [len(te) for _, te in raw],
            "size_baseline": vars(base), "load_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(head), flush=True)
    rows = []
    for weights in a.backbones.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            a.seed = seed
            t1 = time.perf_counter()
            proto = model_for(sc, weights, seed)
            sites = [(cache(proto, tr), cache(proto, te)) for tr, te in raw]
            init = trainable(Tail(proto))
            cache_s = time.perf_counter() - t1

            def make():
                t = Tail(model_for(sc, weights, seed))
                load(t, init)
                return t

            for eps in (float(e) for e in a.epsilons.split(",")):
                for arm in a.arms.split(","):
                    t2 = time.perf_counter()
                    accuracy = run_arm(arm, make, sites, eps, a)
                    row = {"backbone": weights, "seed": seed, "eps": eps, "arm": arm,
                           "lr": lr_for(eps, a),
                           "accuracy": round(accuracy, 4),
                           "seconds": round(time.perf_counter() - t2, 1),
                           "cache_s": round(cache_s, 1), "load": os.getloadavg()[0]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"head": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
