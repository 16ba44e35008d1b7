"""Real images, real pretrained backbone: Br35H brain MRI (the ``br35h`` scenario) with
EfficientNet-Lite0 (ImageNet weights) vs the same net with random weights.

Arms, each with the same model (``imaging.backbones.build_model``: LoRA r=8 in blocks
14-15 and the head conv, trainable classifier; same seed and init) and the same budget of
``rounds × local_epochs`` passes over every record:

* **federated**: FedAvg of the trainable tensors over the scenario's three sites (weights
  = training records), each site training with ``client.train.train`` (Opacus DP-SGD,
  record-level ε); one σ for all sites, the largest any site needs (as bench_utility),
  or with ``--sigma per-site`` each site's own σ for the same ε over the run (the policy
  field ``target_epsilon_per_run``); the server's step is ``--server`` (``ServerOpt``);
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
        [--lr 0.005] [--lr-dp LR] [--sigma max|per-site]
        [--server fedavg|fedprox|fedavgm|fedadam|fedyogi|fednova|scaffold] [--server-lr ETA]
        [--server-momentum B] [--proximal-mu MU] [--local-share S] [--cache-dir DIR]
        [--out results.json]
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
from fedadapt.strategies.lora_math import weighted_mean
from fedadapt.strategies.scaffold import correction, momentum_norm, site_variate

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


def cached_sites(proto: nn.Module, raw, stem: Path | None, weights: str, seed: int):
    """The sites' (train, test) prefix features: from ``stem``'s file when there is one,
    else computed from ``raw`` (and saved under ``stem``); None when neither is at hand."""
    path = Path(f"{stem}.{weights}.{seed}.pt") if stem is not None else None
    if path is not None and path.exists():
        return [(TensorDataset(*tr), TensorDataset(*te)) for tr, te in torch.load(path)]
    if raw is None:
        return None
    sites = [(cache(proto, tr), cache(proto, te)) for tr, te in raw]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save([(tr.tensors, te.tensors) for tr, te in sites], path)
    return sites


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


class ServerOpt:
    """The server's step from the size-weighted mean of the sites' tensors.

    ``fedavg`` / ``fedprox`` / ``scaffold`` / ``fednova``: the mean itself (FedProx and
    SCAFFOLD act at the sites: ``strategies.scaffold``'s control variates, computed
    here with the product's functions; FedNova, Wang et al. NeurIPS 2020, rescales each
    site's update by τ_eff / ‖a_k‖₁ before the mean, ``fednova_states``). ``fedavgm``:
    server momentum ``v ← β v + Δ``, ``w ← w + η v`` (Hsu et al. 2019). ``fedadam`` /
    ``fedyogi``: the arithmetic of Flower 1.41's ``FedAdam`` / ``FedYogi`` (Reddi et al.,
    ICLR 2021: Δ = mean − w, m ← β₁m + (1−β₁)Δ, Adam's v with its bias-corrected η, or
    Yogi's sign update of v), with Flower's defaults, which ``strategies.factory`` uses
    (FedAdam η = 0.1, FedYogi η = 0.01, β = 0.9 / 0.99, τ = 1e-3) unless ``--server-lr``.
    """

    DEFAULT_ETA = {"fedadam": 0.1, "fedyogi": 0.01, "fedavgm": 1.0}

    def __init__(self, name: str, a: argparse.Namespace) -> None:
        self.name, self.b1, self.b2, self.tau = name, 0.9, 0.99, 1e-3
        self.eta = a.server_lr if a.server_lr is not None else self.DEFAULT_ETA.get(name, 1.0)
        self.beta = a.server_momentum
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, rnd: int, glob: dict[str, torch.Tensor], avg: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        if self.name in ("fedavg", "fedprox", "fednova", "scaffold"):
            return avg
        d = {k: avg[k] - glob[k] for k in glob}
        if self.name == "fedavgm":
            self.m = {k: self.beta * self.m[k] + d[k] if self.m else d[k] for k in d}
            return {k: glob[k] + self.eta * self.m[k] for k in d}
        self.m = {k: self.b1 * self.m.get(k, torch.zeros_like(d[k])) + (1 - self.b1) * d[k]
                  for k in d}
        if self.name == "fedadam":
            self.v = {k: self.b2 * self.v.get(k, torch.zeros_like(d[k]))
                      + (1 - self.b2) * d[k] ** 2 for k in d}
            eta = self.eta * math.sqrt(1 - self.b2 ** (rnd + 1.0)) / (1 - self.b1 ** (rnd + 1.0))
        else:  # fedyogi
            v0 = {k: self.v.get(k, torch.zeros_like(d[k])) for k in d}
            self.v = {k: v0[k] - (1 - self.b2) * d[k] ** 2 * torch.sign(v0[k] - d[k] ** 2)
                      for k in d}
            eta = self.eta
        return {k: glob[k] + eta * self.m[k] / (self.v[k].sqrt() + self.tau) for k in d}


def fednova_states(glob, states, steps, sizes):
    """Each site's end state with its update rescaled by τ_eff / ‖a_k‖₁, so that the
    size-weighted mean is FedNova's step (τ_eff = Σ p_k ‖a_k‖₁)."""
    norms = [momentum_norm(t) for t in steps]
    total = sum(sizes)
    t_eff = sum(n * a for n, a in zip(sizes, norms)) / total
    return [{k: glob[k] + (s[k] - glob[k]) * (t_eff / a) for k in glob}
            for s, a in zip(states, norms)]


def local_part(tr: TensorDataset, a: argparse.Namespace, seed: int) -> TensorDataset:
    """A site's round data: all of it, or (``--local-share s < 1``) a seeded random share
    ``s`` of its records, so that more rounds cost the same passes (``rounds × s``)."""
    if a.local_share >= 1.0:
        return tr
    n = len(tr)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(*(t[idx[:max(1, round(n * a.local_share))]] for t in tr.tensors))


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

    def site_dp(i: int) -> DPRequest | None:
        """Site i's request: the federation's one σ, or (``--sigma per-site``) its own."""
        return dp([sizes[i]]) if a.sigma == "per-site" else dp(sizes)

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
        requests = [site_dp(i) for i in range(len(sites))]
        server = ServerOpt(a.server, a)
        mu = a.proximal_mu if a.server == "fedprox" else 0.0
        c, site_c = {}, [None] * len(sites)  # scaffold: strategies.scaffold's variates
        params = dict(m.named_parameters())
        for rnd in range(a.rounds):
            glob, states, steps = trainable(m), [], []
            for i, (tr, _) in enumerate(sites):
                load(m, glob)
                fix = correction(c, site_c[i]) if c else {}
                res = train(m, local_part(tr, a, a.seed + rnd), epochs=a.local_epochs,
                            lr=lr, batch_size=a.batch, device=dev,
                            seed=a.seed + 1000 * rnd + 10 * i, dp=requests[i],
                            proximal_mu=mu,
                            grad_correction=[(params[k], d) for k, d in fix.items()])
                states.append(trainable(m))
                steps.append(res.steps)
            total = sum(sizes)
            if a.server == "scaffold":
                site_c = [site_variate(correction(c, site_c[i]) if c else None, glob,
                                       states[i], lr=lr, steps=steps[i])
                          for i in range(len(sites))]
                c = weighted_mean(site_c, sizes)
            if a.server == "fednova":
                states = fednova_states(glob, states, steps, sizes)
            avg = {k: sum(s[k] * n for s, n in zip(states, sizes)) / total for k in glob}
            load(m, server.step(rnd + 1, glob, avg))
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
    p.add_argument("--sigma", choices=("max", "per-site"), default="max",
                   help="federated DP: one σ for all sites, the largest any site needs "
                   "(max), or each site its own σ for the same ε over the run (per-site)")
    p.add_argument("--server", choices=("fedavg", "fedprox", "fedavgm", "fedadam",
                                        "fedyogi", "fednova", "scaffold"),
                   default="fedavg",
                   help="the server's update of the federated arms (see ServerOpt)")
    p.add_argument("--server-lr", type=float, default=None,
                   help="server η (default: Flower's: FedAdam 0.1, FedYogi 0.01; 1.0)")
    p.add_argument("--server-momentum", type=float, default=0.5, help="fedavgm's β")
    p.add_argument("--proximal-mu", type=float, default=0.01,
                   help="fedprox's μ (default: the run config's proximal-mu, 0.01)")
    p.add_argument("--local-share", type=float, default=1.0,
                   help="share of its records a site trains on per round (non-DP only)")
    p.add_argument("--cache-dir", default="",
                   help="keep the cached prefix features here and reuse them")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.local_share < 1.0 and any(float(e) != INF for e in a.epsilons.split(",")):
        p.error("--local-share < 1 changes the sampling the DP accounting assumes: use it "
                "with --epsilons inf only")
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only contend
    sc = load_scenario("br35h")
    sc = dataclasses.replace(sc, image_size=a.side, sites=tuple(
        dataclasses.replace(s, package=dataclasses.replace(
            s.package, size=max(10, int(s.package.size * a.fraction)))) for s in sc.sites))
    t0 = time.perf_counter()
    stem = Path(a.cache_dir) / f"br35h_f{a.fraction}_s{a.side}" if a.cache_dir else None
    meta_path = Path(f"{stem}.meta.json") if stem is not None else None
    if meta_path is not None and meta_path.exists():
        raw, meta = None, json.loads(meta_path.read_text())
    else:
        raw = [site_data(sc, i) for i in range(len(sc.sites))]
        recs = assign([s.package for s in sc.sites], pool(sc.sites[0].package.package,
                                                           sc.sites[0].package.classes),
                      sc.seed)
        meta = {"train_sizes": [len(tr) for tr, _ in raw],
                "test_sizes": [len(te) for _, te in raw],
                "size_baseline": vars(size_baseline(sum((tr for tr, _ in recs), []),
                                                    sum((te for _, te in recs), [])))}
        if meta_path is not None:
            meta_path.parent.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps(meta))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    head = {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load": os.getloadavg(), "side": a.side, "rounds": a.rounds,
            "local_epochs": a.local_epochs, "fraction": a.fraction,
            "lr": a.lr, "lr_dp": a.lr_dp,
            "batch": a.batch, "clip": a.clip,
            "sigma": a.sigma, "server": a.server, "server_lr": a.server_lr,
            "server_momentum": a.server_momentum, "proximal_mu": a.proximal_mu,
            "local_share": a.local_share, **meta,
            "load_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(head), flush=True)
    rows = []
    for weights in a.backbones.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            a.seed = seed
            t1 = time.perf_counter()
            proto = model_for(sc, weights, seed)
            sites = cached_sites(proto, raw, stem, weights, seed)
            if stem is not None and raw is None and sites is None:
                raw = [site_data(sc, i) for i in range(len(sc.sites))]
            if sites is None:
                sites = cached_sites(proto, raw, stem, weights, seed)
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
                           "lr": lr_for(eps, a), "sigma": a.sigma, "server": a.server,
                           "server_lr": a.server_lr, "local_share": a.local_share,
                           "accuracy": round(accuracy, 4),
                           "seconds": round(time.perf_counter() - t2, 1),
                           "cache_s": round(cache_s, 1), "load": os.getloadavg()[0]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"head": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
