"""Task losses and metrics: classification, multi-label classification and segmentation.

Segmentation uses MONAI ``DiceCELoss`` (soft Dice, Milletari et al., "V-Net", 3DV 2016,
plus voxel cross-entropy) and reports the mean foreground ``DiceMetric``. Classification
metrics are accuracy, balanced accuracy (mean per-class recall) and ROC AUC through
MONAI ``ROCAUCMetric`` (one-vs-rest average for multi-class, per-label average for
multi-label). All functions are plain torch; the DP-SGD training loop that uses these
losses is the site's own (``client.train.train``, through ``privacy.dp``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, ROCAUCMetric
from torch import nn
from torch.utils.data import TensorDataset


TASKS = ("classification", "multilabel", "segmentation")
#: The metric each task is judged by (``TaskScores.result()[SCORE[task]]``).
SCORE = {"classification": "accuracy", "multilabel": "accuracy", "segmentation": "dice"}

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def segmentation_loss() -> DiceCELoss:
    """Per-sample Dice + cross-entropy, averaged over the batch (what Opacus' mean expects)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=False, reduction="mean")


def task_loss(task: str) -> Loss:
    """The training loss of ``task``: ``loss(logits, y)``, a mean over the batch's examples.

    Every loss is a mean of per-example terms, which is what Opacus' ``loss_reduction=
    "mean"`` assumes when it rescales per-sample gradients (DP-SGD, Abadi et al. 2016):
    cross-entropy (``classification``, ``y`` class indices), binary cross-entropy on
    logits (``multilabel``, ``y`` 0/1 of shape ``(B, K)``), and MONAI ``DiceCELoss`` with
    per-example Dice (``segmentation``, ``y`` a ``(B, 1, *spatial)`` mask).
    """
    if task == "classification":
        return nn.CrossEntropyLoss()
    if task == "multilabel":
        bce = nn.BCEWithLogitsLoss()
        return lambda logits, y: bce(logits, y.float())
    if task == "segmentation":
        return segmentation_loss()
    raise ValueError(f"unknown task {task!r}; use one of {TASKS}")


class TaskScores:
    """Evaluation metrics of a task, accumulated over batches.

    ``classification``/``multilabel``: :func:`classification_metrics` on all logits
    (``(N, K)``, small). ``segmentation``: mean foreground Dice (MONAI ``DiceMetric``,
    background excluded, per image then averaged; an image without foreground in both
    mask and prediction is left out, MONAI's ``ignore_empty``) and voxel accuracy.
    """

    def __init__(self, task: str, num_classes: int) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
        self.task, self.num_classes = task, num_classes
        self._logits: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self._dice = DiceMetric(include_background=False, reduction="mean")
        self._correct = self._voxels = 0

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch: ``logits`` ``(B, K, ...)`` and its targets."""
        logits, y = logits.detach().float().cpu(), y.detach().cpu()
        if self.task != "segmentation":
            self._logits.append(logits)
            self._y.append(y)
            return
        k = self.num_classes
        pred = logits.argmax(1)  # (B, *spatial)
        true = y[:, 0].long()
        self._dice(y_pred=nn.functional.one_hot(pred, k).movedim(-1, 1),
                   y=nn.functional.one_hot(true, k).movedim(-1, 1))
        self._correct += int((pred == true).sum())
        self._voxels += true.numel()

    def result(self) -> dict[str, float]:
        """The metrics so far; non-finite values (e.g. AUC with one class) are left out."""
        if self.task == "segmentation":
            out = {"dice": float(self._dice.aggregate().item()),
                   "accuracy": self._correct / max(self._voxels, 1)}
        else:
            out = classification_metrics(torch.cat(self._logits), torch.cat(self._y),
                                         multilabel=self.task == "multilabel")
        return {k: v for k, v in out.items() if np.isfinite(v)}


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
