"""``server.summary``: the typed ``summary.json`` keeps schema 1's keys and documents them."""

from __future__ import annotations

from fedadapt.config import RunConfig
from fedadapt.server.record import RunLog
from fedadapt.server.summary import (SCHEMA, StrategySection, Summary, WireSection,
                                     privacy_section, summary_schema)

TOP = ["schema", "run_dir", "started", "duration_s", "config", "privacy", "stopped_early",
       "cross_site", "continual", "strategy", "sites", "rounds", "wire", "adapter_dir", "drift"]


def _summary() -> Summary:
    cfg = RunConfig()
    return Summary(run_dir="/r", started="2026-01-01T00:00:00", duration_s=1.5,
                   config=cfg.to_mapping(), privacy=privacy_section(cfg, RunLog(), None),
                   stopped_early="", cross_site=None, continual=None,
                   strategy=StrategySection(name="fedavg", exact_residual={}), sites={},
                   rounds=[], wire=WireSection(tensor_names=["a"], num_tensors=1,
                                               dtype="float32",
                                               bytes_per_direction_per_site=16),
                   adapter_dir="adapter")


def test_summary_json_has_schema_1_keys_in_order() -> None:
    doc = _summary().to_json()
    assert list(doc) == TOP and doc["schema"] == SCHEMA == "fedadapt.summary/1"
    # schema 1's keys in their order, then the later additions (secure aggregation)
    assert list(doc["privacy"]) == ["unit", "dp", "accountant", "noise_multiplier",
                                    "max_grad_norm", "note", "refusals", "site_level",
                                    "secure_aggregation"]
    assert doc["privacy"]["secure_aggregation"] is None
    assert doc["privacy"]["unit"] == "record" and doc["privacy"]["accountant"] == "none"
    assert doc["wire"] == {"tensor_names": ["a"], "num_tensors": 1, "dtype": "float32",
                           "bytes_per_direction_per_site": 16}


def test_every_field_is_documented() -> None:
    rows = summary_schema()
    assert [r[0] for r in rows if "." not in r[0]] == TOP
    assert "privacy.site_level" in [r[0] for r in rows]
    assert all(doc for _, _, doc in rows), [r for r in rows if not r[2]]


def test_drift_section_lists_each_sites_rounds_and_alerts() -> None:
    from fedadapt.server.summary import drift_section

    log = RunLog(drift={"b": [{"round": 1, "alert": False, "tested": False},
                              {"round": 2, "alert": True, "tested": True}],
                        "a": [{"round": 2, "alert": True, "tested": True}]})
    assert drift_section(RunConfig(), log) is None  # drift-monitor off
    sec = drift_section(RunConfig(drift_monitor=True, drift_shift="b:2"), log)
    assert list(sec.sites) == ["a", "b"] and sec.shift == "b:2" and sec.alpha == 0.05
    assert sec.alerts == [{"site": "a", "round": 2}, {"site": "b", "round": 2}]
    assert "drift-alert" in sec.released
    rows = [r[0] for r in summary_schema()]
    assert {"drift.alpha", "drift.sites", "drift.alerts"} <= set(rows)
    assert _summary().to_json()["drift"] is None


def test_drift_log_survives_a_checkpoint(tmp_path) -> None:
    import torch
    from flwr.app import ArrayRecord

    from fedadapt.server.checkpoint import load_checkpoint, save_checkpoint
    from fedadapt.server.record import RoundLog
    from fedadapt.strategies.factory import build_strategy

    cfg = RunConfig(drift_monitor=True)
    entry = {"round": 1, "alert": False, "tested": False, "mmd_p": 1.0, "ks_p": 1.0,
             "pred_p": 1.0, "reference_round": 1}
    log = RunLog(rounds=[RoundLog(1)], drift={"a": [entry]})
    save_checkpoint(tmp_path, cfg, 1, ArrayRecord({"w": torch.zeros(2)}),
                    build_strategy("fedavg", cfg), log, started=0.0)
    assert load_checkpoint(tmp_path).log.drift == {"a": [entry]}
