"""``fedadapt pretrain``: MAE-pretrain the default ViT on unlabelled synthetic multi-site images."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedadapt.argtypes import positive_int

#: The shipped checkpoint's file name (``imaging.backbones.BUILTIN_WEIGHTS``).
BUILTIN_NAME = "imaging/pretrained/vit-default-mae.safetensors"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fedadapt pretrain`` to the CLI."""
    # Defaults live in imaging.pretrain.PretrainConfig; flags left out keep them, and
    # torch/MONAI are imported only when the command runs.
    p = sub.add_parser(
        "pretrain", help="MAE-pretrain the default ViT backbone on unlabelled synthetic images",
        description="Self-supervised masked-autoencoder pretraining (He et al., CVPR 2022) of "
        "the default ViT on unlabelled synthetic images from many simulated scanners. Writes "
        "the encoder (decoder dropped) to --out; use it with run config "
        "backbone-weights=PATH. The shipped default was made with the default flags.")
    p.add_argument("--out", required=True, metavar="FILE",
                   help=f"checkpoint to write (.safetensors, .pt or .pth); the shipped one is "
                   f"{BUILTIN_NAME}")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="passes over the images (default: PretrainConfig.epochs)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: PretrainConfig.seed)")
    p.add_argument("--scanners", type=positive_int, default=None,
                   help="simulated scanners (default: PretrainConfig.num_scanners)")
    p.add_argument("--images-per-scanner", type=positive_int, default=None,
                   help="unlabelled images per scanner (default: "
                   "PretrainConfig.images_per_scanner)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice); results are "
                   "bit-reproducible for a fixed seed and thread count")
    p.set_defaults(func=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    import torch

    from fedadapt.imaging.pretrain import PretrainConfig, pretrain, save_encoder

    out = Path(args.out)
    if out.suffix.lower() not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"--out {out}: expected a .safetensors, .pt or .pth file name, "
                         f"found suffix '{out.suffix}'")
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {"epochs": args.epochs, "seed": args.seed, "num_scanners": args.scanners,
             "images_per_scanner": args.images_per_scanner}
    cfg = PretrainConfig(**{k: v for k, v in given.items() if v is not None})
    start = time.perf_counter()

    def log(epoch: int, loss: float) -> None:
        print(f"epoch {epoch:3d}/{cfg.epochs}  MAE loss {loss:.4f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    result = pretrain(cfg, log=log)
    path = save_encoder(result, cfg, out)
    print(f"encoder: {path} ({path.stat().st_size / 1e6:.2f} MB, "
          f"{len(result.encoder_state)} tensors)")
    return 0
