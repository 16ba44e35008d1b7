"""``fedadapt tta``: test-time adaptation of a released model at a site, on its own
unlabelled images (``client.tta``: SAR/Tent on early/middle block norms).

    fedadapt tta BUNDLE --site-dir DIR [--out NORMS.safetensors] [--public-key KEY.pub]
    fedadapt tta BUNDLE --synthetic-shift GAIN,GAMMA,NOISE,BLUR,BIAS [--num N]

The bundle (``fedadapt release``) is verified first (signature, file hashes, base model
rebuilt from its spec); a bundle that fails is refused. With ``--site-dir`` the site's
training images from its ``site.toml`` are read without their labels; with
``--synthetic-shift`` a simulated site with that scanner is generated (labels are kept
aside only to report accuracy before and after). The adapted norm parameters are
written to ``--out`` at the site; nothing is sent anywhere.

Safeguard (``client.tta_guard``, our addition): ``--holdout-fraction`` of the images is
held back and never adapted on; if, after adaptation, more than ``--tolerance`` of those
the released model was confident on change class (or their mean entropy rises), the
released weights are restored and the report says ``safeguard_reverted: true`` and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from torch.utils.data import TensorDataset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tta", help="test-time adaptation of a released model on a site's "
                       "unlabelled images (SAR: norms of early/middle blocks, entropy filter, "
                       "SAM, reset)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="a release folder (fedadapt release)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--site-dir", help="the site's folder (site.toml names its data)")
    src.add_argument("--synthetic-shift", metavar="GAIN,GAMMA,NOISE,BLUR,BIAS",
                     help="simulate a site with this scanner (imaging.synthetic.ScannerShift)")
    p.add_argument("--num", type=int, default=512, help="simulated images (--synthetic-shift)")
    p.add_argument("--public-key", default=None, help="expected signer of the bundle")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="SGD lr (default: TTAConfig's)")
    p.add_argument("--holdout-fraction", type=float, default=None,
                   help="share of the images held back for the safeguard (default 0.2; "
                   "0 disables it)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="revert when more than this share of confident held-back images "
                   "change class (default 0.01)")
    p.add_argument("--out", default=None, help="write the adapted norm parameters here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_tta)


def load_released(bundle: str | Path, *, public_key: str | None = None):
    """The released model (frozen base rebuilt from the spec + PEFT adapter), after the
    bundle verifies. Returns ``(model, spec, run config mapping)``.

    Raises:
        ValueError: If the bundle fails verification (every problem named).
    """
    from peft import PeftModel

    from fedadapt.imaging.backbones import ModelSpec
    from fedadapt.server.release import MANIFEST, released_base
    from fedadapt.server.release_verify import verify_release

    report = verify_release(bundle, public_key=public_key)
    if not report.ok:
        raise ValueError(f"release {bundle} fails verification; refusing to adapt it:\n  "
                         + "\n  ".join(report.problems))
    manifest = json.loads((Path(bundle) / MANIFEST).read_text())
    spec = ModelSpec(**manifest["base_model"]["spec"])
    model = PeftModel.from_pretrained(released_base(spec), str(Path(bundle) / "adapter"))
    return model.eval(), spec, manifest["run"]["config"]


def synthetic_site(shift: str, *, num: int, run_config: dict, site_index: int = 90
                   ) -> TensorDataset:
    """A simulated site with scanner ``GAIN,GAMMA,NOISE,BLUR,BIAS`` (balanced labels)."""
    from fedadapt.config import RunConfig
    from fedadapt.imaging.synthetic import ScannerShift, SiteSpec, make_site_data

    try:
        gain, gamma, noise, blur, bias = (float(v) for v in shift.split(","))
    except ValueError:
        raise ValueError(f"--synthetic-shift must be 5 numbers GAIN,GAMMA,NOISE,BLUR,BIAS, "
                         f"got {shift!r}") from None
    cfg = RunConfig.from_mapping(run_config)
    spec = SiteSpec("tta-site", num, 4, ScannerShift(gain, gamma, noise, blur, bias))
    data, _ = make_site_data(spec, image_size=cfg.image_size, num_classes=cfg.num_classes,
                             seed=cfg.seed, site_index=site_index)
    return data


def _site_images(site_dir: str, run_config: dict) -> TensorDataset:
    from fedadapt.client.site import deployed_site
    from fedadapt.config import RunConfig

    site = deployed_site(RunConfig.from_mapping(run_config), Path(site_dir), {})
    return site.datasets()[0]


def run_tta(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from fedadapt.client.tta import TTAConfig, adapt_stream, predict, split_holdout
    from fedadapt.client.tta_guard import holdout_mask

    model, spec, run_config = load_released(args.bundle, public_key=args.public_key)
    data = (_site_images(args.site_dir, run_config) if args.site_dir else
            synthetic_site(args.synthetic_shift, num=args.num, run_config=run_config))
    images = data.tensors[0]
    batches = list(torch.split(images, args.batch_size))
    before = predict(model, batches)
    given = {"lr": args.lr, "holdout_fraction": args.holdout_fraction,
             "tolerance": args.tolerance}
    cfg = dataclasses.replace(TTAConfig(), **{k: v for k, v in given.items() if v is not None})
    stream, held = split_holdout(images, cfg.holdout_fraction, cfg.holdout_seed)
    online, sar = adapt_stream(model, list(torch.split(stream, args.batch_size)),
                               num_classes=spec.num_classes, cfg=cfg, holdout=held,
                               batch_size=args.batch_size)
    after = predict(model, batches)
    report = {"images": len(images), "held_back": len(held), **sar.stats.to_dict()}
    if args.synthetic_shift:  # a simulation: labels exist, used only for this report
        y = data.tensors[1]
        keep = ~holdout_mask(len(images), cfg.holdout_fraction, cfg.holdout_seed)
        report.update({f"accuracy_{k}": float((v.argmax(1) == yy).float().mean())
                       for k, v, yy in (("before", before, y), ("online", online, y[keep]),
                                        ("after", after, y))})
    if args.out:
        save_file(sar.adapted_state(), args.out)
        report["adapted_norms"] = args.out
    print(json.dumps(report, indent=2) if args.json else
          "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0

