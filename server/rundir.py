"""The run directory: ``summary.json`` (schema in the README) and the final PEFT adapter."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model, load_trainable

SCHEMA = "fedadapt.summary/1"
ADAPTER_DIR = "adapter"


def new_run_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create ``<out_dir>/<timestamp>/`` (a suffix keeps two runs in one second apart)."""
    base = Path(out_dir) / time.strftime("%Y%m%d-%H%M%S")
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    path.mkdir(parents=True)
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and a rename: never half-written."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(run_dir: Path, cfg: RunConfig, arrays: ArrayRecord) -> Path:
    """Save the global adapter + head in PEFT format (``adapter_config.json`` +
    ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained``."""
    model = build_model(cfg.model_spec())
    load_trainable(model, arrays.to_torch_state_dict())
    out = run_dir / ADAPTER_DIR
    model.save_pretrained(str(out))
    return out
