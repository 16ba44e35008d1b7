"""Backbones and adapter injection: a frozen backbone with PEFT LoRA and a trainable head.

Only the adapter tensors (``lora_A``/``lora_B``) and the task head are trainable; these
are exactly the tensors that travel between server and sites. The frozen backbone is
rebuilt deterministically at every site from its spec (seed), so it never travels.

The default (2-D classification) backbone is :class:`ViTClassifier`, which starts from
the shipped MAE checkpoint; a spec naming a registry backbone (``imaging.registry``,
e.g. ``unetr-2d``/``unetr-3d`` for segmentation, ``vit-3d``) is built from the registry
with the registry's LoRA targets and head; a spec with ``backbone_path`` is a foundation
model from local files (``imaging.local``: transformers folders, timm-layout ViT files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from monai.networks.nets import ViT
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from fedadapt.imaging.weights import CheckpointError, load_weights

#: LoRA goes into the attention projections of MONAI's ``SABlock``.
VIT_LORA_TARGETS = ("qkv", "out_proj")
HEAD = "head"
TASKS = ("classification", "multilabel", "segmentation")
#: The shipped MAE-pretrained encoder of the default ``ModelSpec`` (``fedadapt pretrain``).
BUILTIN_WEIGHTS = Path(__file__).resolve().parent / "pretrained" / "vit-default-mae.safetensors"
#: ``ViTClassifier`` tensors an encoder checkpoint does not hold: the task head (trained
#: with the adapters) and the feature standardisation (recomputed for the loaded encoder).
ENCODER_ALLOW_MISSING = (r"^head\.", r"^feature_(mean|std)$")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and adapter settings; the same spec gives the same model everywhere.

    Attributes:
        image_size: Input side in pixels (2-D, one channel).
        patch_size: ViT patch side.
        hidden_size: Token width.
        mlp_dim: Width of the transformer MLP.
        num_layers: Transformer blocks.
        num_heads: Attention heads.
        num_classes: Outputs of the task head.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA α.
        seed: Seed of the (frozen) backbone and of the initial adapters.
        backbone_weights: Encoder weights: ``"random"`` (seeded random init),
            ``"builtin"`` (the shipped MAE-pretrained checkpoint, :data:`BUILTIN_WEIGHTS`)
            or a path to a ``.safetensors``/``.pt``/``.pth`` holding ``encoder.*`` tensors
            (a registry backbone: its own tensor names; its head may be missing).
        task: ``classification``, ``multilabel`` or ``segmentation`` (what the sites'
            loss and metrics are, ``imaging.tasks``).
        spatial_dims: 2 or 3.
        backbone: A registry name (:func:`backbone_for`), or empty for the default
            :class:`ViTClassifier` (2-D classification). Registry backbones take
            ``hidden_size``, ``mlp_dim`` and ``num_heads`` from this spec where they have
            them (UNETR: 12 layers, patch 16, fixed by MONAI).
        backbone_path: A foundation model from local files (``imaging.local``): a
            ``transformers`` ``save_pretrained`` folder, an open_clip local-dir folder or
            a timm-style ViT file; empty for none. Its shape comes from the checkpoint
            (the shape fields above are then unused), its weights are the checkpoint's
            (``backbone_weights`` must be ``"random"``); 2-D classification/multilabel.
        train_decoder: Also train the registry backbone's convolutional encoder/decoder
            blocks in full (UNETR: ``encoder1``, ``decoder2``..``decoder5``; PEFT
            ``modules_to_save``, sent with the adapters), not only LoRA in the ViT and the
            head. A randomly initialised UNETR's convolutional path otherwise never trains.
    """

    image_size: int = 32
    patch_size: int = 4
    hidden_size: int = 96
    mlp_dim: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_classes: int = 3
    lora_rank: int = 8
    lora_alpha: int = 16
    seed: int = 0
    backbone_weights: str = "random"
    task: str = "classification"
    spatial_dims: int = 2
    backbone: str = ""
    backbone_path: str = ""
    train_decoder: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.backbone_weights, str) or not self.backbone_weights:
            raise ValueError("backbone_weights must be 'builtin', 'random' or a checkpoint "
                             f"path, got {self.backbone_weights!r}")
        if self.task not in TASKS:
            raise ValueError(f"ModelSpec.task={self.task!r}: use one of {TASKS}")
        if not isinstance(self.train_decoder, bool):
            raise ValueError(f"ModelSpec.train_decoder must be true or false, got "
                             f"{self.train_decoder!r}")
        if self.train_decoder and not self.backbone:
            raise ValueError("train-decoder: only a registry backbone with a convolutional "
                             "decoder (unetr-2d, unetr-3d: segmentation) has one to train; "
                             "this spec builds "
                             + (f"backbone-path {self.backbone_path!r}" if self.backbone_path
                                else "the default 2-D ViT classifier") + ": turn it off")
        if self.backbone_path:
            _check_local(self)
            return
        if self.backbone:
            from fedadapt.imaging.registry import UNETR_PATCH, decoder_modules, get_backbone

            b = get_backbone(self.backbone)
            if self.train_decoder:
                decoder_modules(self.backbone)  # raises if it has none
            if b.spatial_dims != self.spatial_dims or (b.task == "segmentation") != (
                    self.task == "segmentation"):
                raise ValueError(f"backbone {self.backbone!r} is {b.spatial_dims}-D "
                                 f"{b.task}; the spec is {self.spatial_dims}-D {self.task}")
            if b.name.startswith("unetr") and self.image_size % UNETR_PATCH:
                raise ValueError(f"image_size {self.image_size} is not a multiple of UNETR's "
                                 f"patch size {UNETR_PATCH}; use 16, 32, 48, ...")
            if self.backbone_weights == "builtin" and b.pretrained is None:
                raise ValueError(f"backbone_weights 'builtin' is the default 2-D ViT's MAE "
                                 f"checkpoint; {self.backbone!r} has none shipped: use "
                                 "'random' or the path of a checkpoint of this backbone")
            return
        if self.task == "segmentation" or self.spatial_dims != 2:
            raise ValueError(f"the default backbone is a 2-D classifier; a {self.spatial_dims}"
                             f"-D {self.task} spec names a registry backbone (backbone_for)")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")


def _check_local(spec: ModelSpec) -> None:
    where = f"backbone-path {spec.backbone_path!r}"
    if spec.task == "segmentation" or spec.spatial_dims != 2 or spec.backbone:
        raise ValueError(
            f"{where}: a local foundation-model encoder trains as a 2-D classifier (pooled "
            "features + linear head, task classification or multilabel); this spec is "
            f"{spec.spatial_dims}-D {spec.task}. Segmentation would need a decoder on its "
            "patch tokens (UNETR-style, Hatamizadeh et al. 2022), which is not implemented: "
            "leave backbone-path empty to use the scenario's UNETR")
    if spec.backbone_weights != "random":
        raise ValueError(f"{where}: the weights are the checkpoint's; backbone-weights "
                         f"{spec.backbone_weights!r} cannot apply as well (use one of them)")


class ViTClassifier(nn.Module):
    """MONAI ViT encoder, mean-pooled tokens, frozen feature standardisation, linear head.

    The pooled features of a frozen encoder share a large common offset and vary little
    between images; under DP-SGD that offset eats the clipping budget and turns noise
    on the head into large logit noise. ``feature_mean``/``feature_std`` are frozen
    buffers measured once on *public* synthetic reference images (no site data, so no
    privacy cost), the same role ImageNet normalisation constants play for a
    pretrained model; they are part of the backbone and never travel.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.encoder = ViT(in_channels=1, img_size=spec.image_size, patch_size=spec.patch_size,
                           hidden_size=spec.hidden_size, mlp_dim=spec.mlp_dim,
                           num_layers=spec.num_layers, num_heads=spec.num_heads,
                           spatial_dims=2, classification=False, qkv_bias=True)
        self.register_buffer("feature_mean", torch.zeros(spec.hidden_size))
        self.register_buffer("feature_std", torch.ones(spec.hidden_size))
        self.head = nn.Linear(spec.hidden_size, spec.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder(x)  # (B, num_patches, hidden)
        return tokens.mean(dim=1)  # (B, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.features(x) - self.feature_mean) / self.feature_std
        return self.head(z)  # (B, num_classes)

    @torch.no_grad()
    def calibrate(self, reference: torch.Tensor) -> None:
        """Set the feature standardisation from public reference images (B, 1, H, W)."""
        f = self.features(reference)
        self.feature_mean.copy_(f.mean(0))
        self.feature_std.copy_(f.std(0).clamp_min(1e-6))


def public_reference_images(image_size: int, n: int = 256) -> torch.Tensor:
    """Synthetic anatomy through a spread of public scanners, from a fixed public seed.

    The reference spans scanner variability (gain, gamma, noise, blur, bias field), so
    the standardisation it yields is not tuned to any one site's scanner.
    """
    from fedadapt.imaging.synthetic import ScannerShift, SiteSpec, make_site_data

    scanners = [ScannerShift(), ScannerShift(1.3, 0.7, 0.08, 0.0, 0.3),
                ScannerShift(0.7, 1.4, 0.04, 1.0, 0.1), ScannerShift(1.0, 1.0, 0.1, 0.5, 0.4)]
    parts = []
    for k, shift in enumerate(scanners):
        ref, _ = make_site_data(SiteSpec(f"public-reference-{k}", n // len(scanners), 4, shift),
                                image_size=image_size, num_classes=3, seed=12345, site_index=k)
        parts.append(ref.tensors[0])
    return torch.cat(parts)


def _builtin_weights() -> Path:
    """The shipped checkpoint: next to this module, else in the installed distribution.

    ``flwr run`` executes the app from its bundle (a FAB), which holds only source and
    text files; the checkpoint is then found in the installed ``fedadapt`` package (a
    regular install, or the source tree of an editable one).
    """
    if BUILTIN_WEIGHTS.is_file():
        return BUILTIN_WEIGHTS
    import importlib.metadata
    import json
    from urllib.parse import unquote, urlparse

    rel = BUILTIN_WEIGHTS.relative_to(BUILTIN_WEIGHTS.parents[2])
    try:
        dist = importlib.metadata.distribution("fedadapt")
    except importlib.metadata.PackageNotFoundError:
        return BUILTIN_WEIGHTS
    candidates = [Path(str(dist.locate_file(rel)))]
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://"):
            candidates.append(Path(unquote(urlparse(url).path)) / rel)
    return next((c for c in candidates if c.is_file()), BUILTIN_WEIGHTS)


def backbone_weights_path(choice: str) -> Path | None:
    """The checkpoint file of a ``backbone_weights`` choice; None for ``"random"``.

    Raises:
        CheckpointError: If the file (the shipped one for ``"builtin"``) does not exist.
    """
    if choice == "random":
        return None
    path = _builtin_weights() if choice == "builtin" else Path(choice).expanduser()
    if not path.is_file():
        what = ("the shipped checkpoint is missing from the installed package; reinstall "
                "fedadapt or recreate it with `fedadapt pretrain --out " + str(path) + "`"
                if choice == "builtin" else "use 'builtin', 'random' or an existing "
                ".safetensors/.pt/.pth file (an absolute path: sites run in other folders)")
        raise CheckpointError(f"backbone-weights {choice!r}: file {path} not found; {what}")
    return path


def backbone_for(task: str, spatial_dims: int) -> str:
    """The backbone a task runs on: empty (the default :class:`ViTClassifier`) for 2-D
    classification, UNETR for segmentation, the registry's 3-D ViT for 3-D classification."""
    if task == "segmentation":
        return f"unetr-{spatial_dims}d"
    return "" if spatial_dims == 2 else "vit-3d"


def registry_base(spec: ModelSpec) -> nn.Module:
    """The base model (no adapters) of a spec naming a registry backbone: seeded from
    ``spec.seed``, with ``spec.backbone_weights`` loaded strictly (the head may be missing).
    ``PeftModel.from_pretrained(registry_base(spec), adapter_dir)`` loads a saved adapter.
    """
    from fedadapt.imaging.registry import build_backbone, get_backbone

    if not spec.backbone:
        raise ValueError("registry_base: the spec names no registry backbone")
    b = get_backbone(spec.backbone)
    shape = dict(hidden_size=spec.hidden_size, mlp_dim=spec.mlp_dim, num_heads=spec.num_heads)
    if "num_layers" in b.defaults:
        shape.update(num_layers=spec.num_layers, patch_size=spec.patch_size)
    base = build_backbone(spec.backbone, num_classes=spec.num_classes,
                          img_size=(spec.image_size,) * spec.spatial_dims, seed=spec.seed,
                          **{k: v for k, v in shape.items() if k in b.defaults})
    if spec.backbone_weights == "builtin" and b.pretrained is not None:
        b.pretrained(base)  # weights an installed package ships (efficientnet-lite0)
        return base
    path = backbone_weights_path(spec.backbone_weights)
    if path is not None:
        load_weights(base, path, allow_missing=tuple(rf"^{h}\." for h in b.head))
    return base


def build_model(spec: ModelSpec) -> PeftModel:
    """Build the frozen backbone and inject LoRA with PEFT.

    The encoder is seeded-random or loaded strictly from ``spec.backbone_weights`` (every
    ``encoder.*`` tensor must be present and fit); the feature standardisation is then
    measured on the public reference images *through that encoder*, so a pretrained
    encoder gets its own constants.

    Args:
        spec: The model spec. The same spec yields bit-identical weights.

    Returns:
        A ``PeftModel`` whose only trainable tensors are LoRA factors and the head (and,
        with ``spec.train_decoder``, the backbone's decoder blocks).

    Raises:
        CheckpointError: If the weights file is missing, unreadable or does not fit.
    """
    path = backbone_weights_path(spec.backbone_weights)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        if spec.backbone_path:  # a foundation model from local files (imaging.local)
            from fedadapt.imaging.local import attach_lora, local_base

            base, targets = local_base(spec.backbone_path, num_classes=spec.num_classes,
                                       image_size=spec.image_size)
            return attach_lora(base, targets, rank=spec.lora_rank, alpha=spec.lora_alpha)
        if spec.backbone:  # the adapters' initial values are seeded too (FFA-LoRA's A)
            from fedadapt.imaging.registry import attach_peft

            return attach_peft(registry_base(spec), spec.backbone, rank=spec.lora_rank,
                               alpha=spec.lora_alpha, train_decoder=spec.train_decoder)
        base = ViTClassifier(spec)
        if path is not None:
            load_weights(base, path, allow_missing=ENCODER_ALLOW_MISSING)
        base.eval()
        base.calibrate(public_reference_images(spec.image_size))
        base.train()
        config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                            target_modules=list(VIT_LORA_TARGETS), modules_to_save=[HEAD])
        model = get_peft_model(base, config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that travel: every trainable parameter, by name, detached on CPU."""
    return {name: p.detach().cpu().clone() for name, p in _unwrap(model).named_parameters()
            if p.requires_grad}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters themselves, by the names :func:`trainable_state` uses."""
    return {n: p for n, p in _unwrap(model).named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load adapter and head tensors into ``model``, strictly.

    Raises:
        ValueError: If a name is missing or unexpected, or a shape does not match; the
            message lists every mismatch.
    """
    params = {n: p for n, p in _unwrap(model).named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    shapes = [f"{n}: expected {tuple(params[n].shape)}, got {tuple(t.shape)}"
              for n, t in tensors.items() if n in params and params[n].shape != t.shape]
    if missing or unexpected or shapes:
        raise ValueError("adapter tensors do not fit the model: "
                         f"missing={missing[:5]}{'...' if len(missing) > 5 else ''} "
                         f"unexpected={unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
                         f"shape mismatches={shapes[:5]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def is_adapter_or_head(name: str) -> bool:
    """Whether a tensor name belongs to an adapter (LoRA) or to the task head."""
    return "lora_" in name or f"{HEAD}.modules_to_save" in name


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip Opacus' GradSampleModule wrapper, which prefixes names with ``_module.``."""
    return getattr(model, "_module", model)
