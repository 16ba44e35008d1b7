"""Parameter penalties (EWC, O-LoRA) as a separate, data-independent step.

Under DP-SGD (Opacus) the per-sample gradients of the data loss are clipped and
noised. A penalty on parameters only (EWC's λ/2 Σ F_i (θ_i − θ*_i)², O-LoRA's
Σ‖A_prev A_currᵀ‖²) has no per-sample structure, so it is applied after each
optimiser step as ``θ ← θ − lr·∇penalty(θ)`` with ``torch.autograd.grad`` (no
``.grad`` or Opacus hook is touched), outside clipping and noise, exactly like
the FedProx step in ``client/train.py``. It costs no privacy as long as its
inputs do not leave the site: EWC's Fisher is computed on the site's own data and
stays there (it is never sent to the server), and the anchor θ* is the previous
phase's global adapter that the site already received.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["PenaltyFn", "penalty_step"]

PenaltyFn = Callable[[], torch.Tensor]


def penalty_step(params: Sequence[torch.Tensor], penalty: PenaltyFn, lr: float) -> float:
    """One gradient step of ``penalty`` on ``params``; returns the penalty value.

    Args:
        params: the trainable tensors (adapters and head).
        penalty: a closure returning a scalar built from ``params`` only.
        lr: the step size (the optimiser's learning rate).
    """
    value = penalty()
    if not value.requires_grad:
        return float(value)
    grads = torch.autograd.grad(value, list(params), allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(lr * g)
    return float(value.detach())
