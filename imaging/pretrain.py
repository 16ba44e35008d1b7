"""Self-supervised pretraining of the default ViT by masked autoencoding.

Masked autoencoders (MAE; He et al., "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022): the image is cut into patches, a random 75 % of them are
dropped, the ViT encoder sees only the visible ones, and a small decoder — given the
encoded visible tokens plus a shared learnable mask token at every dropped position —
reconstructs the dropped patches' pixels (per-patch normalised, MSE on masked patches
only). After pretraining the decoder is thrown away; the encoder is the backbone that
``imaging.backbones.build_model`` freezes and adapts with LoRA.

The data are *unlabelled* synthetic images from many simulated scanners
(``imaging.synthetic``): scanners drawn at random from ranges wider than the
default federation's, image streams disjoint from any simulated site's (site indices
from :data:`STREAM_OFFSET` on), labels discarded. Everything is deterministic by
``PretrainConfig.seed`` on a given machine and thread count.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import ViT
from torch import nn

from fedadapt import atomic
from fedadapt.imaging.backbones import ModelSpec, ViTClassifier
from fedadapt.imaging.synthetic import ScannerShift, SiteSpec, make_site_data

#: Synthetic image streams of pretraining start at this site index, far from the
#: indices 0..num_sites-1 of simulated federations, so no site's images are seen.
STREAM_OFFSET = 100_000


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of MAE pretraining; the defaults made the shipped checkpoint.

    Attributes:
        model: Architecture of the encoder (only its ViT fields are used).
        num_scanners: Simulated scanners (sites) that contribute unlabelled images.
        images_per_scanner: Images drawn through each scanner.
        epochs: Passes over the unlabelled images.
        batch_size: Images per optimiser step.
        lr: Peak AdamW learning rate (after linear warm-up, then cosine decay).
        warmup_epochs: Epochs of linear warm-up.
        weight_decay: AdamW weight decay.
        mask_ratio: Share of patches hidden from the encoder (MAE: 0.75).
        decoder_dim: Token width of the decoder.
        decoder_layers: Transformer blocks of the decoder.
        decoder_heads: Attention heads of the decoder.
        norm_pix_loss: Reconstruct per-patch normalised pixels (MAE's better target).
        seed: Seed of the data, the masks, the initial weights and the batch order.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    num_scanners: int = 64
    images_per_scanner: int = 128
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1.5e-3
    warmup_epochs: int = 2
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    decoder_dim: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        errors = []
        for name in ("num_scanners", "images_per_scanner", "epochs", "batch_size",
                     "decoder_dim", "decoder_layers", "decoder_heads"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            errors.append(f"lr must be positive, got {self.lr!r}")
        if self.warmup_epochs < 0 or self.weight_decay < 0:
            errors.append("warmup_epochs and weight_decay must be >= 0, got "
                          f"{self.warmup_epochs!r} and {self.weight_decay!r}")
        num_patches = (self.model.image_size // self.model.patch_size) ** 2
        if not 0 < self.mask_ratio < 1 or round(num_patches * (1 - self.mask_ratio)) < 1:
            errors.append(f"mask_ratio must be in (0, 1) and leave at least one of the "
                          f"{num_patches} patches visible, got {self.mask_ratio!r}")
        if self.decoder_dim % max(self.decoder_heads, 1):
            errors.append(f"decoder_dim {self.decoder_dim} must be divisible by "
                          f"decoder_heads {self.decoder_heads}")
        if errors:
            raise ValueError("invalid pretrain config:\n  " + "\n  ".join(errors))


class MaskedAutoencoder(nn.Module):
    """A MONAI ViT encoder that sees only visible patches, and a small MAE decoder.

    Args:
        encoder: The MONAI ViT (``classification=False``) to pretrain; kept by reference.
        spec: Its architecture (image and patch size, width).
        cfg: Decoder size, mask ratio and loss target.
    """

    def __init__(self, encoder: ViT, spec: ModelSpec, cfg: PretrainConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch_size = spec.patch_size
        self.num_patches = (spec.image_size // spec.patch_size) ** 2
        self.num_visible = round(self.num_patches * (1 - cfg.mask_ratio))
        self.norm_pix_loss = cfg.norm_pix_loss
        d = cfg.decoder_dim
        self.decoder_embed = nn.Linear(spec.hidden_size, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos = nn.Parameter(torch.zeros(1, self.num_patches, d))
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(d, 4 * d, cfg.decoder_heads, qkv_bias=True)
            for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, spec.patch_size ** 2)  # one channel
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, N, p*p), patches in the row-major order of MONAI's patch conv."""
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The MAE loss of a batch (MSE on the masked patches only).

        Args:
            x: Images (B, 1, H, W).
            generator: RNG of the random masks.
        """
        tokens = self.encoder.patch_embedding(x)  # (B, N, D), position embeddings added
        b, n, dim = tokens.shape
        noise = torch.rand(b, n, generator=generator, device=x.device)
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        keep = shuffle[:, :self.num_visible]
        h = tokens.gather(1, keep[..., None].expand(-1, -1, dim))  # (B, n_vis, D)
        for blk in self.encoder.blocks:
            h = blk(h)
        h = self.decoder_embed(self.encoder.norm(h))  # (B, n_vis, d)
        masked = self.mask_token.expand(b, n - self.num_visible, -1)
        h = torch.cat([h, masked], dim=1)  # shuffled order: visible first
        h = h.gather(1, restore[..., None].expand(-1, -1, h.shape[-1])) + self.decoder_pos
        for blk in self.decoder_blocks:
            h = blk(h)
        pred = self.decoder_pred(self.decoder_norm(h))  # (B, N, p*p)
        target = self.patchify(x)
        if self.norm_pix_loss:
            mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mu) / (var + 1e-6).sqrt()
        mask = torch.ones(b, n, device=x.device)
        mask[:, :self.num_visible] = 0
        mask = mask.gather(1, restore)  # 1 = masked, in patch order
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()


def pretrain_images(cfg: PretrainConfig) -> torch.Tensor:
    """Unlabelled images (num_scanners * images_per_scanner, 1, H, W) from random scanners.

    Scanner settings are drawn from ranges that contain the default federation's
    (gain 0.6-1.4, gamma 0.6-1.6, noise 0.02-0.1, blur 0-1.2 px, bias field 0-0.4); the
    label mix is random too, and the labels are dropped.
    """
    rng = np.random.default_rng([cfg.seed, 31337])
    parts = []
    for k in range(cfg.num_scanners):
        shift = ScannerShift(
            intensity_scale=float(rng.uniform(0.6, 1.4)), gamma=float(rng.uniform(0.6, 1.6)),
            noise_std=float(rng.uniform(0.02, 0.1)), blur_sigma=float(rng.uniform(0.0, 1.2)),
            bias_coeff=float(rng.uniform(0.0, 0.4)))
        weights = tuple(float(w) for w in rng.uniform(0.5, 2.0, size=3))
        site = SiteSpec(f"pretrain-scanner-{k}", cfg.images_per_scanner, 0, shift, weights)
        train, _ = make_site_data(site, image_size=cfg.model.image_size, num_classes=3,
                                  seed=cfg.seed, site_index=STREAM_OFFSET + k)
        parts.append(train.tensors[0])  # labels discarded
    return torch.cat(parts)


@dataclass(frozen=True)
class PretrainResult:
    """What a pretraining run produced.

    Attributes:
        encoder_state: ``encoder.*`` tensors, named as in ``ViTClassifier``.
        losses: Mean MAE loss of each epoch.
    """

    encoder_state: dict[str, torch.Tensor]
    losses: tuple[float, ...]


def pretrain(cfg: PretrainConfig, *,
             log: Callable[[int, float], None] | None = None) -> PretrainResult:
    """Pretrain the default ViT encoder with MAE on unlabelled synthetic images.

    Args:
        cfg: The settings (seeded).
        log: Called with ``(epoch, mean loss)`` after each epoch.

    Returns:
        The encoder's tensors (decoder dropped) and the loss curve.
    """
    images = pretrain_images(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        base = ViTClassifier(cfg.model)
        mae = MaskedAutoencoder(base.encoder, cfg.model, cfg)
    finally:
        torch.random.set_rng_state(rng_state)
    decay = [p for n, p in mae.named_parameters() if p.ndim >= 2 and "pos" not in n
             and "mask_token" not in n]
    no_decay = [p for n, p in mae.named_parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:  # linear warm-up, then half-cosine to zero (MAE recipe)
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    losses = []
    step = 0
    mae.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(images), generator=gen)
        running, seen = 0.0, 0
        for i in range(0, len(images), cfg.batch_size):
            x = images[order[i:i + cfg.batch_size]]  # (B, 1, H, W)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = mae(x, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item() * len(x)
            seen += len(x)
            step += 1
        losses.append(running / seen)
        if log is not None:
            log(epoch + 1, losses[-1])
    state = {f"encoder.{k}": v.detach().cpu().contiguous().clone()
             for k, v in base.encoder.state_dict().items()}
    return PretrainResult(state, tuple(losses))


def save_encoder(result: PretrainResult, cfg: PretrainConfig, path: str | Path) -> Path:
    """Write the encoder as ``.safetensors`` (with the config and losses as metadata) or ``.pt``.

    Raises:
        ValueError: If the suffix is not ``.safetensors``, ``.pt`` or ``.pth``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"--out {path}: expected a .safetensors, .pt or .pth file name, "
                         f"found suffix '{suffix}'")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save

        meta = {"method": "MAE (He et al., CVPR 2022)",
                "pretrain_config": json.dumps(asdict(cfg), sort_keys=True),
                "losses": json.dumps([round(v, 6) for v in result.losses])}
        atomic.write_bytes(path, save(result.encoder_state, metadata=meta))
    else:
        atomic.write_torch(path, result.encoder_state)
    return path
