"""Size-only baseline: how well the *raw file size* of an image predicts its label.

When the classes of a data set come from different collections (Br35H: tumour and
no-tumour scans were gathered separately), a model can score well by recognising the
collection instead of the finding. The images a model sees are centre-cropped and
resized (``imaging.packaged``), so their size carries no signal; this baseline, fitted
on the raw width, height and aspect ratio of the same training records and scored on
the same held-out records, says how much such a shortcut would be worth. A model is
only informative to the extent that it beats it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedadapt.imaging.packaged import raw_sizes


@dataclass(frozen=True)
class SizeBaseline:
    """Held-out accuracy of label predictors that see only raw image sizes.

    Attributes:
        nearest: 1-nearest-neighbour on (log w, log h): an image gets the label of the
            training image closest in raw size (collections have typical sizes).
        logistic: Logistic regression on (log w, log h, log w/h), standardised.
        threshold: Best single threshold on one of width, height, aspect (chosen on
            the training records).
        majority: Always predicting the training set's most frequent class.
        n_train: Training records.
        n_test: Held-out records.
    """

    nearest: float
    logistic: float
    threshold: float
    majority: float
    n_train: int
    n_test: int


def _features(sizes: np.ndarray) -> np.ndarray:
    w, h = sizes[:, 0], sizes[:, 1]
    return np.log(np.stack([w, h, w / h], axis=1))


def size_baseline(train: list[tuple[Path, int]], test: list[tuple[Path, int]]) -> SizeBaseline:
    """Fit on ``train``'s raw sizes and labels, score on ``test`` (2 or more classes)."""
    xtr, xte = _features(raw_sizes(train)), _features(raw_sizes(test))
    ytr = np.asarray([y for _, y in train])
    yte = np.asarray([y for _, y in test])
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-9
    k = int(max(ytr.max(), yte.max())) + 1
    logits = _logistic(torch.tensor((xtr - mu) / sd), torch.tensor(ytr), k)
    pred = logits(torch.tensor((xte - mu) / sd)).argmax(1).numpy()
    majority = float(np.mean(yte == np.bincount(ytr, minlength=k).argmax()))
    d = ((xte[:, None, :2] - xtr[None, :, :2]) ** 2).sum(-1)  # (n_test, n_train)
    nearest = float(np.mean(ytr[d.argmin(1)] == yte))
    return SizeBaseline(nearest=nearest, logistic=float(np.mean(pred == yte)),
                        threshold=_threshold(xtr, ytr, xte, yte), majority=majority,
                        n_train=len(train), n_test=len(test))


def _logistic(x: torch.Tensor, y: torch.Tensor, k: int):
    """Multinomial logistic regression (L-BFGS, a little L2), returns its logit map."""
    lin = torch.nn.Linear(x.shape[1], k, dtype=torch.float64)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + 1e-3 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: lin(z).detach()


def _threshold(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float:
    """Best ``feature > t`` rule for a binary label on train, its accuracy on test."""
    if ytr.max() > 1:
        return float("nan")
    best = (-1.0, 0, 0.0, True)
    for f in range(xtr.shape[1]):
        for t in np.unique(xtr[:, f]):
            for up in (True, False):
                acc = float(np.mean(((xtr[:, f] > t) == up) == ytr.astype(bool)))
                if acc > best[0]:
                    best = (acc, f, t, up)
    _, f, t, up = best
    return float(np.mean(((xte[:, f] > t) == up) == yte.astype(bool)))
