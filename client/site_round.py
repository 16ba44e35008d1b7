"""One training round at a site, as plain code: guard → DP train → ledger record → reply state.

The ClientApp (``client.app.handle_train``) and the empirical privacy audit
(``client.empirical``) both run a site's round through :func:`site_round`, so the audit
exercises the very path a federation does: the σ the site picks for its per-round ε
target (:func:`plan_round`), FFA-LoRA freezing (:func:`freeze_lora_a`), the per-round
seed (:func:`round_seed`), the FedProx step and the Opacus wiring. What differs is
passed in, never patched: the budgets the round is charged to (the ClientApp: one per
dataset the training set draws from; the audit: none, it must not spend the site's
budget) and the DP wiring (the audit's ``--broken`` emulations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from fedadapt.client.budget import planned_round
from fedadapt.client.continual import ContinualRound
from fedadapt.client.site import Site
from fedadapt.client.train import TrainResult, resolve_device, train
from fedadapt.imaging.backbones import trainable_parameters, trainable_state
from fedadapt.imaging.tasks import task_loss
from fedadapt.messages import DriftReport, TrainConfig
from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.dp import DPRequest, Wiring, make_private
from fedadapt.privacy.guard import Decision, TrainRequest, noise_for_target
from fedadapt.privacy.policy import SitePolicy
from fedadapt.strategies.lora_math import change_rank

LORA_A_PART = ".lora_A."


class Budget(Protocol):
    """What a round is charged to (``privacy.site_budget.SiteBudget``)."""

    policy: SitePolicy

    def decide(self, request: TrainRequest, *, run_id: str) -> Decision: ...

    def record(self, request: TrainRequest, *, run_id: str, round: int) -> float: ...


def freeze_lora_a(model: nn.Module) -> None:
    """FFA-LoRA (Sun et al., ICLR 2024): A stays at the seed shared by all sites, so it is
    neither trained nor sent, and averaging B alone is exact."""
    for name, p in model.named_parameters():
        if LORA_A_PART in name:
            p.requires_grad_(False)


def round_seed(seed: int, site_index: int, rnd: int) -> int:
    """The seed of a site's round (shuffling / Poisson sampling; +1 for the DP noise)."""
    return hash((seed, site_index, rnd)) % 2**31


def plan_round(num_records: int, cfg: TrainConfig, policy: SitePolicy | None) -> TrainRequest:
    """The mechanism the round will run, known before training: σ (the server's, raised
    to the policy's per-round and per-run ε targets — never less than asked), C, q and
    steps. The per-run target prices ``max_rounds_per_run`` rounds of this round's
    mechanism as one of ``rounds × steps`` steps (RDP / PRV composition of identical
    rounds), so each site's σ fits its own q."""
    q, steps = planned_round(num_records, batch_size=cfg.batch_size, epochs=cfg.local_epochs)
    sigma = cfg.noise_multiplier if cfg.dp_enabled else 0.0
    if not cfg.dp_enabled or policy is None:
        return TrainRequest(sigma, cfg.max_grad_norm, q, steps)
    for target, n_steps in ((policy.target_epsilon_per_round, steps),
                            (policy.target_epsilon_per_run,
                             steps * policy.max_rounds_per_run)):
        if target > 0:
            sigma = max(sigma, noise_for_target(target, delta=policy.delta, sample_rate=q,
                                                steps=n_steps, accountant=policy.accountant))
    return TrainRequest(sigma, cfg.max_grad_norm, q, steps)


@dataclass(frozen=True)
class Refused:
    """The guard of one of the round's budgets refused it; nothing was trained."""

    decision: Decision
    cap: float


@dataclass(frozen=True)
class Trained:
    """A trained round.

    Attributes:
        result: What training reported.
        request: The mechanism the guard priced and the ledgers recorded.
        epsilon: Total ε of the site's ledgers after the round (the largest; 0 without
            DP or without budgets).
        epsilon_round: ε of this round alone (0 without DP or without budgets).
        state: The trained tensors at the global rank (the reply's).
        drift: The drift monitor's report on the received model, or None without one.
    """

    result: TrainResult
    request: TrainRequest
    epsilon: float
    epsilon_round: float
    state: dict[str, torch.Tensor]
    drift: DriftReport | None = None


def _dp(cfg: TrainConfig, request: TrainRequest) -> DPRequest | None:
    return DPRequest(request.noise_multiplier, request.clip_norm) if cfg.dp_enabled else None


def site_round(site: Site, model: nn.Module, train_set: Dataset, cfg: TrainConfig, *,
               budgets: Sequence[Budget], policy: SitePolicy | None, run_id: str,
               hooks: ContinualRound | None = None,
               dp_request: Callable[[TrainConfig, TrainRequest], DPRequest | None] = _dp,
               wiring: Wiring = make_private,
               monitor: Callable[[nn.Module], DriftReport] | None = None,
               correction: Mapping[str, torch.Tensor] | None = None) -> Refused | Trained:
    """Run one round of training at ``site`` on ``train_set``.

    Args:
        site: The site (its seed, index, device, task, LoRA rank).
        model: The model with the received tensors loaded (trained in place).
        train_set: The round's training records.
        cfg: The server's request.
        budgets: Charged for the round: each decides first, each records after training
            (fsync'ed) *before* the reply leaves. Empty: no guard and no ledger.
        policy: The site's policy, for σ's per-round ε target and the round's ε.
        run_id: The Flower run (the guard's rounds-per-run limit).
        hooks: The continual method's penalty / extra loss, or None.
        dp_request: σ and C handed to Opacus for the priced request (the audit's
            ``--broken`` modes pass other ones; the ledgers record ``request`` anyway).
        wiring: How Opacus is wired in (the audit's ``fixed-batch`` passes another).
        monitor: The site's drift monitor (``client.drift_monitor.monitor_round``), run
            on the received model once the guard allows the round and before training;
            None (the audit) runs none.
        correction: SCAFFOLD's ``c − c_i`` by tensor name (``strategies.scaffold``),
            added to every gradient step after DP noise; None without one.

    Raises:
        RuntimeError: If training ran another mechanism (q, steps) than the guard priced;
            the update is withheld.
        ValueError: If ``correction`` does not match the trained tensors (checked before
            the guard: nothing is spent).
    """
    pairs = correction_pairs(site, model, correction) if correction is not None else []
    request = plan_round(len(train_set), cfg, policy)  # type: ignore[arg-type]
    for budget in budgets:
        decision = budget.decide(request, run_id=run_id)
        if not decision.allowed:
            return Refused(decision, budget.policy.epsilon_cap)
    drift = monitor(model) if monitor is not None else None  # the received model, untrained
    dp = dp_request(cfg, request)
    hooks = hooks or ContinualRound(train_set)
    result = train(model, train_set, epochs=cfg.local_epochs, lr=cfg.lr,
                   batch_size=cfg.batch_size, device=resolve_device(site.run.device),
                   seed=round_seed(site.run.seed, site.index, cfg.server_round), dp=dp,
                   amp=site.run.amp, proximal_mu=cfg.proximal_mu,
                   param_penalty=hooks.param_penalty, extra_loss=hooks.extra_loss,
                   loss_fn=task_loss(site.task), wiring=wiring, grad_correction=pairs)
    eps_total = eps_round = 0.0
    if dp is not None:
        if (result.sample_rate, result.steps) != (request.sample_rate, request.steps):
            raise RuntimeError(  # the guard priced another mechanism: withhold the update
                f"site {site.name}: trained with q={result.sample_rate}, steps={result.steps} "
                f"but the budget guard priced q={request.sample_rate}, steps={request.steps}; "
                "update withheld")
        if budgets:
            eps_total = max(b.record(request, run_id=run_id, round=cfg.server_round)
                            for b in budgets)
        if policy is not None and budgets:
            eps_round = epsilon([Mechanism(request.noise_multiplier, request.sample_rate,
                                           request.steps)],
                                delta=policy.delta, accountant=policy.accountant)
    return Trained(result, request, eps_total, eps_round, reply_state(site, model), drift)


def correction_pairs(site: Site, model: nn.Module, correction: Mapping[str, torch.Tensor]
                     ) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, c − c_i)`` pairs for ``train``'s ``grad_correction``.

    Raises:
        ValueError: If the site personalises tensors (their variates are meaningless),
            or the correction's names, shapes or values do not fit the trained tensors.
    """
    where = f"site {site.name}: the server's SCAFFOLD correction"
    if site.personalised_keys:
        raise ValueError(f"{where} cannot be used: this site personalises "
                         f"{list(site.personalised_keys)}, which do not start from the global "
                         "tensors; remove personalised_keys from site.toml or ask the server "
                         "for another strategy")
    params = trainable_parameters(model)
    if set(correction) != set(params):
        diff = sorted(set(correction) ^ set(params))
        raise ValueError(f"{where} names other tensors than this site trains: {diff[:3]} "
                         f"(expected the {len(params)} trainable tensors of the run's model)")
    pairs = []
    for name, p in params.items():
        d = correction[name]
        if d.shape != p.shape or not torch.isfinite(d).all():
            raise ValueError(f"{where}: {name} has shape {tuple(d.shape)}"
                             f"{'' if torch.isfinite(d).all() else ' and non-finite values'}"
                             f", expected {tuple(p.shape)} finite values")
        pairs.append((p, d))
    return pairs


def reply_state(site: Site, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors at the global rank (zero-padded from the site's own: exact)."""
    state = trainable_state(model)
    if site.lora_rank != site.run.lora_rank:
        state, _ = change_rank(state, site.run.lora_rank, site.lora_rank)
    return state
