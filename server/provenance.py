"""Provenance of a released model: hashes, versions and each site's privacy record.

Pure helpers for ``server.release``: sha256 of files and of tensor state dicts, the
code and library versions a run was made with, the Wilson score interval of a site's
accuracy, and each site's ledger head (the sha256 of its last entry) with ε recomputed
from the recorded mechanisms (``privacy.audit``), never copied from a stored value.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch

from fedadapt.privacy.accounting import epsilon
from fedadapt.privacy.audit import audit_ledger
from fedadapt.privacy.ledger import entry_hash, mechanism, read_entries

#: Libraries whose versions a release records.
LIBRARIES = ("flwr", "torch", "opacus", "peft", "monai", "safetensors", "numpy")
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over tensors in sorted name order: name, dtype, shape, then raw bytes.

    Independent of file format and of the order a module registers its tensors, so the
    same weights hash the same whether built from a spec or read from a checkpoint.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Installed versions of :data:`LIBRARIES` (None for one not installed)."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: str | Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout holding ``path``; ``(None, None)`` outside one."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(path), *args], capture_output=True,
                                  text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def wilson_interval(successes: int, n: int, *, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927; Brown, Cai and
    DasGupta 2001 recommend it over the normal approximation for small ``n``).

    Args:
        successes: Correct predictions k, 0 <= k <= n.
        n: Evaluated records, >= 1.
        z: Standard normal quantile (1.96 for a 95 % interval).

    Returns:
        ``(lower, upper)`` within [0, 1].

    Raises:
        ValueError: If ``n < 1`` or ``successes`` is outside 0..n.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"Wilson interval needs 0 <= successes <= n and n >= 1, got "
                         f"successes={successes}, n={n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class LedgerHead:
    """A ledger as it stood at release: its file, the fingerprint prefix in its name,
    how many entries it held, ε recomputed from them and the hash of the last one.

    Attributes:
        file: The ledger's file name: ``<site>-<fingerprint[:16]>.jsonl`` (format 1) or
            ``<site>-ds-<sha256(dataset id)[:16]>.jsonl`` (format 2, per-record budgets).
        data_fingerprint_prefix: Format 1: the first 16 hex digits of the training
            tensors' sha256 (the file name's); '' for a format-2 ledger.
        entries: Entries at release.
        epsilon: ε recomputed from the entries' mechanisms.
        delta: δ of the entries.
        accountant: Accountant of the entries.
        head_sha256: sha256 of the canonical JSON of the last entry.
        dataset_id: Format 2: the site-declared dataset id the entries charge; ''.
    """

    file: str
    data_fingerprint_prefix: str
    entries: int
    epsilon: float
    delta: float
    accountant: str
    head_sha256: str
    dataset_id: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class ProvenanceError(ValueError):
    """A run's privacy record cannot be vouched for (a ledger fails its audit)."""


def ledger_head(path: Path, site: str, *, upto: int | None = None) -> LedgerHead:
    """Audit one ledger and describe its head (after ``upto`` entries, default all).

    Raises:
        ProvenanceError: If the ledger fails the audit (chain, stored ε, cap), is empty,
            or holds fewer than ``upto`` entries.
    """
    audit = audit_ledger(path)
    if not audit.ok:
        raise ProvenanceError(f"ledger {path} of site {site!r} fails its audit: {audit.error}; "
                              f"run `fedadapt audit {path}` for the full report")
    entries = read_entries(path)
    n = len(entries) if upto is None else upto
    if not entries or n < 1 or n > len(entries):
        raise ProvenanceError(f"ledger {path} of site {site!r} holds {len(entries)} entries, "
                              f"expected at least {max(n, 1)}")
    kept = entries[:n]
    eps = epsilon([mechanism(e) for e in kept], delta=float(kept[0]["delta"]),
                  accountant=str(kept[0]["accountant"]))
    dataset_id = str(kept[-1].get("dataset_id", ""))
    prefix = (path.stem[len(site) + 1:] if path.stem.startswith(site + "-") and not dataset_id
              else "")
    return LedgerHead(path.name, prefix, n, eps, float(kept[0]["delta"]),
                      str(kept[0]["accountant"]), entry_hash(kept[-1]), dataset_id)
