"""Test-time adaptation at an unseen site: accuracy before/after, shifted vs unshifted.

A real DP federation (Flower Simulation Engine, the default synthetic hospitals) is run
and released (``fedadapt release``); the released model is loaded back from the bundle
(``fedadapt.cmd_tta.load_released``) and adapted with ``client.tta`` on two sites that
never trained:

* **shifted**: a scanner no training site had (gamma 2.5, noise 0.15, blur 1.5, bias
  0.35; training gammas are 0.8-1.5, noise <= 0.07, blur <= 1.0, bias <= 0.25);
* **unshifted**: new patients through the scanner of training site hospital-a.

Each site streams its unlabelled images once (online protocol: each batch is predicted
before the model adapts on it), then the adapted model is evaluated on a separate split
of the same site. Labels are used only to score. Methods: ``sar`` (``TTAConfig()``) and
``tent`` (no filter, no SAM, no reset, no balance term), side by side in one run.

Usage::

    python benchmarks/bench_tta.py                 # 3 sites, 3 rounds, 768 stream images
    python benchmarks/bench_tta.py --run-dir runs/X # reuse a finished run
    python benchmarks/bench_tta.py --quick         # tiny (tests)

The last line printed is the SAR accuracy change on the shifted site (points).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
from pathlib import Path

import torch

from fedadapt.client.tta import TTAConfig, adapt_stream, entropy, predict
from fedadapt.cmd_tta import load_released
from fedadapt.config import RunConfig
from fedadapt.imaging.synthetic import ScannerShift, SiteSpec, default_sites, make_site_data
from fedadapt.server.release import build_release
from fedadapt.server.signing import generate_key

UNSEEN = ScannerShift(intensity_scale=1.0, gamma=2.5, noise_std=0.15, blur_sigma=1.5,
                      bias_coeff=0.35)
METHODS = {"sar": TTAConfig(),
           "tent": TTAConfig(entropy_margin=1e9, sam_rho=0.0, reset_threshold=0.0,
                             balance_weight=0.0)}


def site(cfg: RunConfig, shift: ScannerShift, n: int, index: int):
    stream, test = make_site_data(SiteSpec("tta", n, n // 2, shift), image_size=cfg.image_size,
                                  num_classes=cfg.num_classes, seed=cfg.seed, site_index=index)
    return stream.tensors, test.tensors


def acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def evaluate(model, data, method: str, batch: int, num_classes: int, *, lr: float,
             epochs: int) -> dict:
    (xs, ys), (xt, yt) = data
    m = copy.deepcopy(model)
    before = acc(predict(m, torch.split(xt, batch)), yt)
    # `epochs` passes over the site's unlabelled set; "online" scores the first pass
    stream = list(torch.split(xs, batch)) * epochs
    online, sar = adapt_stream(m, stream, num_classes=num_classes,
                               cfg=dataclasses.replace(METHODS[method], lr=lr))
    online = online[: len(xs)]
    after = acc(predict(m, torch.split(xt, batch)), yt)
    frozen = predict(copy.deepcopy(model), torch.split(xs, batch))
    return {"before": before, "after": after, "stream_frozen": acc(frozen, ys),
            "entropy_frozen": float(entropy(frozen).mean()),
            "stream_online": acc(online, ys), **sar.stats.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stream", type=int, default=768)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=TTAConfig().lr)
    ap.add_argument("--epochs", type=int, default=1, help="passes over the unlabelled set")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.stream = 1, 64
    tmp = Path(tempfile.mkdtemp(prefix="bench-tta-"))
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        from fedadapt.simulations.runner import simulate

        size = (64, 32) if args.quick else (240, 96)
        run_dir = simulate(RunConfig(out_dir=str(tmp / "runs"), num_sites=2 if args.quick else 3,
                                     num_server_rounds=args.rounds, site_train_size=size[0],
                                     site_test_size=size[1], noise_multiplier=0.8,
                                     local_epochs=2, lr=0.03, epsilon_cap=100.0,
                                     cross_site_eval=False))
    key = generate_key(tmp / "key.pem")
    bundle = build_release(run_dir, tmp / "bundle", key_path=key)
    model, spec, run_config = load_released(bundle, public_key=f"{key}.pub")
    cfg = RunConfig.from_mapping(run_config)
    train_a = default_sites(cfg.num_sites, cfg.site_train_size, cfg.site_test_size, cfg.seed)[0]
    sites = {"shifted": site(cfg, UNSEEN, args.stream, 90),
             "unshifted": site(cfg, train_a.shift, args.stream, 91)}
    print(f"run {run_dir}; released bundle {bundle}; {args.stream} stream images per site; "
          f"lr {args.lr}, {args.epochs} pass(es), batch {args.batch}")
    print(f"{'site':10} {'method':6} {'before':>7} {'after':>7} {'delta':>7} "
          f"{'online':>7} {'frozen':>7} {'updates':>7} {'resets':>6} {'reliable':>8} {'H0':>5}")
    results = {}
    for name, data in sites.items():
        for method in METHODS:
            r = results[name, method] = evaluate(model, data, method, args.batch, spec.num_classes,
                                                   lr=args.lr, epochs=args.epochs)
            print(f"{name:10} {method:6} {r['before']:7.3f} {r['after']:7.3f} "
                  f"{100 * (r['after'] - r['before']):+7.1f} {r['stream_online']:7.3f} "
                  f"{r['stream_frozen']:7.3f} {r['updates']:7d} {r['resets']:6d} "
                  f"{r['reliable_fraction']:8.2f} {r['entropy_frozen']:5.2f}")
    r = results["shifted", "sar"]
    print(f"sar accuracy change on the shifted site: {100 * (r['after'] - r['before']):+.1f} points")


if __name__ == "__main__":
    main()
