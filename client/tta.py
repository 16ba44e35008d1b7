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

For BatchNorm backbones (EfficientNet-Lite0, whose BN is frozen during DP training)
every BN layer is swapped at the site for a test-time BN (``client.tta_bn``): statistics
re-estimated on the site's images (Schneider et al. 2020) and Tent on all BN affine
parameters (Wang et al. 2021 adapt BN). The ViT (LayerNorm) path is SAR's, unchanged.

A label-free safeguard, our addition (``client.tta_guard``), holds back part of the
unlabelled images, never adapts on them, and reverts to the released weights when the
adapted model's predictions there drift from the released model's beyond the tolerance.

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

from fedadapt.client.tta_bn import TTABatchNorm2d, convert_batchnorm, recalibrate, set_adapting
from fedadapt.client.tta_guard import SafeguardCheck, compare, split_holdout

__all__ = ["SAR", "TTAConfig", "adapt_stream", "entropy", "norm_parameters", "predict",
           "sar_loss", "split_holdout"]

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
        update_affine: Take gradient steps on the norm affine parameters (False: BN
            statistics re-estimation only).
        bn_prior: Weight of the released BN statistics mixed with the site's (0: the
            site's only, as Tent; Schneider et al. 2020's N/(N+n)).
        holdout_fraction: Share of the site's unlabelled images held back for the
            safeguard (never adapted on); 0 disables the safeguard.
        tolerance: The safeguard reverts when more than this share of the held-back
            images change class.
        guard_confidence: If set, count only the held-back images the released model is
            confident on (entropy < ``guard_confidence · ln C``); None: all (default).
        max_entropy_increase: The safeguard also reverts when the held-back mean entropy
            rises by more than this (nats).
        check_every: Also check every this many stream batches (0: only at the end).
        holdout_seed: Seed of the held-back split.
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
    update_affine: bool = True
    bn_prior: float = 0.0
    holdout_fraction: float = 0.2
    tolerance: float = 0.01
    guard_confidence: float | None = None
    max_entropy_increase: float = 0.1
    check_every: int = 0
    holdout_seed: int = 0

    def __post_init__(self) -> None:
        checks = [(self.lr > 0, "lr", "> 0"), (0 <= self.momentum < 1, "momentum", "in [0, 1)"),
                  (self.entropy_margin > 0, "entropy_margin", "> 0"),
                  (self.sam_rho >= 0, "sam_rho", ">= 0"),
                  (self.reset_threshold >= 0, "reset_threshold", ">= 0"),
                  (0 <= self.ema_momentum < 1, "ema_momentum", "in [0, 1)"),
                  (0 < self.adapt_fraction <= 1, "adapt_fraction", "in (0, 1]"),
                  (self.balance_weight >= 0, "balance_weight", ">= 0"),
                  (self.balance_max_classes >= 2, "balance_max_classes", ">= 2"),
                  (0 <= self.bn_prior <= 1, "bn_prior", "in [0, 1]"),
                  (0 <= self.holdout_fraction < 1, "holdout_fraction", "in [0, 1)"),
                  (0 <= self.tolerance < 1, "tolerance", "in [0, 1)"),
                  (self.guard_confidence is None or self.guard_confidence > 0,
                   "guard_confidence", "None or > 0"),
                  (self.max_entropy_increase >= 0, "max_entropy_increase", ">= 0"),
                  (self.check_every >= 0, "check_every", ">= 0")]
        bad = [f"TTAConfig.{k} must be {want}, got {getattr(self, k)!r}"
               for ok, k, want in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits), per sample: (B, C) -> (B,)."""
    logp = logits.log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def norm_parameters(model: nn.Module, adapt_fraction: float) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze the norm affine parameters that adapt.

    A model with test-time BatchNorm (:func:`client.tta_bn.convert_batchnorm`): every BN
    layer's ``weight``/``bias`` (Tent). Otherwise (a transformer): the norm layers in the
    first ``ceil(adapt_fraction * blocks)`` numbered ``...blocks.<i>...`` (SAR).

    Returns:
        The adapted parameters by name.

    Raises:
        ValueError: If the model has neither test-time BN nor a norm layer inside
            numbered ``blocks``.
    """
    bn = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, TTABatchNorm2d)]
    norms = [(name, int(m.group(1)), mod) for name, mod in model.named_modules()
             if isinstance(mod, NORM_TYPES) and (m := _BLOCK.search(name + "."))]
    if not bn and not norms:
        raise ValueError("test-time adaptation found no BatchNorm and no LayerNorm/GroupNorm "
                         "inside numbered 'blocks.<i>' of the model; it adapts a "
                         "transformer's block norms (MONAI ViT/UNETR) or a BatchNorm CNN")
    for p in model.parameters():
        p.requires_grad_(False)
    if bn:
        chosen = [mod for _, mod in bn]
        names = [name for name, _ in bn]
    else:
        cut = math.ceil(adapt_fraction * (max(i for _, i, _ in norms) + 1))
        chosen = [mod for _, i, mod in norms if i < cut]
        names = [name for name, i, _ in norms if i < cut]
    out: dict[str, nn.Parameter] = {}
    for name, mod in zip(names, chosen):
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
    checks: list[SafeguardCheck] = field(default_factory=list)
    reverted: bool = False

    def to_dict(self) -> dict:
        last = self.checks[-1] if self.checks else None
        return {"batches": self.batches, "updates": self.updates, "resets": self.resets,
                "samples": self.samples, "reliable_fraction": self.reliable / max(self.samples, 1),
                "final_entropy_ema": self.ema[-1] if self.ema else None,
                "safeguard_reverted": self.reverted,
                "safeguard": last.to_dict() if last else None,
                "safeguard_checks": len(self.checks)}


class SAR:
    """Online SAR/Tent adaptation of a model's norms.

    ``step(x)`` returns the predictions for ``x`` made *before* adapting on it (the
    online protocol of Tent/SAR), then takes one sharpness-aware step on it. BatchNorm
    layers are converted to test-time BN in place (``client.tta_bn``).
    """

    def __init__(self, model: nn.Module, num_classes: int, cfg: TTAConfig = TTAConfig()) -> None:
        self.model, self.cfg, self.num_classes = model.eval(), cfg, num_classes
        self.bn = convert_batchnorm(model, cfg.bn_prior)
        self.params = norm_parameters(model, cfg.adapt_fraction)
        self.margin = cfg.entropy_margin * math.log(num_classes)
        self.balance = cfg.balance_weight if num_classes <= cfg.balance_max_classes else 0.0
        self._released = {n: p.detach().clone() for n, p in self.params.items()}
        self.stats = TTAStats()
        self._new_optimizer()
        self.ema: float | None = None
        self.stopped = False  # set when the safeguard reverted: no further adaptation

    def _new_optimizer(self) -> None:
        self.opt = torch.optim.SGD(list(self.params.values()), lr=self.cfg.lr,
                                   momentum=self.cfg.momentum)

    def reset(self) -> None:
        """Back to the released weights (and BN statistics), fresh optimiser and EMA."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self._released[n])
        for layer in self.bn.values():
            layer.release()
        self._new_optimizer()
        self.ema = None
        self.stats.resets += 1

    def revert(self) -> None:
        """The safeguard failed: back to the released model, and stop adapting."""
        self.reset()
        self.stats.resets -= 1  # a revert is not an entropy-collapse reset
        self.stats.reverted, self.stopped = True, True

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
        if self.stopped:
            with torch.no_grad():
                return self.model(x)
        if not self.cfg.update_affine:  # BN statistics only
            set_adapting(self.bn, True, track=True)
            try:
                with torch.no_grad():
                    return self.model(x)
            finally:
                set_adapting(self.bn, False)
        set_adapting(self.bn, True, track=True)
        try:
            return self._sar_step(x)
        finally:
            set_adapting(self.bn, False)

    def _sar_step(self, x: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        set_adapting(self.bn, True, track=False)  # SAM's second pass: no double count
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

    def finish(self, batches: list[torch.Tensor]) -> None:
        """Re-estimate the BN statistics over the stream under the final affine map."""
        if self.bn and not self.stopped:
            recalibrate(self.model, self.bn, batches)

    def guard(self, released: torch.Tensor, holdout: list[torch.Tensor]) -> SafeguardCheck:
        """Compare with the released model's logits on the held-back images; revert on
        failure (``client.tta_guard``)."""
        conf = self.cfg.guard_confidence
        below = None if conf is None else conf * math.log(self.num_classes)
        check = compare(released, predict(self.model, holdout), confident_below=below,
                        tolerance=self.cfg.tolerance,
                        max_entropy_increase=self.cfg.max_entropy_increase,
                        after_batches=self.stats.batches)
        self.stats.checks.append(check)
        if check.failed:
            self.revert()
        return check

    def adapted_state(self) -> dict[str, torch.Tensor]:
        """The adapted norm parameters and BN statistics (they stay at the site)."""
        out = {n: p.detach().cpu().clone() for n, p in self.params.items()}
        for name, layer in self.bn.items():
            out[f"{name}.running_mean"] = layer.running_mean.detach().cpu().clone()
            out[f"{name}.running_var"] = layer.running_var.detach().cpu().clone()
        return out


def adapt_stream(model: nn.Module, batches: Iterable[torch.Tensor], *, num_classes: int,
                 cfg: TTAConfig = TTAConfig(), holdout: torch.Tensor | None = None,
                 batch_size: int = 64) -> tuple[torch.Tensor, SAR]:
    """Adapt online over unlabelled batches, guarded by the held-back images ``holdout``
    (never adapted on; ``None``: no safeguard). BN statistics are re-estimated over the
    stream at the end; then the safeguard compares with the released model.

    Returns:
        ``(logits of every sample, made before adapting on its batch (N, C), the SAR state)``.
    """
    batches = list(batches)
    sar = SAR(model, num_classes, cfg)
    held = list(torch.split(holdout, batch_size)) if holdout is not None and len(holdout) else []
    released = predict(model, held) if held else None  # before any update
    outs = []
    for i, x in enumerate(batches):
        outs.append(sar.step(x))
        if released is not None and cfg.check_every and (i + 1) % cfg.check_every == 0 \
                and not sar.stopped and i + 1 < len(batches):
            sar.finish(batches[:i + 1])
            sar.guard(released, held)
    sar.finish(batches)
    if released is not None and not sar.stopped:
        sar.guard(released, held)
    return torch.cat(outs), sar


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Logits of a frozen model over batches (N, C)."""
    model.eval()
    return torch.cat([model(x) for x in batches])
