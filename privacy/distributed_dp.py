"""Distributed DP under secure aggregation: the Skellam mechanism and its accountant.

Each site adds integer noise ``Sk = Poisson(v/2) − Poisson(v/2)`` (variance ``v``) to its
quantised update before masking; a sum of independent Skellams is Skellam, so the sum the
server unmasks carries Skellam noise of variance ``n·v`` for the ``n`` sites whose vectors
it holds, and no one — the server included — sees a less noisy value (Agarwal, Kairouz &
Liu, "The Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021;
Kairouz, Liu & Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", ICML 2021, for the same setting with discrete
Gaussians).

The privacy unit is one site's whole update in a round (add/remove one site). Its
integer L2 sensitivity is bounded deterministically: the clipped, weight-scaled update
has L2 norm ≤ C, i.e. ≤ C·s in quantiser levels, and stochastic rounding moves each of
its d coordinates by less than 1, so Δ2 ≤ C·s + √d and Δ1 ≤ √d·Δ2.

RDP of the Skellam mechanism with total variance μ, for integer α > 1 (Agarwal et al.
2021, Theorem 3.5):

    ε(α) ≤ α Δ2² / (2μ) + min( ((2α − 1) Δ2² + 6 Δ1) / (4μ²),  3 Δ1 / (2μ) ).

Rounds compose by adding RDP; (ε, δ) comes from Opacus's RDP conversion. Every site
takes part in every round (no sampling of sites), so there is no amplification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from opacus.accountants.analysis.rdp import get_privacy_spent

ORDERS: tuple[int, ...] = tuple(range(2, 64)) + tuple(range(64, 513, 8))


def sensitivity(clip_norm: float, scale: float, dim: int) -> tuple[float, float]:
    """``(Δ2, Δ1)`` of one site's quantised update, in integer levels (see module doc)."""
    l2 = clip_norm * scale + math.sqrt(dim)
    return l2, math.sqrt(dim) * l2


def site_variance(noise_multiplier: float, l2_sensitivity: float, num_sites: int) -> float:
    """Each site's Skellam variance, so that the sum of ``num_sites`` has std z·Δ2."""
    if noise_multiplier <= 0 or num_sites < 1:
        raise ValueError(f"noise multiplier {noise_multiplier} must be > 0 and num_sites "
                         f"{num_sites} >= 1")
    return (noise_multiplier * l2_sensitivity) ** 2 / num_sites


def skellam_noise(shapes: Sequence[tuple[int, ...]], variance: float,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Integer Skellam noise of ``variance`` per coordinate: Poisson(v/2) − Poisson(v/2)."""
    lam = variance / 2
    return [rng.poisson(lam, s).astype(np.int64) - rng.poisson(lam, s).astype(np.int64)
            for s in shapes]


def skellam_rdp(alpha: int, *, l2: float, l1: float, variance: float) -> float:
    """RDP ε(α) of the Skellam mechanism of total ``variance`` (Agarwal et al. 2021, Thm
    3.5), for L2/L1 sensitivities ``l2``/``l1``."""
    if alpha < 2 or variance <= 0:
        raise ValueError(f"alpha {alpha} must be an integer >= 2 and variance {variance} > 0")
    mu = variance
    return alpha * l2**2 / (2 * mu) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * mu**2),
                                          3 * l1 / (2 * mu))


def skellam_epsilon(releases: Sequence[tuple[float, float, float]], *, delta: float) -> float:
    """(ε at ``delta``) of composed Skellam releases ``[(Δ2, Δ1, total variance), ...]``."""
    if not releases:
        return 0.0
    rdp = [sum(skellam_rdp(a, l2=l2, l1=l1, variance=v) for l2, l1, v in releases)
           for a in ORDERS]
    eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


@dataclass
class SkellamAccountant:
    """The server's history of distributed-DP releases (one per unmasked round).

    Attributes:
        noise_multiplier: z of ``secagg-noise-multiplier``.
        delta: δ of the site-level ε.
        releases: Per round: ``{"round", "sites", "l2", "l1", "variance"}``.
    """

    noise_multiplier: float
    delta: float
    releases: list[dict[str, Any]] = field(default_factory=list)

    def record(self, rnd: int, *, num_sites: int, l2: float, l1: float,
               site_var: float) -> float:
        """Add round ``rnd``'s release (``num_sites`` noise shares in the sum); ε so far."""
        self.releases.append({"round": rnd, "sites": num_sites, "l2": l2, "l1": l1,
                              "variance": num_sites * site_var})
        return self.epsilon()

    def epsilon(self) -> float:
        return skellam_epsilon([(r["l2"], r["l1"], r["variance"]) for r in self.releases],
                               delta=self.delta)

    def report(self) -> dict[str, Any]:
        """The ``privacy.distributed`` block of ``summary.json``."""
        return {"unit": "site", "mechanism": "skellam", "accountant": "rdp (Agarwal et al. "
                "2021, Thm 3.5)", "noise_multiplier": self.noise_multiplier,
                "delta": self.delta, "epsilon": self.epsilon(), "rounds": self.releases}
