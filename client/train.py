"""Local training and evaluation at a site: plain PyTorch, no Flower import.

``train`` runs SGD, or DP-SGD when given a ``DPRequest``, on the task's loss
(``imaging.tasks.task_loss``: cross-entropy, BCE on logits or Dice + CE);
``evaluate_metrics`` returns the loss and the task's metrics, ``evaluate`` the loss and
the task's score (accuracy, or foreground Dice for segmentation). All run on the device
they are given, with bf16 autocast on CUDA when ``amp`` is set (autocast covers the
forward pass; Opacus computes per-sample gradients and clips them in float32, so the DP
guarantee does not depend on it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.hooks import RemovableHandle

from fedadapt.continual.penalty import penalty_step
from fedadapt.names import SGD_MOMENTUM
from fedadapt.imaging.tasks import SCORE, Loss, TaskScores, task_loss
from fedadapt.privacy.dp import DPRequest, Wiring, empty_batch, make_private


@dataclass(frozen=True)
class TrainResult:
    """What a round of local training produced.

    Attributes:
        loss: Mean training loss over the round's batches.
        steps: Optimiser steps taken.
        sample_rate: Poisson sample rate q (DP) or batch_size / N (non-DP).
        num_examples: Training records at the site.
    """

    loss: float
    steps: int
    sample_rate: float
    num_examples: int


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device; "
                           "install a CUDA build of torch or use --device cpu/auto")
    return torch.device(name)


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=amp and device.type == "cuda")


def _correct_before_each_step(optimizer: torch.optim.Optimizer,
                              grad_correction: Sequence[tuple[nn.Parameter, torch.Tensor]],
                              device: torch.device) -> RemovableHandle | None:
    """Hook ``grad_correction`` (see :func:`train`) on the SGD optimiser itself: Opacus'
    DPOptimizer steps it after clipping and noising, so the correction is added after."""
    if not grad_correction:
        return None
    pairs = [(p, d.to(device=device, dtype=p.dtype)) for p, d in grad_correction]

    def add_correction(*_: object) -> None:
        for p, d in pairs:
            if p.grad is not None:
                p.grad.add_(d)

    return optimizer.register_step_pre_hook(add_correction)


def _outside_dp(params: list[nn.Parameter], anchor: list[torch.Tensor], lr: float,
                proximal_mu: float, param_penalty: Callable[[], torch.Tensor] | None) -> None:
    """The data-independent steps after each optimiser step: FedProx, then the penalty."""
    if anchor:
        with torch.no_grad():
            for p, p0 in zip(params, anchor):
                p.sub_(lr * proximal_mu * (p - p0))
    if param_penalty is not None:
        penalty_step(params, param_penalty, lr)


def train(model: nn.Module, dataset: Dataset, *, epochs: int, lr: float, batch_size: int,
          device: torch.device, seed: int, dp: DPRequest | None = None,
          amp: bool = False, proximal_mu: float = 0.0,
          param_penalty: Callable[[], torch.Tensor] | None = None,
          extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
          loss_fn: Loss | None = None, wiring: Wiring = make_private,
          grad_correction: Sequence[tuple[nn.Parameter, torch.Tensor]] = ()) -> TrainResult:
    """Train the trainable tensors of ``model`` on ``dataset`` in place.

    Args:
        model: Model whose trainable tensors are the adapters and head.
        dataset: The site's training split.
        epochs: Passes over the data (with Poisson sampling: ``epochs * len(loader)`` steps).
        lr: SGD learning rate (momentum 0.9).
        batch_size: Expected batch size.
        device: Where to train.
        seed: Seeds shuffling / Poisson sampling and the DP noise.
        dp: DP-SGD parameters; ``None`` trains without DP.
        amp: bf16 autocast on CUDA.
        proximal_mu: FedProx (Li et al., MLSys 2020) weight μ of ``μ/2‖w − w_global‖²`` on
            the trainable tensors: a separate step ``w ← w − lr·μ·(w − w_global)`` after
            each optimiser step, outside DP clipping and noise (no privacy cost).
        param_penalty: A continual-learning penalty on the trainable tensors only (EWC,
            O-LoRA; see ``continual.penalty``), applied the same way: a separate step
            ``w ← w − lr·∇penalty`` after each optimiser step, outside DP clipping/noise.
        extra_loss: A per-example-mean loss term ``f(x, logits)`` added to the task loss
            (e.g. LwF distillation); it is part of each example's gradient, so under
            DP-SGD it is clipped and noised with it.
        loss_fn: The task loss ``f(logits, y)``, a mean over the batch's examples
            (``imaging.tasks.task_loss``); default cross-entropy.
        wiring: How ``dp`` is wired into model, optimiser and loader: Opacus with Poisson
            sampling (:func:`privacy.dp.make_private`); the empirical audit passes a
            deliberately broken one (``privacy.empirical.fixed_batches``).
        grad_correction: ``(parameter, d)`` pairs (SCAFFOLD's ``c − c_i``): ``d`` is added
            to the gradient before every SGD step, through momentum, after Opacus' clipping
            and noise (data-independent: no privacy cost).

    Returns:
        The round's ``TrainResult``.
    """
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    hook = _correct_before_each_step(optimizer, grad_correction, device)
    n = len(dataset)  # type: ignore[arg-type]
    sample_rate = min(1.0, batch_size / n)
    net: nn.Module = model
    if dp is not None:
        noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        net, optimizer, loader = wiring(model, optimizer, loader, request=dp,
                                        generator=noise_gen)
        sample_rate = 1.0 / len(loader)
    loss_fn, steps, total = loss_fn or task_loss("classification"), 0, 0.0
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            if len(y):
                with _autocast(device, amp):
                    logits = net(x)
                loss = loss_fn(logits.float(), y)
                if extra_loss is not None:
                    loss = loss + extra_loss(x, logits.float())
                loss.backward()
            else:  # an empty batch, drawn by Poisson sampling (DP only): still a step,
                # and Opacus still adds the noise, to no per-sample gradient at all
                empty_batch(optimizer)  # type: ignore[arg-type]
                loss = torch.zeros(())
            optimizer.step()
            _outside_dp(params, anchor, lr, proximal_mu, param_penalty)
            steps += 1
            total += loss.item()
    if dp is not None:
        net._close()  # remove Opacus hooks/attributes: the model is reused by the caller
    if hook is not None:
        hook.remove()
    return TrainResult(loss=total / max(steps, 1), steps=steps, sample_rate=sample_rate,
                       num_examples=n)


@torch.no_grad()
def evaluate_metrics(model: nn.Module, dataset: Dataset, *, batch_size: int,
                     device: torch.device, amp: bool = False, task: str = "classification",
                     num_classes: int = 0) -> tuple[float, dict[str, float]]:
    """Mean task loss of ``model`` on ``dataset`` and the task's metrics.

    Args:
        task: ``classification``, ``multilabel`` or ``segmentation``.
        num_classes: Output classes (segmentation: with background); 0 takes the model's.

    Returns:
        ``(loss, metrics)``; metrics as ``imaging.tasks.TaskScores.result``.
    """
    model.to(device).eval()
    loss_fn = task_loss(task)
    scores: TaskScores | None = None
    total, n = 0.0, 0
    # Images are small next to volumes: classify in batches of at least 64.
    size = batch_size if task == "segmentation" else max(batch_size, 64)
    for x, y in DataLoader(dataset, batch_size=size):
        x, y = x.to(device), y.to(device)
        with _autocast(device, amp):
            logits = model(x).float()
        scores = scores or TaskScores(task, num_classes or logits.shape[1])
        total += float(loss_fn(logits, y)) * len(y)
        scores.update(logits, y)
        n += len(y)
    if scores is None:
        raise ValueError("evaluate: the dataset is empty")
    return total / n, scores.result()


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
             amp: bool = False, task: str = "classification") -> tuple[float, float]:
    """Mean task loss and the task's score (accuracy; segmentation: foreground Dice)."""
    loss, metrics = evaluate_metrics(model, dataset, batch_size=batch_size, device=device,
                                     amp=amp, task=task)
    return loss, metrics.get(SCORE[task], float("nan"))
