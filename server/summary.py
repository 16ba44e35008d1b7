"""``summary.json``: the typed record of a finished run and its schema.

A run's summary is a :class:`Summary` (frozen dataclasses), written by
:func:`write_summary` as JSON with the same keys, in the same order, as schema
``fedadapt.summary/1`` has always had; ``fedadapt report`` and anything else that
reads an old ``summary.json`` reads a new one. Every top-level field carries a one-line
doc (``metadata["doc"]``); :func:`summary_schema` lists them for the documentation.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedadapt import atomic, keys
from fedadapt.config import RunConfig
from fedadapt.layout import SUMMARY_JSON
from fedadapt.server.record import RunLog

SCHEMA = "fedadapt.summary/1"
#: What the ``privacy`` block says about where ε is accounted.
PRIVACY_NOTE = ("each site accounts with its own policy's accountant and delta "
                "(sites.*.accountant, sites.*.delta) in its own ledger")


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"doc": text}, **kw)


@dataclass(frozen=True, kw_only=True)
class PrivacySection:
    """The run's privacy settings as the server asked for them, and the sites' refusals."""

    unit: str = _doc("the privacy unit of every record-level ε: one training record",
                     default="record")
    dp: bool = _doc("whether the server asked the sites for DP-SGD")
    accountant: str = _doc("the sites' accountants (comma-separated), or 'none'")
    noise_multiplier: float = _doc("σ the server asked for (0 without DP)")
    max_grad_norm: float = _doc("per-sample clipping norm C")
    note: str = _doc("where ε is accounted", default=PRIVACY_NOTE)
    refusals: list[dict[str, Any]] = _doc("every structured refusal of every round")
    site_level: dict[str, Any] | None = _doc("server-side site-level DP report, or null")
    secure_aggregation: dict[str, Any] | None = _doc(
        "secure aggregation's settings and, with 'secagg-noise', the site-level ε of the "
        "unmasked sums (distributed DP), or null", default=None)


@dataclass(frozen=True, kw_only=True)
class StrategySection:
    """The aggregation strategy."""

    name: str = _doc("the strategy's name (run config 'strategy')")
    exact_residual: dict[str, Any] = _doc("exact LoRA aggregation: residual per round")


@dataclass(frozen=True, kw_only=True)
class WireSection:
    """What crossed the wire."""

    tensor_names: list[str] = _doc("names of every tensor that travelled (adapters, head)")
    num_tensors: int = _doc("how many tensors travel")
    dtype: str = _doc("the transport dtype of floating tensors")
    bytes_per_direction_per_site: int = _doc("bytes of one global adapter on the wire")


@dataclass(frozen=True, kw_only=True)
class DriftSection:
    """The sites' drift monitors (``drift-monitor``): what each site reported per round."""

    alpha: float = _doc("the false-alarm level of each site's alert per round (drift-alpha)")
    window: int = _doc("records per window (drift-window)")
    shift: str = _doc("the shift injected in simulation, 'SITE:ROUND' (drift-shift), or ''")
    released: list[str] = _doc("the reply keys that left each site (the known leak)")
    sites: dict[str, list[dict[str, Any]]] = _doc(
        "per site, per round it trained: round, alert, tested (false in the round its "
        "reference was built), mmd_p, ks_p, pred_p, reference_round")
    alerts: list[dict[str, Any]] = _doc("every alert: site and round")


@dataclass(frozen=True, kw_only=True)
class Summary:
    """A finished run (schema :data:`SCHEMA`)."""

    schema: str = _doc("the schema's name and version", default=SCHEMA)
    run_dir: str = _doc("the run directory")
    started: str = _doc("local start time, ISO 8601 without zone")
    duration_s: float = _doc("wall-clock seconds of the run")
    config: dict[str, Any] = _doc("the run config, kebab-case keys")
    privacy: PrivacySection = _doc("privacy settings and refusals (record-level ε)")
    stopped_early: str = _doc("why the run stopped before its last round, or ''")
    cross_site: dict[str, Any] | None = _doc("cross-site accuracy matrix, or null")
    continual: dict[str, Any] | None = _doc("continual metrics (R, ACC, BWT, FWT), or null")
    strategy: StrategySection = _doc("the aggregation strategy")
    sites: dict[str, dict[str, Any]] = _doc("per site: records, ε spent, cap, final scores")
    rounds: list[dict[str, Any]] = _doc("per round: train/evaluate metrics, bytes, faults")
    wire: WireSection = _doc("what crossed the wire")
    adapter_dir: str = _doc("the final PEFT adapter, relative to run_dir")
    drift: DriftSection | None = _doc("the sites' drift alerts per round, or null without "
                                      "drift-monitor", default=None)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``summary.json`` (sections as nested objects)."""
        return _json(self)


def _json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return obj


def summary_schema() -> list[tuple[str, str, str]]:
    """``(dotted field, type, doc)`` of every field of :class:`Summary`, sections expanded."""
    out: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            out.append((prefix + f.name, str(f.type), f.metadata.get("doc", "")))
            sub = _SECTIONS.get(str(f.type).removesuffix(" | None"))
            if sub is not None:
                walk(sub, f"{prefix}{f.name}.")

    walk(Summary, "")
    return out


_SECTIONS: dict[str, type] = {"PrivacySection": PrivacySection,
                              "StrategySection": StrategySection, "WireSection": WireSection,
                              "DriftSection": DriftSection}


def drift_section(cfg: RunConfig, log: RunLog) -> DriftSection | None:
    """The ``drift`` block from what the sites' monitors reported, or None when off."""
    if not cfg.drift_monitor:
        return None
    return DriftSection(
        alpha=cfg.drift_alpha, window=cfg.drift_window, shift=cfg.drift_shift,
        released=[keys.DRIFT_ALERT, keys.DRIFT_MMD_P, keys.DRIFT_KS_P, keys.DRIFT_PRED_P,
                  keys.DRIFT_REFERENCE_ROUND],
        sites={s: log.drift[s] for s in sorted(log.drift)},
        alerts=sorted(({"site": s, "round": e["round"]} for s, rs in log.drift.items()
                       for e in rs if e["alert"]), key=lambda a: (a["round"], a["site"])))


def secagg_section(cfg: RunConfig, distributed: dict[str, Any] | None
                   ) -> dict[str, Any] | None:
    """The ``privacy.secure_aggregation`` block (None without secure aggregation)."""
    if not cfg.secure_aggregation:
        return None
    return {"protocol": "secagg+", "threshold": cfg.secagg_threshold,
            "num_shares": cfg.secagg_num_shares or cfg.num_sites,
            "clip_norm": cfg.secagg_clip_norm, "max_weight": cfg.secagg_max_weight,
            "noise": cfg.secagg_noise, "server_sees": "masked vectors, their sum, shares",
            "distributed_dp": distributed}


def privacy_section(cfg: RunConfig, log: RunLog, site_level: dict[str, Any] | None,
                    distributed: dict[str, Any] | None = None) -> PrivacySection:
    """The ``privacy`` block from the run config and what the sites reported (and, under
    secure aggregation with ``secagg-noise``, the server's distributed-DP report)."""
    accountants = sorted({str(i["accountant"]) for i in log.sites.values() if "accountant" in i})
    return PrivacySection(dp=cfg.dp, accountant=", ".join(accountants) or "none",
                          noise_multiplier=cfg.noise_multiplier if cfg.dp else 0.0,
                          max_grad_norm=cfg.max_grad_norm,
                          refusals=[r for rl in log.rounds for r in rl.refusals],
                          site_level=site_level,
                          secure_aggregation=secagg_section(cfg, distributed))


def timestamp(started: float) -> str:
    """``started`` (``time.time()``) as the summary's local ISO time."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))


def write_summary(run_dir: Path, summary: Summary) -> dict[str, Any]:
    """Write ``<run_dir>/summary.json`` atomically; returns the JSON object written."""
    doc = summary.to_json()
    atomic.write_json(Path(run_dir) / SUMMARY_JSON, doc)
    return doc
