"""One-run empirical privacy audit of a site's real training path.

Steinke, Nasr & Jagielski (NeurIPS 2023, "Privacy auditing with one (1) training run"):
m canaries are each included in the site's training data independently with
probability 1/2; the site trains through ``client.train.train`` (the same PEFT LoRA
model from ``fedimaging.backbones.build_model``, the same Opacus wiring in
``privacy.dp.make_private`` with Poisson sampling) for the audit's rounds; the auditor
scores every canary, guesses "included" for the r/2 highest and "excluded" for the
r/2 lowest scores, and ``privacy.audit_bounds`` turns the number of correct guesses
into an ε lower bound. ε_claimed is ``privacy.accounting.epsilon`` over the mechanisms
the training reported (σ as configured, q and steps as run).

Canaries are *input-space, black-box* canaries: images of i.i.d. Gaussian noise with a
uniformly random label (they are out of distribution, so only the canary's own
gradient teaches the model its label). A canary's score is its loss decrease,
loss(initial model) − loss(trained model), on its own label.

``broken`` emulates wiring bugs without touching the training code, while ε_claimed is
still computed from the configured σ:

* ``noise-zero``: the noise multiplier actually used is 1e-12 (``DPRequest`` refuses an
  exact 0 — it fails closed), i.e. no noise.
* ``no-clip``: clipping is off: Opacus gets C' = 1e6 and σ' = σ·C/C', so the noise
  std σ'·C' equals the configured σ·C but no per-sample gradient is ever clipped.

A single site's round is local training followed by FedAvg over one client, which is the
identity; the audit therefore calls the site training function once per round without
the Flower transport.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, TensorDataset

from client.train import train
from fedimaging.backbones import ModelSpec, build_model
from fedimaging.synthetic import SiteSpec, ScannerShift, make_site_data
from privacy.accounting import Mechanism, epsilon
from privacy.audit_bounds import auroc, one_run_epsilon_lower, tpr_fpr_epsilon_lower
from privacy.dp import DPRequest

BROKEN = ("none", "noise-zero", "no-clip")
Broken = Literal["none", "noise-zero", "no-clip"]
_NO_CLIP_NORM = 1e6

#: What the bound proves and does not prove (printed by the CLI and stored in JSON).
STATEMENT = (
    "ε_lower is a statistical LOWER bound: with probability ≥ the confidence, the "
    "training path that ran is NOT (ε, δ)-DP for any ε < ε_lower. If ε_lower > "
    "ε_claimed, the claim is false for this code path (a bug report). ε_lower ≤ "
    "ε_claimed does NOT prove the claim: one-run audits with black-box input canaries "
    "are far from tight, and the audit tests only this scenario (its model, data, "
    "canaries, rounds and hyper-parameters), not the worst case.")


@dataclass(frozen=True)
class AuditConfig:
    """The audit's scenario.

    Attributes:
        canaries: m, canaries each included with probability 1/2.
        guesses: r, guesses made (half "included", half "excluded"); ≤ canaries.
        confidence: Confidence of the lower bounds.
        rounds: Rounds of local training at the audited site.
        dp: Audit DP-SGD training; False audits non-private training (power check).
        broken: ``none`` | ``noise-zero`` | ``no-clip`` (see the module docstring).
        noise_multiplier: Configured σ; max_grad_norm: configured C; delta: δ.
        train_size: Real (synthetic-hospital) records besides the canaries.
        local_epochs, lr, batch_size: Site training hyper-parameters.
        model: The model spec (a small one by default so the audit runs on a CPU).
        seed: Seeds data, canaries, inclusion and training.
    """

    canaries: int = 128
    guesses: int = 40
    confidence: float = 0.95
    rounds: int = 1
    dp: bool = True
    broken: str = "none"
    noise_multiplier: float = 40.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    train_size: int = 16
    local_epochs: int = 60
    lr: float = 0.1
    batch_size: int = 16
    model: ModelSpec = field(default_factory=lambda: ModelSpec(
        image_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2,
        num_classes=3, lora_rank=4, lora_alpha=8, seed=0))
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, value: object, fix: str) -> None:
            if not ok:
                raise ValueError(f"audit {name}={value!r} is invalid: {fix}")
        need(self.canaries >= 2, "canaries", self.canaries, "use at least 2 canaries")
        need(2 <= self.guesses <= self.canaries and self.guesses % 2 == 0, "guesses",
             self.guesses, f"use an even number in 2..{self.canaries}")
        need(0 < self.confidence < 1, "confidence", self.confidence, "use a value in (0, 1)")
        need(self.rounds >= 1, "rounds", self.rounds, "use at least 1 round")
        need(self.broken in BROKEN, "broken", self.broken, f"use one of {BROKEN}")
        need(self.dp or self.broken == "none", "broken", self.broken,
             "broken wiring only applies to DP training; drop --no-dp or use none")
        need(self.noise_multiplier > 0 or not self.dp, "noise_multiplier",
             self.noise_multiplier, "use σ > 0 (or audit non-private training)")
        need(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "use C > 0")
        need(0 < self.delta < 1, "delta", self.delta, "use a value in (0, 1)")


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit. ``epsilon_claimed`` is ``inf`` for non-private training."""

    epsilon_lower: float
    epsilon_claimed: float
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


def make_canaries(m: int, spec: ModelSpec, seed: int) -> TensorDataset:
    """m Gaussian-noise images (1, H, W) with uniformly random labels."""
    g = torch.Generator().manual_seed(seed + 7919)
    x = torch.randn(m, 1, spec.image_size, spec.image_size, generator=g)
    y = torch.randint(0, spec.num_classes, (m,), generator=g)
    return TensorDataset(x, y)


@torch.no_grad()
def _canary_losses(model: nn.Module, canaries: TensorDataset) -> np.ndarray:
    model.eval()
    x, y = canaries.tensors
    loss = nn.functional.cross_entropy(model(x), y, reduction="none")
    model.train()
    return loss.numpy().astype(np.float64)


def _center_by_label(delta_loss: np.ndarray, labels: torch.Tensor) -> np.ndarray:
    """Subtract each label's median loss decrease: training moves all noise images of a
    label together (they share a common feature offset); what is left is the part of a
    canary's loss decrease that is its own. Uses no inclusion information."""
    y = labels.numpy()
    out = delta_loss.copy()
    for c in np.unique(y):
        out[y == c] -= np.median(delta_loss[y == c])
    return out


def _dp_request(cfg: AuditConfig) -> DPRequest | None:
    if not cfg.dp:
        return None
    if cfg.broken == "noise-zero":
        return DPRequest(noise_multiplier=1e-12, max_grad_norm=cfg.max_grad_norm)
    if cfg.broken == "no-clip":
        return DPRequest(noise_multiplier=cfg.noise_multiplier * cfg.max_grad_norm
                         / _NO_CLIP_NORM, max_grad_norm=_NO_CLIP_NORM)
    return DPRequest(noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm)


def run_audit(cfg: AuditConfig, *, device: torch.device | None = None) -> AuditResult:
    """Run the one-run canary audit of ``cfg`` and return the bounds.

    Args:
        cfg: The scenario.
        device: Where to train (CPU by default).
    """
    device = device or torch.device("cpu")
    spec = cfg.model
    site = SiteSpec("audited-site", cfg.train_size, 16, ScannerShift())
    real, _ = make_site_data(site, image_size=spec.image_size, num_classes=spec.num_classes,
                             seed=cfg.seed, site_index=0)
    canaries = make_canaries(cfg.canaries, spec, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 31337])
    included = rng.random(cfg.canaries) < 0.5
    idx = torch.from_numpy(np.flatnonzero(included))
    inserted = TensorDataset(canaries.tensors[0][idx], canaries.tensors[1][idx])
    data = ConcatDataset([real, inserted])

    model = build_model(spec)
    before = _canary_losses(model, canaries)
    request = _dp_request(cfg)
    history: list[Mechanism] = []
    steps, q = 0, 0.0
    for rnd in range(cfg.rounds):
        res = train(model, data, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                    device=device, seed=cfg.seed * 1000 + rnd, dp=request)
        model.to("cpu")
        steps, q = steps + res.steps, res.sample_rate
        if cfg.dp:  # the ledger's claim: the configured σ, the q and steps actually run
            history.append(Mechanism(cfg.noise_multiplier, res.sample_rate, res.steps))
    scores = _center_by_label(before - _canary_losses(model, canaries), canaries.tensors[1])

    order = np.argsort(-scores, kind="stable")
    half = cfg.guesses // 2
    correct = int(included[order[:half]].sum() + (~included[order[-half:]]).sum())
    eps_lower = one_run_epsilon_lower(cfg.canaries, cfg.guesses, correct, delta=cfg.delta,
                                      confidence=cfg.confidence)
    eps_claimed = epsilon(history, delta=cfg.delta) if cfg.dp else float("inf")
    s_in, s_out = scores[included].tolist(), scores[~included].tolist()
    # Threshold at the r/2-th highest score: the same "included" guesses as above.
    thr = tpr_fpr_epsilon_lower(s_in, s_out, threshold=float(scores[order[half - 1]]),
                                delta=cfg.delta, confidence=cfg.confidence)
    conf = asdict(cfg)
    return AuditResult(epsilon_lower=eps_lower, epsilon_claimed=eps_claimed, correct=correct,
                       guesses=cfg.guesses, canaries=cfg.canaries, auroc=auroc(s_in, s_out),
                       tpr=thr.tpr, fpr=thr.fpr, tpr_lower=thr.tpr_lower,
                       fpr_upper=thr.fpr_upper, epsilon_lower_tpr_fpr=thr.epsilon_lower,
                       steps=steps, sample_rate=q, scores_in=s_in, scores_out=s_out,
                       config=conf)
