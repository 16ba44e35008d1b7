"""The arithmetic of secure aggregation (SecAgg+, Bell et al., CCS 2020), shared by site and
server: clip, quantise, mask, unmask, decode, and the check of a reconstructed secret.

Built on Flower's own primitives (``flwr.common.secure_aggregation``: Shamir sharing,
ECDH key agreement + HKDF, ``ndarrays_arithmetic``, ``dequantize``) and ``cryptography``,
with two deliberate departures, both for security:

* Masks are expanded from their seeds with AES-256-CTR (``cryptography``), keyed by
  HKDF-SHA256 of the seed. Flower's ``pseudo_rand_gen`` folds a seed to 32 bits for
  ``numpy.random.RandomState``, so a server could search all 2**32 seeds of a mask.
* Stochastic rounding takes an explicit ``numpy.random.Generator`` (Flower's
  ``quantize`` draws from NumPy's global RNG); the formula is Flower's.

A site's vector is ``[factor] + tensors`` as in Flower's SecAgg+ (``factor_combine``): the
factor is its weight ``round(w / max_weight × target)``, masked like the tensors, so the
server learns only the sum of the weights. Every value lives in Z_M, M = 2**32; the
unmasked sum is read as a signed integer (``|sum| < M/2``, checked by
:func:`check_headroom`), so distributed-DP noise may push a coordinate below zero.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, public_key_to_bytes

TARGET_RANGE = 2**22  # quantisation levels of one site's coordinate (Flower's default)
MOD_RANGE = 2**32  # the ring Z_M of masked values
MAX_COMBINATIONS = 256  # share subsets tried to find (and exclude) bad shares


class SecAggError(ValueError):
    """Secure aggregation cannot go on; the message says which stage, which site, and why."""


@dataclass(frozen=True)
class SecAggParams:
    """What every site of a round must agree on.

    Attributes:
        clip_norm: L2 bound C of a site's update; also the quantiser's range [-C, C].
        max_weight: Weighted FedAvg: a site's factor is w / max_weight (0: weight 1).
        target_range: Quantisation levels per coordinate.
        mod_range: The ring of masked values.
    """

    clip_norm: float
    max_weight: int = 0
    target_range: int = TARGET_RANGE
    mod_range: int = MOD_RANGE

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise SecAggError(f"clip norm must be > 0, got {self.clip_norm}")
        if self.max_weight < 0:
            raise SecAggError(f"max weight must be >= 0, got {self.max_weight}")
        if self.mod_range != MOD_RANGE or not 2 <= self.target_range < self.mod_range // 4:
            raise SecAggError(f"target range {self.target_range} / mod range "
                              f"{self.mod_range}: expected mod range 2**32 and a target "
                              "range below 2**30")

    @property
    def scale(self) -> float:
        """Integer levels per unit of update: s = target / (2C)."""
        return self.target_range / (2 * self.clip_norm)

    def factor(self, weight: float) -> int:
        """A site's integer weight factor (Flower's ``q_ratio``).

        Raises:
            SecAggError: If ``weight`` exceeds ``max_weight`` (its masked sum could wrap).
        """
        if self.max_weight == 0:
            return self.target_range
        if not 0 < weight <= self.max_weight:
            raise SecAggError(f"site weight {weight} (its example count) is not in "
                              f"(0, secagg-max-weight={self.max_weight}]; raise "
                              "'secagg-max-weight' in the run config")
        return max(1, round(weight / self.max_weight * self.target_range))


def clip_l2(delta: Mapping[str, torch.Tensor], bound: float) -> tuple[dict[str, torch.Tensor],
                                                                     float]:
    """``delta`` scaled to L2 norm at most ``bound`` (DP-FedAvg's clip, McMahan et al. ICLR
    2018); returns it and the norm before clipping."""
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in delta.values()))
    k = min(1.0, bound / norm) if norm > 0 else 1.0
    return {n: t * k for n, t in delta.items()}, norm


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased rounding to integers: up with probability ``x - floor(x)``."""
    low = np.floor(x)
    return (low + (rng.random(x.shape) < (x - low))).astype(np.int64)


def quantise(delta: Mapping[str, torch.Tensor], names: Sequence[str], params: SecAggParams,
             weight: float, rng: np.random.Generator) -> list[np.ndarray]:
    """A clipped update as the integers a site masks: ``[factor] + tensors``.

    Each coordinate of ``factor / target × delta`` is mapped from [-C, C] to
    [0, target] and rounded stochastically (Flower's ``quantize`` formula).

    Args:
        delta: The site's update, already clipped to ``params.clip_norm``.
        names: The order of the tensors (the received ones', sorted).
        params: The round's parameters.
        weight: The site's weight (its example count).
        rng: The rounding RNG.
    """
    q_factor = params.factor(weight)
    ratio = q_factor / params.target_range
    c, s = params.clip_norm, params.scale
    out = [np.array([q_factor], dtype=np.int64)]
    for name in names:
        x = delta[name].detach().cpu().double().numpy() * ratio
        out.append(stochastic_round((np.clip(x, -c, c) + c) * s, rng))
    return out


def prg(seed: bytes, shapes: Sequence[tuple[int, ...]], mod_range: int = MOD_RANGE
        ) -> list[np.ndarray]:
    """The mask expanded from ``seed``: AES-256-CTR keystream (key = HKDF-SHA256 of the
    seed), read as little-endian uint32, i.e. uniform over Z_(2**32)."""
    if mod_range != MOD_RANGE:
        raise SecAggError(f"mod range {mod_range}: only 2**32 is supported")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"fedadapt secagg mask").derive(seed)
    sizes = [int(np.prod(s)) if len(s) else 1 for s in shapes]
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    flat = np.frombuffer(enc.update(b"\0" * (4 * sum(sizes))), dtype="<u4").astype(np.int64)
    out, at = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[at:at + size].reshape(shape))
        at += size
    return out


def shapes_of(vector: Sequence[np.ndarray]) -> list[tuple[int, ...]]:
    return [tuple(a.shape) for a in vector]


def add(a: Sequence[np.ndarray], b: Sequence[np.ndarray], sign: int = 1) -> list[np.ndarray]:
    """``a + sign·b`` mod M, element-wise over the arrays."""
    return [np.mod(x + sign * y, MOD_RANGE) for x, y in zip(a, b, strict=True)]


def mask(vector: Sequence[np.ndarray], own_seed: bytes, own_nid: int,
         pair_keys: Mapping[int, bytes]) -> list[np.ndarray]:
    """SecAgg+'s masked vector: ``x + PRG(b_u) + Σ_v ±PRG(s_uv)`` mod M, with ``+`` for a
    neighbour of a smaller node id (Bell et al., Flower's ``_collect_masked_vectors``)."""
    shapes = shapes_of(vector)
    out = add(vector, prg(own_seed, shapes))
    for nid, key in pair_keys.items():
        out = add(out, prg(key, shapes), 1 if own_nid > nid else -1)
    return out


def signed(vector: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Values of Z_M read as integers in [-M/2, M/2)."""
    return [np.where(a >= MOD_RANGE // 2, a - MOD_RANGE, a) for a in vector]


def decode_mean(total: Sequence[np.ndarray], names: Sequence[str], num_sites: int,
                params: SecAggParams) -> tuple[dict[str, torch.Tensor], int]:
    """The weighted mean update from the unmasked sum of ``num_sites`` quantised vectors.

    ``Σ_k q_k = s (Σ_k r_k x_k + n C) + rounding (+ noise)``: dequantise (Flower's
    ``dequantize``), remove the ``n·C`` offset, divide by ``Σ r_k`` (the factor sum).

    Returns:
        The mean update (float32 tensors) and the factor sum.
    """
    total = signed(total)
    q_sum = int(total[0][0])
    if q_sum <= 0:
        raise SecAggError(f"unmasked weight factor sum is {q_sum}: the shares or masked "
                          "vectors are inconsistent")
    values = dequantize(list(total[1:]), params.clip_norm, params.target_range)
    offset = -(num_sites - 1) * params.clip_norm
    mean = {name: torch.from_numpy((v + offset) * (params.target_range / q_sum)).float()
            for name, v in zip(names, values, strict=True)}
    return mean, q_sum


def check_headroom(num_sites: int, noise_std: float, params: SecAggParams) -> None:
    """Raise unless the sum of ``num_sites`` vectors (plus 8 std of noise) stays below M/2,
    where its signed reading is exact."""
    top = num_sites * params.target_range + 8 * noise_std
    if top >= params.mod_range // 2:
        raise SecAggError(f"{num_sites} sites x {params.target_range} levels + noise "
                          f"({noise_std:.3g} std) would wrap the ring of 2**32: lower "
                          "'secagg-noise-multiplier' or sample fewer sites per round")


def check_masked(vector: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
                 ) -> str | None:
    """Why a masked vector is malformed (names, shapes, integer values in Z_M), or None."""
    if set(vector) != set(shapes):
        diff = sorted(set(vector) ^ set(shapes))
        return f"masked vector's tensor names differ from those sent: {diff[:3]}"
    for name, a in vector.items():
        if tuple(a.shape) != tuple(shapes[name]):
            return f"{name}: masked shape {tuple(a.shape)}, expected {tuple(shapes[name])}"
        if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() >= MOD_RANGE)):
            return f"{name}: masked values must be integers in [0, 2**32), got {a.dtype}"
    return None


def seed_digest(seed: bytes) -> bytes:
    """The commitment a site sends to its mask seed (sha256), checked after rebuilding it."""
    return hashlib.sha256(seed).digest()


def seed_verifier(digest: bytes) -> Callable[[bytes], bool]:
    return lambda secret: hashlib.sha256(secret).digest() == digest


def key_verifier(public_key: bytes) -> Callable[[bytes], bool]:
    """True for the private key whose public key a site published at setup."""
    def verify(secret: bytes) -> bool:
        try:
            return public_key_to_bytes(bytes_to_private_key(secret).public_key()) == public_key
        except (ValueError, TypeError):
            return False
    return verify


def _combine(shares: Sequence[bytes], verify: Callable[[bytes], bool]) -> bytes | None:
    try:
        secret = combine_shares(list(shares))
    except (ValueError, IndexError):
        return None
    return secret if verify(secret) else None


def reconstruct(shares: Mapping[int, bytes], threshold: int,
                verify: Callable[[bytes], bool]) -> tuple[bytes, list[int]]:
    """Rebuild a secret from the shares its holders returned, excluding bad shares.

    Shamir's scheme has no integrity of its own: a wrong share silently yields a wrong
    secret. Each secret is therefore checked against what its owner committed to (the
    sha256 of its mask seed, or the public key of its private key): subsets of
    ``threshold`` shares are tried in turn (up to :data:`MAX_COMBINATIONS`) until one
    rebuilds the committed secret, and every other share is then checked against it
    (with ``threshold − 1`` of the verified ones), so a bad share is reported even when
    it was not needed. ``threshold`` shares per combination keep the cost at
    O(n·t²) field operations per secret rather than O(n²).

    Args:
        shares: Holder node id → the share it returned.
        threshold: Shares needed.
        verify: The owner's commitment check.

    Returns:
        The secret and the holders whose shares were rejected.

    Raises:
        SecAggError: With fewer than ``threshold`` shares, or if no subset verifies.
    """
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} share(s) returned, {threshold} needed "
                          "(secagg-threshold)")
    holders = sorted(shares)
    for tried, subset in enumerate(combinations(holders, threshold)):
        if tried >= MAX_COMBINATIONS:
            break
        secret = _combine([shares[h] for h in subset], verify)
        if secret is None:
            continue
        base = [shares[h] for h in subset[:threshold - 1]]
        bad = [h for h in holders if h not in subset
               and _combine(base + [shares[h]], verify) is None]
        return secret, bad
    raise SecAggError(f"no {threshold} of the {len(shares)} shares from nodes {holders} "
                      "rebuild the committed secret: shares were tampered with or corrupted")
