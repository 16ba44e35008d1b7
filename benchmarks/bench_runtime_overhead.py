"""Runtime overhead: a federation on Flower's Simulation Engine ÷ the same work in a plain loop.

Both sides run the same RunConfig on the same synthetic hospitals
(``imaging.synthetic.default_sites``): each round, every site loads the global adapter,
trains with ``client.train.train`` (DP-SGD as configured) and evaluates with
``client.train.evaluate``; the round ends with a FedAvg weighted by training size. The
plain loop does this in one process with one model; the federation is
``simulations.runner.simulate`` (the real ServerApp/ClientApps on the Ray backend,
including start-up). The last line is simulation wall time ÷ plain-loop wall time.

    python benchmarks/bench_runtime_overhead.py [--quick] [--rounds R]

Without ``--rounds`` it runs the default job (``fedadapt simulate``'s ``RunConfig()``:
3 sites, 5 rounds, 2 local epochs, 480 / 160 records at the largest site, DP on).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from fedadapt.client.train import evaluate, resolve_device, train
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model, load_trainable, trainable_state
from fedadapt.imaging.synthetic import default_sites, make_site_data
from fedadapt.privacy.dp import DPRequest
from fedadapt.simulations.runner import simulate
from fedadapt.imaging.run_spec import run_model_spec


def plain_loop(cfg: RunConfig) -> float:
    """Wall seconds of the federation's local work done in one process."""
    t0 = time.perf_counter()
    device = resolve_device("cpu")
    specs = default_sites(cfg.num_sites, cfg.site_train_size, cfg.site_test_size, cfg.seed)
    data = [make_site_data(s, image_size=cfg.image_size, num_classes=cfg.num_classes,
                           seed=cfg.seed, site_index=i) for i, s in enumerate(specs)]
    model = build_model(run_model_spec(cfg))
    global_state = trainable_state(model)
    dp = DPRequest(cfg.noise_multiplier, cfg.max_grad_norm) if cfg.dp else None
    for rnd in range(1, cfg.num_server_rounds + 1):
        states, weights = [], []
        for i, (tr, _) in enumerate(data):
            load_trainable(model, global_state)
            res = train(model, tr, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                        device=device, seed=cfg.seed + 1000 * rnd + i, dp=dp)
            states.append(trainable_state(model))
            weights.append(res.num_examples)
        total = sum(weights)
        global_state = {k: sum(s[k] * (w / total) for s, w in zip(states, weights))
                        for k in global_state}
        load_trainable(model, global_state)
        for _, te in data:
            evaluate(model, te, batch_size=cfg.batch_size, device=device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the test suite")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds (default: the default job's, RunConfig().num_server_rounds)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(out_dir=out, device="cpu")  # the default job
        if args.quick:
            cfg = cfg.replace(num_server_rounds=1, num_sites=2, site_train_size=64,
                              site_test_size=32)
        if args.rounds:
            cfg = cfg.replace(num_server_rounds=args.rounds)
        torch.set_num_threads(1)  # as each ClientApp does (client.site.set_threads)
        plain = plain_loop(cfg)
        t0 = time.perf_counter()
        simulate(cfg)
        sim = time.perf_counter() - t0
    print(f"{cfg.num_sites} sites, {cfg.num_server_rounds} rounds, train size "
          f"{cfg.site_train_size}, dp {cfg.dp}")
    print(f"plain loop: {plain:.2f} s   Flower simulation: {sim:.2f} s")
    print(f"Flower simulation / plain loop wall time: {sim / plain:.3f}x")


if __name__ == "__main__":
    main()
