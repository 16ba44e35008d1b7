"""A verifiable release bundle of a finished run: model card, PEFT adapter, provenance.

``build_release`` writes into a new folder::

    README.md                      model card (Hugging Face format, ``server.model_card``)
    adapter/adapter_config.json    the run's final adapter + head, as PEFT saved it
    adapter/adapter_model.safetensors
    summary.json                   the run's summary, verbatim
    provenance.json                the manifest: every file's sha256, base-model and
                                   adapter hashes, run config, strategy, code and library
                                   versions, and per site its data fingerprint, record
                                   count, ε/δ/accountant and its ledger head
    provenance.sig                 Ed25519 signature (hex) over provenance.json's bytes

The ledger head (sha256 of the last entry at release) anchors each site's ledger: its
hash chain covers every entry but the last one's own bytes, and the signed manifest
covers those. ``verify_release`` rechecks all of it (``server.release_verify``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file

import fedadapt
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import ModelSpec, backbone_weights_path, build_model
from fedadapt.imaging.run_spec import run_model_spec
from fedadapt.server.model_card import render_card
from fedadapt.server.provenance import (ProvenanceError, file_sha256, git_commit, ledger_head,
                                        library_versions, state_dict_sha256)
from fedadapt.server.signing import load_private_key, public_raw_hex, sign

SCHEMA = "fedadapt.release/1"
MANIFEST, SIGNATURE, CARD, SUMMARY = "provenance.json", "provenance.sig", "README.md", "summary.json"
ADAPTER_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors")


def released_base(spec: ModelSpec) -> torch.nn.Module:
    """The frozen base model a release's adapter loads onto, rebuilt from its spec:
    ``PeftModel.from_pretrained(released_base(spec), "<release>/adapter")``."""
    return build_model(spec).unload()


def base_model_record(spec: ModelSpec) -> dict[str, Any]:
    """Name, spec, weights choice and hashes of the base model built from ``spec``."""
    path = backbone_weights_path(spec.backbone_weights)
    base = released_base(spec)
    weights = spec.backbone_weights if path is None or spec.backbone_weights in (
        "builtin", "random") else path.name
    return {"name": spec.backbone or "vit-2d-classifier", "spec": dataclasses.asdict(spec),
            "weights": weights,
            "weights_file_sha256": None if path is None else file_sha256(path),
            "state_dict_sha256": state_dict_sha256(base.state_dict())}


def _load_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{run_dir} is not a finished run directory: {path} is missing "
                         "(a run writes it when it ends)") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    for key in ("config", "sites", "run_dir"):
        if key not in summary:
            raise ValueError(f"{path} has no '{key}'; expected a fedadapt.summary/1 file")
    return summary


def site_records(summary: Mapping[str, Any], sites_dir: Path, *, dp: bool,
                 fingerprints: Mapping[str, str] | None = None,
                 dataset_ids: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per site: record count, data fingerprint and each ledger's head, audited.

    Args:
        summary: The run's summary.
        sites_dir: Folder of the sites' folders ``<site>/ledger/*.jsonl``.
        dp: Whether the run trained under DP (then a site that trained needs a ledger).
        fingerprints: Full dataset fingerprints by site, where the releaser can recompute
            them (simulated sites); else only the ledgers' 16-digit prefixes are known.
        dataset_ids: The sites' declared dataset ids, where the releaser can recompute
            them: a format-2 ledger (per-record budget) is named by it, not by the
            fingerprint.

    Raises:
        ProvenanceError: If a site that trained under DP has no ledger, a ledger fails its
            audit, or a recomputed fingerprint does not match its ledger's name.
    """
    out: dict[str, dict[str, Any]] = {}
    for site, info in sorted(summary["sites"].items()):
        paths = sorted((sites_dir / site / "ledger").glob("*.jsonl"))
        if dp and int(info.get("rounds_trained", 0)) > 0 and not paths:
            raise ProvenanceError(
                f"site {site!r} trained {info.get('rounds_trained')} DP round(s) but no ledger "
                f"is in {sites_dir / site / 'ledger'}; pass --sites-dir with the folder that "
                "holds the sites' ledgers (a deployed site's ledger stays at the site)")
        heads = [ledger_head(p, site).to_dict() for p in paths]
        full = (fingerprints or {}).get(site)
        declared = (dataset_ids or {}).get(site)
        if full and heads and not any(h["data_fingerprint_prefix"] == full[:16]
                                      or (declared and h["dataset_id"] == declared)
                                      for h in heads):
            raise ProvenanceError(f"site {site!r}: neither its data fingerprint {full[:16]}... "
                                  f"nor its dataset id {declared!r} names any of its ledgers "
                                  f"{[h['file'] for h in heads]}")
        out[site] = {"num_train": info.get("num_train"), "num_test": info.get("num_test"),
                     "data_fingerprint": full or (heads[0]["data_fingerprint_prefix"]
                                                  if len(heads) == 1 else None),
                     "data_fingerprint_source": "recomputed" if full else "ledger-name-prefix",
                     "dataset_id": declared or next((h["dataset_id"] for h in heads
                                                     if h["dataset_id"]), None),
                     "summary_epsilon": info.get("epsilon"), "ledgers": heads}
    return out


def build_manifest(run_dir: Path, summary: Mapping[str, Any], sites: Mapping[str, Any],
                   adapter_dir: Path) -> dict[str, Any]:
    """The manifest without its ``files`` and ``signer`` (which need the written bundle)."""
    cfg = RunConfig.from_mapping(summary["config"])
    commit, dirty = git_commit(Path(fedadapt.__file__).parent)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {"id": Path(str(summary["run_dir"])).name, "config": dict(summary["config"]),
                "strategy": cfg.strategy, "privacy": summary.get("privacy")},
        "code": {"fedadapt": fedadapt.__version__, "git_commit": commit, "git_dirty": dirty},
        "versions": library_versions(),
        "base_model": base_model_record(run_model_spec(cfg)),
        "adapter": {"sha256": file_sha256(adapter_dir / "adapter_model.safetensors"),
                    "tensors_sha256": state_dict_sha256(tensors), "num_tensors": len(tensors)},
        "sites": dict(sites)}


def build_release(run_dir: str | Path, out: str | Path, *, key_path: str | Path,
                  sites_dir: str | Path | None = None,
                  fingerprints: Mapping[str, str] | None = None,
                  dataset_ids: Mapping[str, str] | None = None) -> Path:
    """Write a signed release bundle of ``run_dir`` into the new folder ``out``.

    Args:
        run_dir: A finished run directory (``summary.json`` + ``adapter/``).
        out: The bundle folder; must not exist or be empty.
        key_path: Ed25519 private key PEM (``server.signing.generate_key``).
        sites_dir: Where the sites' ledgers are; default the run config's ``sites-dir``.
        fingerprints: Full data fingerprints by site, if recomputable.
        dataset_ids: Declared dataset ids by site, if recomputable.

    Returns:
        ``out``.

    Raises:
        ValueError: On a missing/partial run directory, a non-empty ``out``, or an
            unusable key; ``ProvenanceError`` if a ledger fails its audit.
    """
    run_dir, out = Path(run_dir), Path(out)
    summary = _load_summary(run_dir)
    adapter = run_dir / str(summary.get("adapter_dir", "adapter"))
    for name in ADAPTER_FILES:
        if not (adapter / Path(name).name).is_file():
            raise ValueError(f"{adapter / Path(name).name} is missing: {run_dir} has no saved "
                             "adapter (did the run finish?)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"release folder {out} exists and is not empty; choose a new folder")
    key = load_private_key(key_path)  # before anything is written
    cfg = RunConfig.from_mapping(summary["config"])
    sites_root = Path(sites_dir) if sites_dir else Path(cfg.sites_dir or run_dir / "sites")
    sites = site_records(summary, sites_root, dp=cfg.dp, fingerprints=fingerprints,
                         dataset_ids=dataset_ids)
    manifest = build_manifest(run_dir, summary, sites, adapter)
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copyfile(adapter / Path(name).name, out / name)
    shutil.copyfile(run_dir / SUMMARY, out / SUMMARY)
    (out / CARD).write_text(render_card(manifest, summary))
    manifest["files"] = {name: file_sha256(out / name)
                         for name in (CARD, SUMMARY, *ADAPTER_FILES)}
    manifest["signer"] = {"algorithm": "ed25519", "public_key": public_raw_hex(key.public_key())}
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (out / MANIFEST).write_bytes(data)
    (out / SIGNATURE).write_text(sign(key, data).hex() + "\n")
    return out
