"""SecAgg+ stages driven directly, in process: the server's (server/secagg.py) and the
sites' (client/secagg.py) functions exchange real Flower Messages, each site with its own
Context, without the Simulation Engine; many sites, sparse graphs and tampering are cheap
here. Every message content goes through Flower's protobuf serialisation (what the
Deployment Engine sends over gRPC), with node ids on both sides of 2**63 (Flower's node
ids are uint64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedadapt import keys
from fedadapt.client import secagg as site
from fedadapt.config import RunConfig
from fedadapt.messages import TrainReply
from fedadapt.privacy.secagg import SecAggError
from fedadapt.server import secagg as server
from tests.flower_helpers import task_identity  # noqa: F401  (fixture)

HANDLERS = {keys.QUERY_SECAGG_SETUP: site.handle_setup,
            keys.QUERY_SECAGG_SHARE_KEYS: site.handle_share_keys,
            keys.QUERY_SECAGG_UNMASK: site.handle_unmask}
SHAPES = {"a": (4, 3), "b": (5,)}


def _wire(msg: Message) -> Message:
    """``msg`` with its content as it arrives after Flower's protobuf round trip."""
    msg.content = recorddict_from_proto(recorddict_to_proto(msg.content))
    return msg


class Federation:
    """``n`` sites with their own Contexts, and the exchange the server's stages use."""

    def __init__(self, n: int, **cfg) -> None:
        self.cfg = RunConfig(secure_aggregation=True, num_sites=n, **cfg)
        self.nodes = [1000 + 17 * i if i % 2 else 2**63 + 17 * i for i in range(n)]
        self.ctx = {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(),
                                 run_config={}) for nid in self.nodes}
        self.arrays = {k: torch.zeros(s) for k, s in SHAPES.items()}
        gen = torch.Generator().manual_seed(0)
        self.updates = {nid: {k: torch.randn(s, generator=gen) * 0.05 for k, s in SHAPES.items()}
                        for nid in self.nodes}
        self.weights = {nid: 10 + 7 * i for i, nid in enumerate(self.nodes)}
        self.down: set[int] = set()  # sites that stop answering
        self.errors: list[str] = []  # what the sites raised
        self.session = server.new_session(self.cfg, 1, self.arrays, self.nodes)

    def send(self, messages: list[Message], stage: str) -> list[Message]:
        """As ``server.exchange.exchange``: a site that raises sends an error, left out."""
        out = []
        for m in messages:
            if m.metadata.dst_node_id in self.down:
                continue
            try:
                out.append(_wire(HANDLERS[m.metadata.message_type](
                    _wire(m), self.ctx[m.metadata.dst_node_id])))
            except ValueError as err:
                self.errors.append(str(err))
        return out

    def keys_shared(self) -> None:
        server.setup(self.session, self.send, self.cfg)
        server.share_keys(self.session, self.send)

    def train(self, nid: int, rng: np.random.Generator) -> Message:
        msg = _wire(server.attach(Message(RecordDict({keys.ARRAYS: ArrayRecord(self.arrays)}),
                                          dst_node_id=nid, message_type="train"), self.session))
        site.receive_shares(msg, self.ctx[nid])
        reply = TrainReply(site_id=f"site-{nid}", arrays=ArrayRecord(),
                           num_examples=self.weights[nid], train_loss=0.0, epsilon=0.0,
                           epsilon_round=0.0, delta=1e-5, steps=1, sample_rate=0.1,
                           partition_id=0)
        trained = {k: self.arrays[k] + self.updates[nid][k] for k in SHAPES}
        return _wire(site.masked_reply(msg, self.ctx[nid], reply, self.arrays, trained, rng))

    def fedavg(self, nodes) -> dict[str, torch.Tensor]:
        w = sum(self.weights[n] for n in nodes)
        return {k: sum(self.weights[n] * self.updates[n][k] for n in nodes) / w for k in SHAPES}


def _close(mean, want, tol=2e-4):
    return all(float((mean[k] - want[k]).abs().max()) <= tol for k in SHAPES)


@pytest.mark.parametrize("n, shares", [(3, 0), (7, 3)])
def test_the_sum_is_fedavg_and_one_dropout_after_key_sharing_is_survived(
        task_identity, n, shares):  # noqa: F811
    fed = Federation(n, secagg_num_shares=shares)
    fed.keys_shared()
    rng = np.random.default_rng(0)
    dropped = fed.nodes[1]
    replies = [fed.train(nid, rng) for nid in fed.nodes if nid != dropped]
    fed.down.add(dropped)
    total, active = server.collect(fed.session, replies)
    assert active == set(fed.nodes) - {dropped}
    mean, k = server.unmask(fed.session, fed.send, total, active)
    assert k == n - 1 and _close(mean, fed.fedavg(active))
    assert not _close(mean, fed.fedavg(fed.nodes))  # the dropped site is not in it


def test_a_tampered_forwarded_share_stops_the_site_before_training(task_identity):  # noqa
    fed = Federation(3)
    fed.keys_shared()
    nid = fed.nodes[0]
    srcs, ctxts = fed.session.forward[nid]
    ctxts[0] = ctxts[0][:-4] + b"AAAA"
    with pytest.raises(SecAggError, match=f"share from node {srcs[0]} failed authentication"):
        fed.train(nid, np.random.default_rng(0))


def test_a_site_refuses_to_reveal_both_shares_of_a_node(task_identity):  # noqa: F811
    fed = Federation(3)
    fed.keys_shared()
    rng = np.random.default_rng(0)
    for nid in fed.nodes:
        fed.train(nid, rng)
    target = fed.nodes[2]
    greedy = Message(RecordDict({keys.SECAGG: server.ConfigRecord({
        Key.STAGE: "unmask", Key.ACTIVE_NODE_ID_LIST: fed.nodes,
        Key.DEAD_NODE_ID_LIST: [target]})}), dst_node_id=fed.nodes[0],
        message_type=keys.QUERY_SECAGG_UNMASK)
    with pytest.raises(SecAggError, match="both shares"):
        site.handle_unmask(greedy, fed.ctx[fed.nodes[0]])


def test_too_few_survivors_cannot_unmask(task_identity):  # noqa: F811
    fed = Federation(3, secagg_threshold=3)
    fed.keys_shared()
    rng = np.random.default_rng(0)
    replies = [fed.train(nid, rng) for nid in fed.nodes[:2]]
    fed.down.add(fed.nodes[2])
    total, active = server.collect(fed.session, replies)
    with pytest.raises(SecAggError, match="needed"):
        server.unmask(fed.session, fed.send, total, active)
    assert all("smaller than threshold" in e for e in fed.errors) and len(fed.errors) == 2


def test_a_malformed_masked_vector_is_excluded_as_a_dropout(task_identity):  # noqa: F811
    fed = Federation(3)
    fed.keys_shared()
    rng = np.random.default_rng(0)
    replies = [fed.train(nid, rng) for nid in fed.nodes]
    replies[0].content[keys.ARRAYS] = ArrayRecord({"a": Array.from_numpy_ndarray(
        np.zeros((4, 3), dtype=np.uint32))})
    total, active = server.collect(fed.session, replies)
    (rejected,) = fed.session.rejected
    assert "tensor names differ" in rejected["reason"]
    mean, _ = server.unmask(fed.session, fed.send, total, active)
    assert _close(mean, fed.fedavg(active))


def test_skellam_noise_is_in_the_sum_only(task_identity):  # noqa: F811
    fed = Federation(3, secagg_noise="skellam", secagg_noise_multiplier=1.0,
                     secagg_clip_norm=1.0, secagg_max_weight=0)
    fed.keys_shared()
    assert fed.session.noise_variance > 0
    rng = np.random.default_rng(0)
    replies = [fed.train(nid, rng) for nid in fed.nodes]
    total, active = server.collect(fed.session, replies)
    mean, _ = server.unmask(fed.session, fed.send, total, active)
    want = {k: sum(fed.updates[n][k] for n in fed.nodes) / 3 for k in SHAPES}
    err = torch.cat([(mean[k] - want[k]).flatten() for k in SHAPES])
    # noise std on the mean: z·Δ2 / (s·n) ≈ z·C / n = 1/3 per coordinate
    assert 0.1 < float(err.std()) < 1.0
