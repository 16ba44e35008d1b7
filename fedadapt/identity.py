"""Who a site's budget belongs to: a declared dataset identity and one id per record.

Record-level DP bounds what a release reveals about any one *record* (a patient's
image), so the budget must follow records, not the bytes of a training tensor: the
same records re-ordered, re-typed, re-sized or nudged by 1e-7 are the same patients
(Dwork & Roth, "The Algorithmic Foundations of Differential Privacy", 2014, §2.3: the
unit of privacy is the record). A :class:`DatasetIdentity` names

* ``dataset_id``: declared by the site (``site.toml`` ``dataset_id`` or the datalist's
  ``dataset_id``; simulated sites derive a stable one from site, scenario and seed); it
  names the ledger file the dataset's rounds are appended to;
* ``record_ids``: one stable id per record, computed from the *source* of the record
  (sha256 of the source file's bytes and its path relative to the datalist, or the
  datalist's own ``record_id``; for generated data, site/scope/seed/index), never from
  preprocessed tensors.

A round's *manifest* is the set of record ids it may touch; manifests are stored
content-addressed (:func:`manifest_digest`) next to the ledger (``privacy.manifests``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

ATTR = "fedadapt_identity"  # attribute set on a dataset object by :func:`attach`


class IdentityError(ValueError):
    """A dataset has no usable identity (the site refuses to train: fail closed)."""


@dataclass(frozen=True)
class DatasetIdentity:
    """The declared identity of one training set.

    Attributes:
        dataset_id: The site-declared id of the dataset (stable across re-exports).
        record_ids: One id per record, in the dataset's order (duplicates allowed: two
            records with one id are accounted as one, which only adds spending to it).
    """

    dataset_id: str
    record_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.dataset_id, str) and self.dataset_id.strip()):
            raise IdentityError(f"dataset_id must be a non-empty string, got "
                                f"{self.dataset_id!r}; declare dataset_id in site.toml or "
                                f"the datalist")
        if not isinstance(self.record_ids, tuple) or not self.record_ids:
            raise IdentityError(f"dataset {self.dataset_id!r}: record_ids must be a non-empty "
                                f"tuple of strings, got {type(self.record_ids).__name__} "
                                f"of length {len(self.record_ids) if self.record_ids else 0}")
        bad = next((r for r in self.record_ids if not (isinstance(r, str) and r)), None)
        if bad is not None:
            raise IdentityError(f"dataset {self.dataset_id!r}: every record id must be a "
                                f"non-empty string, found {bad!r}")

    @property
    def records(self) -> frozenset[str]:
        """The distinct record ids (the manifest of a round over the whole dataset)."""
        return frozenset(self.record_ids)


def manifest_digest(record_ids: Iterable[str]) -> str:
    """sha256 of the canonical JSON of the sorted, distinct record ids."""
    return hashlib.sha256(manifest_bytes(record_ids)).hexdigest()


def manifest_bytes(record_ids: Iterable[str]) -> bytes:
    """The canonical bytes a manifest is stored as (a sorted JSON list)."""
    return json.dumps(sorted(set(record_ids)), separators=(",", ":")).encode()


def attach(dataset: Any, identity: DatasetIdentity) -> Any:
    """Attach ``identity`` to ``dataset`` (returned) after checking their sizes agree.

    Raises:
        IdentityError: If the dataset has another number of records than ids.
    """
    if len(dataset) != len(identity.record_ids):
        raise IdentityError(f"dataset {identity.dataset_id!r}: {len(dataset)} records but "
                            f"{len(identity.record_ids)} record ids")
    setattr(dataset, ATTR, identity)
    return dataset


def identity_of(dataset: Any) -> DatasetIdentity:
    """The identity attached to ``dataset``.

    Raises:
        IdentityError: If none is attached (a derived dataset: charge its sources).
    """
    identity = getattr(dataset, ATTR, None)
    if not isinstance(identity, DatasetIdentity):
        raise IdentityError(f"a training set of {len(dataset)} records has no record "
                            f"identity: the site cannot say whose budget a round spends "
                            f"and refuses to train (datasets from Site.datasets carry one)")
    return identity


def source_record_id(path: Path, relative: str) -> str:
    """sha256 over a record's source path (relative to its datalist) and its bytes.

    A DICOM series folder hashes each file (sorted by relative name) with its name.
    """
    h = hashlib.sha256(b"fedadapt-record-v1\0" + relative.encode() + b"\0")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def array_record_id(namespace: str, *arrays: Any) -> str:
    """sha256 of a record held inside one file (e.g. a MedMNIST npz) from its raw arrays."""
    h = hashlib.sha256(b"fedadapt-record-v1\0" + namespace.encode() + b"\0")
    for a in arrays:
        h.update(f"{a.dtype}{tuple(a.shape)}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def synthetic_identity(site: str, scope: str, seed: int, n: int) -> DatasetIdentity:
    """The stable identity of ``n`` generated records of a simulated site.

    Record ``i`` is ``sim:<site>:<scope>:seed<seed>:<i>``; it does not depend on the
    image size or any other preprocessing, so a run at another size spends the same
    records' budget.
    """
    dataset_id = f"sim:{site}:{scope}:seed{seed}"
    return DatasetIdentity(dataset_id, tuple(f"{dataset_id}:{i}" for i in range(n)))
