"""DP-SGD wiring with Opacus (Abadi et al. 2016, "Deep Learning with Differential Privacy").

``make_private`` is the one place where a site's model, optimiser and data loader become
private: Poisson sampling (which the accountant's analysis assumes), per-sample
gradients for the trainable tensors only (LoRA factors and the head), per-sample
clipping to ``max_grad_norm`` and Gaussian noise of std ``noise_multiplier *
max_grad_norm``, drawn from a generator seeded by the caller.

Per-sample gradients come from one of two Opacus modes (:func:`grad_sample_mode`):
PyTorch's expanded weights (``"ew"``) when every trainable tensor is the weight or bias
of a plain ``nn.Linear`` (LoRA factors, a linear head) and the model is on the CPU, else
per-module hooks (``"hooks"``). Both give the exact per-sample gradients (pinned against
per-example autograd in ``tests/grad_check.py``); expanded weights skip the full backward
hooks and the per-module Python of ``"hooks"``, about 60 % of the DP step's
overhead on the default model (BENCHMARKS.md, "DP overhead"). Expanded weights do not
support autocast (bf16 activations meet fp32 weights in their backward) nor empty
batches, so CUDA (where ``amp`` applies) keeps hooks, and :func:`empty_batch` stands in
for the forward pass on an empty Poisson batch.
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


#: The Opacus per-sample-gradient modes ``make_private`` wires (both exact).
GRAD_SAMPLE_MODES = ("hooks", "ew")


def grad_sample_mode(model: nn.Module) -> str:
    """The Opacus ``grad_sample_mode`` for ``model``: ``"ew"`` or ``"hooks"``.

    ``"ew"`` (expanded weights: ``torch.nn.utils._per_sample_grad``, which computes the
    per-sample gradient inside ``F.linear``'s backward) when the model is on the CPU and
    every module that owns a trainable tensor is exactly ``nn.Linear``; an op it does not
    support on a trainable tensor raises, never a wrong gradient. ``"hooks"`` otherwise
    (convolutions, norms, IA3 vectors, CUDA and its bf16 autocast).
    """
    owners = [m for m in model.modules()
              if any(p.requires_grad for p in m.parameters(recurse=False))]
    on_cpu = all(p.device.type == "cpu" for p in model.parameters() if p.requires_grad)
    if owners and on_cpu and all(type(m) is nn.Linear for m in owners):
        return "ew"
    return "hooks"


def empty_batch(optimizer: DPOptimizer) -> None:
    """Prepare a DP-SGD step on an empty Poisson batch (no forward or backward pass).

    Poisson sampling can draw no record; the step must still be taken (the accountant
    counts it, and its noise is part of the mechanism). With no records there are no
    per-sample gradients: each trainable tensor gets an empty ``grad_sample`` of shape
    ``(0, *shape)``, exactly what Opacus' hooks give an empty batch, so
    ``optimizer.step()`` clips nothing and adds the noise alone.
    """
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))


class Wiring(Protocol):
    """How DP-SGD is wired into a model, optimiser and loader (:func:`make_private`)."""

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loader: DataLoader, *, request: DPRequest, generator: torch.Generator
                 ) -> tuple[GradSampleModule, DPOptimizer, DataLoader]: ...


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *,
                 request: DPRequest, generator: torch.Generator, mode: str | None = None
                 ) -> tuple[GradSampleModule, DPOptimizer, DataLoader]:
    """Make a model, optimiser and loader DP-SGD private with Opacus.

    Args:
        model: The model; only parameters with ``requires_grad`` get per-sample gradients.
        optimizer: Its optimiser.
        loader: The training loader; it is replaced by a Poisson-sampling loader with
            sample rate ``1 / len(loader)``.
        request: σ and C.
        generator: Seeded RNG for both the Poisson sampling and the noise.
        mode: Opacus ``grad_sample_mode`` (``"hooks"`` or ``"ew"``); ``None`` picks
            :func:`grad_sample_mode`'s (tests and benchmarks compare the two).

    Returns:
        ``(model, optimizer, loader)`` that behave like the ones passed in; the model's
        per-sample gradients come from :func:`grad_sample_mode`'s mode. On an empty
        batch call :func:`empty_batch` instead of the forward and backward passes.
    """
    if mode not in (None, *GRAD_SAMPLE_MODES):
        raise ValueError(f"make_private: mode {mode!r} is not one of {GRAD_SAMPLE_MODES} "
                         "(None picks grad_sample_mode(model)); ghost clipping needs its "
                         "own loss wrapper and is not wired here")
    engine = PrivacyEngine(accountant="rdp")
    return engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=request.noise_multiplier, max_grad_norm=request.max_grad_norm,
        poisson_sampling=True, noise_generator=generator,
        grad_sample_mode=mode or grad_sample_mode(model))
