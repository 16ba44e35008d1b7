"""The site runtime kept for the life of the ClientApp process.

Flower runs a site's ClientApp handlers in a process that outlives a round: a Ray actor
in simulation (one actor serves its sites round after round), the SuperNode's ClientApp
process in deployment. Building the frozen backbone with its PEFT adapters, and loading
or generating the site's data, cost more than a small site's local round, so both are
kept here and reused:

* models, one per :class:`ModelSpec` (the backbone and the adapters' shapes): before each
  use every adapter and head tensor goes back to the value the model was built with, its
  ``requires_grad`` too, and the gradients are dropped; the caller then loads the tensors
  the server sent, exactly as on a freshly built model;
* the site's ``(train, test)`` datasets per (site, phase), with the record identity the
  budget is kept under.

Both are small LRU caches, so memory stays flat however many sites one process serves.
Privacy state — the site's policy and ledger — is never kept: the budget guard reads it
from disk every round (``client/budget.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, TypeVar

import torch
from torch import nn

from fedadapt.imaging.backbones import ModelSpec, build_model, load_trainable, trainable_state

#: Models kept per process (one per model spec: a run uses one, heterogeneous ranks more).
MAX_MODELS = 4
#: Sites whose datasets a process keeps (a Ray actor may serve many sites).
MAX_DATASETS = 8

T = TypeVar("T")


@dataclass
class _Kept:
    model: nn.Module
    initial: dict[str, torch.Tensor]  # the trainable tensors as built (CPU copies)


class _LRU(OrderedDict):
    """An ordered dict that keeps only its ``size`` most recently used entries."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or_make(self, key: Hashable, make: Callable[[], T]) -> T:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


_MODELS: _LRU = _LRU(MAX_MODELS)
_DATASETS: _LRU = _LRU(MAX_DATASETS)


def _build(spec: ModelSpec) -> _Kept:
    model = build_model(spec)
    return _Kept(model, trainable_state(model))


def _reset(kept: _Kept) -> nn.Module:
    """The kept model as :func:`build_model` returned it (adapters, head, trainability)."""
    model = kept.model
    names = set(kept.initial)
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(True)  # FFA-LoRA froze lora_A last time, perhaps
        p.grad = None
    load_trainable(model, kept.initial)
    model.train()
    return model


def model_for(spec: ModelSpec) -> nn.Module:
    """The model of ``spec``, built once per process and reset before each use.

    The same object comes back for the same spec, so a caller that needs a second model
    at once (LwF's frozen teacher) builds its own with :func:`build_model`.
    """
    return _reset(_MODELS.get_or_make(repr(spec), lambda: _build(spec)))


def datasets_for(key: Hashable, load: Callable[[], T]) -> T:
    """The datasets loaded by ``load`` for ``key`` (a site and phase), loaded once."""
    return _DATASETS.get_or_make(key, load)


def clear() -> None:
    """Forget every kept model and dataset (tests; a process that changes its data)."""
    _MODELS.clear()
    _DATASETS.clear()
