"""A site's side of secure aggregation (SecAgg+, Bell et al., CCS 2020) on the Message API.

The stages are Flower's own (``flwr.client.mod.secure_aggregation.secaggplus_mod``): its
``SecAggPlusState`` (kept in the node's ``Context.state`` between the stages, as Flower's
mod does), its stage checks and its ``_setup`` (two ECDH key pairs), ``_share_keys``
(Shamir shares of the mask seed and of the first secret key, each encrypted to one
neighbour with a key agreed by ECDH) and ``_unmask`` (the shares the server asks for). The
masked-vector stage is the round's train message: the site decrypts its neighbours' shares
*before* training (a share that fails authentication stops the site before it spends any
budget), trains as usual, then clips its update, quantises it, adds its share of Skellam
noise if asked, masks it (:mod:`privacy.secagg`) and replies with the masked vector only.

What this adds to Flower's stages: the sha256 commitment to the mask seed (so the server
can reject a tampered share), and two refusals at the unmask stage — a node named both
active and dead (whose two shares together would unmask its update), and itself as dead.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from contextlib import contextmanager
from typing import Iterator, Mapping, cast

import numpy as np
import torch
from cryptography.fernet import InvalidToken
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod.secure_aggregation.secaggplus_mod import (SecAggPlusState, _setup,
                                                               _share_keys, _unmask,
                                                               check_configs, check_stage)
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (decrypt,
                                                                        generate_shared_key)
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedadapt import keys
from fedadapt.messages import TrainReply
from fedadapt.privacy import secagg as sa
from fedadapt.privacy.distributed_dp import skellam_noise


@contextmanager
def _quiet() -> Iterator[None]:
    """Flower's stage functions log every stage of every node at DEBUG; a simulated site's
    console would fill with them."""
    log = logging.getLogger("flwr")
    level = log.level
    log.setLevel(max(level, logging.INFO))
    try:
        yield
    finally:
        log.setLevel(level)


def _load(context: Context) -> SecAggPlusState:
    if keys.SECAGG_STATE not in context.state.config_records:
        context.state.config_records[keys.SECAGG_STATE] = ConfigRecord({})
    return SecAggPlusState(**context.state.config_records[keys.SECAGG_STATE])


def _save(context: Context, state: SecAggPlusState) -> None:
    context.state.config_records[keys.SECAGG_STATE] = ConfigRecord(state.to_dict())


def _stage(state: SecAggPlusState, record: ConfigRecord) -> ConfigRecord:
    """Flower's checks of the stage order and of the stage's fields; the fields."""
    configs = ConfigRecord(dict(record))
    check_stage(state.current_stage, configs)
    state.current_stage = cast(str, configs.pop(Key.STAGE))
    check_configs(state.current_stage, configs)
    return configs


def _reply(msg: Message, res: Mapping) -> Message:
    return Message(RecordDict({keys.SECAGG: ConfigRecord(dict(res), False)}), reply_to=msg)


def handle_setup(msg: Message, context: Context) -> Message:
    """Stage 0: the round's parameters; reply with two fresh public keys."""
    state = _load(context)
    record = msg.content[keys.SECAGG]
    configs = _stage(state, ConfigRecord({k: v for k, v in record.items() if k not in (
        keys.SECAGG_NOISE, keys.SECAGG_NOISE_VARIANCE, keys.SECAGG_CLIP_NORM)}))
    state.nid = msg.metadata.dst_node_id
    with _quiet():
        res = _setup(state, configs)
    state.noise = str(record[keys.SECAGG_NOISE])  # type: ignore[attr-defined]
    state.noise_variance = float(record[keys.SECAGG_NOISE_VARIANCE])  # type: ignore
    state.clip_norm = float(record[keys.SECAGG_CLIP_NORM])  # type: ignore[attr-defined]
    _save(context, state)
    return _reply(msg, res)


def handle_share_keys(msg: Message, context: Context) -> Message:
    """Stage 1: the neighbours' public keys; reply with the encrypted shares of this site's
    mask seed and secret key (one per neighbour) and the seed's sha256 commitment."""
    state = _load(context)
    configs = _stage(state, msg.content[keys.SECAGG])
    with _quiet():
        res = _share_keys(state, configs)
    res[keys.SECAGG_SEED_DIGEST] = sa.seed_digest(state.rd_seed)
    _save(context, state)
    return _reply(msg, res)


def receive_shares(msg: Message, context: Context) -> None:
    """Stage 2, before training: decrypt and keep the shares the neighbours sent.

    Raises:
        privacy.secagg.SecAggError: If a share fails authentication or names another
            sender or receiver (tampered with or misrouted): the site trains nothing.
    """
    state = _load(context)
    configs = _stage(state, msg.content[keys.SECAGG])
    ciphertexts = cast(list[bytes], configs[Key.CIPHERTEXT_LIST])
    srcs = cast(list[int], configs[Key.SOURCE_LIST])
    if len(ciphertexts) + 1 < state.threshold:
        raise sa.SecAggError(f"node {state.nid}: {len(ciphertexts)} neighbour(s) sent key "
                             f"shares, {state.threshold - 1} needed (secagg-threshold)")
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        if src not in state.ss2_dict:
            raise sa.SecAggError(f"node {state.nid}: key share from node {src}, which is "
                                 "not one of its neighbours")
        try:
            plaintext = decrypt(state.ss2_dict[src], ciphertext)
        except InvalidToken:
            raise sa.SecAggError(f"node {state.nid}: the key share from node {src} failed "
                                 "authentication (tampered with or corrupted in transit); "
                                 "this site withholds its update") from None
        actual_src, dst, seed_share, sk1_share = share_keys_plaintext_separate(plaintext)
        if (actual_src, dst) != (src, state.nid):
            raise sa.SecAggError(f"node {state.nid}: a share forwarded as {src} -> "
                                 f"{state.nid} says {actual_src} -> {dst}")
        state.rd_seed_share_dict[src] = seed_share
        state.sk1_share_dict[src] = sk1_share
    state.srcs = list(srcs)  # type: ignore[attr-defined]  # the neighbours masked with
    _save(context, state)


def check_weight(context: Context, num_examples: int) -> None:
    """Before training: refuse a weight above ``secagg-max-weight`` while nothing is spent.

    Raises:
        privacy.secagg.SecAggError: If the weight is out of range.
    """
    state = _load(context)
    sa.SecAggParams(clip_norm=float(state.clip_norm),  # type: ignore[attr-defined]
                    max_weight=int(state.max_weight)).factor(num_examples)


def _masked_record(vector: list[np.ndarray], names: list[str]) -> ArrayRecord:
    """Masked ring elements as uint32 on the wire (4 bytes a coordinate)."""
    return ArrayRecord({n: Array.from_numpy_ndarray(a.astype(np.uint32))
                        for n, a in zip(names, vector, strict=True)})


def masked_reply(msg: Message, context: Context, reply: TrainReply,
                 received: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                 rng: np.random.Generator | None = None) -> Message:
    """Stage 2, after training: the reply with the masked update in place of the tensors.

    The update is ``trained − received`` over the received tensors, clipped to the
    round's L2 bound, weighted by the example count (``secagg-max-weight``), quantised,
    noised (``secagg-noise``) and masked with the private and the pairwise masks.

    Args:
        rng: Rounding and noise RNG (default: seeded from the OS's entropy; the server
            must not be able to reproduce it).
    """
    state = _load(context)
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    names = sorted(received)
    delta, _ = sa.clip_l2({n: trained[n].float() - received[n].float() for n in names},
                          float(state.clip_norm))  # type: ignore[attr-defined]
    params = sa.SecAggParams(clip_norm=float(state.clip_norm),  # type: ignore[attr-defined]
                             max_weight=int(state.max_weight),
                             target_range=state.target_range, mod_range=state.mod_range)
    vector = quantised_update(delta, names, params, reply.num_examples, rng)
    if state.noise == "skellam":  # type: ignore[attr-defined]
        noise = skellam_noise(sa.shapes_of(vector[1:]), state.noise_variance, rng)  # type: ignore
        vector = [vector[0]] + [v + e for v, e in zip(vector[1:], noise)]
    sk1 = bytes_to_private_key(state.sk1)
    pair_keys = {nid: generate_shared_key(sk1, bytes_to_public_key(state.public_keys_dict[nid][0]))
                 for nid in state.srcs}  # type: ignore[attr-defined]
    masked = sa.mask(vector, state.rd_seed, state.nid, pair_keys)
    _save(context, state)
    out = dataclasses.replace(reply, arrays=_masked_record(masked[1:], names))
    message = out.to_message(msg)
    message.content[keys.SECAGG_FACTOR] = _masked_record(masked[:1], [keys.SECAGG_FACTOR])
    return message


def quantised_update(delta: Mapping[str, torch.Tensor], names: list[str],
                     params: sa.SecAggParams, weight: float, rng: np.random.Generator
                     ) -> list[np.ndarray]:
    """The integers this site masks, ``[factor] + tensors`` (tests record them here)."""
    return sa.quantise(delta, names, params, weight, rng)


def handle_unmask(msg: Message, context: Context) -> Message:
    """Stage 3: the shares of the active neighbours' mask seeds and of the dropped ones'
    secret keys — never both for one node, never this site's own key."""
    state = _load(context)
    configs = _stage(state, msg.content[keys.SECAGG])
    active = set(cast(list[int], configs[Key.ACTIVE_NODE_ID_LIST]))
    dead = set(cast(list[int], configs[Key.DEAD_NODE_ID_LIST]))
    if active & dead or state.nid in dead:
        raise sa.SecAggError(f"node {state.nid}: the server asked for both shares of nodes "
                             f"{sorted(active & dead) or [state.nid]}, which would unmask "
                             "their updates; refused")
    unknown = (active | dead) - set(state.rd_seed_share_dict)
    if unknown:
        raise sa.SecAggError(f"node {state.nid}: asked for shares of nodes {sorted(unknown)} "
                             "that never shared keys with it; refused")
    with _quiet():
        res = _unmask(state, configs)
    # The round is over for this site: its secrets and the shares it holds are not kept.
    state.sk1 = state.sk2 = state.rd_seed = b""
    state.rd_seed_share_dict, state.sk1_share_dict, state.ss2_dict = {}, {}, {}
    _save(context, state)
    return _reply(msg, res)

