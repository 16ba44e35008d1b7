"""Hugging Face ``transformers`` vision backbones from a local ``save_pretrained`` folder.

Nothing is downloaded: the folder is read with ``local_files_only=True`` (and
``HF_HUB_OFFLINE=1`` while it loads). The family is the ``model_type`` of the folder's
``config.json``; the input normalisation and size are the image processor's own, read
from ``preprocessor_config.json`` (``image_mean``/``image_std``, ``crop_size``/``size``)
instead of statistics measured on synthetic images.

Families (:data:`FAMILIES`), each with its LoRA targets (Hu et al., ICLR 2022) and the
pooled feature a linear head reads:

- ``vit`` (Dosovitskiy et al., ICLR 2021) and ``dinov2`` (Oquab et al., TMLR 2024):
  attention ``q_proj``/``v_proj`` (transformers 5 names; ``query``/``value`` in 4.x),
  mean of the final (layer-normed) tokens.
- ``clip``/``clip_vision_model`` (Radford et al., ICML 2021) and
  ``siglip``/``siglip_vision_model`` (Zhai et al., ICCV 2023), the vision towers only:
  ``q_proj``/``v_proj``; CLIP: ``post_layernorm`` of the mean token, SigLIP: mean of its
  post-layer-normed tokens (its attention-pooling head is not built).
- ``sam``/``sam_vision_model`` (Kirillov et al., ICCV 2023), the image encoder only:
  the fused ``qkv`` projection of its global-attention blocks only (windowed blocks fold
  windows into the batch axis, which breaks Opacus' per-sample gradients, see
  :func:`_sam_targets`); mean of the last block's tokens (the neck, made for the mask
  decoder, is not pooled).

Every family was checked under Opacus (``tests/imaging/test_hf_backbones.py``): per-sample
gradients of the LoRA factors and the head equal per-example autograd, with ``eager``
and ``sdpa`` attention (the attention kernel is a function, not a hooked module, and
holds no trainable tensor). Other ``model_type`` values are refused with the list of
supported ones. Segmentation on these encoders is refused (:func:`check_task`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fedadapt.imaging.weights import CheckpointError

CONFIG_JSON = "config.json"
PREPROCESSOR_JSON = "preprocessor_config.json"
#: Attention kernel the encoders are loaded with. ``sdpa`` gives the same per-sample
#: gradients as ``eager`` under Opacus (tested) and is faster.
ATTN_IMPLEMENTATION = "sdpa"


def _tokens_mean(out: Any, model: nn.Module) -> torch.Tensor:
    return out.last_hidden_state.mean(dim=1)  # (B, N, D) -> (B, D)


def _clip_pool(out: Any, model: nn.Module) -> torch.Tensor:
    # CLIP's last_hidden_state precedes its final LayerNorm (pooler_output applies it).
    tower = getattr(model, "vision_model", model)  # transformers 4 nests it, 5 does not
    return tower.post_layernorm(out.last_hidden_state.mean(dim=1))


def _sam_pool(out: Any, model: nn.Module) -> torch.Tensor:
    return out.hidden_states[-1].mean(dim=(1, 2))  # (B, H', W', D) -> (B, D)


def _sam_targets(config: Any) -> str:
    """LoRA on the ``qkv`` of SAM's *global*-attention blocks only.

    A windowed block folds the windows into the batch axis ((B·windows, w, w, D)), so
    Opacus' hooks would see B·windows "samples" in its ``qkv`` (tested: 12 rows for a
    batch of 3) and could not clip per image. Global blocks (``global_attn_indexes``,
    2, 5, 8, 11 in ViT-B) keep the batch axis and get exact per-sample gradients.
    """
    size = int(getattr(config, "window_size", 0))
    layers = range(int(config.num_hidden_layers))
    glob = [i for i in layers if size <= 0 or i in set(config.global_attn_indexes)]
    if not glob:
        raise CheckpointError("SAM encoder without global-attention blocks: its windowed "
                              "blocks fold windows into the batch axis, so Opacus cannot "
                              "compute per-image gradients for LoRA there")
    return rf".*\.layers\.({'|'.join(map(str, glob))})\.attn\.qkv"


@dataclass(frozen=True)
class Family:
    """One supported ``model_type``.

    Attributes:
        model_class: Name of the ``transformers`` class that loads the encoder.
        lora_targets: Module-name suffixes that receive LoRA.
        feature_size: Config attribute holding the pooled feature width.
        pool: ``(model output, encoder) -> (B, D)`` pooled features.
        load_kwargs: Extra ``from_pretrained`` arguments (config overrides).
        hidden_states: Ask the encoder for every block's output (SAM pools the last).
        targets_of: ``config -> PEFT target_modules`` when the targets depend on the
            checkpoint's config (a regex string); else ``lora_targets`` is used.
    """

    model_class: str
    lora_targets: tuple[str, ...]
    feature_size: str
    pool: Callable[[Any, nn.Module], torch.Tensor]
    load_kwargs: tuple[tuple[str, Any], ...] = ()
    hidden_states: bool = False
    targets_of: Callable[[Any], str] | None = None

    def targets(self, config: Any) -> list[str] | str:
        """PEFT ``target_modules`` for a checkpoint of this family with ``config``."""
        return self.targets_of(config) if self.targets_of else list(self.lora_targets)


_VIT = Family("ViTModel", ("q_proj", "v_proj"), "hidden_size", _tokens_mean,
              (("add_pooling_layer", False),))
_DINO = Family("Dinov2Model", ("q_proj", "v_proj"), "hidden_size", _tokens_mean)
_CLIP = Family("CLIPVisionModel", ("q_proj", "v_proj"), "hidden_size", _clip_pool)
_SIGLIP = Family("SiglipVisionModel", ("q_proj", "v_proj"), "hidden_size", _tokens_mean,
                 (("vision_use_head", False),))
_SAM = Family("SamVisionModel", ("qkv",), "hidden_size", _sam_pool, hidden_states=True,
              targets_of=_sam_targets)
FAMILIES: dict[str, Family] = {
    "vit": _VIT, "dinov2": _DINO, "clip": _CLIP, "clip_vision_model": _CLIP,
    "siglip": _SIGLIP, "siglip_vision_model": _SIGLIP, "sam": _SAM, "sam_vision_model": _SAM,
}


@dataclass(frozen=True)
class Preprocessing:
    """What the image processor does to an image in [0, 1], as plain numbers.

    Attributes:
        mean: Per-channel mean subtracted (``image_mean``; zeros if not normalising).
        std: Per-channel std divided by (``image_std``; ones if not normalising).
        size: Square side the encoder is fed (``crop_size``, else ``size``).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean or min(self.std) <= 0:
            raise ValueError(f"Preprocessing: image_mean {self.mean} and image_std {self.std} "
                             "must have one value per channel, std > 0")
        if self.size < 1:
            raise ValueError(f"Preprocessing.size must be >= 1, got {self.size}")


def _json(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"backbone folder {path.parent}: no {path.name}; {hint}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _side(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("height", "shortest_edge", "longest_edge"):
            if isinstance(value.get(key), int):
                return value[key]
    return None


def read_preprocessing(folder: str | Path) -> Preprocessing:
    """The normalisation and input size of ``<folder>/preprocessor_config.json``.

    Raises:
        CheckpointError: If the file is missing or has no usable mean/std/size.
    """
    path = Path(folder) / PREPROCESSOR_JSON
    cfg = _json(path, "save the model's image processor next to it "
                "(`AutoImageProcessor.from_pretrained(...).save_pretrained(folder)`)")
    normalise = cfg.get("do_normalize", True)
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    if normalise and not (isinstance(mean, list) and isinstance(std, list)):
        raise CheckpointError(f"{path}: expected lists 'image_mean' and 'image_std', found "
                              f"{mean!r} and {std!r}")
    crop = _side(cfg.get("crop_size")) if cfg.get("do_center_crop", False) else None
    size = crop or _side(cfg.get("size"))
    if size is None:
        raise CheckpointError(f"{path}: expected 'size' (or 'crop_size') as an integer or "
                              f"{{'height': ..}}/{{'shortest_edge': ..}}, found "
                              f"{cfg.get('size')!r}")
    if not normalise:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    try:
        return Preprocessing(tuple(float(m) for m in mean), tuple(float(s) for s in std),
                             int(size))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def model_type(folder: str | Path) -> str:
    """The ``model_type`` of ``<folder>/config.json``."""
    path = Path(folder) / CONFIG_JSON
    cfg = _json(path, "expected a folder written by `save_pretrained`")
    kind = cfg.get("model_type")
    if not isinstance(kind, str):
        raise CheckpointError(f"{path}: no 'model_type'; expected one of {sorted(FAMILIES)}")
    return kind


def family(folder: str | Path) -> Family:
    """The supported family of the model saved in ``folder``.

    Raises:
        CheckpointError: If its ``model_type`` is not one of :data:`FAMILIES`.
    """
    kind = model_type(folder)
    if kind not in FAMILIES:
        raise CheckpointError(
            f"backbone folder {folder}: model_type {kind!r} is not supported; supported "
            f"families: {sorted(FAMILIES)} (each has LoRA targets and an Opacus "
            "per-sample-gradient test; another family needs both before it can train)")
    return FAMILIES[kind]


def load_encoder(folder: str | Path) -> tuple[nn.Module, Family]:
    """Load the encoder saved in ``folder`` from local files only.

    Raises:
        CheckpointError: On an unsupported family or a folder transformers cannot load.
    """
    import transformers

    fam = family(folder)
    cls = getattr(transformers, fam.model_class)
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        encoder = cls.from_pretrained(str(folder), local_files_only=True,
                                      attn_implementation=ATTN_IMPLEMENTATION,
                                      **dict(fam.load_kwargs))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"backbone folder {folder}: transformers cannot load it as "
                              f"{fam.model_class} ({type(e).__name__}: {e})") from e
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    return encoder.eval(), fam


class HFClassifier(nn.Module):
    """A frozen ``transformers`` encoder, pooled features and a linear ``head``.

    Args:
        encoder: The model from :func:`load_encoder`.
        fam: Its family.
        preprocess: The processor's resize + normalisation (``imaging.local.Preprocess``).
        num_classes: Outputs of the head.
    """

    def __init__(self, encoder: nn.Module, fam: Family, preprocess: nn.Module,
                 num_classes: int) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.encoder = encoder
        self.family = fam
        width = int(getattr(encoder.config, fam.feature_size))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(x)  # (B, 1|3, H, W) in [0, 1] -> (B, 3, S, S) normalised
        out = self.encoder(pixel_values=pixels, output_hidden_states=self.family.hidden_states)
        return self.head(self.family.pool(out, self.encoder))  # (B, num_classes)
