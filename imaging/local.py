"""Foundation-model backbones from local files (``backbone-path``), and their digest.

``ModelSpec.backbone_path`` names what the user brings; nothing is downloaded:

- a folder with ``config.json`` → a ``transformers`` vision model (:mod:`imaging.hf`);
- a folder with ``open_clip_config.json`` → an open_clip tower with a timm trunk, or a
  ``.safetensors``/``.pt``/``.pth`` file in timm's layout → a MONAI ViT
  (:mod:`imaging.timm_vit`).

Either way the model is the frozen encoder behind :class:`Preprocess` (grayscale
replicated to the encoder's channels, resized to its input size, normalised with its
own mean/std) with a linear ``head`` on pooled features; LoRA goes into the family's
attention projections. Only adapters and head travel, as for every backbone.

Deployment: the path is read *at each site* (the run config travels, the checkpoint
does not), so every site needs the same checkpoint at that path. The server sends
:func:`checkpoint_sha256` of its own copy with every train/evaluate message
(``keys.BACKBONE_SHA256``) and a site refuses a mismatch (:func:`check_digest`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from fedadapt.imaging.hf import CONFIG_JSON, Preprocessing
from fedadapt.imaging.weights import CheckpointError

HEAD = "head"
CHUNK = 1 << 20
_DIGESTS: dict[tuple, str] = {}  # (path, (name, size, mtime) of each file) -> sha256


class Preprocess(nn.Module):
    """Images in [0, 1] (B, 1|C, H, W) → the encoder's input: channels, size, mean/std.

    A one-channel (grayscale) medical image is replicated to the encoder's C channels,
    as RGB pretraining expects; the resize is bilinear when H, W differ from the
    processor's size. No trainable tensors (Opacus sees none here).
    """

    def __init__(self, prep: Preprocessing) -> None:
        super().__init__()
        c = len(prep.mean)
        self.size = prep.size
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std).view(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.mean.shape[1]
        if x.shape[1] == 1 and c > 1:
            x = x.expand(-1, c, -1, -1)
        elif x.shape[1] != c:
            raise ValueError(f"the backbone takes 1 or {c} image channels, got {x.shape[1]}")
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        return (x - self.mean) / self.std


def kind(path: str | Path) -> str:
    """``"hf"`` (transformers folder) or ``"timm"`` (timm file / open_clip folder).

    Raises:
        CheckpointError: If the path does not exist or is neither.
    """
    from fedadapt.imaging.timm_vit import OPEN_CLIP_CONFIG

    p = Path(path).expanduser()
    if p.is_dir() and (p / CONFIG_JSON).is_file():
        return "hf"
    if (p.is_dir() and (p / OPEN_CLIP_CONFIG).is_file()) or (
            p.is_file() and p.suffix.lower() in (".safetensors", ".pt", ".pth")):
        return "timm"
    what = "folder without config.json or open_clip_config.json" if p.is_dir() else (
        "file of another type" if p.is_file() else "nothing (not found)")
    raise CheckpointError(
        f"backbone-path {str(path)!r}: expected a transformers `save_pretrained` folder "
        "(config.json, preprocessor_config.json, weights), an open_clip local-dir folder "
        f"or a timm-style ViT .safetensors/.pt/.pth file; found {what} (give an absolute "
        "path: sites run in other folders)")


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(f for f in path.rglob("*") if f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(path).parts))


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 of a checkpoint file, or of a folder's files (relative names and contents,
    sorted; hidden entries such as ``.cache`` skipped). Cached per file size and mtime."""
    p = Path(path).expanduser().resolve()
    files = _files(p)
    stamp = (str(p), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp in _DIGESTS:
        return _DIGESTS[stamp]
    total = hashlib.sha256()
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(CHUNK):
                h.update(block)
        name = f.name if p.is_file() else str(f.relative_to(p))
        total.update(f"{name}\0{h.hexdigest()}\n".encode())
    _DIGESTS[stamp] = total.hexdigest()
    return _DIGESTS[stamp]


def check_digest(path: str | Path, expected: str, *, site: str) -> None:
    """Refuse to train on a checkpoint that is not the server's.

    Raises:
        CheckpointError: If ``expected`` is empty or differs from this site's copy.
    """
    if not expected:
        raise CheckpointError(f"site {site}: the server sent no sha256 of backbone-path "
                              f"{str(path)!r}; refusing to train on an unverified backbone "
                              "(the server must be a fedadapt version that sends it)")
    own = checkpoint_sha256(path)
    if own != expected:
        raise CheckpointError(
            f"site {site}: backbone-path {str(path)!r} has sha256 {own[:16]}..., the "
            f"server's has {expected[:16]}...; every site needs the same checkpoint at this "
            "path: copy the server's checkpoint here (compare with `sha256sum`)")


def local_base(backbone_path: str, *, num_classes: int, image_size: int) -> tuple[
        nn.Module, list[str] | str]:
    """The base model (no adapters) of ``backbone_path`` and its LoRA targets.

    The head is initialised from the global RNG (``build_model`` seeds it).
    """
    if kind(backbone_path) == "hf":
        from fedadapt.imaging.hf import HFClassifier, load_encoder, read_preprocessing

        encoder, fam = load_encoder(backbone_path)
        pre = Preprocess(read_preprocessing(backbone_path))
        return HFClassifier(encoder, fam, pre, num_classes), fam.targets(encoder.config)
    from fedadapt.imaging.timm_vit import LORA_TARGETS, timm_base

    return timm_base(backbone_path, num_classes=num_classes,
                     image_size=image_size), LORA_TARGETS


def attach_lora(base: nn.Module, targets: list[str] | str, *, rank: int,
                alpha: int) -> PeftModel:
    """PEFT LoRA on ``targets``; the encoder stays frozen, adapters and ``head`` train."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=targets, modules_to_save=[HEAD])
    return get_peft_model(base, config)
