"""Utility: federated vs pooled centralised vs each site alone, at ε ∈ {1, 3, 8, ∞}.

The default scenario (``RunConfig`` defaults: three synthetic hospitals of 480, 336 and
192 training records with distinct scanners and label mixes). Three ways to train the
same model (``imaging.backbones.build_model``, LoRA + head, same seed and init) with
the same budget of ``rounds × local_epochs`` passes over every record:

* **federated**: the real Flower federation, ``simulations.runner.simulate`` (FedAvg of
  the adapters, DP-SGD at each site with record-level ε);
* **pooled**: every site's training split in one ``client.train.train`` run
  (``rounds × local_epochs`` epochs; central DP-SGD over the pooled records);
* **local**: each site trains alone on its own split, the same number of epochs.

For a target ε the noise multiplier σ comes from Opacus ``get_noise_multiplier`` for the
whole run's steps at the sample rate the training uses (Poisson sampling with
q = 1 / ⌈N / batch⌉, ⌈N / batch⌉ steps per epoch). In the federation the server sends one σ
to every site, so it is the largest σ any site needs: every site ends at or below the
target (the smallest site, with the largest q, sets it). ε = ∞ means DP off.
Accuracy is on each site's held-out split, weighted by its size (federated: the global
model after the last round; pooled: the pooled model; local: each site's own model on
its own split). The last line gives the two gaps the issue sets goals for.

    python benchmarks/bench_utility.py [--quick] [--rounds R] [--epsilons 1,3,8,inf]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset

from fedadapt.client.train import evaluate, resolve_device, train
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model
from fedadapt.imaging.synthetic import default_sites, make_site_data
from fedadapt.privacy.dp import DPRequest
from fedadapt.simulations.runner import simulate
from fedadapt.imaging.run_spec import run_model_spec

INF = math.inf
NO_CAP = 1e6  # the benchmark measures utility: no site may refuse on its budget


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch (Opacus keeps ``len(loader)`` under Poisson sampling)."""
    return math.ceil(n / batch_size)


def noise_for(target_eps: float, *, n: int, cfg: RunConfig, epochs: int) -> float:
    """σ that makes ``epochs`` epochs of DP-SGD on ``n`` records reach ``target_eps`` at δ.

    Opacus ``get_noise_multiplier`` with the RDP accountant (Mironov et al. 2019), the
    one the sites account with, for q = 1 / ⌈n / batch⌉ and ``epochs · ⌈n / batch⌉`` steps.
    """
    from opacus.accountants.utils import get_noise_multiplier

    b = steps_per_epoch(n, cfg.batch_size)
    return float(get_noise_multiplier(target_epsilon=target_eps, target_delta=cfg.delta,
                                      sample_rate=1.0 / b, steps=epochs * b, accountant="rdp"))


def weighted(accs: list[float], sizes: list[int]) -> float:
    """Accuracy over all held-out records: per-site accuracies weighted by test size."""
    return sum(a * n for a, n in zip(accs, sizes)) / sum(sizes)


def federated(cfg: RunConfig, eps: float, sizes: list[int]) -> dict:
    """Run the Flower federation at ``eps`` and read its last round from summary.json."""
    epochs = cfg.num_server_rounds * cfg.local_epochs
    if eps == INF:
        run_cfg = cfg.replace(dp=False)
    else:  # one σ for all sites: the largest any site needs to stay within eps
        sigma = max(noise_for(eps, n=n, cfg=cfg, epochs=epochs) for n in sizes)
        run_cfg = cfg.replace(dp=True, noise_multiplier=sigma)
    t0 = time.perf_counter()
    run_dir = simulate(run_cfg)
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    last = summary["rounds"][-1]
    if len(last["evaluate"]) != cfg.num_sites:
        raise RuntimeError(f"federation at eps={eps} evaluated {len(last['evaluate'])} of "
                           f"{cfg.num_sites} sites in its last round; see {run_dir}")
    spent = [r["epsilon"] for r in last["train"].values()]
    return {"accuracy": last["accuracy"],
            "per_site": {s: m["accuracy"] for s, m in sorted(last["evaluate"].items())},
            "sigma": run_cfg.noise_multiplier if run_cfg.dp else 0.0,
            "eps_spent_max": max(spent) if run_cfg.dp else INF, "wall_s": wall}


def centralised(cfg: RunConfig, eps: float, train_sets: list[Dataset],
                test_sets: list[Dataset]) -> tuple[dict, dict]:
    """Pooled training and each site alone, at ``eps``; plain ``client.train`` in-process."""
    device = resolve_device("cpu")
    epochs = cfg.num_server_rounds * cfg.local_epochs
    sizes = [len(t) for t in test_sets]  # type: ignore[arg-type]

    def fit(data: Dataset, seed: int) -> tuple[torch.nn.Module, float]:
        n = len(data)  # type: ignore[arg-type]
        sigma = 0.0 if eps == INF else noise_for(eps, n=n, cfg=cfg, epochs=epochs)
        dp = DPRequest(sigma, cfg.max_grad_norm) if sigma else None
        model = build_model(run_model_spec(cfg))
        train(model, data, epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size,
              device=device, seed=seed, dp=dp)
        return model, sigma

    t0 = time.perf_counter()
    model, sigma = fit(ConcatDataset(train_sets), cfg.seed)
    accs = [evaluate(model, te, batch_size=cfg.batch_size, device=device)[1] for te in test_sets]
    pooled = {"accuracy": weighted(accs, sizes), "per_site": accs, "sigma": sigma,
              "wall_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    accs, sigmas = [], []
    for i, (tr, te) in enumerate(zip(train_sets, test_sets)):
        model, sigma = fit(tr, cfg.seed + 1 + i)
        accs.append(evaluate(model, te, batch_size=cfg.batch_size, device=device)[1])
        sigmas.append(sigma)
    local = {"accuracy": weighted(accs, sizes), "per_site": accs, "sigma": max(sigmas),
             "wall_s": time.perf_counter() - t0}
    return pooled, local


def _fmt_eps(eps: float) -> str:
    return "inf" if eps == INF else f"{eps:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the test suite")
    parser.add_argument("--rounds", type=int, default=None,
                        help="federated rounds (default: RunConfig's; quick: 1)")
    parser.add_argument("--epsilons", default=None,
                        help="comma-separated targets, 'inf' for no DP (default 1,3,8,inf; "
                        "quick: 8)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    eps_text = args.epsilons or ("8" if args.quick else "1,3,8,inf")
    epsilons = [INF if e.strip() == "inf" else float(e) for e in eps_text.split(",")]
    torch.set_num_threads(1)  # as each ClientApp does; the machine is shared
    with tempfile.TemporaryDirectory() as out:
        base = RunConfig(out_dir=out, device="cpu", epsilon_cap=NO_CAP)
        if args.quick:
            base = base.replace(num_server_rounds=1, num_sites=2, local_epochs=1,
                                site_train_size=48, site_test_size=24, batch_size=16)
        if args.rounds:
            base = base.replace(num_server_rounds=args.rounds)
        specs = default_sites(base.num_sites, base.site_train_size, base.site_test_size,
                              base.seed)
        data = [make_site_data(s, image_size=base.image_size, num_classes=base.num_classes,
                               seed=base.seed, site_index=i) for i, s in enumerate(specs)]
        train_sets, test_sets = [d[0] for d in data], [d[1] for d in data]
        rows = {}
        for eps in epsilons:
            fed = federated(base, eps, [len(t) for t in train_sets])
            pooled, local = centralised(base, eps, train_sets, test_sets)
            rows[eps] = {"federated": fed, "pooled": pooled, "local": local}
            print(f"eps={_fmt_eps(eps)}: federated {fed['accuracy']:.3f}  pooled "
                  f"{pooled['accuracy']:.3f}  local {local['accuracy']:.3f}", flush=True)
    print(f"\n{base.num_sites} sites (train {[s.train_size for s in specs]}, test "
          f"{[s.test_size for s in specs]}), {base.num_server_rounds} rounds x "
          f"{base.local_epochs} local epochs, batch {base.batch_size}, lr {base.lr}, "
          f"C {base.max_grad_norm}, delta {base.delta}, strategy {base.strategy}")
    names = [s.name for s in specs]
    print("| eps target | federated | pooled | local only | fed - pooled | sigma fed / pooled "
          "/ local (max) | max site eps spent (fed) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for eps, r in rows.items():
        f, p, lo = r["federated"], r["pooled"], r["local"]
        spent = "-" if eps == INF else f"{f['eps_spent_max']:.2f}"
        print(f"| {_fmt_eps(eps)} | {f['accuracy']:.3f} | {p['accuracy']:.3f} | "
              f"{lo['accuracy']:.3f} | {100 * (f['accuracy'] - p['accuracy']):+.1f} pts | "
              f"{f['sigma']:.3f} / {p['sigma']:.3f} / {lo['sigma']:.3f} | {spent} |")
    print("\nper-site held-out accuracy (" + ", ".join(names) + "):")
    for eps, r in rows.items():
        fed_sites = [r["federated"]["per_site"].get(n, float("nan")) for n in names]
        print(f"  eps={_fmt_eps(eps):>4}  federated {_vec(fed_sites)}  pooled "
              f"{_vec(r['pooled']['per_site'])}  local {_vec(r['local']['per_site'])}")
    print("wall s per eps (federated / pooled / local): " + "; ".join(
        f"{_fmt_eps(e)}: {r['federated']['wall_s']:.0f} / {r['pooled']['wall_s']:.0f} / "
        f"{r['local']['wall_s']:.0f}" for e, r in rows.items()))
    if args.json:
        args.json.write_text(json.dumps({_fmt_eps(e): r for e, r in rows.items()}, indent=2,
                                        default=str))
    parts = []
    if INF in rows:
        gap = 100 * (rows[INF]["federated"]["accuracy"] - rows[INF]["pooled"]["accuracy"])
        parts.append(f"non-DP federated - pooled: {gap:+.1f} pts (goal >= -2: "
                     f"{'met' if gap >= -2 else 'NOT met'})")
        if 8.0 in rows:
            gap8 = 100 * (rows[8.0]["federated"]["accuracy"] - rows[INF]["federated"]["accuracy"])
            parts.append(f"eps=8 federated - non-DP federated: {gap8:+.1f} pts (goal >= -5: "
                         f"{'met' if gap8 >= -5 else 'NOT met'})")
    print("; ".join(parts) if parts else "federated accuracy: " + ", ".join(
        f"eps={_fmt_eps(e)} {r['federated']['accuracy']:.3f}" for e, r in rows.items()))


def _vec(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


if __name__ == "__main__":
    main()
