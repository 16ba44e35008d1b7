"""O-LoRA orthogonality penalty between LoRA subspaces of successive phases.

Wang et al., "Orthogonal Subspace Learning for Language Model Continual
Learning", Findings of EMNLP 2023: the current phase's LoRA ``A`` (r×d) is pushed
orthogonal to the frozen ``A``'s of earlier phases with Σ_prev ‖A_prev A_currᵀ‖²_F.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["lora_a_params", "orthogonality_penalty"]


def lora_a_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable LoRA ``A`` weights (names containing ``lora_A``), by name."""
    return {n: p for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad}


def orthogonality_penalty(
    current: Mapping[str, torch.Tensor], previous: Sequence[Mapping[str, torch.Tensor]]
) -> torch.Tensor:
    """Σ_prev Σ_layers ‖A_prev A_currᵀ‖²_F.

    Args:
        current: name → the current phase's A (r×d), differentiable.
        previous: one mapping per earlier phase, name → frozen A (r'×d).

    Raises:
        ValueError: if a previous A's layer is missing from ``current`` or has
            a different input dimension.
    """
    total = torch.zeros(())
    for phase in previous:
        for n, a_prev in phase.items():
            if n not in current:
                raise ValueError(f"O-LoRA: earlier phase's {n} has no current LoRA A")
            a_cur = current[n]
            if a_prev.shape[-1] != a_cur.shape[-1]:
                raise ValueError(
                    f"O-LoRA: {n} input dims differ: {tuple(a_prev.shape)} vs {tuple(a_cur.shape)}"
                )
            total = total + (a_prev.detach() @ a_cur.T).pow(2).sum()
    return total
