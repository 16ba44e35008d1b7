"""Pure tensor math for aggregating LoRA adapters (no Flower, no state).

Adapter state dicts map PEFT names to tensors: ``...<module>.lora_A.default.weight`` of
shape ``(r, in)`` and ``...<module>.lora_B.default.weight`` of shape ``(out, r)``; the
module's update is ``ΔW = B @ A`` (times PEFT's scaling, identical at every site).

Averaging A and B separately (plain FedAvg) is inexact: ``mean(B) mean(A) ≠ mean(B A)``.
The exact alternatives here follow:

* FFA-LoRA — Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
  ICLR 2024: A frozen at a shared seed, so ``Σ p_k B_k A = (Σ p_k B_k) A`` exactly.
* FLoRA — Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
  Heterogeneous Low-Rank Adaptations", NeurIPS 2024: stack the factors along the rank
  axis, ``[p_1 B_1 … p_K B_K] [A_1; …; A_K] = Σ p_k B_k A_k`` exactly, any ranks.
* FedEx-LoRA — Singhal et al., "Exact Aggregation for Federated and Efficient
  Fine-Tuning of Foundation Models", ACL 2025: the exact product is kept; here it is
  re-factorised to the global rank by truncated SVD (exact when its rank ≤ r; otherwise
  the relative Frobenius residual is returned so the caller can report it).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

LORA_A = ".lora_A."
LORA_B = ".lora_B."

State = Mapping[str, torch.Tensor]


def normalise(weights: Sequence[float]) -> list[float]:
    """Weights ``p_k = w_k / Σ w`` (e.g. from example counts).

    Raises:
        ValueError: if any weight is negative or they sum to zero.
    """
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg: ``Σ p_k x_k`` per tensor, accumulated in fp32 (cast back to input dtype)."""
    p = normalise(weights)
    out = {}
    for name, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for pk, s in zip(p, states):
            acc += pk * s[name].to(torch.float32)
        out[name] = acc.to(ref.dtype)
    return out


def median(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (Yin et al., ICML 2018); unweighted, robust to < K/2 outliers."""
    return {n: torch.stack([s[n].to(torch.float32) for s in states]).median(dim=0).values
            .to(ref.dtype) for n, ref in states[0].items()}


def trimmed_mean(states: Sequence[State], trim: float = 0.2) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the ``⌊trim·K⌋`` largest and smallest values.

    Raises:
        ValueError: if ``trim`` is not in [0, 0.5).
    """
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    k = len(states)
    cut = int(trim * k)
    out = {}
    for n, ref in states[0].items():
        x = torch.stack([s[n].to(torch.float32) for s in states]).sort(dim=0).values
        out[n] = x[cut:k - cut].mean(dim=0).to(ref.dtype)
    return out


def lora_pairs(state: State) -> dict[str, tuple[str, str]]:
    """Map each LoRA module prefix to its ``(A name, B name)``.

    Raises:
        ValueError: if an A has no B or vice versa.
    """
    a = {n.split(LORA_A)[0]: n for n in state if LORA_A in n}
    b = {n.split(LORA_B)[0]: n for n in state if LORA_B in n}
    if set(a) != set(b):
        raise ValueError(f"unpaired LoRA factors for modules {sorted(set(a) ^ set(b))}")
    return {m: (a[m], b[m]) for m in sorted(a)}


def product_sum(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor],
                weights: Sequence[float]) -> torch.Tensor:
    """The exact target ``Σ p_k B_k A_k`` in fp32 (ranks may differ across k)."""
    p = normalise(weights)
    return sum(pk * b.to(torch.float32) @ a.to(torch.float32) for pk, b, a in zip(p, bs, as_))


def flora_stack(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor],
                weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking: ``(B, A)`` of rank ``Σ r_k`` with ``B @ A = Σ p_k B_k A_k`` exactly.

    The weights are folded into the B factor.
    """
    p = normalise(weights)
    b = torch.cat([pk * bk.to(torch.float32) for pk, bk in zip(p, bs)], dim=1)
    a = torch.cat([ak.to(torch.float32) for ak in as_], dim=0)
    return b, a


def svd_refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factorisation ``B A ≈ delta`` (Eckart–Young), balanced by √σ.

    Returns:
        ``(B (out, rank), A (rank, in), relative Frobenius residual)``; the residual is 0
        (to float tolerance) when ``rank(delta) ≤ rank``.
    """
    d = delta.to(torch.float32)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = torch.zeros(d.shape[0], rank)
    a = torch.zeros(rank, d.shape[1])
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vh[:r]
    total = float(torch.linalg.norm(s))
    resid = float(torch.linalg.norm(s[r:])) / total if total > 0 else 0.0
    return b, a, resid


def exact_aggregate(states: Sequence[State], weights: Sequence[float], rank: int
                    ) -> tuple[dict[str, torch.Tensor], float]:
    """Re-factorise ``Σ p_k B_k A_k`` per module to ``rank``; average the other tensors.

    Sites may have different ranks (the product is rank-agnostic).

    Returns:
        The aggregated state (LoRA factors of ``rank``, others by weighted mean over the
        sites that hold them) and the largest relative residual over modules.
    """
    pairs = lora_pairs(states[0])
    lora_names = {n for ab in pairs.values() for n in ab}
    others = [{n: t for n, t in s.items() if n not in lora_names} for s in states]
    out = weighted_mean(others, weights) if others[0] else {}
    worst = 0.0
    for a_name, b_name in pairs.values():
        delta = product_sum([s[b_name] for s in states], [s[a_name] for s in states], weights)
        b, a, resid = svd_refactor(delta, rank)
        out[a_name] = a.to(states[0][a_name].dtype)
        out[b_name] = b.to(states[0][b_name].dtype)
        worst = max(worst, resid)
    return out, worst


def pad_rank(state: State, rank: int) -> dict[str, torch.Tensor]:
    """Zero-pad (or truncate) LoRA factors to ``rank``: A rows, B columns.

    Zero-padding leaves ``B A`` unchanged; truncation drops the last rank components
    (an error equal to their contribution, use :func:`svd_refactor` to minimise it).
    """
    out = {}
    for n, t in state.items():
        if LORA_A in n:
            new = torch.zeros(rank, t.shape[1], dtype=t.dtype)
            r = min(rank, t.shape[0])
            new[:r] = t[:r]
        elif LORA_B in n:
            new = torch.zeros(t.shape[0], rank, dtype=t.dtype)
            r = min(rank, t.shape[1])
            new[:, :r] = t[:, :r]
        else:
            new = t
        out[n] = new
    return out


def to_rank(state: State, rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """Give a site back an adapter of its own ``rank`` by truncated SVD of each ``B A``.

    Returns:
        The state at ``rank`` and the largest relative residual (0 if exact).
    """
    out = dict(state)
    worst = 0.0
    for a_name, b_name in lora_pairs(state).values():
        b, a, resid = svd_refactor(state[b_name].float() @ state[a_name].float(), rank)
        out[a_name], out[b_name] = a.to(state[a_name].dtype), b.to(state[b_name].dtype)
        worst = max(worst, resid)
    return out, worst


def relative_error(approx: torch.Tensor, target: torch.Tensor) -> float:
    """``‖approx − target‖_F / ‖target‖_F``."""
    return float(torch.linalg.norm(approx - target) / torch.linalg.norm(target))


def change_rank(state: State, rank: int, from_rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """Move an adapter from LoRA rank ``from_rank`` to ``rank``, keeping its update.

    PEFT scales a rank-r module's update by ``α / r``, so the update ``(α/from_rank) B A``
    is kept by ``B' A' = (rank / from_rank) B A``: zero-padding (exact) when ``rank ≥
    from_rank``, truncated SVD (:func:`to_rank`; the relative residual is returned) when
    it is smaller. This is how a site of a smaller rank (heterogeneous ranks, as in
    FLoRA, Wang et al. NeurIPS 2024) gets the global adapter at its own rank, and sends
    its own back at the global rank for exact product aggregation.

    Returns:
        The state at ``rank`` and the largest relative residual over modules (0 if exact).
    """
    if rank < 1 or from_rank < 1:
        raise ValueError(f"LoRA ranks must be ≥ 1, got rank={rank}, from_rank={from_rank}")
    if rank >= from_rank:
        out, resid = pad_rank(state, rank), 0.0
    else:
        out, resid = to_rank(state, rank)
    scale = rank / from_rank
    if scale != 1.0:
        out = {n: t * scale if LORA_B in n else t for n, t in out.items()}
    return out, resid
