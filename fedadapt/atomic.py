"""Atomic whole-file writes: a reader or a crash sees the old file or the new one, never half.

The recipe (POSIX rename semantics; see e.g. Pillai et al., "All File Systems Are Not
Created Equal", OSDI 2014): write a temporary file in the *same* directory, flush and
fsync it, ``os.replace`` it over the target (atomic on one file system), then fsync the
directory so that the rename itself survives a power loss. Every file fedadapt writes
whole (``summary.json``, ``checkpoint.pt``, the run key, a site's kept replies and
memory, policies) goes through :func:`write_bytes` / :func:`write_text` /
:func:`write_json`. Append-only files (the privacy ledger) have their own discipline.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

__all__ = ["fsync_dir", "write_bytes", "write_figure", "write_json", "write_text", "write_torch"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a rename or a new file in it is durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o666) -> Path:
    """Replace ``path``'s content with ``data`` atomically and durably.

    Args:
        path: The file to write; its folder is created if missing.
        data: The whole new content.
        mode: Permission bits of a new file (the umask applies), e.g. ``0o600`` for a
            secret: the temporary file is created with them, so the content is never
            readable by others, not even briefly.

    Returns:
        ``path``.

    Raises:
        OSError: If the write fails; the old file (if any) is then left untouched and
            the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8",
               mode: int = 0o666) -> Path:
    """:func:`write_bytes` of ``text`` encoded with ``encoding``."""
    return write_bytes(path, text.encode(encoding), mode=mode)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """:func:`write_text` of ``json.dumps(obj, indent=indent)`` (serialised first, so an
    object JSON cannot hold fails before anything is written)."""
    return write_text(path, json.dumps(obj, indent=indent))


def write_figure(path: str | os.PathLike[str], fig: Any, **savefig: Any) -> Path:
    """Save a matplotlib figure (format from the suffix, default PNG) atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **savefig)
    return write_bytes(path, buf.getvalue())


def write_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` of ``obj`` to ``path``, atomically (torch is imported by the caller's
    object: this module imports no third-party package)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())
