"""Append-only, hash-chained privacy ledger per (site, dataset).

Format 1 (``<site>-<fingerprint[:16]>.jsonl``, keyed by the training tensors' sha256)
has the keys :data:`ENTRY_KEYS`. Format 2 (``<site>-ds-<sha256(dataset id)[:16]>.jsonl``,
``privacy.record_budget``) adds :data:`V2_KEYS`: ``v`` = 2, the declared ``dataset_id``,
the ``manifest`` digest of the records the round may touch, ``n_records`` and ``seq``
(the entry's place among the site's format-2 entries). Both are read here; code older
than format 2 refuses a format-2 file (unknown keys), i.e. fails closed.

One JSON object per line. Each entry carries ``prev`` = sha256 of the canonical JSON
(sorted keys, no spaces) of the previous entry ("0"*64 for the first), so editing,
deleting or reordering an entry breaks the chain. Appends hold an exclusive
``fcntl.flock`` on ``<ledger>.lock`` and write + flush + fsync the line before
returning, so an entry is durable before the site's update leaves the site. A last
line cut by a crash is reported as an error, never repaired.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from fedadapt.privacy.accounting import Mechanism

GENESIS = "0" * 64
ENTRY_KEYS = ("run_id", "round", "noise_multiplier", "sample_rate", "steps", "clip_norm",
              "delta", "accountant", "epsilon", "time", "prev")
V2_KEYS = ("v", "dataset_id", "manifest", "n_records", "seq")
FORMAT = 2


class LedgerError(ValueError):
    """A ledger is unreadable, truncated, or its hash chain is broken."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line


def fingerprint(data: bytes) -> str:
    """sha256 hex digest of the training data bytes (the dataset's identity)."""
    return hashlib.sha256(data).hexdigest()


def canonical(entry: dict) -> bytes:
    """Canonical JSON bytes of an entry (sorted keys, compact separators)."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def ledger_path(ledger_dir: str | Path, site: str, data_fingerprint: str) -> Path:
    """The ledger file for ``site`` and a dataset fingerprint."""
    return Path(ledger_dir) / f"{site}-{data_fingerprint[:16]}.jsonl"


def mechanism(entry: dict) -> Mechanism:
    """The DP-SGD mechanism recorded by an entry."""
    return Mechanism(float(entry["noise_multiplier"]), float(entry["sample_rate"]),
                     int(entry["steps"]))


_KEY_SETS = (set(ENTRY_KEYS), set(ENTRY_KEYS) | set(V2_KEYS))


def read_entries(path: str | Path) -> list[dict]:
    """Read and verify a ledger (missing file = empty ledger).

    Raises:
        LedgerError: Naming the first bad line (1-based) on a truncated last line,
            invalid JSON, missing keys, or a broken hash chain.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LedgerError(f"ledger {path} is unreadable: {exc}") from exc
    if not raw:
        return []
    lines = raw.split(b"\n")
    if lines[-1] != b"":
        raise LedgerError(f"ledger {path}: last line is truncated (no trailing newline); "
                          f"a write was cut; not repaired", line=len(lines))
    entries: list[dict] = []
    prev = GENESIS
    for i, line in enumerate(lines[:-1], start=1):
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise LedgerError(f"ledger {path}: invalid JSON ({exc})", line=i) from exc
        if not isinstance(entry, dict) or set(entry) not in _KEY_SETS:
            raise LedgerError(f"ledger {path}: entry keys are not {ENTRY_KEYS} (format 1) "
                              f"or those plus {V2_KEYS} (format 2)", line=i)
        if "v" in entry and entry["v"] != FORMAT:
            raise LedgerError(f"ledger {path}: entry format v={entry['v']!r} is not "
                              f"{FORMAT}; upgrade fedadapt to read it", line=i)
        if entry["prev"] != prev:
            raise LedgerError(f"ledger {path}: hash chain broken (this or the previous entry altered, removed "
                              f"or reordered)", line=i)
        prev = entry_hash(entry)
        entries.append(entry)
    return entries


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on ``<path>.lock``."""
    path = Path(path)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Ledger:
    """A site's ledger file for one dataset."""

    path: Path

    def entries(self) -> list[dict]:
        return read_entries(self.path)

    def history(self) -> list[Mechanism]:
        return [mechanism(e) for e in self.entries()]

    def append(self, *, run_id: str, round: int, noise_multiplier: float, sample_rate: float,
               steps: int, clip_norm: float, delta: float, accountant: str,
               epsilon: float | Callable[[list[Mechanism]], float]) -> dict:
        """Append one entry durably under the lock; returns the entry written.

        The chain is re-verified under the lock first, so a corrupt ledger is never
        extended. ``epsilon`` may be a function of the history *including* the new
        entry's mechanism, evaluated under the lock (so two processes appending at once
        cannot both pass a cap check made on a stale history); it may raise to refuse.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.path):
            existing = read_entries(self.path)
            if callable(epsilon):
                epsilon = epsilon([*(mechanism(e) for e in existing),
                                   Mechanism(float(noise_multiplier), float(sample_rate),
                                             int(steps))])
            return write_entry(self.path, existing, {
                "run_id": str(run_id), "round": int(round),
                "noise_multiplier": float(noise_multiplier),
                "sample_rate": float(sample_rate), "steps": int(steps),
                "clip_norm": float(clip_norm), "delta": float(delta),
                "accountant": str(accountant), "epsilon": float(epsilon)})


def write_entry(path: Path, existing: list[dict], fields: dict) -> dict:
    """Chain ``fields`` after ``existing`` (read under the caller's lock) and append the
    line durably (write + fsync; fsync of the folder when the file is new)."""
    entry = {**fields, "time": time.time(),
             "prev": entry_hash(existing[-1]) if existing else GENESIS}
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, canonical(entry) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)
    return entry
