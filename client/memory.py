"""What a site remembers between rounds of a continual run, kept where it survives restarts.

Flower's ``context.state`` lives in the SuperNode's memory for one Flower run: a restarted
SuperNode, or a server resumed with ``resume-from`` (a new Flower run), would start with
none of it and silently fall back to naive fine-tuning. ``SiteMemory`` writes every
entry through to the site's own folder, ``<site_dir>/continual/<run key>/``, where the
run key is the federation run's name sent by the server (its run directory's name, the
same after a resume), and reads it back when ``context.state`` does not have it.

The entries are the site's own: the phase anchor, the DP Fisher, earlier phases' LoRA A
and the replay reservoir (records of the site's own data: they stay on the site's disk,
next to the data they come from). Writes are atomic (:mod:`fedadapt.atomic`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from safetensors.torch import load_file, save

from fedadapt import atomic
from fedadapt.layout import MEMORY_DIR

_RUN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def memory_folder(site_dir: Path | None, run_key: str, kind: str = MEMORY_DIR) -> Path | None:
    """``<site_dir>/<kind>/<run_key>`` (``kind``: ``continual``, or ``replies`` for
    :mod:`client.replies`), or None without a site folder or run key.

    Raises:
        ValueError: If the run key (sent by the server) is not a plain name; it names a
            folder at the site, so separators and ``..`` are refused.
    """
    if site_dir is None or not run_key:
        return None
    if not _RUN_KEY.match(run_key) or ".." in run_key:
        raise ValueError(f"run key {run_key!r} from the server is not a plain name (letters, "
                         "digits, '.', '_', '-'); the site refuses to use it as a folder")
    return Path(site_dir) / kind / run_key


class SiteMemory:
    """``context.state`` written through to a folder (None: memory only)."""

    def __init__(self, context: Context, folder: Path | None) -> None:
        self.context, self.folder = context, folder

    def arrays(self, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored under ``key``, or None."""
        rec = self.context.state.array_records.get(key)
        if rec is not None:
            return rec.to_torch_state_dict()
        path = self._path(key, ".safetensors")
        if path is None or not path.is_file():
            return None
        tensors = load_file(str(path))
        self.context.state[key] = ArrayRecord(tensors)
        return tensors

    def put_arrays(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` under ``key`` (in memory, then durably in the folder)."""
        tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
        self.context.state[key] = ArrayRecord(tensors)
        path = self._path(key, ".safetensors")
        if path is not None:
            atomic.write_bytes(path, save(tensors))

    def number(self, key: str) -> int | None:
        """The integer stored under ``key``, or None."""
        rec = self.context.state.config_records.get(key)
        if rec is not None:
            return int(rec["value"])  # type: ignore[arg-type]
        path = self._path(key, ".json")
        if path is None or not path.is_file():
            return None
        value = int(json.loads(path.read_text())["value"])
        self.context.state[key] = ConfigRecord({"value": value})
        return value

    def put_number(self, key: str, value: int) -> None:
        """Store an integer under ``key``."""
        self.context.state[key] = ConfigRecord({"value": int(value)})
        path = self._path(key, ".json")
        if path is not None:
            atomic.write_json(path, {"value": int(value)}, indent=None)

    def _path(self, key: str, suffix: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}{suffix}"
