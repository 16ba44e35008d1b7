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
variates (by node id) and sends each site its own correction, so the downlink doubles.
"""

from __future__ import annotations

from typing import Iterable

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


def site_variate(own: State | None, c: State, sent: State, trained: State, *, lr: float,
                 steps: int, momentum: float = SGD_MOMENTUM) -> State:
    """SCAFFOLD option II: ``c_i⁺ = c_i − c + (x − y_i) / (lr · ‖a(τ_i)‖₁)``.

    Args:
        own: The site's variate ``c_i`` (None: zero, a site's first round).
        c: The server's variate (empty: zero, the first round).
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
        if own is not None:
            v = v + own[name]
        if c:
            v = v - c[name]
        out[name] = v
    return out


def correction(c: State, own: State | None) -> State:
    """``c − c_i``, the term a site adds to each gradient step."""
    return {n: t - own[n] for n, t in c.items()} if own is not None else dict(c)


class Scaffold(AdapterAggregation):
    """FedAvg's weighted mean plus SCAFFOLD control variates (module docstring).

    Args:
        lr: The sites' learning rate (the run config's ``lr``).
        momentum: The sites' SGD momentum.
        wire_dtype: The run's ``wire-dtype``: the variates use what the sites received,
            and each correction travels in it.
        **fedavg: Passed to Flower's ``FedAvg``.

    Attributes:
        c: The server's variate (empty before the first aggregation).
        site_c: Each site's variate ``c_i``, by node id.
        site_n: Each site's last number of training records, by node id (weights of c).
    """

    def __init__(self, *, lr: float, momentum: float = SGD_MOMENTUM,
                 wire_dtype: str = "float32", **fedavg) -> None:
        if not lr > 0:
            raise ValueError(f"lr={lr} must be > 0")
        super().__init__("mean", **fedavg)
        self.lr, self.momentum, self.wire_dtype = lr, momentum, wire_dtype
        self.c: State = {}
        self.site_c: dict[int, State] = {}
        self.site_n: dict[int, float] = {}
        self._sent: State = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's train messages, each with its site's correction once there is one."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = wire.decode(wire.encode(arrays, self.wire_dtype))  # what sites get
        if self.c:
            for m in messages:  # Flower's messages share one RecordDict: give each its own
                own = self.site_c.get(m.metadata.dst_node_id)
                m.content = RecordDict({**dict(m.content), keys.SCAFFOLD_CORRECTION:
                                        wire.encode(correction(self.c, own), self.wire_dtype)})
        return messages

    def aggregate_valid(self, server_round: int, valid: list[Message]
                        ) -> tuple[ArrayRecord, MetricRecord | None]:
        """The weighted mean; then each replying site's ``c_i`` and the server's ``c``."""
        agg, metrics = super().aggregate_valid(server_round, valid)
        for m in valid:
            node, content = m.metadata.src_node_id, m.content
            self.site_c[node] = site_variate(
                self.site_c.get(node), self.c, self._sent,
                content[self.arrayrecord_key].to_torch_state_dict(), lr=self.lr,
                steps=int(content[keys.METRICS][keys.STEPS]), momentum=self.momentum)
            self.site_n[node] = float(content[keys.METRICS][self.weighted_by_key])
        nodes = sorted(self.site_c)
        self.c = lora_math.weighted_mean([self.site_c[n] for n in nodes],
                                         [self.site_n[n] for n in nodes])
        return agg, metrics


def received_correction(msg: Message) -> State | None:
    """The float32 correction a train message carries (``scaffold``), or None."""
    rec = msg.content.array_records.get(keys.SCAFFOLD_CORRECTION)
    return None if rec is None else wire.decode(rec)
