"""Test-time adaptation at an unseen site, on its unlabelled images only.

Tent (Wang et al., ICLR 2021, "Tent: Fully Test-Time Adaptation by Entropy
Minimization") adapts normalisation affine parameters by minimising the entropy of the
model's predictions; SAR (Niu et al., ICLR 2023, "Towards Stable Test-Time Adaptation
in Dynamic Wild World") makes that stable: it adapts only the norm layers of early and
middle blocks (ViT-B: all but blocks 9-11 and the final norm), drops samples whose
entropy is above ``0.4 ln C`` (large gradients that cause collapse), takes a
sharpness-aware step (SAM, Foret et al., ICLR 2021) and resets to the released weights
when an EMA of the mean entropy falls below 0.2 (a collapsed model is confidently
wrong). For few-class tasks a class-balance term (the entropy of the batch's mean
prediction, as in SHOT, Liang et al. 2020) keeps entropy minimisation from pushing all
predictions into one class.

LoRA factors, the head and every other weight stay frozen; labels are never read.
Everything runs at the site: nothing here sends anything anywhere.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


@dataclass(frozen=True)
class TTAConfig:
    """Settings of SAR-style test-time adaptation (defaults: Niu et al. 2023).

    Attributes:
        lr: SGD learning rate on the norm affine parameters.
        momentum: SGD momentum.
        entropy_margin: Samples with entropy >= ``entropy_margin * ln C`` are not used.
        sam_rho: Radius ρ of the sharpness-aware perturbation.
        reset_threshold: Reset to the released weights when the entropy EMA falls below it.
        ema_momentum: Weight of the old value in the entropy EMA.
        adapt_fraction: Share of the transformer blocks, from the first, whose norms adapt
            (SAR on ViT-B: 9 of 12 = 0.75); the final norm never adapts.
        balance_weight: Weight of the class-balance term (0 disables it).
        balance_max_classes: The class-balance term applies when C is at most this.
    """

    lr: float = 1e-3
    momentum: float = 0.9
    entropy_margin: float = 0.4
    sam_rho: float = 0.05
    reset_threshold: float = 0.2
    ema_momentum: float = 0.9
    adapt_fraction: float = 0.75
    balance_weight: float = 1.0
    balance_max_classes: int = 10

    def __post_init__(self) -> None:
        checks = [(self.lr > 0, "lr", "> 0"), (0 <= self.momentum < 1, "momentum", "in [0, 1)"),
                  (self.entropy_margin > 0, "entropy_margin", "> 0"),
                  (self.sam_rho >= 0, "sam_rho", ">= 0"),
                  (self.reset_threshold >= 0, "reset_threshold", ">= 0"),
                  (0 <= self.ema_momentum < 1, "ema_momentum", "in [0, 1)"),
                  (0 < self.adapt_fraction <= 1, "adapt_fraction", "in (0, 1]"),
                  (self.balance_weight >= 0, "balance_weight", ">= 0"),
                  (self.balance_max_classes >= 2, "balance_max_classes", ">= 2")]
        bad = [f"TTAConfig.{k} must be {want}, got {getattr(self, k)!r}"
               for ok, k, want in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits), per sample: (B, C) -> (B,)."""
    logp = logits.log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def norm_parameters(model: nn.Module, adapt_fraction: float) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze the affine parameters of the norm layers in the
    first ``ceil(adapt_fraction * blocks)`` blocks (``...blocks.<i>...``).

    Returns:
        The adapted parameters by name.

    Raises:
        ValueError: If the model has no norm layer inside numbered ``blocks``.
    """
    norms = [(name, int(m.group(1)), mod) for name, mod in model.named_modules()
             if isinstance(mod, NORM_TYPES) and (m := _BLOCK.search(name + "."))]
    if not norms:
        raise ValueError("test-time adaptation found no LayerNorm/BatchNorm/GroupNorm inside "
                         "numbered 'blocks.<i>' of the model; it adapts a transformer's "
                         "block norms (MONAI ViT/UNETR)")
    cut = math.ceil(adapt_fraction * (max(i for _, i, _ in norms) + 1))
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, nn.Parameter] = {}
    for name, i, mod in norms:
        if i >= cut:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            p.requires_grad_(True)
            out[f"{name}.{pname}"] = p
    return out


def sar_loss(logits: torch.Tensor, *, margin: float, balance_weight: float
             ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Entropy of the reliable samples (entropy < margin) plus the class-balance term.

    Returns:
        ``(loss or None if no sample is reliable, reliable mask (B,))``.
    """
    ent = entropy(logits)
    keep = ent < margin
    if not bool(keep.any()):
        return None, keep
    loss = ent[keep].mean()
    if balance_weight > 0:
        mean_p = logits[keep].softmax(dim=1).mean(dim=0)
        loss = loss + balance_weight * (mean_p * mean_p.clamp_min(1e-8).log()).sum()
    return loss, keep


@dataclass
class TTAStats:
    """What an adaptation did (no image, label or prediction leaves with it)."""

    batches: int = 0
    updates: int = 0
    resets: int = 0
    samples: int = 0
    reliable: int = 0
    ema: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"batches": self.batches, "updates": self.updates, "resets": self.resets,
                "samples": self.samples, "reliable_fraction": self.reliable / max(self.samples, 1),
                "final_entropy_ema": self.ema[-1] if self.ema else None}


class SAR:
    """Online SAR adaptation of a model's early/middle block norms.

    ``step(x)`` returns the predictions for ``x`` made *before* adapting on it (the
    online protocol of Tent/SAR), then takes one sharpness-aware step on it.
    """

    def __init__(self, model: nn.Module, num_classes: int, cfg: TTAConfig = TTAConfig()) -> None:
        self.model, self.cfg, self.num_classes = model.eval(), cfg, num_classes
        self.params = norm_parameters(model, cfg.adapt_fraction)
        self.margin = cfg.entropy_margin * math.log(num_classes)
        self.balance = cfg.balance_weight if num_classes <= cfg.balance_max_classes else 0.0
        self._released = {n: p.detach().clone() for n, p in self.params.items()}
        self.stats = TTAStats()
        self._new_optimizer()
        self.ema: float | None = None

    def _new_optimizer(self) -> None:
        self.opt = torch.optim.SGD(list(self.params.values()), lr=self.cfg.lr,
                                   momentum=self.cfg.momentum)

    def reset(self) -> None:
        """Back to the released weights, with a fresh optimiser and EMA."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self._released[n])
        self._new_optimizer()
        self.ema = None
        self.stats.resets += 1

    def _perturb(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """SAM's ascent: move each parameter by ρ g/‖g‖ (returns what to undo)."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2) if grads else None
        moved = []
        if norm is None or not torch.isfinite(norm) or norm == 0:
            return moved
        with torch.no_grad():
            for p in self.params.values():
                if p.grad is not None:
                    e = p.grad * (self.cfg.sam_rho / (norm + 1e-12))
                    p.add_(e)
                    moved.append((p, e))
        return moved

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Predict ``x`` (B, ...) -> logits (B, C), then adapt on it."""
        self.stats.batches += 1
        self.stats.samples += x.shape[0]
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss, keep = sar_loss(logits, margin=self.margin, balance_weight=self.balance)
        self.stats.reliable += int(keep.sum())
        if loss is None:
            return logits.detach()
        loss.backward()
        moved = self._perturb()
        self.opt.zero_grad(set_to_none=True)
        second = self.model(x)
        ent2 = entropy(second)
        loss2, keep2 = sar_loss(second[keep], margin=self.margin, balance_weight=self.balance)
        if loss2 is not None:
            loss2.backward()  # the gradient at the perturbed point ...
        with torch.no_grad():
            for p, e in moved:
                p.sub_(e)
        if loss2 is not None:  # ... steps from the unperturbed weights (SAM)
            self.opt.step()
            self.stats.updates += 1
            value = float(ent2[keep][keep2].detach().mean())
            m = self.cfg.ema_momentum
            self.ema = value if self.ema is None else m * self.ema + (1 - m) * value
            self.stats.ema.append(self.ema)
            if self.ema < self.cfg.reset_threshold:
                self.reset()
        return logits.detach()

    def adapted_state(self) -> dict[str, torch.Tensor]:
        """The adapted norm parameters (they stay at the site)."""
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}


def adapt_stream(model: nn.Module, batches: Iterable[torch.Tensor], *, num_classes: int,
                 cfg: TTAConfig = TTAConfig()) -> tuple[torch.Tensor, SAR]:
    """Adapt online over unlabelled batches.

    Returns:
        ``(logits of every sample, made before adapting on its batch (N, C), the SAR state)``.
    """
    sar = SAR(model, num_classes, cfg)
    outs = [sar.step(x) for x in batches]
    return torch.cat(outs), sar


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Logits of a frozen model over batches (N, C)."""
    model.eval()
    return torch.cat([model(x) for x in batches])
