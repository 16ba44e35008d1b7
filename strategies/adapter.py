"""Flower strategies that aggregate LoRA adapter tensors (math in :mod:`strategies.lora_math`).

``AdapterAggregation`` subclasses Flower's ``FedAvg`` only for its ``aggregate_train``
(the natural extension point): sampling, configuration and evaluation are Flower's.
"""

from __future__ import annotations

from typing import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedadapt import keys
from fedadapt.strategies import lora_math

RULES = ("mean", "exact", "median", "trimmed-mean")


class AdapterAggregation(FedAvg):
    """FedAvg's round protocol with an adapter-aware aggregation rule.

    Rules:
        ``mean``: weighted mean of every tensor (FedAvg; exact for FFA-LoRA, Sun et al.
        ICLR 2024, where A is frozen; inexact for full LoRA).
        ``exact``: per module, ``Σ p_k B_k A_k`` re-factorised to ``rank`` by truncated
        SVD (FedEx-LoRA, Singhal et al. ACL 2025; FLoRA stacking, Wang et al. NeurIPS
        2024, gives the same product); the relative residual is kept in
        ``residuals`` (0 when the sum has rank ≤ ``rank``).
        ``median`` / ``trimmed-mean``: coordinate-wise robust rules (Yin et al. ICML 2018).

    Args:
        rule: One of :data:`RULES`.
        rank: Global LoRA rank for ``exact``.
        trim: Fraction trimmed at each end for ``trimmed-mean``.
        **fedavg: Passed to Flower's ``FedAvg``.
    """

    def __init__(self, rule: str = "mean", *, rank: int = 8, trim: float = 0.2,
                 **fedavg) -> None:
        if rule not in RULES:
            raise ValueError(f"rule={rule!r} is not one of {RULES}")
        if rank < 1:
            raise ValueError(f"rank={rank} must be ≥ 1")
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim={trim} must be in [0, 0.5)")
        super().__init__(**fedavg)
        self.rule, self.rank, self.trim = rule, rank, trim
        self.residuals: dict[int, float] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies' adapter tensors with ``self.rule``."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        return self.aggregate_valid(server_round, valid)

    def aggregate_valid(self, server_round: int, valid: list[Message]
                        ) -> tuple[ArrayRecord, MetricRecord | None]:
        """Aggregate replies Flower's checks passed (subclasses add to this step)."""
        contents = [m.content for m in valid]
        states = [c[self.arrayrecord_key].to_torch_state_dict() for c in contents]
        weights = [float(c[keys.METRICS][self.weighted_by_key]) for c in contents]
        if self.rule == "mean":
            agg = lora_math.weighted_mean(states, weights)
        elif self.rule == "median":
            agg = lora_math.median(states)
        elif self.rule == "trimmed-mean":
            agg = lora_math.trimmed_mean(states, self.trim)
        else:
            agg, resid = lora_math.exact_aggregate(states, weights, self.rank)
            self.residuals[server_round] = resid
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord(agg), metrics
