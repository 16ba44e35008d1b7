"""Budget guard: decide, before any training, whether a server's request fits the policy.

Pure function of (policy, ledger history, request, rounds already run in this run).
ε is composed over the site's whole history plus the requested round with the
policy's accountant (Opacus RDP, Mironov et al. 2019; or PRV, Gopi et al. 2021). With
per-record accounting (:func:`check_groups`) the history is one per record group and
the round must fit the cap for every group.

Numeric inputs, all answered in well under a second:

* NaN, a negative σ / clip norm / step count, a sample rate outside (0, 1], a
  non-integer step count: :class:`ValueError` from :class:`TrainRequest` (a malformed
  request);
* σ = inf or σ > :data:`MAX_NOISE_MULTIPLIER`, a sample rate below
  :data:`MIN_SAMPLE_RATE`, 0 steps: a refusal with the reason (a well-formed request
  for a round that would release nothing useful or that no accountant prices sensibly;
  never accounted, never trained).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.policy import SitePolicy


MAX_NOISE_MULTIPLIER = 100.0  # above it the update is noise only; RDP slows down (σ=1e4: 2 s)
MIN_SAMPLE_RATE = 1e-7  # below it a round samples (almost) no records


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"train request: {name} must be a number, got "
                         f"{type(value).__name__} {value!r}")
    if math.isnan(float(value)):
        raise ValueError(f"train request: {name} is NaN; the server sent no usable value "
                         f"(check its run config)")
    return float(value)


@dataclass(frozen=True)
class TrainRequest:
    """What the server asks the site to run this round (``noise_multiplier == 0``: no DP).

    Raises:
        ValueError: On NaN, a non-number, σ < 0, clip norm <= 0, sample rate outside
            (0, 1], or steps that are not an integer >= 0 (the message names the field).
    """

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma = _real("noise_multiplier", self.noise_multiplier)
        clip = _real("clip_norm", self.clip_norm)
        q = _real("sample_rate", self.sample_rate)
        if sigma < 0:
            raise ValueError(f"train request: noise_multiplier must be >= 0 (0: no DP), "
                             f"got {sigma}")
        if not clip > 0:
            raise ValueError(f"train request: clip_norm must be > 0, got {clip}")
        if not 0 < q <= 1:
            raise ValueError(f"train request: sample_rate must be in (0, 1], got {q}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) \
                or self.steps < 0:
            raise ValueError(f"train request: steps must be an integer >= 0, got "
                             f"{self.steps!r}")


def unusable(request: TrainRequest) -> str:
    """Why a well-formed DP request is refused before any accounting ('' if it is not)."""
    sigma = request.noise_multiplier
    if not math.isfinite(sigma) or sigma > MAX_NOISE_MULTIPLIER:
        return (f"noise multiplier {sigma} is above the largest the site accepts "
                f"({MAX_NOISE_MULTIPLIER}): the update would be noise only")
    if request.steps == 0:
        return "a round of 0 steps trains nothing; refused (not accounted)"
    if request.sample_rate < MIN_SAMPLE_RATE:
        return (f"sample rate {request.sample_rate} is below {MIN_SAMPLE_RATE}: the round "
                f"would sample (almost) no records; refused")
    return ""


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
    return check_groups(policy, [history], request, rounds_this_run=rounds_this_run)


def _eps(policy: SitePolicy, histories: Sequence[Sequence[Mechanism]],
         extra: Sequence[Mechanism] = ()) -> float:
    """Largest ε over the histories (identical histories are priced once)."""
    distinct = {tuple(sorted((m.noise_multiplier, m.sample_rate, m.steps) for m in h))
                for h in histories} or {()}
    return max(epsilon([*(Mechanism(*m) for m in h), *extra], delta=policy.delta,
                       accountant=policy.accountant) for h in distinct)


def check_groups(policy: SitePolicy, histories: Sequence[Sequence[Mechanism]],
                 request: TrainRequest, *, rounds_this_run: int) -> Decision:
    """:func:`check` per record group: ``histories`` holds one history per group of
    records the round may touch; ``eps_spent``/``eps_after`` are the largest over them,
    and the round is allowed only if it fits the cap for every group."""
    spent = _eps(policy, histories)
    remaining = policy.epsilon_cap - spent

    def refuse(reason: str, after: float = spent) -> Decision:
        return Decision(False, reason, spent, after, remaining)

    if request.noise_multiplier == 0:
        if policy.allow_non_dp:
            return Decision(True, "", spent, math.inf, remaining)
        return refuse("non-DP training was requested but the site's policy does not allow "
                      "it (allow_non_dp = false)")
    if unusable(request):
        return refuse(unusable(request))
    if request.noise_multiplier < policy.min_noise_multiplier:
        return refuse(f"noise multiplier {request.noise_multiplier} is below the site's "
                      f"floor {policy.min_noise_multiplier}")
    if not policy.clip_norm_min <= request.clip_norm <= policy.clip_norm_max:
        return refuse(f"clip norm {request.clip_norm} is outside the site's range "
                      f"[{policy.clip_norm_min}, {policy.clip_norm_max}]")
    if rounds_this_run >= policy.max_rounds_per_run:
        return refuse(f"max rounds per run ({policy.max_rounds_per_run}) reached")
    mech = Mechanism(request.noise_multiplier, request.sample_rate, request.steps)
    after = _eps(policy, histories, [mech])
    if after > policy.epsilon_cap:
        return refuse(f"budget: epsilon after this round {after:.4g} would exceed the "
                      f"site's cap {policy.epsilon_cap}", after)
    return Decision(True, "", spent, after, remaining)


def is_budget_refusal(reason: str) -> bool:
    """True if a refusal means the site's budget is spent (the server stops asking)."""
    return reason.startswith("budget:") or reason.startswith("max rounds")


def noise_for_target(epsilon_per_round: float, *, delta: float, sample_rate: float,
                     steps: int, accountant: str = "rdp") -> float:
    """σ that gives ``epsilon_per_round`` for one round of ``steps`` steps at rate
    ``sample_rate`` (Opacus get_noise_multiplier; pass ``rounds × steps`` for a run of
    identical rounds)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon_per_round, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant))
