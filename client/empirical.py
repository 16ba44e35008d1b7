"""The empirical privacy audit of a site, run through the site's own round.

Steinke, Nasr & Jagielski (NeurIPS 2023, "Privacy auditing with one (1) training run"):
the canary game of :mod:`privacy.empirical`, played on the path a federation runs — each
round is :func:`client.site_round.site_round` (the site's σ for its per-round ε target,
FFA-LoRA freezing, per-round seeds, FedProx step, Opacus wiring), with the site's data
plus the included canaries. The audit spends nothing of the site's budget: its rounds
are charged to no ledger; the site's guard is checked up front, round by round, on the
audit's own history. ``--broken`` modes are passed to the round as its DP request and
wiring, never patched in.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from fedadapt import keys
from fedadapt.client.site import Site, site_from_context
from fedadapt.client.site_round import Trained, freeze_lora_a, plan_round, site_round
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model
from fedadapt.layout import policy_path, site_toml_path
from fedadapt.messages import TrainConfig
from fedadapt.privacy import canaries as cn
from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.audit_bounds import auroc, one_run_epsilon_lower, tpr_fpr_epsilon_lower
from fedadapt.privacy.dp import make_private
from fedadapt.privacy.empirical import (INPUT_CANARIES, AuditConfig, AuditResult,
                                        broken_dp_request, fixed_batches)
from fedadapt.privacy.guard import check
from fedadapt.privacy.policy import load_policy
from fedadapt.strategies.factory import freezes_lora_a

__all__ = ["for_site", "run_audit"]


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
    policy = load_policy(policy_path(folder), n_records=len(_site(cfg).datasets()[0]))
    return replace(cfg, policy=policy, delta=policy.delta, accountant=policy.accountant)


def _site(cfg: AuditConfig) -> Site:
    node: dict[str, object] = {}
    deployed = bool(cfg.site_dir) and site_toml_path(cfg.site_dir).is_file()
    if cfg.site_dir:
        node[keys.NODE_SITE_DIR] = cfg.site_dir
    if cfg.partition_id is not None or not deployed:  # a site.toml names its own partition
        node[keys.NODE_PARTITION_ID] = cfg.partition_id or 0
        node[keys.NODE_NUM_PARTITIONS] = cfg.run.num_sites
    return site_from_context(cfg.run.to_mapping(), node)


def _train_config(run: RunConfig, rnd: int) -> TrainConfig:
    """What the server would send the site in round ``rnd`` of ``run``."""
    return TrainConfig(server_round=rnd, local_epochs=run.local_epochs, lr=run.lr,
                       batch_size=run.batch_size, dp_enabled=run.dp,
                       noise_multiplier=run.noise_multiplier, max_grad_norm=run.max_grad_norm,
                       freeze_lora_a=freezes_lora_a(run.strategy), wire_dtype=run.wire_dtype,
                       proximal_mu=run.proximal_mu if run.strategy == "fedprox" else 0.0)


def _site_sigma(cfg: AuditConfig, n: int) -> float:
    """σ the site would train with (:func:`client.site_round.plan_round`), checked against
    the site's guard round by round, before anything is trained."""
    run, policy = cfg.run, cfg.policy
    if policy is None:
        return run.noise_multiplier
    request = plan_round(n, _train_config(run, 1), policy)
    history: list[Mechanism] = []
    for rnd in range(1, run.num_server_rounds + 1):
        decision = check(policy, history, request, rounds_this_run=rnd - 1)
        if not decision.allowed:
            raise ValueError(f"the site's policy {policy_path(cfg.site_dir)} would "
                             f"refuse round {rnd} of this run config ({decision.reason}); "
                             f"audit a run the site accepts (--run-config "
                             f"noise-multiplier=..., num-server-rounds=..., ...)")
        if request.noise_multiplier > 0:
            history.append(Mechanism(request.noise_multiplier, request.sample_rate,
                                     request.steps))
    return request.noise_multiplier


def _canary_count(cfg: AuditConfig, spec: object) -> tuple[int, int]:
    """``(m, r)``: canaries and guesses (defaults: see :class:`AuditConfig`)."""
    m = cfg.canaries or (cn.dirac_capacity(spec) // 2 if cfg.canary == "dirac"
                         else INPUT_CANARIES)
    r = cfg.guesses or max(2, m // 4 * 2)  # default: guess on half, abstain in between
    if r > m:
        raise ValueError(f"guesses ({r}) exceed canaries ({m}); use --guesses <= {m}")
    if cfg.canary == "dirac" and m > cn.dirac_capacity(spec):
        raise ValueError(f"{m} Dirac canaries do not fit: the head of this model holds at "
                         f"most {cn.dirac_capacity(spec)} orthogonal ones; use --canaries "
                         f"2..{cn.dirac_capacity(spec)}")
    return m, r


def _train_rounds(cfg: AuditConfig, site: Site, model: torch.nn.Module, data: ConcatDataset,
                  canaries: cn.Canaries, sigma: float) -> tuple[list[Mechanism], int, float]:
    """The run's rounds through the site's own round; the claim's mechanisms (the
    configured σ, the q and steps actually run), total steps and the last q."""
    run = site.run
    wiring = fixed_batches if cfg.broken == "fixed-batch" else make_private
    history: list[Mechanism] = []
    steps, q = 0, 0.0
    for rnd in range(1, run.num_server_rounds + 1):
        tc = replace(_train_config(run, rnd), noise_multiplier=sigma)
        hooks = cn.dirac_hooks(model, canaries) if cfg.canary == "dirac" else nullcontext()
        with hooks:
            # σ is the site's already (policy=None: not raised again to its target).
            out = site_round(site, model, data, tc, budgets=(), policy=None,
                             run_id="audit", wiring=wiring,
                             dp_request=lambda c, req: (broken_dp_request(
                                 cfg.broken, sigma, req.clip_norm) if c.dp_enabled else None))
        assert isinstance(out, Trained)  # no budgets: nothing refuses
        res = out.result
        steps, q = steps + res.steps, res.sample_rate
        if run.dp:  # the ledger's claim: the configured σ, the q and steps actually run
            history.append(Mechanism(sigma, res.sample_rate, res.steps))
    return history, steps, q


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
    m, r = _canary_count(cfg, spec)
    rng = np.random.default_rng([run.seed, 31337])
    included = rng.random(m) < 0.5  # each canary in with probability 1/2, independently
    sigma = _site_sigma(cfg, len(real) + int(included.sum()))  # the site's guard, first

    model = build_model(spec)  # the initial global model the server sends
    basis = cn.public_feature_basis(model, spec)[0] if cfg.canary == "dirac" else None
    canaries = cn.make_canaries(cfg.canary, m, spec, seed=run.seed, basis=basis,
                                norm=cfg.canary_scale * run.max_grad_norm)
    data = ConcatDataset([real, canaries.subset(torch.from_numpy(np.flatnonzero(included)))])
    if freezes_lora_a(run.strategy):  # as the ClientApp does for FFA-LoRA
        freeze_lora_a(model)
    w0 = cn.head_weight(model)
    before = cn.canary_losses(model, canaries) if cfg.canary == "input" else None
    history, steps, q = _train_rounds(cfg, site, model, data, canaries, sigma)
    model.to("cpu")
    if cfg.canary == "dirac":
        scores = cn.dirac_scores(w0, cn.head_weight(model), canaries)
    else:
        assert before is not None
        scores = cn.center_by_label(before - cn.canary_losses(model, canaries),
                                    canaries.data.tensors[1])
    return _result(cfg, site, scores, included, r, history, sigma, steps, q)


def _result(cfg: AuditConfig, site: Site, scores: np.ndarray, included: np.ndarray, r: int,
            history: list[Mechanism], sigma: float, steps: int, q: float) -> AuditResult:
    """Score the guesses: ε_lower from the correct ones, ε_claimed from ``history``."""
    m = len(included)
    order = np.argsort(-scores, kind="stable")
    half = r // 2
    correct = int(included[order[:half]].sum() + (~included[order[-half:]]).sum())
    eps_lower = one_run_epsilon_lower(m, r, correct, delta=cfg.delta, confidence=cfg.confidence)
    ceiling = one_run_epsilon_lower(m, r, r, delta=cfg.delta, confidence=cfg.confidence)
    eps_claimed = (epsilon(history, delta=cfg.delta, accountant=cfg.accountant) if site.run.dp
                   else float("inf"))
    s_in, s_out = scores[included].tolist(), scores[~included].tolist()
    # Threshold at the r/2-th highest score: the same "included" guesses as above.
    thr = tpr_fpr_epsilon_lower(s_in, s_out, threshold=float(scores[order[half - 1]]),
                                delta=cfg.delta, confidence=cfg.confidence)
    conf = asdict(cfg)
    conf["run"] = site.run.to_mapping()
    conf["noise_multiplier_used"] = sigma
    return AuditResult(canary=cfg.canary, epsilon_lower=eps_lower, epsilon_claimed=eps_claimed,
                       epsilon_ceiling=ceiling, correct=correct, guesses=r, canaries=m,
                       auroc=auroc(s_in, s_out), tpr=thr.tpr, fpr=thr.fpr,
                       tpr_lower=thr.tpr_lower, fpr_upper=thr.fpr_upper,
                       epsilon_lower_tpr_fpr=thr.epsilon_lower, steps=steps, sample_rate=q,
                       site=site.name, scores_in=s_in, scores_out=s_out, config=conf)
