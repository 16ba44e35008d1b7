"""Content-addressed record manifests next to a site's ledgers.

``<ledger dir>/manifests/<sha256>.json`` holds the sorted JSON list of the record ids a
ledger entry's round may have touched; the entry stores only the digest, so the hash
chain covers the manifest too. Files are written atomically (temp file, fsync,
``os.replace``, fsync of the folder) before the entry that names them, and verified
against their name when read: a missing, altered or unreadable manifest is an error
(privacy fails closed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from fedadapt import atomic
from fedadapt.identity import manifest_bytes, manifest_digest
from fedadapt.privacy.ledger import LedgerError

MANIFEST_DIR = "manifests"


@dataclass(frozen=True)
class ManifestStore:
    """The manifests of one site's ledger folder (a small read cache per instance)."""

    ledger_dir: Path
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def folder(self) -> Path:
        return Path(self.ledger_dir) / MANIFEST_DIR

    def path(self, digest: str) -> Path:
        return self.folder / f"{digest}.json"

    def put(self, record_ids: Iterable[str]) -> str:
        """Store a manifest durably (idempotent); returns its digest."""
        ids = list(record_ids)
        data = manifest_bytes(ids)
        digest = manifest_digest(ids)
        target = self.path(digest)
        if target.is_file() and target.read_bytes() == data:
            return digest
        atomic.write_bytes(target, data, mode=0o644)
        return digest

    def get(self, digest: str) -> frozenset[str]:
        """The record ids of manifest ``digest``.

        Raises:
            LedgerError: If the manifest is missing, unreadable, not a JSON list of
                strings, or its content does not hash to its name.
        """
        if digest in self._cache:
            return self._cache[digest]
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LedgerError(f"record manifest {path} named by a ledger entry is missing or "
                              f"unreadable ({exc}); the records it covers cannot be "
                              f"accounted: restore it from a backup") from exc
        try:
            ids = json.loads(data)
        except ValueError as exc:
            raise LedgerError(f"record manifest {path} is not valid JSON ({exc})") from exc
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise LedgerError(f"record manifest {path}: expected a JSON list of record id "
                              f"strings, found {type(ids).__name__}")
        if manifest_digest(ids) != digest:
            raise LedgerError(f"record manifest {path} was altered: its content hashes to "
                              f"{manifest_digest(ids)}, not to its name")
        out = frozenset(ids)
        self._cache[digest] = out
        return out
