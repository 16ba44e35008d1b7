"""Learning without Forgetting distillation loss.

Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017: the current
model is distilled towards the previous phase's global model on the current
site's data, KL(softmax(old/T) ‖ softmax(new/T))·T² (Hinton et al. 2015 scaling).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["distillation_loss"]


def distillation_loss(
    new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """Mean over the batch of KL(p_old ‖ p_new)·T² at temperature T.

    Args:
        new_logits: (N, C) logits of the model being trained.
        old_logits: (N, C) logits of the frozen previous model (detached here).
        temperature: T > 0.

    Raises:
        ValueError: if T ≤ 0 or the shapes differ.
    """
    if temperature <= 0:
        raise ValueError(f"LwF temperature must be > 0; got {temperature}")
    if new_logits.shape != old_logits.shape:
        raise ValueError(
            f"LwF logits shapes differ: new {tuple(new_logits.shape)} vs old {tuple(old_logits.shape)}"
        )
    t = temperature
    log_p_new = F.log_softmax(new_logits / t, dim=-1)
    log_p_old = F.log_softmax(old_logits.detach() / t, dim=-1)
    kl = (log_p_old.exp() * (log_p_old - log_p_new)).sum(dim=-1)
    return kl.mean() * t * t
