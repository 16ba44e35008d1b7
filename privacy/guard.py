"""Budget guard: decide, before any training, whether a server's request fits the policy.

Pure function of (policy, ledger history, request, rounds already run in this run).
ε is composed over the site's whole history plus the requested round with the
policy's accountant (Opacus RDP, Mironov et al. 2019; or PRV, Gopi et al. 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.policy import SitePolicy


@dataclass(frozen=True)
class TrainRequest:
    """What the server asks the site to run this round (``noise_multiplier == 0``: no DP)."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class Decision:
    """Outcome of the guard.

    Attributes:
        allowed: True if the site may train.
        reason: Empty when allowed, else why the request is refused.
        eps_spent: ε of the history before this round.
        eps_after: ε after this round if trained (== eps_spent when refused before
            accounting).
        eps_remaining: cap - eps_spent.
    """

    allowed: bool
    reason: str
    eps_spent: float
    eps_after: float
    eps_remaining: float


def check(policy: SitePolicy, history: Sequence[Mechanism], request: TrainRequest, *,
          rounds_this_run: int) -> Decision:
    """Refuse if the request is below the noise floor, outside the clip range, past the
    per-run round limit, or would make the total ε exceed the policy cap."""
    spent = epsilon(history, delta=policy.delta, accountant=policy.accountant)
    remaining = policy.epsilon_cap - spent

    def refuse(reason: str, after: float = spent) -> Decision:
        return Decision(False, reason, spent, after, remaining)

    if request.noise_multiplier == 0:
        if policy.allow_non_dp:
            return Decision(True, "", spent, math.inf, remaining)
        return refuse("non-DP training was requested but the site's policy does not allow "
                      "it (allow_non_dp = false)")
    if request.noise_multiplier < policy.min_noise_multiplier:
        return refuse(f"noise multiplier {request.noise_multiplier} is below the site's "
                      f"floor {policy.min_noise_multiplier}")
    if not policy.clip_norm_min <= request.clip_norm <= policy.clip_norm_max:
        return refuse(f"clip norm {request.clip_norm} is outside the site's range "
                      f"[{policy.clip_norm_min}, {policy.clip_norm_max}]")
    if rounds_this_run >= policy.max_rounds_per_run:
        return refuse(f"max rounds per run ({policy.max_rounds_per_run}) reached")
    mech = Mechanism(request.noise_multiplier, request.sample_rate, request.steps)
    after = epsilon([*history, mech], delta=policy.delta, accountant=policy.accountant)
    if after > policy.epsilon_cap:
        return refuse(f"budget: epsilon after this round {after:.4g} would exceed the "
                      f"site's cap {policy.epsilon_cap}", after)
    return Decision(True, "", spent, after, remaining)


def is_budget_refusal(reason: str) -> bool:
    """True if a refusal means the site's budget is spent (the server stops asking)."""
    return reason.startswith("budget:") or reason.startswith("max rounds")


def noise_for_target(epsilon_per_round: float, *, delta: float, sample_rate: float,
                     steps: int, accountant: str = "rdp") -> float:
    """σ that gives ``epsilon_per_round`` for one round (Opacus get_noise_multiplier)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon_per_round, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant))
