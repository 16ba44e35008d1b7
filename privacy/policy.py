"""Site privacy policy: a TOML file owned by the site, never taken from the server.

Example ``policy.toml``::

    epsilon_cap = 8.0
    delta = 1e-5                 # optional; default 1/(10*N); error if larger
    min_noise_multiplier = 0.5
    clip_norm_min = 0.1
    clip_norm_max = 10.0
    accountant = "rdp"           # or "prv"
    max_rounds_per_run = 100
    target_epsilon_per_round = 0.0  # > 0: the site picks σ itself for this ε per round
    target_epsilon_per_run = 0.0    # > 0: ... for this ε over max_rounds_per_run rounds
    allow_non_dp = false         # true only for research sites: non-DP rounds are unaccounted

A missing or unreadable policy is an error (privacy fails closed).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from fedadapt import atomic
from fedadapt.privacy.accounting import ACCOUNTANTS


class PolicyError(ValueError):
    """A site policy is missing, unreadable or invalid."""


def max_delta(n_records: int) -> float:
    """The largest δ a site may use: 1/(10·N) for N training records."""
    if n_records < 1:
        raise PolicyError(f"n_records must be >= 1, got {n_records}")
    return 1.0 / (10 * n_records)


@dataclass(frozen=True)
class SitePolicy:
    """A site's record-level privacy policy.

    Attributes:
        epsilon_cap: Total ε the site will ever spend on this dataset (all runs).
        delta: δ of every ε statement; at most 1/(10·N).
        min_noise_multiplier: Noise floor σ_min; requests below it are refused.
        clip_norm_min: Smallest allowed per-sample clipping norm C.
        clip_norm_max: Largest allowed per-sample clipping norm C.
        accountant: ``rdp`` or ``prv``.
        max_rounds_per_run: Most rounds the site trains in within one run.
        target_epsilon_per_round: When > 0, the site derives its own noise multiplier
            for a round from this ε target (Opacus ``get_noise_multiplier``) and uses
            the larger of it and the server's request.
        target_epsilon_per_run: When > 0, the site derives its own noise multiplier
            so that ``max_rounds_per_run`` rounds of the planned mechanism compose (same
            q and steps every round: one mechanism of ``rounds × steps`` steps, exact for
            RDP and PRV) to this ε, and uses the larger of it and the server's request.
            Each site then calibrates σ to its own sample rate (Abadi et al. 2016;
            Mironov 2017) instead of the whole federation using the σ its smallest site
            needs. A calibration only: the cap and the noise floor still decide.
        allow_non_dp: Allow rounds without DP-SGD. Such rounds release updates that no
            accountant covers (a documented leak), so the default is False and a
            non-DP request is refused.
    """

    epsilon_cap: float
    delta: float
    min_noise_multiplier: float = 0.5
    clip_norm_min: float = 1e-3
    clip_norm_max: float = 100.0
    accountant: str = "rdp"
    max_rounds_per_run: int = 1000
    target_epsilon_per_round: float = 0.0
    target_epsilon_per_run: float = 0.0
    allow_non_dp: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, value: object, fix: str) -> PolicyError:
            return PolicyError(f"policy field {name}={value!r} is invalid: {fix}")

        if not (isinstance(self.epsilon_cap, (int, float)) and math.isfinite(self.epsilon_cap)
                and self.epsilon_cap > 0):
            raise bad("epsilon_cap", self.epsilon_cap, "use a finite number > 0")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise bad("delta", self.delta, "use a number in (0, 1), at most 1/(10*N)")
        if not (isinstance(self.min_noise_multiplier, (int, float))
                and self.min_noise_multiplier > 0):
            raise bad("min_noise_multiplier", self.min_noise_multiplier, "use a number > 0")
        if not (isinstance(self.clip_norm_min, (int, float)) and self.clip_norm_min > 0):
            raise bad("clip_norm_min", self.clip_norm_min, "use a number > 0")
        if not (isinstance(self.clip_norm_max, (int, float))
                and self.clip_norm_max >= self.clip_norm_min):
            raise bad("clip_norm_max", self.clip_norm_max,
                      f"use a number >= clip_norm_min ({self.clip_norm_min})")
        if self.accountant not in ACCOUNTANTS:
            raise bad("accountant", self.accountant, f"use one of {ACCOUNTANTS}")
        if not (isinstance(self.max_rounds_per_run, int) and self.max_rounds_per_run >= 1):
            raise bad("max_rounds_per_run", self.max_rounds_per_run, "use an integer >= 1")
        if not (isinstance(self.target_epsilon_per_round, (int, float))
                and math.isfinite(self.target_epsilon_per_round)
                and 0 <= self.target_epsilon_per_round <= self.epsilon_cap):
            raise bad("target_epsilon_per_round", self.target_epsilon_per_round,
                      f"use 0 (off) or a number in (0, epsilon_cap={self.epsilon_cap}]")
        if not (isinstance(self.target_epsilon_per_run, (int, float))
                and math.isfinite(self.target_epsilon_per_run)
                and 0 <= self.target_epsilon_per_run <= self.epsilon_cap):
            raise bad("target_epsilon_per_run", self.target_epsilon_per_run,
                      f"use 0 (off) or a number in (0, epsilon_cap={self.epsilon_cap}]")
        if not isinstance(self.allow_non_dp, bool):
            raise bad("allow_non_dp", self.allow_non_dp, "use true or false")


_FIELDS = {f.name for f in fields(SitePolicy)}


def policy_from_dict(data: dict, *, n_records: int) -> SitePolicy:
    """Build and validate a policy; δ defaults to, and may not exceed, 1/(10·N).

    Raises:
        PolicyError: On unknown or missing keys, bad values, or δ > 1/(10·N).
    """
    unknown = set(data) - _FIELDS
    if unknown:
        raise PolicyError(f"unknown policy keys {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    if "epsilon_cap" not in data:
        raise PolicyError("policy is missing epsilon_cap; add e.g. epsilon_cap = 8.0")
    bound = max_delta(n_records)
    values = dict(data)
    values.setdefault("delta", bound)
    policy = SitePolicy(**values)
    if policy.delta > bound:
        raise PolicyError(f"policy field delta={policy.delta!r} is invalid: it exceeds "
                          f"1/(10*N) = {bound:.3g} for N={n_records} training records; "
                          f"lower it or omit it")
    return policy


def load_policy(path: str | Path, *, n_records: int) -> SitePolicy:
    """Read and validate the site's ``policy.toml`` (fail closed).

    Raises:
        PolicyError: If the file is missing, unreadable, not TOML, or invalid.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise PolicyError(f"site privacy policy {path} not found; the site refuses to "
                          f"train without one (write a policy.toml)") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"site privacy policy {path} is unreadable: {exc}") from exc
    return policy_from_dict(data, n_records=n_records)


def write_policy(path: str | Path, policy: SitePolicy) -> None:
    """Write ``policy`` as TOML (used to provision simulated sites)."""
    lines = []
    for f in fields(SitePolicy):
        v = getattr(policy, f.name)
        if isinstance(v, bool):
            lines.append(f"{f.name} = {str(v).lower()}")
        else:
            lines.append(f'{f.name} = "{v}"' if isinstance(v, str) else f"{f.name} = {v!r}")
    atomic.write_text(path, "\n".join(lines) + "\n")
