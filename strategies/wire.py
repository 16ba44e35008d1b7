"""16-bit transport of adapter tensors: encode an ArrayRecord for the wire, decode it back.

Adapter (and head) tensors may travel as ``bfloat16`` or ``float16`` in both directions
(server → site and site → server), halving the payload; every receiver decodes them to
``float32`` at once, so training starts from and aggregation accumulates in float32
(the mixed-precision recipe of Micikevicius et al., "Mixed Precision Training", ICLR
2018, applied to communication). ``float32`` keeps Flower's own NumPy serialisation
unchanged.

NumPy has no bfloat16, so 16-bit tensors are carried as Flower ``Array`` objects of
``stype`` :data:`RAW_STYPE`: their raw little-endian bytes, with the torch dtype name
and the shape; the payload is exactly two bytes per element, with no header.
"""

from __future__ import annotations

import sys
from typing import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from fedadapt import keys
from fedadapt.strategies.names import WIRE_DTYPES

RAW_STYPE = "fedadapt.torch-raw"  # raw little-endian tensor bytes, dtype = torch dtype name
NUMPY_STYPE = "numpy.ndarray"  # Flower's own serialisation (np.save bytes)
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in _TORCH:
        raise ValueError(f"wire dtype {dtype!r} is not one of {', '.join(WIRE_DTYPES)}; "
                         f"set the run config 'wire-dtype' to one of them")
    return _TORCH[dtype]


def encode(tensors: ArrayRecord | Mapping[str, torch.Tensor], dtype: str) -> ArrayRecord:
    """Tensors as they travel: floating tensors cast to ``dtype``, others unchanged.

    Args:
        tensors: A state (name → tensor) or an ArrayRecord (decoded first).
        dtype: One of :data:`strategies.names.WIRE_DTYPES`.

    Raises:
        ValueError: On an unknown ``dtype``.
    """
    target = _check_dtype(dtype)
    state = decode(tensors) if isinstance(tensors, ArrayRecord) else dict(tensors)
    if target == torch.float32:
        return ArrayRecord({n: t.detach().cpu().float() if t.is_floating_point() else t
                            for n, t in state.items()})
    out = ArrayRecord()
    for name, t in state.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            out[name] = Array.from_numpy_ndarray(t.numpy())
            continue
        raw = t.to(target).contiguous().view(torch.uint8).numpy()
        if sys.byteorder != "little":
            raise RuntimeError("16-bit transport needs a little-endian machine")
        out[name] = Array(dtype=dtype, shape=tuple(t.shape), stype=RAW_STYPE,
                          data=raw.tobytes())
    return out


def decode(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A received ArrayRecord as float32 torch tensors (integer tensors unchanged).

    Raises:
        ValueError: If a raw array names an unknown dtype or its byte count does not
            match its shape.
    """
    out: dict[str, torch.Tensor] = {}
    for name, arr in record.items():
        if arr.stype == RAW_STYPE:
            dt = _check_dtype(arr.dtype)
            n = int(np.prod(arr.shape)) if arr.shape else 1
            want = n * torch.tensor([], dtype=dt).element_size()
            if len(arr.data) != want:
                raise ValueError(f"tensor {name!r} on the wire: {len(arr.data)} bytes for shape "
                                 f"{tuple(arr.shape)} {arr.dtype}, expected {want}; the "
                                 f"message is corrupt or from another fedadapt version")
            t = torch.frombuffer(bytearray(arr.data), dtype=dt).reshape(tuple(arr.shape))
        else:
            t = torch.from_numpy(np.array(arr.numpy(), copy=True))
        out[name] = t.float() if t.is_floating_point() else t
    return out


def format_problem(record: ArrayRecord, dtype: str) -> str | None:
    """Why ``record`` is not what :func:`encode` makes for ``dtype``, or None if it is.

    Every floating tensor must travel in the run's wire dtype: as Flower's NumPy
    serialisation of ``float32`` for ``float32``, as :data:`RAW_STYPE` bytes of exactly
    ``dtype`` (and of the right length) for a 16-bit dtype. Non-floating tensors keep
    Flower's NumPy serialisation. Update validation (:mod:`strategies.validation`)
    rejects a reply with a problem before it is decoded, since decoding to float32 would
    hide the dtype the site sent.

    Args:
        record: A reply's ArrayRecord as it came off the wire.
        dtype: The run's wire dtype (``wire-dtype``).
    """
    _check_dtype(dtype)
    for name, arr in record.items():
        if arr.stype == RAW_STYPE:
            if arr.dtype != dtype:
                return (f"{name}: sent as {arr.dtype} on the wire, the run's wire-dtype is "
                        f"{dtype}")
            n = int(np.prod(arr.shape)) if arr.shape else 1
            if len(arr.data) != n * bytes_per_element(dtype):
                return (f"{name}: {len(arr.data)} bytes for shape {tuple(arr.shape)} {dtype}, "
                        f"expected {n * bytes_per_element(dtype)}")
        elif arr.stype == NUMPY_STYPE:
            try:
                kind = np.dtype(arr.dtype).kind
            except TypeError:
                return f"{name}: unknown dtype {arr.dtype!r} on the wire"
            if kind in "fc" and (dtype != "float32" or arr.dtype != "float32"):
                return (f"{name}: sent as {arr.dtype} on the wire, the run's wire-dtype is "
                        f"{dtype}")
        else:
            return (f"{name}: serialisation {arr.stype!r} on the wire, expected "
                    f"{NUMPY_STYPE!r} or {RAW_STYPE!r}")
    return None


def bytes_per_element(dtype: str) -> int:
    """Bytes one floating element takes on the wire in ``dtype``."""
    return torch.tensor([], dtype=_check_dtype(dtype)).element_size()


def encode_messages(messages: Iterable[Message], dtype: str) -> list[Message]:
    """Encode the ArrayRecord of each outgoing message in place (no-op for float32)."""
    messages = list(messages)
    if dtype != "float32":
        for msg in messages:
            if keys.ARRAYS in msg.content.array_records:
                msg.content[keys.ARRAYS] = encode(msg.content[keys.ARRAYS], dtype)
    return messages
