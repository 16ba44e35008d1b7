"""``build_strategy(name, cfg)``: a Flower strategy for a run, wrapped in update validation."""

from __future__ import annotations

import math

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedProx, FedYogi, Strategy

from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.strategies.adapter import AdapterAggregation
from fedadapt.strategies.names import STRATEGIES
from fedadapt.strategies.scaffold import Scaffold
from fedadapt.strategies.site_dp import SiteLevelDP
from fedadapt.strategies.validation import Validated

# Strategies whose sites keep lora_A frozen at the shared seed and send only B (+ head).
FROZEN_A = frozenset({"ffa-lora"})


def freezes_lora_a(name: str) -> bool:
    """Whether sites must freeze ``lora_A`` (FFA-LoRA, Sun et al. ICLR 2024)."""
    return name in FROZEN_A


def build_strategy(name: str, cfg: RunConfig, *, validate: bool = True) -> Strategy:
    """The strategy ``name`` (see :data:`strategies.names.STRATEGIES`) for ``cfg``.

    Args:
        name: Strategy name.
        cfg: Run config (number of sites, LoRA rank, proximal μ, server lr, wire dtype;
            the sites' lr for ``scaffold``).
        validate: Wrap in :class:`strategies.validation.Validated` (default), which
            takes replies as they came off the wire (``cfg.wire_dtype``) and hands the
            inner strategy float32 tensors.

    Raises:
        ValueError: if ``name`` is unknown.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    common: dict[str, Any] = dict(
        fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=cfg.num_sites,
        min_train_nodes=1, min_evaluate_nodes=1, arrayrecord_key=keys.ARRAYS,
        configrecord_key=keys.CONFIG, weighted_by_key=keys.NUM_EXAMPLES)
    inner: Strategy
    if name in ("fedavg", "ffa-lora"):
        inner = AdapterAggregation("mean", **common)
    elif name in ("exact", "median", "trimmed-mean"):
        inner = AdapterAggregation(name, rank=cfg.lora_rank, **common)
    elif name == "scaffold":
        inner = Scaffold(lr=cfg.lr, rank=cfg.lora_rank, wire_dtype=cfg.wire_dtype, **common)
    elif name == "fedprox":
        inner = FedProx(proximal_mu=cfg.proximal_mu, **common)
    elif name == "fedadam":
        inner = FedAdam(**common, **({"eta": cfg.server_lr} if cfg.server_lr else {}))
    else:
        inner = FedYogi(**common, **({"eta": cfg.server_lr} if cfg.server_lr else {}))
    if cfg.site_dp:
        inner = SiteLevelDP(inner, noise_multiplier=cfg.site_noise_multiplier,
                            clip_norm=cfg.site_clip_norm, num_sites=cfg.num_sites,
                            delta=cfg.delta, seed=cfg.seed)
    # Site-incremental replay mixes, by design, small rehearsal updates of earlier sites
    # with the large updates of a phase's new sites: a norm screen against the round's
    # median would reject the new sites. It is off there (the other checks stay on).
    rehearsal = cfg.scenario == "site-incremental" and cfg.continual == "replay"
    return (Validated(inner, wire_dtype=cfg.wire_dtype,
                      norm_factor=math.inf if rehearsal else 10.0) if validate else inner)
