"""Verify a release bundle (``server.release``): signature, every file hash, the base
model rebuilt from its spec, and — given the sites' ledgers — each ledger's head and ε.

Every problem is collected and named (which file, what was expected, what was found);
nothing stops at the first one. A ledger may have grown since the release (later
rounds or runs): its first ``entries`` entries must still end in the recorded head and
recompute to the recorded ε.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from fedadapt.imaging.backbones import ModelSpec
from fedadapt.server.provenance import ProvenanceError, ledger_head, state_dict_sha256
from fedadapt.server.provenance import file_sha256
from fedadapt.server.release import MANIFEST, SIGNATURE, released_base
from fedadapt.server.signing import (SigningError, load_public_key, public_key_from_hex,
                                     public_raw_hex, verify)

EPS_REL_TOL = 1e-6


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_release`` found.

    Attributes:
        ok: No problem found.
        problems: One line per problem, naming the file.
        checked: What was checked and passed.
        signer: Hex public key the manifest was verified against.
        pinned: Whether that key was given by the caller (else the manifest's own key:
            integrity, not authorship).
    """

    ok: bool
    problems: tuple[str, ...]
    checked: tuple[str, ...]
    signer: str | None
    pinned: bool

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": list(self.problems), "checked": list(self.checked),
                "signer": self.signer, "pinned": self.pinned}


@dataclass
class _Findings:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


def _check_signature(bundle: Path, data: bytes, manifest: dict, public_key: Path | None,
                     f: _Findings) -> str | None:
    try:
        sig = bytes.fromhex((bundle / SIGNATURE).read_text().strip())
    except FileNotFoundError:
        f.problems.append(f"{SIGNATURE}: missing (the bundle is unsigned)")
        return None
    except ValueError:
        f.problems.append(f"{SIGNATURE}: not a hex signature")
        return None
    embedded = (manifest.get("signer") or {}).get("public_key")
    try:
        key = load_public_key(public_key) if public_key else public_key_from_hex(str(embedded))
    except SigningError as err:
        f.problems.append(f"{SIGNATURE}: no usable public key ({err})")
        return None
    signer = public_raw_hex(key)
    if public_key and embedded != signer:
        f.problems.append(f"{MANIFEST}: names signer {embedded}, but the given public key "
                          f"{public_key} is {signer}")
    if verify(key, sig, data):
        f.checked.append(f"signature of {MANIFEST} by {signer}")
    else:
        f.problems.append(f"{MANIFEST}/{SIGNATURE}: signature does not verify with key "
                          f"{signer} (the manifest was altered or signed by another key)")
    return signer


def _check_files(bundle: Path, manifest: dict, f: _Findings) -> None:
    listed = manifest.get("files") or {}
    for name, expected in sorted(listed.items()):
        path = bundle / name
        if not path.is_file():
            f.problems.append(f"{name}: missing")
            continue
        found = file_sha256(path)
        if found == expected:
            f.checked.append(f"sha256 of {name}")
        else:
            f.problems.append(f"{name}: sha256 {found} differs from the manifest's {expected} "
                              "(the file was altered)")
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    for extra in sorted(present - set(listed) - {MANIFEST, SIGNATURE}):
        f.problems.append(f"{extra}: not listed in the manifest (added after signing)")
    adapter = (manifest.get("adapter") or {}).get("sha256")
    if adapter and listed.get("adapter/adapter_model.safetensors") != adapter:
        f.problems.append(f"{MANIFEST}: adapter sha256 differs from its file entry")


def _check_base(manifest: dict, f: _Findings) -> None:
    base = manifest.get("base_model") or {}
    try:
        spec = ModelSpec(**base["spec"])
        found = state_dict_sha256(released_base(spec).state_dict())
    except (KeyError, TypeError, ValueError, OSError) as err:
        f.problems.append(f"{MANIFEST}: base model cannot be rebuilt from its spec ({err})")
        return
    if found == base.get("state_dict_sha256"):
        f.checked.append("base model rebuilt from its spec: state-dict sha256 matches")
    else:
        f.problems.append(f"{MANIFEST}: the base model built here from the spec hashes to "
                          f"{found}, the release recorded {base.get('state_dict_sha256')} "
                          "(other weights or library versions)")


def ledger_files(paths: Iterable[str | Path]) -> list[Path]:
    """Ledger files among ``paths``: files as given, folders searched for ``*.jsonl``."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.rglob("*.jsonl")))
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"--ledgers {p}: no such file or folder")
    return out


def _check_ledgers(manifest: dict, ledgers: Sequence[Path], f: _Findings) -> None:
    recorded = {h["file"]: (site, h) for site, s in (manifest.get("sites") or {}).items()
                for h in s.get("ledgers", [])}
    for path in ledgers:
        if path.name not in recorded:
            f.checked.append(f"ledger {path}: not part of this release (ignored)")
            continue
        site, head = recorded[path.name]
        try:
            now = ledger_head(path, site, upto=int(head["entries"]))
        except ProvenanceError as err:
            f.problems.append(f"ledger {path}: {err}")
            continue
        if now.head_sha256 != head["head_sha256"]:
            f.problems.append(f"ledger {path}: entry {head['entries']} hashes to "
                              f"{now.head_sha256}, the release recorded {head['head_sha256']} "
                              "(the ledger's last entry at release was altered)")
        elif not math.isclose(now.epsilon, float(head["epsilon"]), rel_tol=EPS_REL_TOL):
            f.problems.append(f"ledger {path}: ε recomputed from its entries is "
                              f"{now.epsilon}, the release recorded {head['epsilon']}")
        else:
            f.checked.append(f"ledger {path}: head and ε={now.epsilon:.6g} match")
    given = {p.name for p in ledgers}
    for name in sorted(set(recorded) - given):
        f.checked.append(f"ledger {name} of site {recorded[name][0]}: not given, not checked")


def verify_release(bundle: str | Path, *, ledgers: Sequence[str | Path] = (),
                   public_key: str | Path | None = None, rebuild_base: bool = True) -> VerifyReport:
    """Recheck a release bundle.

    Args:
        bundle: The release folder.
        ledgers: Ledger files or folders holding them (e.g. a sites dir).
        public_key: The expected signer's public key PEM; without it the manifest's own
            key is used (which proves integrity, not who signed).
        rebuild_base: Rebuild the base model from its spec and compare its hash.

    Returns:
        The report; ``ok`` is False if any check failed.

    Raises:
        ValueError: If ``bundle`` is not a folder or a ``--ledgers`` path does not exist.
    """
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise ValueError(f"release {bundle}: no such folder")
    files = ledger_files(ledgers)
    f = _Findings()
    try:
        data = (bundle / MANIFEST).read_bytes()
        manifest = json.loads(data)
    except FileNotFoundError:
        f.problems.append(f"{MANIFEST}: missing")
        return VerifyReport(False, tuple(f.problems), (), None, bool(public_key))
    except ValueError as exc:
        f.problems.append(f"{MANIFEST}: not valid JSON ({exc}); the manifest was altered")
        return VerifyReport(False, tuple(f.problems), (), None, bool(public_key))
    signer = _check_signature(bundle, data, manifest, Path(public_key) if public_key else None, f)
    _check_files(bundle, manifest, f)
    if rebuild_base:
        _check_base(manifest, f)
    _check_ledgers(manifest, files, f)
    return VerifyReport(not f.problems, tuple(f.problems), tuple(f.checked), signer,
                        bool(public_key))
