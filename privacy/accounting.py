"""Record-level privacy accounting: pure functions over a history of DP-SGD mechanisms.

A site's spending is the composition of every round it trained in, each round a
Poisson-subsampled Gaussian mechanism applied ``steps`` times with noise multiplier σ
and sample rate q. Rounds may differ in (σ, q, steps); Opacus' accountants compose
such heterogeneous histories (RDP: Mironov 2017, Mironov et al. 2019 "Rényi Differential
Privacy of the Sampled Gaussian Mechanism"; PRV: Gopi et al. 2021, "Numerical
Composition of Differential Privacy").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

ACCOUNTANTS = ("rdp", "prv")
SIGMA_ACCOUNTED_MAX = 100.0  # larger σ is accounted as this (ε falls with σ: an upper bound)
PRV_RDP_LIMIT = 100.0  # PRV answers with RDP's ε above it (PRV's grid would need >100 GiB)


@dataclass(frozen=True)
class Mechanism:
    """One round of DP-SGD at one site.

    Attributes:
        noise_multiplier: σ, noise std divided by the clipping norm.
        sample_rate: q, the Poisson sampling probability of each record per step.
        steps: Noisy optimiser steps taken with these parameters.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0 for a DP guarantee, "
                             f"got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


def epsilon(history: Iterable[Mechanism], *, delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` of the composition of ``history``.

    Args:
        history: The mechanisms, in any order (composition is commutative).
        delta: Target δ, in (0, 1).
        accountant: ``rdp`` (Opacus RDP, the default) or ``prv`` (Opacus PRV).

    Returns:
        ε; 0.0 for an empty history. σ above :data:`SIGMA_ACCOUNTED_MAX` is accounted as
        that value (Opacus' RDP does not terminate for σ = inf); with ``prv``, a history
        whose RDP ε exceeds :data:`PRV_RDP_LIMIT` gets the RDP ε (both are upper
        bounds; PRV's discretisation grid would not fit in memory).

    Raises:
        ValueError: On an unknown accountant or a δ outside (0, 1).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    steps = [(min(m.noise_multiplier, SIGMA_ACCOUNTED_MAX), m.sample_rate, m.steps)
             for m in history if m.steps > 0]
    if not steps:
        return 0.0
    eps_rdp = _rdp_epsilon(steps, delta)
    if accountant == "rdp" or eps_rdp > PRV_RDP_LIMIT:
        return eps_rdp
    acc = PRVAccountant()
    acc.history = list(steps)
    return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=4096)
def _unit_rdp(sigma: float, q: float) -> np.ndarray:
    """RDP of one step at Opacus' default orders, cached: a site's rounds repeat a few
    (σ, q) pairs, and the fractional orders cost up to a second each time."""
    out = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                   orders=RDPAccountant.DEFAULT_ALPHAS)
    out.setflags(write=False)
    return out


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """What ``RDPAccountant(history).get_epsilon(delta)`` returns (same orders, same sum,
    bit for bit), with each (σ, q) priced once."""
    rdp = sum([_unit_rdp(float(sigma), float(q)) * steps for sigma, q, steps in history])
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp,
                                            delta=delta)
    return float(eps)
