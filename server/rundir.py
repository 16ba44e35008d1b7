"""The run directory: its run key and the final PEFT adapter (``summary.json``: ``server.summary``)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from flwr.app import ArrayRecord

from fedadapt import atomic
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model, load_trainable
from fedadapt.layout import ADAPTER_DIR, RUN_KEY_FILE
from fedadapt.imaging.run_spec import run_model_spec


def new_run_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create ``<out_dir>/<timestamp>/`` (a suffix keeps two runs in one second apart)."""
    base = Path(out_dir) / time.strftime("%Y%m%d-%H%M%S")
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    path.mkdir(parents=True)
    return path


def run_key(run_dir: Path) -> str:
    """The federation run's name for the sites (``keys.RUN_KEY``): the run directory's
    name and a random suffix, made once and kept in ``<run_dir>/run-key`` so that a
    resumed run sends the same one and two federations never share one."""
    path = run_dir / RUN_KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    key = f"{run_dir.name}-{uuid.uuid4().hex[:12]}"
    atomic.write_text(path, key + "\n")
    return key


def save_adapter(run_dir: Path, cfg: RunConfig, arrays: ArrayRecord) -> Path:
    """Save the global adapter + head in PEFT format (``adapter_config.json`` +
    ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained``."""
    model = build_model(run_model_spec(cfg))
    load_trainable(model, arrays.to_torch_state_dict())
    out = run_dir / ADAPTER_DIR
    model.save_pretrained(str(out))
    return out
