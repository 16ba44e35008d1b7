"""Canaries for the empirical privacy audit: records whose membership the auditor guesses.

Two kinds, both inserted as ordinary records of the site's training set, so the real
data loader Poisson-samples them and Opacus computes, clips and noises their per-sample
gradients like any other record's:

* ``dirac`` — white-box *gradient-space* canaries (Nasr et al., USENIX Security 2023,
  "Tight auditing of differentially private machine learning"; Steinke, Nasr &
  Jagielski, NeurIPS 2023, white-box setting). Canary c's per-sample gradient is a fixed vector
  ``g_c = norm · v_{k_c} ⊗ u_{j_c}`` on the trainable task head's weight (head-input
  direction ``u_{j_c}``, class-logit direction ``v_{k_c}``), plus a small shared bias
  term; the canaries' directions are mutually orthogonal, so at most
  ``hidden_size · (num_classes − 1)`` of them fit. The ``u_j`` are the head-input
  directions that public reference images use least (``public_feature_basis``), so the
  site's own records barely move the weights along them; in the coordinate basis these
  are Dirac canaries up to a fixed rotation. The gradient does not depend on the
  model's state: the head's input for a canary row is replaced by ``a · u_j`` and its
  logits by a straight-through constant ``L0`` with ``softmax(L0) − onehot(k) ∝ v_k``
  (forward hooks on the real PEFT model; LoRA tensors get a zero gradient from a
  canary). A correct clip scales ``g_c`` down to C; with clipping off it keeps its raw
  norm (``norm`` ≫ C), which is what makes a missing clip visible. Score: the model
  update projected on the canary's direction, ``−v_kᵀ ΔW_head u_j``.
* ``input`` — black-box *input-space* canaries: Gaussian-noise images with random
  labels; score: label-centred loss decrease. Weak (kept for comparison).

A canary image carries ``MARK`` in pixel (0, 0, 0) and its index in pixel (0, 0, 1);
real images are standardised intensities and never hold ``MARK``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model is imaging's; imported where used (the CLI stays light)
    from fedadapt.imaging.backbones import ModelSpec

CANARY_TYPES = ("dirac", "input")
MARK = 1.0e6
_HEAD = "head"  # PEFT ModulesToSaveWrapper of the trainable task head
_HEAD_TRAINED = "head.modules_to_save.default"
_LOGIT_OFF = -50.0  # softmax weight e^-50: a logit that is "off"


def dirac_capacity(spec: ModelSpec) -> int:
    """How many mutually orthogonal Dirac canaries the head holds: h · (K − 1)."""
    return spec.hidden_size * (spec.num_classes - 1)


def helmert(num_classes: int) -> torch.Tensor:
    """(K−1, K) orthonormal basis of the sum-zero logit space; row k−1 ∝ (1,…,1, −k, 0,…).

    Row k−1 is the direction of ``softmax(L0) − onehot(k)`` for L0 = 0 on the first k
    logits and "off" elsewhere, so label k with that L0 realises it exactly.
    """
    rows = []
    for k in range(1, num_classes):
        v = torch.zeros(num_classes)
        v[:k] = 1.0
        v[k] = -float(k)
        rows.append(v / v.norm())
    return torch.stack(rows)


@dataclass(frozen=True)
class Canaries:
    """m canaries of one kind, as a dataset of marked records.

    Attributes:
        kind: ``dirac`` or ``input``.
        data: ``TensorDataset(x, y)`` of all m canaries (the auditor includes a subset).
        columns: Dirac canaries: head column j of each canary, shape (m,).
        kinds: Dirac canaries: logit direction k ∈ 1..K−1 of each canary, shape (m,).
        norm: Dirac canaries: raw per-sample gradient norm (before clipping).
        directions: Dirac canaries: (h, n) orthonormal head-input directions; canary c
            uses column ``columns[c]``.
    """

    kind: str
    data: TensorDataset
    columns: torch.Tensor | None = None
    kinds: torch.Tensor | None = None
    norm: float = 0.0
    directions: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.data)

    def subset(self, idx: torch.Tensor) -> TensorDataset:
        x, y = self.data.tensors
        return TensorDataset(x[idx], y[idx])


def public_feature_basis(model: nn.Module, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal directions of the head's input space, least-used by images first.

    Eigen-decomposition of the second moment of the standardised head features of the
    *public* reference images (``public_reference_images``; no site data). The frozen
    encoder's features are nearly low-rank, so the real records' gradients on the head
    hardly touch the first (least-used) directions; Dirac canaries placed there are not
    drowned by the site's own gradient (for the default model, site records' second
    moment along the first 48 directions is ~1e-3 to 4e-2, against ~0.4 to 1 along any
    coordinate axis).

    Returns:
        ``(basis, variance)``: (h, h) eigenvectors as columns and their (h,) eigenvalues,
        ascending.
    """
    vit = _head_owner(model)
    was_training = vit.training
    vit.eval()
    with torch.no_grad():
        from fedadapt.imaging.backbones import public_reference_images

        ref = public_reference_images(spec.image_size)
        z = (vit.features(ref) - vit.feature_mean) / vit.feature_std  # (n, h)
        var, basis = torch.linalg.eigh((z.T @ z / len(z)).double())
    vit.train(was_training)
    return basis.float(), var.float()


def make_canaries(kind: str, m: int, spec: ModelSpec, *, norm: float, seed: int,
                  basis: torch.Tensor | None = None) -> Canaries:
    """Build m canaries of ``kind`` for models of ``spec``.

    Args:
        kind: ``dirac`` or ``input``.
        m: Number of canaries.
        spec: The site's model spec (image size, hidden size, classes).
        norm: Raw gradient norm of a Dirac canary (ignored for ``input``).
        seed: Seeds the images and labels of input canaries.
        basis: Dirac canaries: (h, h) orthonormal head-input directions, most suitable
            first (``public_feature_basis``); canary slots fill them in order, K−1 per
            direction. ``None``: the coordinate axes.

    Raises:
        ValueError: On an unknown kind, more Dirac canaries than the head holds, or a
            norm too small to realise.
    """
    side = spec.image_size
    if kind == "input":
        g = torch.Generator().manual_seed(seed + 7919)
        x = torch.randn(m, 1, side, side, generator=g)
        y = torch.randint(0, spec.num_classes, (m,), generator=g)
        return Canaries("input", TensorDataset(x, y))
    if kind != "dirac":
        raise ValueError(f"canary type {kind!r} is unknown; use one of {CANARY_TYPES}")
    cap = dirac_capacity(spec)
    if not 2 <= m <= cap:
        raise ValueError(f"{m} Dirac canaries do not fit: the head of this model "
                         f"(hidden_size={spec.hidden_size}, num_classes={spec.num_classes}) "
                         f"holds at most {cap} orthogonal ones; use --canaries 2..{cap}")
    if norm <= math.sqrt(2.0):
        raise ValueError(f"Dirac canary norm {norm} is too small; use a norm > 1.42 "
                         f"(the default is 100 × the clipping norm)")
    slots = torch.arange(m)
    columns, kinds = slots // (spec.num_classes - 1), slots % (spec.num_classes - 1) + 1
    basis = torch.eye(spec.hidden_size) if basis is None else basis
    x = torch.zeros(m, 1, side, side)
    x[:, 0, 0, 0] = MARK
    x[:, 0, 0, 1] = torch.arange(m, dtype=torch.float32)
    return Canaries("dirac", TensorDataset(x, kinds.clone()), columns, kinds, float(norm),
                    basis[:, :int(columns.max()) + 1].clone())


def _head_owner(model: nn.Module) -> nn.Module:
    """The ``ViTClassifier`` inside a PEFT model (features, standardisation, head)."""
    from fedadapt.imaging.backbones import ViTClassifier

    found = [mod for mod in model.modules() if isinstance(mod, ViTClassifier)]
    if len(found) != 1:
        raise ValueError("the model holds no single ViTClassifier; Dirac canaries need a "
                         "model from fedadapt.imaging.backbones.build_model")
    return found[0]


def _head(model: nn.Module, suffix: str) -> nn.Module:
    found = [mod for name, mod in model.named_modules() if name.endswith(suffix)]
    if len(found) != 1:
        raise ValueError(f"the model has {len(found)} modules named '*{suffix}', expected one "
                         f"(a PEFT model from fedadapt.imaging.backbones.build_model)")
    return found[0]


def head_weight(model: nn.Module) -> torch.Tensor:
    """The trainable head's weight (K, h), detached on CPU."""
    return _head(model, _HEAD_TRAINED).weight.detach().cpu().clone()


@contextmanager
def dirac_hooks(model: nn.Module, canaries: Canaries) -> Iterator[None]:
    """Make marked rows of every batch produce the Dirac canaries' gradients.

    Hooks on the real model (removed on exit): the model's pre-hook finds the marked
    rows; the head's pre-hook replaces their head input by ``a · u_j``; the head's
    forward hook gives them the straight-through logits ``out − out.detach() + L0``,
    whose cross-entropy gradient is ``softmax(L0) − onehot(k) = ‖δ_k‖ v_k`` whatever
    the model's state. The per-sample gradient on the head is then ``a ‖δ_k‖ v_k ⊗
    u_j`` on the weight plus ``‖δ_k‖ v_k`` on the bias, of norm ``canaries.norm``.
    """
    if canaries.kind != "dirac" or canaries.columns is None or canaries.kinds is None \
            or canaries.directions is None:
        raise ValueError("dirac_hooks needs Dirac canaries")
    directions = canaries.directions
    head = _head(model, _HEAD)
    k_all = canaries.kinds
    delta_sq = 1.0 / k_all.double() + 1.0  # ‖softmax(L0) − onehot(k)‖²
    scale = torch.sqrt(canaries.norm ** 2 / delta_sq - 1.0).float()  # a, per canary
    state: dict[str, torch.Tensor] = {}

    def find_rows(_mod: nn.Module, args: tuple) -> None:
        x = args[0]
        mask = x[:, 0, 0, 0] == MARK  # (B,)
        state["mask"] = mask
        state["ids"] = x[mask, 0, 0, 1].round().long().cpu()

    def set_input(_mod: nn.Module, args: tuple) -> tuple:
        z, mask, ids = args[0], state["mask"], state["ids"]
        if not bool(mask.any()):
            return args
        zc = directions[:, canaries.columns[ids]].T * scale[ids, None]  # (n_c, h)
        z = z.clone()
        z[mask] = zc.to(z.device, z.dtype)
        return (z, *args[1:])

    def set_logits(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        mask, ids = state["mask"], state["ids"]
        if not bool(mask.any()):
            return out
        classes = torch.arange(out.shape[1])
        l0 = torch.where(classes[None, :] < k_all[ids][:, None], 0.0, _LOGIT_OFF)  # (n_c, K)
        out = out.clone()
        out[mask] = out[mask] - out[mask].detach() + l0.to(out.device, out.dtype)
        return out

    handles = [model.register_forward_pre_hook(find_rows),
               head.register_forward_pre_hook(set_input),
               head.register_forward_hook(set_logits)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def dirac_scores(w_before: torch.Tensor, w_after: torch.Tensor, canaries: Canaries
                 ) -> np.ndarray:
    """Score of each Dirac canary: ``−v_kᵀ ΔW u_j`` (SGD moves against the gradient).

    Args:
        w_before: Head weight (K, h) before training; w_after: after.
        canaries: The Dirac canaries.

    Returns:
        (m,) float64 scores; an included canary's score gets +lr·C per sampled step
        (correct clipping) on top of noise and the real data's projection.
    """
    if canaries.columns is None or canaries.kinds is None or canaries.directions is None:
        raise ValueError("dirac_scores needs Dirac canaries")
    basis = helmert(w_before.shape[0]).double()  # (K−1, K)
    delta = (w_after - w_before).double() @ canaries.directions.double()  # (K, n)
    cols = delta[:, canaries.columns].T  # (m, K)
    v = basis[canaries.kinds - 1]  # (m, K)
    return (-(cols * v).sum(1)).numpy()


@torch.no_grad()
def canary_losses(model: nn.Module, canaries: Canaries) -> np.ndarray:
    """Per-canary cross-entropy of input-space canaries under ``model`` (on CPU)."""
    model.eval()
    x, y = canaries.data.tensors
    loss = nn.functional.cross_entropy(model(x), y, reduction="none")
    model.train()
    return loss.numpy().astype(np.float64)


def center_by_label(delta_loss: np.ndarray, labels: torch.Tensor) -> np.ndarray:
    """Subtract each label's median loss decrease: training moves all noise images of a
    label together; what is left is the part of a canary's loss decrease that is its own.
    Uses no inclusion information."""
    y = labels.numpy()
    out = delta_loss.copy()
    for c in np.unique(y):
        out[y == c] -= np.median(delta_loss[y == c])
    return out
