"""Elastic Weight Consolidation on the trainable (adapter + head) parameters.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
PNAS 2017. The diagonal empirical Fisher is computed at the site on its own data
and never leaves it, so it needs no privacy accounting of its own; only the
penalty's gradient (a function of parameters, not of records) enters training.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["trainable_params", "diagonal_fisher", "ewc_penalty"]


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with ``requires_grad`` (LoRA adapters and head), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def diagonal_fisher(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher F_i = E_x[(∂ log p(y|x) / ∂θ_i)²] per example.

    Uses the observed labels (empirical Fisher) and one backward pass per
    example, so it is exact rather than a squared batch mean.

    Args:
        model: a classifier returning logits; only ``requires_grad`` params count.
        batches: (x, y) batches of the site's own data.

    Returns:
        Name → tensor of the Fisher diagonal, detached, same shape as the param.

    Raises:
        ValueError: if the model has no trainable parameter or no example is seen.
    """
    params = trainable_params(model)
    if not params:
        raise ValueError("EWC needs trainable parameters; the model has none (requires_grad)")
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    names = list(params)
    was_training = model.training
    model.eval()
    n_seen = 0
    for x, y in batches:
        for k in range(x.shape[0]):
            logp = F.log_softmax(model(x[k : k + 1]), dim=-1)[0, y[k]]
            grads = torch.autograd.grad(logp, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    fisher[n] += g.detach() ** 2
            n_seen += 1
    model.train(was_training)
    if n_seen == 0:
        raise ValueError("EWC Fisher needs at least one example; the site's data is empty")
    return {n: f / n_seen for n, f in fisher.items()}


def ewc_penalty(
    model: nn.Module,
    fisher: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """EWC penalty λ/2 Σ_i F_i (θ_i − θ*_i)² over the params named in ``fisher``.

    Args:
        model: the model being trained.
        fisher: Fisher diagonal from :func:`diagonal_fisher` (previous phase).
        anchor: θ*, the previous phase's parameter values.
        lam: the EWC strength λ ≥ 0.

    Raises:
        ValueError: if λ < 0 or a Fisher name is missing from the model or anchor.
    """
    if lam < 0:
        raise ValueError(f"EWC lambda must be >= 0; got {lam}")
    params = dict(model.named_parameters())
    missing = [n for n in fisher if n not in params or n not in anchor]
    if missing:
        raise ValueError(f"EWC Fisher names missing from model/anchor: {missing[:3]}")
    total = torch.zeros((), dtype=torch.float32)
    for n, f in fisher.items():
        total = total + (f * (params[n] - anchor[n].detach()) ** 2).sum()
    return 0.5 * lam * total
