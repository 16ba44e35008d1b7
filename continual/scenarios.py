"""Continual scenarios: phases of rounds, each with its own sites and data domain.

A pure description: which site indices train in phase p, and which scanner
domain each site's data comes from in phase p. Phase domains differ strongly on
purpose (a new acquisition protocol with a very different contrast curve, bias
field and resolution; then an inverted contrast, as between T1- and T2-weighted
MRI), so that naive sequential fine-tuning forgets (cf. van de Ven et al.,
"Three types of incremental learning", Nature Machine Intelligence 2022).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils.data import TensorDataset

from fedadapt.imaging.synthetic import ScannerShift, SiteSpec, make_site_data

__all__ = ["SCENARIOS", "PhaseDomain", "ContinualScenario", "phase_site_data"]

SCENARIOS = ("site-incremental", "domain-incremental")


@dataclass(frozen=True)
class PhaseDomain:
    """The acquisition domain of one phase.

    Attributes:
        shift: scanner override for the phase, or None to keep the site's own.
        invert: negate the normalised image (inverted contrast).
    """

    shift: ScannerShift | None = None
    invert: bool = False


# Phase 0: each site's own scanner. Phase 1: a new protocol (steep contrast,
# strong bias field, blur). Phase 2: inverted contrast. Later phases cycle 1, 2.
_PHASE_DOMAINS = (
    PhaseDomain(),
    PhaseDomain(ScannerShift(intensity_scale=1.0, gamma=2.0, noise_std=0.05, blur_sigma=1.0, bias_coeff=0.4)),
    PhaseDomain(invert=True),
)


def phase_domain(phase: int) -> PhaseDomain:
    """The domain of phase ``phase`` (0-based)."""
    if phase < 0:
        raise ValueError(f"phase must be >= 0; got {phase}")
    if phase < len(_PHASE_DOMAINS):
        return _PHASE_DOMAINS[phase]
    return _PHASE_DOMAINS[1 + (phase - 1) % (len(_PHASE_DOMAINS) - 1)]


@dataclass(frozen=True)
class ContinualScenario:
    """Phases of rounds over a federation of ``num_sites`` sites.

    Attributes:
        name: "site-incremental" (sites join over phases, each block with the
            phase's domain; earlier sites stop training) or "domain-incremental"
            (all sites train in every phase; their data shift between phases).
        num_sites: sites in the federation (partition ids 0..num_sites-1).
        num_phases: T, the number of phases.
        rounds_per_phase: federated rounds per phase.
    """

    name: str
    num_sites: int
    num_phases: int = 3
    rounds_per_phase: int = 1

    def __post_init__(self) -> None:
        errors = []
        if self.name not in SCENARIOS:
            errors.append(f"scenario={self.name!r} is unknown; use one of {SCENARIOS}")
        if self.num_phases < 2:
            errors.append(f"num_phases={self.num_phases} must be >= 2 to measure forgetting")
        if self.rounds_per_phase < 1:
            errors.append(f"rounds_per_phase={self.rounds_per_phase} must be >= 1")
        min_sites = self.num_phases if self.name == "site-incremental" else 1
        if self.num_sites < min_sites:
            errors.append(
                f"num_sites={self.num_sites} too small: {self.name} needs >= {min_sites} "
                f"(one new site per phase); raise --sites or lower the phases"
            )
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def total_rounds(self) -> int:
        return self.num_phases * self.rounds_per_phase

    def phase_of_round(self, server_round: int) -> int:
        """Phase (0-based) of a 1-based Flower round."""
        if not 1 <= server_round <= self.total_rounds:
            raise ValueError(f"round {server_round} outside 1..{self.total_rounds}")
        return (server_round - 1) // self.rounds_per_phase

    def join_phase(self, site: int) -> int:
        """Phase in which site ``site`` first trains (contiguous blocks)."""
        if not 0 <= site < self.num_sites:
            raise ValueError(f"site {site} outside 0..{self.num_sites - 1}")
        if self.name == "domain-incremental":
            return 0
        return site * self.num_phases // self.num_sites

    def active_sites(self, phase: int) -> tuple[int, ...]:
        """Partition ids that train in ``phase``."""
        self._check_phase(phase)
        if self.name == "domain-incremental":
            return tuple(range(self.num_sites))
        return tuple(i for i in range(self.num_sites) if self.join_phase(i) == phase)

    def site_domain(self, site: int, phase: int) -> PhaseDomain:
        """Domain of site ``site``'s data for phase ``phase``'s train/test split."""
        self._check_phase(phase)
        if self.name == "domain-incremental":
            return phase_domain(phase)
        return phase_domain(self.join_phase(site))

    def _check_phase(self, phase: int) -> None:
        if not 0 <= phase < self.num_phases:
            raise ValueError(f"phase {phase} outside 0..{self.num_phases - 1}")


def phase_site_data(
    spec: SiteSpec, domain: PhaseDomain, *, image_size: int, num_classes: int, seed: int,
    site_index: int, phase: int,
) -> tuple[TensorDataset, TensorDataset]:
    """A site's (train, test) data in a phase's domain (fresh records per phase)."""
    if domain.shift is not None:
        spec = replace(spec, shift=domain.shift)
    train, test = make_site_data(spec, image_size=image_size, num_classes=num_classes,
                                 seed=seed + 7919 * phase, site_index=site_index)
    if not domain.invert:
        return train, test

    def inv(ds: TensorDataset) -> TensorDataset:
        x, y = ds.tensors
        return TensorDataset(torch.neg(x), y)

    return inv(train), inv(test)
