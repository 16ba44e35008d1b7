"""The server's side of secure aggregation (SecAgg+, Bell et al., CCS 2020) on the Message API.

The four stages of Flower's ``SecAggPlusWorkflow`` (``flwr.server.workflow.
secure_aggregation.secaggplus_workflow``), as exchanges of one fedadapt round:

0. **setup** (:func:`open_session`): the round's parameters to every sampled site; each
   answers with two public keys.
1. **share keys**: each site gets its neighbours' public keys (SecAgg+'s k-regular graph
   over a shuffled ring, or every site) and answers with its encrypted Shamir shares for
   them, which the server only forwards, and the sha256 of its mask seed.
2. **collect masked vectors**: the round's train message carries the forwarded shares;
   each site trains and replies with its masked update (``client.secagg``).
3. **unmask** (:func:`close_session`): each surviving site returns the shares of its
   active neighbours' mask seeds and of its dropped neighbours' secret keys; the server
   rebuilds them (checking each against its commitment, excluding bad shares), removes
   the masks from the sum and decodes the weighted mean update.

The server holds masked vectors, their sum and the shares, never one site's update. A
site that fails after sharing keys (an error, a refusal, a malformed vector) is a dropout:
its pairwise masks are rebuilt from its neighbours' shares of its secret key, as SecAgg+
does, as long as ``secagg-threshold`` of them answer.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.messages import reply_site
from fedadapt.privacy import secagg as sa
from fedadapt.privacy.distributed_dp import sensitivity, site_variance

#: ``(messages, rlog-like stage name) -> replies that are not errors``: the round's exchange
#: (``server.exchange.exchange`` bound to its grid, log and timeout).
Exchange = Callable[[list[Message], str], list[Message]]


@dataclass
class Session:
    """One round's SecAgg+ state at the server (no site's update is ever in it).

    Attributes:
        rnd: The round.
        params: Clip norm, weighting, quantisation and ring.
        threshold: Shares needed per secret.
        names: The tensors summed (the global adapter's that travel), sorted.
        shapes: Their shapes.
        neighbours: Node → the nodes (itself included) it shares secrets with.
        public_keys: Node → its two public keys (setup).
        digests: Node → sha256 of its mask seed (share keys).
        shared: Nodes that completed share keys (the ones masks can involve).
        forward: Node → (sources, ciphertexts) of the shares addressed to it.
        noise_variance: Each site's Skellam variance (0 without distributed DP).
        sensitivity: ``(Δ2, Δ1)`` of one site's quantised update, in integer levels.
        rejected: What was excluded and why (``{"site", "node_id", "reason"}``).
    """

    rnd: int
    params: sa.SecAggParams
    threshold: int
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    neighbours: dict[int, set[int]]
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    digests: dict[int, bytes] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)
    forward: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)
    noise_variance: float = 0.0
    sensitivity: tuple[float, float] = (0.0, 0.0)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def record_bytes(record: ConfigRecord) -> int:
    """Bytes of a SecAgg ConfigRecord's values (bytes as they are, numbers as 8)."""
    total = 0
    for value in record.values():
        items = value if isinstance(value, list) else [value]
        total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    return total


def _query(nid: int, rnd: int, message_type: str, record: Mapping[str, Any]) -> Message:
    return Message(RecordDict({keys.SECAGG: ConfigRecord(dict(record))}), dst_node_id=nid,
                   message_type=message_type, group_id=str(rnd))


def _neighbours(nodes: list[int], num_shares: int, rng: random.Random) -> dict[int, set[int]]:
    """SecAgg+'s graph: each node and the ``num_shares // 2`` on each side of it on a
    shuffled ring (Flower's ``SecAggPlusWorkflow.setup_stage``)."""
    ring = list(nodes)
    rng.shuffle(ring)
    half = num_shares >> 1
    return {nid: {ring[(i + o) % len(ring)] for o in range(-half, half + 1)}
            for i, nid in enumerate(ring)}


def _num_shares(cfg: RunConfig, n: int) -> int:
    k = min(cfg.secagg_num_shares or n, n)
    return k + 1 if k < n and k % 2 == 0 else k  # odd, as SecAgg+ wants


def new_session(cfg: RunConfig, rnd: int, arrays: Mapping[str, torch.Tensor],
                nodes: list[int]) -> Session:
    """The round's parameters and neighbour graph for the sampled ``nodes``.

    Raises:
        privacy.secagg.SecAggError: If the sum could wrap the ring (too many sites or too
            much noise) or fewer nodes than ``secagg-threshold`` were sampled.
    """
    if len(nodes) < max(3, cfg.secagg_threshold):
        raise sa.SecAggError(f"round {rnd}: {len(nodes)} site(s) sampled; secure "
                             f"aggregation needs at least {max(3, cfg.secagg_threshold)}")
    params = sa.SecAggParams(clip_norm=cfg.secagg_clip_norm, max_weight=cfg.secagg_max_weight)
    names = sorted(arrays)
    shapes = {n: tuple(arrays[n].shape) for n in names}
    dim = sum(int(np.prod(s)) for s in shapes.values())
    l2, l1 = sensitivity(params.clip_norm, params.scale, dim)
    var = (site_variance(cfg.secagg_noise_multiplier, l2, len(nodes))
           if cfg.secagg_noise == "skellam" else 0.0)
    sa.check_headroom(len(nodes), math.sqrt(var * len(nodes)), params)
    return Session(rnd=rnd, params=params, threshold=cfg.secagg_threshold, names=names,
                   shapes=shapes, neighbours=_neighbours(nodes, _num_shares(cfg, len(nodes)),
                                                        random.Random(cfg.seed * 7919 + rnd)),
                   noise_variance=var, sensitivity=(l2, l1))


def setup(session: Session, send: Exchange, cfg: RunConfig) -> None:
    """Stage 0: parameters out, public keys back."""
    n = len(session.neighbours)
    record = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n,
              Key.SHARE_NUMBER: _num_shares(cfg, n), Key.THRESHOLD: session.threshold,
              Key.CLIPPING_RANGE: float(session.params.clip_norm),
              Key.TARGET_RANGE: session.params.target_range,
              Key.MOD_RANGE: session.params.mod_range,
              Key.MAX_WEIGHT: float(session.params.max_weight),
              keys.SECAGG_NOISE: cfg.secagg_noise,
              keys.SECAGG_NOISE_VARIANCE: float(session.noise_variance),
              keys.SECAGG_CLIP_NORM: float(session.params.clip_norm)}
    for reply in send([_query(nid, session.rnd, keys.QUERY_SECAGG_SETUP, record)
                       for nid in session.neighbours], "secagg-setup"):
        res = reply.content[keys.SECAGG]
        session.public_keys[reply.metadata.src_node_id] = (
            bytes(res[Key.PUBLIC_KEY_1]), bytes(res[Key.PUBLIC_KEY_2]))


def share_keys(session: Session, send: Exchange) -> None:
    """Stage 1: each node's neighbours' public keys out; encrypted shares back (kept only to
    be forwarded) with the seed commitments."""
    alive = set(session.public_keys)

    def make(nid: int) -> Message:
        record: dict[str, Any] = {str(v): list(session.public_keys[v])
                                  for v in session.neighbours[nid] & alive}
        return _query(nid, session.rnd, keys.QUERY_SECAGG_SHARE_KEYS,
                      {**record, Key.STAGE: Stage.SHARE_KEYS})

    replies = send([make(nid) for nid in sorted(alive)], "secagg-share-keys")
    session.shared = {r.metadata.src_node_id for r in replies}
    session.forward = {nid: ([], []) for nid in session.shared}
    for reply in replies:
        src, res = reply.metadata.src_node_id, reply.content[keys.SECAGG]
        session.digests[src] = bytes(res[keys.SECAGG_SEED_DIGEST])
        for dst, ctxt in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST], strict=True):
            if dst in session.forward:
                session.forward[dst][0].append(src)
                session.forward[dst][1].append(ctxt)


def attach(message: Message, session: Session) -> Message:
    """Stage 2: the train message to one site, with the shares addressed to it forwarded.

    A new message: Flower's strategies give every site's message one shared content."""
    nid = message.metadata.dst_node_id
    srcs, ctxts = session.forward[nid]
    content = RecordDict(dict(message.content.items()))
    content[keys.SECAGG] = ConfigRecord({
        Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: list(srcs),
        Key.CIPHERTEXT_LIST: list(ctxts)})
    return Message(content, dst_node_id=nid, message_type=message.metadata.message_type,
                   group_id=message.metadata.group_id)


def _masked(reply: Message, session: Session) -> tuple[list[np.ndarray] | None, str | None]:
    """A trained reply's masked vector ``[factor] + tensors``, or why it is unusable."""
    content = reply.content
    if keys.SECAGG_FACTOR not in content.array_records:
        return None, "no masked weight factor in the reply"
    vector = {n: a.numpy() for n, a in content[keys.ARRAYS].items()}
    problem = sa.check_masked(vector, session.shapes)
    factor = content[keys.SECAGG_FACTOR].get(keys.SECAGG_FACTOR)
    if problem is None and (factor is None or tuple(factor.shape) != (1,)):
        problem = "masked weight factor must be one integer"
    if problem is not None:
        return None, problem
    return ([factor.numpy().astype(np.int64)]
            + [vector[n].astype(np.int64) for n in session.names]), None


def collect(session: Session, trained: list[Message]) -> tuple[list[np.ndarray] | None,
                                                               set[int]]:
    """The sum of the well-formed masked vectors (mod M) and the nodes it holds."""
    total, active = None, set()
    for reply in trained:
        nid = reply.metadata.src_node_id
        if nid not in session.shared:
            continue
        vector, problem = _masked(reply, session)
        if vector is None:
            session.rejected.append({"site": reply_site(reply), "node_id": nid,
                                     "reason": f"secure aggregation: {problem}"})
            continue
        total = vector if total is None else sa.add(total, vector)
        active.add(nid)
    return total, active


def unmask(session: Session, send: Exchange, total: list[np.ndarray], active: set[int]
           ) -> tuple[dict[str, torch.Tensor], int]:
    """Stage 3: shares back; the masks removed; the weighted mean update.

    Returns:
        The mean update (float32) and the number of sites in the sum.

    Raises:
        privacy.secagg.SecAggError: If a secret cannot be rebuilt (too few or bad shares).
    """
    dead = session.shared - active

    def make(nid: int) -> Message:
        nb = session.neighbours[nid]
        return _query(nid, session.rnd, keys.QUERY_SECAGG_UNMASK, {
            Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: sorted(nb & active),
            Key.DEAD_NODE_ID_LIST: sorted(nb & dead)})

    shares: dict[int, dict[int, bytes]] = {nid: {} for nid in session.shared}
    for reply in send([make(nid) for nid in sorted(active)], "secagg-unmask"):
        holder, res = reply.metadata.src_node_id, reply.content[keys.SECAGG]
        for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST], strict=True):
            if owner in shares:
                shares[owner][holder] = bytes(share)
    shapes = sa.shapes_of(total)
    for owner in sorted(active):  # its private mask b_u, from the shares of its seed
        seed = _rebuild(session, owner, shares[owner], sa.seed_verifier(session.digests[owner]))
        total = sa.add(total, sa.prg(seed, shapes), -1)
    for owner in sorted(dead):  # its pairwise masks with the active, from its secret key
        sk1 = _rebuild(session, owner, shares[owner],
                       sa.key_verifier(session.public_keys[owner][0]))
        for v in sorted((session.neighbours[owner] & active) - {owner}):
            key = generate_shared_key(bytes_to_private_key(sk1),
                                      bytes_to_public_key(session.public_keys[v][0]))
            # v added +PRG(s) if v > owner, −PRG(s) otherwise: take it out again.
            total = sa.add(total, sa.prg(key, shapes), -1 if v > owner else 1)
    mean, _ = sa.decode_mean(total, session.names, len(active), session.params)
    return mean, len(active)


def _rebuild(session: Session, owner: int, shares: dict[int, bytes], verify) -> bytes:
    secret, bad = sa.reconstruct(shares, session.threshold, verify)
    for holder in bad:
        session.rejected.append({"site": None, "node_id": holder, "reason": (
            f"secure aggregation: its share of node {owner}'s secret does not match "
            "the secret's commitment (tampered or corrupted); excluded")})
    return secret
