"""``server.summary``: the typed ``summary.json`` keeps schema 1's keys and documents them."""

from __future__ import annotations

from fedadapt.config import RunConfig
from fedadapt.server.record import RunLog
from fedadapt.server.summary import (SCHEMA, StrategySection, Summary, WireSection,
                                     privacy_section, summary_schema)

TOP = ["schema", "run_dir", "started", "duration_s", "config", "privacy", "stopped_early",
       "cross_site", "continual", "strategy", "sites", "rounds", "wire", "adapter_dir"]


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
