"""Task losses, DP training and metrics beyond single-label classification.

Segmentation uses MONAI ``DiceCELoss`` (soft Dice, Milletari et al., "V-Net", 3DV 2016,
plus voxel cross-entropy) and reports the mean foreground ``DiceMetric``. Classification
metrics are accuracy, balanced accuracy (mean per-class recall) and ROC AUC through
MONAI ``ROCAUCMetric`` (one-vs-rest average for multi-class, per-label average for
multi-label). All functions are plain torch; DP-SGD goes through ``privacy.dp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, ROCAUCMetric
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from privacy.dp import DPRequest, make_private


@dataclass(frozen=True)
class SegResult:
    """One local training run: steps taken and mean training loss."""

    steps: int
    loss: float


def segmentation_loss() -> DiceCELoss:
    """Per-sample Dice + cross-entropy, averaged over the batch (what Opacus' mean expects)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=False, reduction="mean")


def train_segmentation(model: nn.Module, dataset: Dataset, *, epochs: int, lr: float,
                       batch_size: int, seed: int, dp: DPRequest | None = None) -> SegResult:
    """Train the trainable tensors (adapters, head) of a segmentation model in place.

    Args:
        model: Maps ``(B, C, *spatial)`` to logits ``(B, K, *spatial)``.
        dataset: ``(image, mask)`` pairs; masks are ``(1, *spatial)`` class indices.
        epochs: Passes over the data.
        lr: SGD learning rate (momentum 0.9).
        batch_size: Expected batch size (Poisson sampling under DP).
        seed: Seeds shuffling/Poisson sampling and the DP noise.
        dp: DP-SGD σ and C, or None for non-private training.
    """
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)
    if dp is not None:
        model, opt, loader = make_private(model, opt, loader, request=dp, generator=gen)
    model.train()
    loss_fn = segmentation_loss()
    steps, total = 0, 0.0
    for _ in range(epochs):
        for x, y in loader:
            if len(x) == 0:  # Poisson sampling can draw an empty batch
                continue
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            steps, total = steps + 1, total + float(loss.detach())
    return SegResult(steps, total / max(steps, 1))


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: Dataset, *, num_classes: int,
                          batch_size: int = 32) -> tuple[float, float]:
    """Mean DiceCE loss and mean foreground Dice (background excluded) on ``dataset``."""
    model.eval()
    loss_fn, dice = segmentation_loss(), DiceMetric(include_background=False, reduction="mean")
    total, n = 0.0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        logits = model(x)
        total += float(loss_fn(logits, y)) * len(x)
        n += len(x)
        pred = nn.functional.one_hot(logits.argmax(1), num_classes).movedim(-1, 1)
        true = nn.functional.one_hot(y[:, 0].long(), num_classes).movedim(-1, 1)
        dice(y_pred=pred, y=true)
    return total / max(n, 1), float(dice.aggregate().item())


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, *,
                           multilabel: bool = False) -> dict[str, float]:
    """Accuracy, balanced accuracy and ROC AUC of ``logits`` ``(N, K)`` against ``y``.

    ``y`` is ``(N,)`` class indices, or ``(N, K)`` 0/1 when ``multilabel`` (then accuracy
    and balanced accuracy are per label at threshold 0.5, averaged over labels).
    """
    k = logits.shape[1]
    auc = ROCAUCMetric(average="macro")
    if multilabel:
        prob, pred = torch.sigmoid(logits), (logits > 0).float()
        auc(prob, y.float())
        acc = float((pred == y).float().mean())
        pos, neg = y == 1, y == 0
        tpr = ((pred == 1) & pos).sum(0) / pos.sum(0).clamp_min(1)
        tnr = ((pred == 0) & neg).sum(0) / neg.sum(0).clamp_min(1)
        bal = float(((tpr + tnr) / 2).mean())
    else:
        prob, pred = torch.softmax(logits, 1), logits.argmax(1)
        auc(prob, nn.functional.one_hot(y.long(), k))
        acc = float((pred == y).float().mean())
        recalls = [float((pred[y == c] == c).float().mean()) for c in range(k) if (y == c).any()]
        bal = float(np.mean(recalls))
    return {"accuracy": acc, "balanced_accuracy": bal, "auc": float(auc.aggregate())}


def synthetic_segmentation(n: int, size: int, *, seed: int, spatial_dims: int = 2,
                           noise: float = 0.3) -> TensorDataset:
    """Noisy images with one bright ellipse-like blob; the mask marks the blob (class 1)."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, size)] * spatial_dims
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (D, *spatial)
    centre = (torch.rand(n, spatial_dims, generator=g) - 0.5) * 0.8
    radius = 0.25 + 0.25 * torch.rand(n, generator=g)
    shape = (n,) + (1,) * spatial_dims
    dist2 = ((grid[None] - centre.view(n, spatial_dims, *(1,) * spatial_dims)) ** 2).sum(1)
    mask = (dist2 < radius.view(shape) ** 2).long()
    x = mask.float() + noise * torch.randn(mask.shape, generator=g)
    return TensorDataset(x[:, None], mask[:, None])
