"""SCAFFOLD: FedAvg with control variates that correct client drift.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, with its option II control variates, computed by the server from what it
receives anyway. Each site ``i`` adds ``c − c_i`` to every local gradient step
(``client.train.train``'s ``grad_correction``); after the round the server sets

    c_i ← c_i − c + (x − y_i) / (lr · ‖a(τ_i)‖₁),      c ← Σ_j p_j c_j,

with ``x`` the adapter the site received, ``y_i`` the one it sent back, ``τ_i`` its local
steps and ``p_j`` the sites' shares of the training records. The sites train with SGD
*with momentum*, so ``lr · τ_i`` of the paper becomes ``lr · ‖a(τ_i)‖₁``, the distance
``τ_i`` heavy-ball steps move on a constant gradient (the normaliser of FedNova, Wang et
al., NeurIPS 2020); with the paper's plain ``τ_i`` the variates overshoot by up to
``1 / (1 − ρ)`` and training diverged on Br35H (BENCHMARKS.md).

Privacy: ``c − c_i`` is computed from earlier released updates only, and the site adds
it to its (Opacus-noised) gradient outside clipping and noise: post-processing, no
privacy cost. Nothing new leaves a site: the uplink is FedAvg's. The server keeps the
variates (by site name) and sends each site its own correction, so the downlink doubles.
A site that stops training (its budget spent) keeps its last ``c_i`` in ``c``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedadapt import keys
from fedadapt.names import SGD_MOMENTUM
from fedadapt.strategies import lora_math, wire
from fedadapt.strategies.adapter import AdapterAggregation

State = dict[str, torch.Tensor]


def momentum_norm(steps: int, momentum: float = SGD_MOMENTUM) -> float:
    """``‖a‖₁ = Σ_{t=1..τ} (1 − ρ^t) / (1 − ρ)``: ``τ`` steps of SGD with heavy-ball
    momentum ``ρ`` (PyTorch's ``buf ← ρ·buf + g``, ``w ← w − lr·buf``) move the weights by
    ``lr · ‖a‖₁ · g`` on a constant gradient ``g`` (FedNova, Wang et al. NeurIPS 2020).

    Raises:
        ValueError: If ``steps < 1`` or ``momentum`` is not in [0, 1).
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum} must be in [0, 1)")
    if momentum == 0.0:
        return float(steps)
    return (steps - momentum * (1 - momentum ** steps) / (1 - momentum)) / (1 - momentum)


def site_variate(applied: State | None, sent: State, trained: State, *, lr: float,
                 steps: int, momentum: float = SGD_MOMENTUM) -> State:
    """SCAFFOLD option II: ``c_i⁺ = (x − y_i) / (lr · ‖a(τ_i)‖₁) − d_i``.

    ``d_i`` is the correction the site actually applied (``c − c_i`` as it arrived, after
    the wire's rounding; zero when none was sent). With ``d_i = c − c_i`` this is the
    paper's ``c_i − c + (x − y_i) / (K·lr)``: the mean gradient the site followed, minus
    the correction it was told to add.

    Args:
        applied: ``d_i`` (None: no correction was sent, a site's first round).
        sent: ``x``, the tensors the site received.
        trained: ``y_i``, the tensors it sent back.
        lr: The sites' learning rate.
        steps: ``τ_i``, its optimiser steps this round.
        momentum: The sites' SGD momentum.
    """
    scale = 1.0 / (lr * momentum_norm(steps, momentum))
    out = {}
    for name, x in sent.items():
        v = (x - trained[name]) * scale
        out[name] = v - applied[name] if applied is not None else v
    return out


def correction(c: State, own: State | None) -> State:
    """``c − c_i``, the term a site adds to each gradient step."""
    return {n: t - own[n] for n, t in c.items()} if own is not None else dict(c)


class Scaffold(AdapterAggregation):
    """FedAvg's weighted mean plus SCAFFOLD control variates (module docstring).

    The variates are kept by site name (the reply's ``site-id``), so a site that comes
    back under another node id (a restart, a resumed run) keeps its own; until it has
    replied under the new id it is sent ``c`` alone (``c_i = 0``), and the correction it
    was sent is what its next variate subtracts.

    Args:
        lr: The sites' learning rate (the run config's ``lr``).
        rank: The run's LoRA rank: a reply trained at another rank (a deployed site's
            own ``lora_rank``) is averaged but moves no variate.
        momentum: The sites' SGD momentum.
        wire_dtype: The run's ``wire-dtype``: the variates use what the sites received,
            and each correction travels in it.
        **fedavg: Passed to Flower's ``FedAvg``.

    Attributes:
        c: The server's variate (empty before the first aggregation).
        site_c: Each site's variate ``c_i``, by site name.
        site_n: Each site's last number of training records, by site name (weights of c).
        node_site: The site name each node id last replied under.
        skipped: Per round, the sites whose reply moved no variate, and why.
    """

    def __init__(self, *, lr: float, rank: int = 8, momentum: float = SGD_MOMENTUM,
                 wire_dtype: str = "float32", **fedavg) -> None:
        if not lr > 0:
            raise ValueError(f"lr={lr} must be > 0")
        super().__init__("mean", rank=rank, **fedavg)
        self.lr, self.momentum, self.wire_dtype = lr, momentum, wire_dtype
        self.c: State = {}
        self.site_c: dict[str, State] = {}
        self.site_n: dict[str, float] = {}
        self.node_site: dict[int, str] = {}
        self.skipped: dict[int, list[dict[str, str]]] = {}
        self._sent: State = {}
        self._applied: dict[int, State] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's train messages, each with its site's correction once there is one."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = wire.decode(wire.encode(arrays, self.wire_dtype))  # what sites get
        self._applied = {}
        if self.c:
            for m in messages:  # Flower's messages share one RecordDict: give each its own
                node = m.metadata.dst_node_id
                own = self.site_c.get(self.node_site.get(node, ""))
                rec = wire.encode(correction(self.c, own), self.wire_dtype)
                self._applied[node] = wire.decode(rec)  # as the site will apply it
                m.content = RecordDict({**dict(m.content), keys.SCAFFOLD_CORRECTION: rec})
        return messages

    def _variate_problem(self, metrics: Mapping[str, Any]) -> str | None:
        steps, rank = metrics.get(keys.STEPS), metrics.get(keys.LORA_RANK, self.rank)
        if not isinstance(steps, int) or steps < 1:
            return f"'{keys.STEPS}' must be an integer >= 1, got {steps!r}"
        if rank != self.rank:
            return f"trained at LoRA rank {rank}, not the run's {self.rank}"
        return None

    def aggregate_valid(self, server_round: int, valid: list[Message]
                        ) -> tuple[ArrayRecord, MetricRecord | None]:
        """The weighted mean; then each replying site's ``c_i`` and the server's ``c``."""
        agg, metrics = super().aggregate_valid(server_round, valid)
        for m in valid:
            node, content = m.metadata.src_node_id, m.content
            site = str(content[keys.STATUS][keys.SITE_ID])
            problem = self._variate_problem(content[keys.METRICS])
            if problem is not None:  # averaged like any reply, but no variate from it
                self.skipped.setdefault(server_round, []).append(
                    {"site": site, "reason": problem})
                continue
            self.node_site[node] = site
            self.site_c[site] = site_variate(
                self._applied.get(node), self._sent,
                content[self.arrayrecord_key].to_torch_state_dict(), lr=self.lr,
                steps=int(content[keys.METRICS][keys.STEPS]), momentum=self.momentum)
            self.site_n[site] = float(content[keys.METRICS][self.weighted_by_key])
        names = sorted(self.site_c)
        if names:
            self.c = lora_math.weighted_mean([self.site_c[n] for n in names],
                                             [self.site_n[n] for n in names])
        return agg, metrics


def received_correction(msg: Message) -> State | None:
    """The float32 correction a train message carries (``scaffold``), or None."""
    rec = msg.content.array_records.get(keys.SCAFFOLD_CORRECTION)
    return None if rec is None else wire.decode(rec)
