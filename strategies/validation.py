"""Update validation around any Flower strategy (composition, not inheritance).

``Validated`` remembers the arrays it sent in ``configure_train`` and, in
``aggregate_train``, takes the replies as they came off the wire. It drops every reply
whose tensors travel in another dtype than the run's ``wire-dtype``
(:func:`strategies.wire.format_problem`, checked before decoding, which would hide it),
are non-finite, have names, shapes or dtypes other than those sent, or whose update norm
``‖w_k − w_sent‖`` exceeds ``norm_factor ×`` the round's median update norm. Rejections
are kept per round in ``rejected`` as ``{"site", "node_id", "reason"}`` for the run
summary; the inner strategy aggregates the rest, decoded to float32.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedadapt import keys
from fedadapt.strategies import wire
from fedadapt.strategies.wrapper import StrategyWrapper


def _site(reply: Message) -> str:
    status = reply.content.config_records.get(keys.STATUS)
    return str(status[keys.SITE_ID]) if status and keys.SITE_ID in status \
        else f"node-{reply.metadata.src_node_id}"


class Validated(StrategyWrapper):
    """Wrap ``inner`` so that malformed or outlying train replies are rejected.

    Args:
        inner: The strategy that aggregates the valid replies.
        norm_factor: Reject an update whose norm exceeds this × the round's median norm
            (only applied with ≥ 3 replies, where a median is meaningful).
        arrayrecord_key: Where the tensors are in a reply.
        wire_dtype: The dtype floating tensors must travel in (the run's ``wire-dtype``).
    """

    def __init__(self, inner: Strategy, *, norm_factor: float = 10.0,
                 arrayrecord_key: str = keys.ARRAYS, wire_dtype: str = "float32") -> None:
        if not norm_factor > 1.0:
            raise ValueError(f"norm_factor={norm_factor} must be > 1")
        wire.bytes_per_element(wire_dtype)  # raises on an unknown dtype
        super().__init__(inner)
        self.norm_factor, self.key, self.wire_dtype = norm_factor, arrayrecord_key, wire_dtype
        self._sent: dict[str, torch.Tensor] = {}
        self.rejected: dict[int, list[dict[str, Any]]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = arrays.to_torch_state_dict()
        return self.inner.configure_train(server_round, arrays, config, grid)

    def check(self, reply: Message) -> tuple[str | None, float]:
        """``(reason or None, update norm)`` for one reply as it came off the wire."""
        reason, norm, _ = self._inspect(reply)
        return reason, norm

    def _inspect(self, reply: Message
                 ) -> tuple[str | None, float, dict[str, torch.Tensor] | None]:
        """``(reason or None, update norm, float32 state or None)`` for one reply."""
        if reply.has_error() or not reply.has_content():
            return None, 0.0, None  # errors are the inner strategy's to log
        rec = reply.content.array_records.get(self.key)
        if rec is None:
            return f"no ArrayRecord under {self.key!r}", math.nan, None
        problem = wire.format_problem(rec, self.wire_dtype)
        if problem is not None:
            return problem, math.nan, None
        state = wire.decode(rec)
        if set(state) != set(self._sent):
            diff = sorted(set(state) ^ set(self._sent))
            return f"tensor names differ from those sent: {diff[:3]}", math.nan, None
        sq = 0.0
        for name, t in state.items():
            ref = self._sent[name]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                return (f"{name}: got {tuple(t.shape)} {t.dtype}, "
                        f"sent {tuple(ref.shape)} {ref.dtype}"), math.nan, None
            if not torch.isfinite(t).all():
                return f"{name}: non-finite values", math.nan, None
            sq += float(((t.float() - ref.float()) ** 2).sum())
        return None, math.sqrt(sq), state

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        rejected = self.rejected.setdefault(server_round, [])
        checked = [(r, *self._inspect(r)) for r in replies]
        keep, norms = [], []
        for reply, reason, norm, state in checked:
            if reason is None:
                if state is not None:  # the inner strategy aggregates in float32
                    reply.content[self.key] = ArrayRecord(state)
                keep.append((reply, norm))
                norms.append(norm)
            else:
                rejected.append({"site": _site(reply), "node_id": reply.metadata.src_node_id,
                                 "reason": reason})
        if len(norms) >= 3:
            bound = self.norm_factor * statistics.median(norms)
            kept = []
            for reply, norm in keep:
                if bound > 0 and norm > bound:
                    rejected.append({"site": _site(reply),
                                     "node_id": reply.metadata.src_node_id,
                                     "reason": f"update norm {norm:.3g} > {self.norm_factor:g}"
                                               f" x median {bound / self.norm_factor:.3g}"})
                else:
                    kept.append((reply, norm))
            keep = kept
        if not keep:
            return None, None
        return self.inner.aggregate_train(server_round, [r for r, _ in keep])
