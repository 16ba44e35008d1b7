"""DP-SGD wiring with Opacus (Abadi et al. 2016, "Deep Learning with Differential Privacy").

``make_private`` is the one place where a site's model, optimiser and data loader become
private: Poisson sampling (which the accountant's analysis assumes), per-sample
gradients for the trainable tensors only (LoRA factors and the head), per-sample
clipping to ``max_grad_norm`` and Gaussian noise of std ``noise_multiplier *
max_grad_norm``, drawn from a generator seeded by the caller.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Protocol

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class DPRequest:
    """The DP-SGD parameters of one round at one site.

    Attributes:
        noise_multiplier: σ (noise std / clipping norm); must be > 0.
        max_grad_norm: Per-sample clipping norm C.
    """

    noise_multiplier: float
    max_grad_norm: float

    def __post_init__(self) -> None:
        if not 0 < self.noise_multiplier < math.inf:
            raise ValueError(f"noise_multiplier must be finite and > 0, got "
                             f"{self.noise_multiplier}")
        if not 0 < self.max_grad_norm < math.inf:
            raise ValueError(f"max_grad_norm must be finite and > 0, got "
                             f"{self.max_grad_norm}")


class Wiring(Protocol):
    """How DP-SGD is wired into a model, optimiser and loader (:func:`make_private`)."""

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loader: DataLoader, *, request: DPRequest, generator: torch.Generator
                 ) -> tuple[GradSampleModule, DPOptimizer, DataLoader]: ...


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *,
                 request: DPRequest, generator: torch.Generator
                 ) -> tuple[GradSampleModule, DPOptimizer, DataLoader]:
    """Make a model, optimiser and loader DP-SGD private with Opacus.

    Args:
        model: The model; only parameters with ``requires_grad`` get per-sample gradients.
        optimizer: Its optimiser.
        loader: The training loader; it is replaced by a Poisson-sampling loader with
            sample rate ``1 / len(loader)``.
        request: σ and C.
        generator: Seeded RNG for both the Poisson sampling and the noise.

    Returns:
        ``(model, optimizer, loader)`` that behave like the ones passed in.
    """
    engine = PrivacyEngine(accountant="rdp")
    return engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=request.noise_multiplier, max_grad_norm=request.max_grad_norm,
        poisson_sampling=True, noise_generator=generator)
