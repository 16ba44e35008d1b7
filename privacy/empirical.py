"""One-run empirical privacy audit of a site's real training path: the canary game.

Steinke, Nasr & Jagielski (NeurIPS 2023, "Privacy auditing with one (1) training run"):
m canaries (``privacy.canaries``) are each included in a site's training data
independently with probability 1/2; the site trains through ``client.train.train`` —
the site's own data, model spec, LoRA adapters and DP parameters from its ``RunConfig``
(and δ / accountant from its ``policy.toml`` when a site folder is given), the same
Opacus wiring (``privacy.dp.make_private``, Poisson sampling) and the same per-round
seeds, FFA-LoRA freezing and FedProx step as the ClientApp — for the run's rounds. The
auditor scores every canary, guesses "included" for the r/2 highest and "excluded" for
the r/2 lowest scores, and ``privacy.audit_bounds`` turns the number of correct guesses
into an ε lower bound. ε_claimed is ``privacy.accounting.epsilon`` (the ledger's
accountant) over the mechanisms the training reported: the configured σ, q and steps
as run.

The auditor observes the site's own update (what the server receives); rounds chain the
site's updates (FedAvg over the audited site alone, so no other site's update hides it).

``broken`` emulates wiring bugs without touching the training code, while ε_claimed is
still computed from the configured σ:

* ``noise-zero``: the noise multiplier actually used is 1e-12 (``DPRequest`` refuses an
  exact 0 — it fails closed), i.e. no noise.
* ``no-clip``: clipping is off: Opacus gets C' = 1e6 and σ' = σ·C/C', so the noise
  std σ'·C' equals the configured σ·C but no per-sample gradient is ever clipped.
* ``fixed-batch``: shuffled fixed-size batches instead of Poisson sampling (Opacus
  ``poisson_sampling=False``: :func:`fixed_batches`, passed to the site's round as its
  DP wiring), while the claim still assumes amplification by Poisson sampling.

This module holds the game's configuration, result and broken wirings; the audit runs
the site's own round (``client.site_round``) from ``client.empirical``, a floor above.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from fedadapt.config import RunConfig
from fedadapt.privacy import canaries as cn
from fedadapt.privacy.accounting import ACCOUNTANTS
from fedadapt.privacy.dp import DPRequest, grad_sample_mode
from fedadapt.privacy.policy import SitePolicy

BROKEN = ("none", "noise-zero", "no-clip", "fixed-batch")
_NO_CLIP_NORM = 1e6
INPUT_CANARIES = 128  # default m for input-space canaries

#: What the bound proves and does not prove (printed by the CLI and stored in JSON).
STATEMENT = (
    "ε_lower is a statistical LOWER bound: with probability ≥ the confidence, the "
    "training path that ran is NOT (ε, δ)-DP for any ε < ε_lower. If ε_lower > "
    "ε_claimed, the claim is false for this code path (a bug report). ε_lower ≤ "
    "ε_claimed does NOT prove the claim: a one-run audit that sees only the site's "
    "update is far from tight (it cannot exceed the ceiling set by m and r), and it "
    "tests only this scenario (this site's data, model, canaries, rounds and "
    "hyper-parameters), not the worst case over datasets.")


@dataclass(frozen=True)
class AuditConfig:
    """The audit's scenario: a site's run config plus the canary game.

    Attributes:
        run: The site's run config (data, model spec, LoRA, DP parameters, rounds).
        partition_id: Which site of ``run``'s federation is audited; ``None``: the one a
            ``site.toml`` in ``site_dir`` names, else 0.
        canary: ``dirac`` (white-box gradient canaries) or ``input`` (noise images).
        canaries: m; ``None``: half the Dirac slots of the head (h·(K−1)/2, in the
            directions public images use least) or 128 input ones.
        guesses: r, even, ≤ m; ``None``: about m/2 (the r/2 highest and r/2 lowest
            scores; abstaining on the middle avoids forced errors).
        canary_scale: Raw Dirac canary gradient norm in units of C (≥ 1.5; clipping
            must bring it down to C, so a missing clip shows).
        confidence: Confidence of the lower bounds.
        broken: ``none`` | ``noise-zero`` | ``no-clip`` | ``fixed-batch`` (see the module
            docstring).
        delta: δ of the claim (the policy's when a site folder is given).
        accountant: ``rdp`` | ``prv`` (the policy's when a site folder is given).
        site_dir: The site's folder (``policy.toml``, ``ledger/``, ``site.toml``), or ''.
        policy: The site's policy (from ``site_dir``), or None.
    """

    run: RunConfig = field(default_factory=RunConfig)
    partition_id: int | None = None
    canary: str = "dirac"
    canaries: int | None = None
    guesses: int | None = None
    canary_scale: float = 100.0
    confidence: float = 0.95
    broken: str = "none"
    delta: float = 1e-5
    accountant: str = "rdp"
    site_dir: str = ""
    policy: SitePolicy | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, value: object, fix: str) -> None:
            if not ok:
                raise ValueError(f"audit {name}={value!r} is invalid: {fix}")
        need(self.canary in cn.CANARY_TYPES, "canary", self.canary,
             f"use one of {cn.CANARY_TYPES}")
        need(self.canaries is None or self.canaries >= 2, "canaries", self.canaries,
             "use at least 2 canaries")
        m = self.canaries
        need(self.guesses is None or (2 <= self.guesses and self.guesses % 2 == 0
                                      and (m is None or self.guesses <= m)),
             "guesses", self.guesses, f"use an even number in 2..{m or 'm'}")
        need(self.canary_scale >= 1.5, "canary_scale", self.canary_scale,
             "use a raw canary norm of at least 1.5 x the clipping norm")
        need(0 < self.confidence < 1, "confidence", self.confidence, "use a value in (0, 1)")
        need(self.broken in BROKEN, "broken", self.broken, f"use one of {BROKEN}")
        need(self.run.dp or self.broken == "none", "broken", self.broken,
             "broken wiring only applies to DP training; drop dp=false or use none")
        need(0 < self.delta < 1, "delta", self.delta, "use a value in (0, 1)")
        need(self.accountant in ACCOUNTANTS, "accountant", self.accountant,
             f"use one of {ACCOUNTANTS}")
        need(self.partition_id is None or 0 <= self.partition_id < self.run.num_sites,
             "partition_id", self.partition_id,
             f"use a site index in 0..{self.run.num_sites - 1} (num-sites={self.run.num_sites})")


def fixed_batches(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *,
                  request: DPRequest, generator: torch.Generator
                  ) -> tuple[GradSampleModule, DPOptimizer, DataLoader]:
    """``--broken fixed-batch``: ``privacy.dp.make_private`` without Poisson sampling
    (the same per-sample-gradient mode, ``privacy.dp.grad_sample_mode``)."""
    return PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=request.noise_multiplier, max_grad_norm=request.max_grad_norm,
        poisson_sampling=False, noise_generator=generator,
        grad_sample_mode=grad_sample_mode(model))


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit. ``epsilon_claimed`` is ``inf`` for non-private training.

    ``epsilon_ceiling`` is the ε_lower that r correct guesses out of r would give: the
    most this game can ever show.
    """

    canary: str
    epsilon_lower: float
    epsilon_claimed: float
    epsilon_ceiling: float
    correct: int
    guesses: int
    canaries: int
    auroc: float
    tpr: float
    fpr: float
    tpr_lower: float
    fpr_upper: float
    epsilon_lower_tpr_fpr: float
    steps: int
    sample_rate: float
    site: str
    scores_in: list[float]
    scores_out: list[float]
    config: dict

    @property
    def violated(self) -> bool:
        """True when the lower bound exceeds the claim: the claim is false."""
        return self.epsilon_lower > self.epsilon_claimed

    def to_json(self) -> dict:
        d = asdict(self)
        d["violated"] = self.violated
        d["statement"] = STATEMENT
        if d["epsilon_claimed"] == float("inf"):
            d["epsilon_claimed"] = None  # JSON has no infinity; null = no claim
        return d


def broken_dp_request(broken: str, sigma: float, clip: float) -> DPRequest:
    """σ and C handed to Opacus for the configured ``sigma`` and ``clip`` under
    ``broken`` (see the module docstring); ``none``: exactly those."""
    if broken == "noise-zero":
        return DPRequest(noise_multiplier=1e-12, max_grad_norm=clip)
    if broken == "no-clip":
        return DPRequest(noise_multiplier=sigma * clip / _NO_CLIP_NORM,
                         max_grad_norm=_NO_CLIP_NORM)
    return DPRequest(noise_multiplier=sigma, max_grad_norm=clip)
