"""One-run empirical privacy audit of a site's real training path.

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
  ``poisson_sampling=False``, swapped in for ``client.train.make_private`` during the
  audit only), while the claim still assumes amplification by Poisson sampling.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from fedadapt.client.budget import planned_round
from fedadapt.client.site import Site, site_from_context
from fedadapt.client.train import resolve_device, train
from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model
from fedadapt.privacy import canaries as cn
from fedadapt.privacy.accounting import ACCOUNTANTS, Mechanism, epsilon
from fedadapt.privacy.audit_bounds import auroc, one_run_epsilon_lower, tpr_fpr_epsilon_lower
from fedadapt.privacy.dp import DPRequest
from fedadapt.privacy.guard import TrainRequest, check, noise_for_target
from fedadapt.privacy.policy import SitePolicy, load_policy
from fedadapt.strategies.factory import freezes_lora_a

BROKEN = ("none", "noise-zero", "no-clip", "fixed-batch")
_NO_CLIP_NORM = 1e6
_INPUT_CANARIES = 128  # default m for input-space canaries
_SITE_TOML = "site.toml"  # a deployed site's own file (deploy.site_config.SITE_TOML)

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


def for_site(run: RunConfig, *, site_dir: str | Path | None = None, **audit: object
             ) -> AuditConfig:
    """The audit of the site that ``run`` (and, if given, its folder) describes.

    With ``site_dir``, the site is resolved as the ClientApp resolves it (its
    ``site.toml`` when one exists, else simulated site ``partition_id``), and the claim
    follows its ``policy.toml``: δ and accountant as in its ledger, σ raised to its
    per-round ε target, and a round its budget guard would refuse (σ below the floor, C
    outside the range, ε past the cap) is an error. Without it, δ is the run config's and
    the accountant RDP.

    Raises:
        ValueError: On a missing site folder or a missing/invalid policy.
    """
    if not site_dir:
        return AuditConfig(run=run, delta=run.delta, **audit)  # type: ignore[arg-type]
    folder = Path(site_dir)
    if not folder.is_dir():
        raise ValueError(f"site folder {folder} does not exist; pass the folder that holds "
                         f"the site's policy.toml and ledger/ (node-config "
                         f"'{keys.NODE_SITE_DIR}')")
    cfg = AuditConfig(run=run, site_dir=str(folder), **audit)  # type: ignore[arg-type]
    policy = load_policy(folder / "policy.toml", n_records=len(_site(cfg).datasets()[0]))
    return replace(cfg, policy=policy, delta=policy.delta, accountant=policy.accountant)


def _site(cfg: AuditConfig) -> Site:
    node: dict[str, object] = {}
    deployed = bool(cfg.site_dir) and (Path(cfg.site_dir) / _SITE_TOML).is_file()
    if cfg.site_dir:
        node[keys.NODE_SITE_DIR] = cfg.site_dir
    if cfg.partition_id is not None or not deployed:  # a site.toml names its own partition
        node[keys.NODE_PARTITION_ID] = cfg.partition_id or 0
        node[keys.NODE_NUM_PARTITIONS] = cfg.run.num_sites
    return site_from_context(cfg.run.to_mapping(), node)


def _site_sigma(cfg: AuditConfig, n: int) -> float:
    """σ the site would train with: the run's, checked against the site's guard round by
    round (and raised to the policy's per-round ε target, as the ClientApp does)."""
    run, policy = cfg.run, cfg.policy
    if policy is None:
        return run.noise_multiplier
    q, steps = planned_round(n, batch_size=run.batch_size, epochs=run.local_epochs)
    sigma = run.noise_multiplier if run.dp else 0.0
    if run.dp and policy.target_epsilon_per_round > 0:  # as client.app.handle_train
        sigma = max(sigma, noise_for_target(policy.target_epsilon_per_round,
                                            delta=policy.delta, sample_rate=q,
                                            steps=steps, accountant=policy.accountant))
    history: list[Mechanism] = []
    for rnd in range(1, run.num_server_rounds + 1):
        decision = check(policy, history, TrainRequest(sigma, run.max_grad_norm, q, steps),
                         rounds_this_run=rnd - 1)
        if not decision.allowed:
            raise ValueError(f"the site's policy {Path(cfg.site_dir) / 'policy.toml'} would "
                             f"refuse round {rnd} of this run config ({decision.reason}); "
                             f"audit a run the site accepts (--run-config "
                             f"noise-multiplier=..., num-server-rounds=..., ...)")
        if sigma > 0:
            history.append(Mechanism(sigma, q, steps))
    return sigma


@contextmanager
def _fixed_batches() -> Iterator[None]:
    """Swap ``client.train``'s ``make_private`` for one without Poisson sampling."""
    import fedadapt.client.train as site_train

    real = site_train.make_private

    def fixed(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *,
              request: DPRequest, generator: torch.Generator):  # type: ignore[no-untyped-def]
        return PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=request.noise_multiplier, max_grad_norm=request.max_grad_norm,
            poisson_sampling=False, noise_generator=generator)

    site_train.make_private = fixed  # type: ignore[assignment]
    try:
        yield
    finally:
        site_train.make_private = real


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


def _dp_request(cfg: AuditConfig, sigma: float) -> DPRequest | None:
    run = cfg.run
    if not run.dp:
        return None
    if cfg.broken == "noise-zero":
        return DPRequest(noise_multiplier=1e-12, max_grad_norm=run.max_grad_norm)
    if cfg.broken == "no-clip":
        return DPRequest(noise_multiplier=sigma * run.max_grad_norm / _NO_CLIP_NORM,
                         max_grad_norm=_NO_CLIP_NORM)
    return DPRequest(noise_multiplier=sigma, max_grad_norm=run.max_grad_norm)


def run_audit(cfg: AuditConfig) -> AuditResult:
    """Run the one-run canary audit of ``cfg`` and return the bounds.

    Args:
        cfg: The scenario (see ``for_site``).

    Raises:
        ValueError: If the canaries do not fit the model or the guesses exceed them.
    """
    site = _site(cfg)
    run = site.run  # a deployed site's device is its own
    spec = site.model_spec()
    real, _ = site.datasets()
    # Dirac default: the half of the head's slots that public images use least.
    m = cfg.canaries or (cn.dirac_capacity(spec) // 2 if cfg.canary == "dirac"
                         else _INPUT_CANARIES)
    r = cfg.guesses or max(2, m // 4 * 2)  # default: guess on half, abstain in between
    if r > m:
        raise ValueError(f"guesses ({r}) exceed canaries ({m}); use --guesses <= {m}")
    if cfg.canary == "dirac" and m > cn.dirac_capacity(spec):
        raise ValueError(f"{m} Dirac canaries do not fit: the head of this model holds at "
                         f"most {cn.dirac_capacity(spec)} orthogonal ones; use --canaries "
                         f"2..{cn.dirac_capacity(spec)}")
    rng = np.random.default_rng([run.seed, 31337])
    included = rng.random(m) < 0.5  # each canary in with probability 1/2, independently
    sigma = _site_sigma(cfg, len(real) + int(included.sum()))  # the site's guard, first

    model = build_model(spec)  # the initial global model the server sends
    basis = cn.public_feature_basis(model, spec)[0] if cfg.canary == "dirac" else None
    canaries = cn.make_canaries(cfg.canary, m, spec, seed=run.seed, basis=basis,
                                norm=cfg.canary_scale * run.max_grad_norm)
    data = ConcatDataset([real, canaries.subset(torch.from_numpy(np.flatnonzero(included)))])
    if freezes_lora_a(run.strategy):  # as the ClientApp does for FFA-LoRA
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    w0 = cn.head_weight(model)
    before = cn.canary_losses(model, canaries) if cfg.canary == "input" else None
    request = _dp_request(cfg, sigma)
    device = resolve_device(run.device)
    mu = run.proximal_mu if run.strategy == "fedprox" else 0.0
    history: list[Mechanism] = []
    steps, q = 0, 0.0
    for rnd in range(1, run.num_server_rounds + 1):
        hooks = cn.dirac_hooks(model, canaries) if cfg.canary == "dirac" else nullcontext()
        wiring = _fixed_batches() if cfg.broken == "fixed-batch" else nullcontext()
        with hooks, wiring:  # same seed expression as client.app.handle_train
            res = train(model, data, epochs=run.local_epochs, lr=run.lr,
                        batch_size=run.batch_size, device=device,
                        seed=hash((run.seed, site.index, rnd)) % 2**31, dp=request,
                        amp=run.amp, proximal_mu=mu)
        steps, q = steps + res.steps, res.sample_rate
        if run.dp:  # the ledger's claim: the configured σ, the q and steps actually run
            history.append(Mechanism(sigma, res.sample_rate, res.steps))
    model.to("cpu")
    if cfg.canary == "dirac":
        scores = cn.dirac_scores(w0, cn.head_weight(model), canaries)
    else:
        assert before is not None
        scores = cn.center_by_label(before - cn.canary_losses(model, canaries),
                                    canaries.data.tensors[1])

    order = np.argsort(-scores, kind="stable")
    half = r // 2
    correct = int(included[order[:half]].sum() + (~included[order[-half:]]).sum())
    eps_lower = one_run_epsilon_lower(m, r, correct, delta=cfg.delta, confidence=cfg.confidence)
    ceiling = one_run_epsilon_lower(m, r, r, delta=cfg.delta, confidence=cfg.confidence)
    eps_claimed = (epsilon(history, delta=cfg.delta, accountant=cfg.accountant) if run.dp
                   else float("inf"))
    s_in, s_out = scores[included].tolist(), scores[~included].tolist()
    # Threshold at the r/2-th highest score: the same "included" guesses as above.
    thr = tpr_fpr_epsilon_lower(s_in, s_out, threshold=float(scores[order[half - 1]]),
                                delta=cfg.delta, confidence=cfg.confidence)
    conf = asdict(cfg)
    conf["run"] = run.to_mapping()
    conf["noise_multiplier_used"] = sigma
    return AuditResult(canary=cfg.canary, epsilon_lower=eps_lower, epsilon_claimed=eps_claimed,
                       epsilon_ceiling=ceiling, correct=correct, guesses=r, canaries=m,
                       auroc=auroc(s_in, s_out), tpr=thr.tpr, fpr=thr.fpr,
                       tpr_lower=thr.tpr_lower, fpr_upper=thr.fpr_upper,
                       epsilon_lower_tpr_fpr=thr.epsilon_lower, steps=steps, sample_rate=q,
                       site=site.name, scores_in=s_in, scores_out=s_out, config=conf)

