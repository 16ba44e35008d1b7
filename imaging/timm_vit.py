"""timm-style ViT checkpoints (RETFound, DINOv2, BiomedCLIP's tower) as a frozen MONAI ViT.

A single ``.safetensors``/``.pt``/``.pth`` file in timm's key layout (``patch_embed.proj``,
``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1``, ``pos_embed``, ``cls_token``; RETFound and
MAE, Dosovitskiy et al. ICLR 2021 / He et al. CVPR 2022; DINOv2, Oquab et al. 2024) is
mapped onto the registry's MONAI ViT with :data:`weights.TIMM_VIT_REMAP`. The shape is
read from the tensors (width, depth, MLP width, patch, channels; heads = width / 64, the
timm/DINOv2/MAE convention, 16 for ViT-H/ViT-g widths). Exact conversions on the way:

- DINOv2's LayerScale (``ls1.gamma``, ``ls2.gamma``) is folded into the linear layer
  before it (``diag(γ)·W``, ``γ·b``), which is the same function.
- Class/register tokens are dropped (MONAI's ViT has none; features are the mean of the
  patch tokens) with their rows of ``pos_embed``; the patch grid of ``pos_embed`` is
  resized bicubically when the run's image size differs from the checkpoint's (as
  timm's ``resample_abs_pos_embed`` does).

Refused with the reason: SAM/MedSAM image encoders (windowed attention with relative
position tables, ``rel_pos_h``; use a ``transformers`` ``SamModel`` folder instead,
:mod:`imaging.hf`) and checkpoints without timm's key layout.

An open_clip ``local-dir`` folder (``open_clip_config.json`` +
``open_clip_pytorch_model.bin``/``open_clip_model.safetensors``, e.g. BiomedCLIP) whose
vision tower is a timm ViT (``vision_cfg.timm_model_name``) is read the same way from its
``visual.trunk.*`` tensors, with the folder's ``preprocess_cfg`` mean/std; open_clip
itself is not needed (it requires torchvision). Native open_clip ViTs (``ln_pre``,
``in_proj_weight``) are refused: MONAI's ViT has no pre-LayerNorm.

Normalisation: ImageNet mean/std (timm's default for these ViTs) unless the folder says.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from torch import nn

from fedadapt.imaging.hf import Preprocessing
from fedadapt.imaging.weights import (TIMM_VIT_ALLOW_MISSING, TIMM_VIT_REMAP, CheckpointError,
                                      load_state, read_checkpoint)

IMAGENET = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224)
#: LoRA targets of MONAI's ViT attention (``SABlock``).
LORA_TARGETS = ("qkv", "out_proj")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: Heads of timm widths whose head width is not 64 (ViT-H/14, ViT-g/14 of EVA/open_clip).
_HEADS = {1280: 16, 1408: 16}
TIMM_LN_EPS = 1e-6
_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "visual.trunk.")


class TimmViTClassifier(nn.Module):
    """Normalisation, a frozen MONAI ViT ``encoder``, mean-pooled tokens, a linear ``head``."""

    def __init__(self, preprocess: nn.Module, encoder: ViT, width: int,
                 num_classes: int) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.encoder = encoder
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder(self.preprocess(x))  # (B, num_patches, width)
        return self.head(tokens.mean(dim=1))


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (``module.``, ``visual.trunk.`` ...) shared by the ViT keys."""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + "patch_embed.") for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _refuse_foreign(state: Mapping[str, torch.Tensor], source: str) -> None:
    if any("rel_pos" in k for k in state):
        raise CheckpointError(
            f"checkpoint {source}: a SAM/MedSAM-style image encoder (windowed attention with "
            "relative position tables 'rel_pos_h/w'), which MONAI's ViT cannot represent; "
            "convert it to a transformers SamModel folder (transformers' convert_sam_to_hf.py) "
            "and pass that folder as the backbone")
    if any(k.endswith("ln_pre.weight") or "in_proj_weight" in k for k in state):
        raise CheckpointError(
            f"checkpoint {source}: a native open_clip/OpenAI ViT (ln_pre, in_proj_weight); "
            "MONAI's ViT has no pre-LayerNorm, so it cannot be loaded exactly; use its "
            "transformers CLIP folder (model_type 'clip') instead")
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(
            f"checkpoint {source}: expected timm ViT keys ('patch_embed.proj.weight', "
            f"'blocks.0.attn.qkv.weight', ...), found {sorted(state)[:6]}")


def fold_layer_scale(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold DINOv2's LayerScale γ into the linear layer before it (an exact rewrite)."""
    out = dict(state)
    for key in [k for k in state if re.search(r"\.ls[12]\.(gamma|weight)$", k)]:
        block, which = re.match(r"(.*)\.ls([12])\.", key).groups()  # type: ignore[union-attr]
        linear = f"{block}.attn.proj" if which == "1" else f"{block}.mlp.fc2"
        gamma = out.pop(key)
        out[f"{linear}.weight"] = out[f"{linear}.weight"] * gamma[:, None]
        if f"{linear}.bias" in out:
            out[f"{linear}.bias"] = out[f"{linear}.bias"] * gamma
    return out


def _patch_pos_embed(pos: torch.Tensor, grid: int, source: str) -> torch.Tensor:
    """Patch rows of ``pos_embed`` (1, T, D) without prefix tokens, resized to grid²."""
    tokens = pos.shape[1]
    native = math.isqrt(tokens)
    while native > 0 and tokens - native * native > 8:
        native -= 1  # up to 8 prefix tokens (class + registers)
    if native == 0 or tokens - native * native > 8:
        raise CheckpointError(f"checkpoint {source}: pos_embed has {tokens} rows, not a "
                              "square patch grid plus class/register tokens")
    patch = pos[:, tokens - native * native:]
    if native == grid:
        return patch
    width = pos.shape[2]
    img = patch.reshape(1, native, native, width).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(1, grid * grid, width).to(pos.dtype)


def vit_shape(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``width, depth, mlp_dim, patch, channels, heads`` read from timm-layout tensors."""
    width, channels, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state
                    if (m := re.match(r"blocks\.(\d+)\.", k)))
    return dict(width=width, depth=depth, mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
                patch=patch, channels=channels, heads=_HEADS.get(width, max(1, width // 64)))


def _open_clip(folder: Path) -> tuple[dict[str, torch.Tensor], Preprocessing]:
    cfg_path = folder / OPEN_CLIP_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read ({type(e).__name__}: {e})") from e
    vision = cfg.get("model_cfg", {}).get("vision_cfg", {})
    if not vision.get("timm_model_name"):
        raise CheckpointError(f"{cfg_path}: the vision tower is not a timm model "
                              "(no model_cfg.vision_cfg.timm_model_name); only timm-trunk "
                              "towers (e.g. BiomedCLIP) load without open_clip")
    weights = next((folder / w for w in OPEN_CLIP_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"open_clip folder {folder}: none of {OPEN_CLIP_WEIGHTS}")
    pre = cfg.get("preprocess_cfg", {})
    size = vision.get("image_size", IMAGENET.size)
    prep = Preprocessing(tuple(pre.get("mean", IMAGENET.mean)), tuple(pre.get("std", IMAGENET.std)),
                         int(size if isinstance(size, int) else size[0]))
    state = read_checkpoint(weights)
    return {k: v for k, v in state.items() if k.startswith("visual.trunk.")}, prep


def timm_base(path: str | Path, *, num_classes: int, image_size: int) -> TimmViTClassifier:
    """The frozen classifier of a timm-layout ViT file or open_clip ``local-dir`` folder.

    Raises:
        CheckpointError: If the file is not a timm ViT, does not fit, or is refused.
    """
    from fedadapt.imaging.local import Preprocess

    path = Path(path)
    state, prep = _open_clip(path) if path.is_dir() else (read_checkpoint(path), IMAGENET)
    state = strip_prefix(state)
    _refuse_foreign(state, str(path))
    shape = vit_shape(state)
    if image_size % shape["patch"]:
        raise CheckpointError(f"checkpoint {path}: image size {image_size} is not a multiple "
                              f"of its patch size {shape['patch']}")
    state = fold_layer_scale(state)
    state["pos_embed"] = _patch_pos_embed(state["pos_embed"], image_size // shape["patch"],
                                          str(path))
    encoder = ViT(in_channels=shape["channels"], img_size=(image_size, image_size),
                  patch_size=shape["patch"], hidden_size=shape["width"],
                  mlp_dim=shape["mlp_dim"], num_layers=shape["depth"],
                  num_heads=shape["heads"], spatial_dims=2, classification=False,
                  qkv_bias="blocks.0.attn.qkv.bias" in state)
    for m in encoder.modules():  # timm's (and DINOv2's, MAE's) LayerNorm epsilon
        if isinstance(m, nn.LayerNorm):
            m.eps = TIMM_LN_EPS
    prep = Preprocessing(prep.mean, prep.std, image_size)  # pos_embed resized, not images
    model = TimmViTClassifier(Preprocess(prep), encoder, shape["width"], num_classes)
    state = {k: v for k, v in state.items() if k != "register_tokens"}
    load_state(model, state, source=str(path), remap=TIMM_VIT_REMAP,
               allow_missing=TIMM_VIT_ALLOW_MISSING + (r"^preprocess\.",))
    return model.eval()
