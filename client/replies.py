"""A site's reply to a round, kept so that a round asked again is not trained twice.

A server that dies after the sites have trained round r (their ledgers record it) but
before it has aggregated and checkpointed, and is resumed (``resume-from``), asks for
round r again, with the same run key and the same global adapter. Without this, the
site would train again and spend its privacy budget twice on one round. A site instead
keeps its last replies in ``<site_dir>/replies/<run key>/`` and sends the kept one again:
re-sending an output already released costs no privacy (post-processing). The tensors
are those that left the site anyway; writes are atomic; only the last two rounds are
kept.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from fedadapt import atomic
from fedadapt.client.memory import memory_folder
from fedadapt.layout import REPLY_DIR

KEEP_ROUNDS = 2


def reply_folder(site_dir: Path | None, run_key: str) -> Path | None:
    """``<site_dir>/replies/<run_key>``, or None without a site folder or run key."""
    return memory_folder(site_dir, run_key, REPLY_DIR)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_reply(folder: Path | None, rnd: int, received: str
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]] | None:
    """``(tensors, metrics, status)`` of the site's reply to round ``rnd``, or None. A
    kept reply counts only for the same request: ``received`` (the :func:`digest` of the
    global tensors received) must be the one it was trained from."""
    if folder is None:
        return None
    meta = folder / f"r{rnd}.json"
    if not meta.is_file():
        return None
    doc = json.loads(meta.read_text())
    if doc.get("received") != received:
        return None
    return load_file(str(folder / f"r{rnd}.safetensors")), doc["metrics"], doc["status"]


def save_reply(folder: Path | None, rnd: int, tensors: dict[str, torch.Tensor],
               metrics: dict[str, Any], status: dict[str, Any], received: str) -> None:
    """Keep the reply to round ``rnd`` (tensors first, then the JSON that marks it
    complete), and drop replies older than the last ``KEEP_ROUNDS`` rounds."""
    if folder is None:
        return
    atomic.write_bytes(folder / f"r{rnd}.safetensors",
                       save({n: t.detach().cpu().contiguous() for n, t in tensors.items()}))
    atomic.write_json(folder / f"r{rnd}.json",
                      {"metrics": metrics, "status": status, "received": received}, indent=None)
    for old in folder.glob("r*.json"):
        k = old.stem[1:]
        if k.isdigit() and int(k) <= rnd - KEEP_ROUNDS:
            old.unlink(missing_ok=True)
            (folder / f"r{k}.safetensors").unlink(missing_ok=True)
