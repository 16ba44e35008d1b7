"""The run config: pyproject defaults mirror RunConfig; bad values give clear errors."""

import tomllib
from pathlib import Path

import pytest

from fedadapt.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_runconfig_defaults():
    app_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_cfg == RunConfig().to_mapping()


def test_roundtrip_and_coercion():
    cfg = RunConfig.from_mapping({"num-server-rounds": 3, "dp": "false", "lr": 1, "seed": 2.0})
    assert (cfg.num_server_rounds, cfg.dp, cfg.lr, cfg.seed) == (3, False, 1.0, 2)
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize("mapping, fragment", [
    ({"num-sites": 0}, "'num-sites' must be an integer >= 1, got 0"),
    ({"num-server-rounds": -1}, "'num-server-rounds' must be an integer >= 1"),
    ({"device": "tpu"}, "'device' must be one of auto, cpu, cuda"),
    ({"delta": 1.5}, "'delta' must be a number in (0, 1)"),
    ({"noise-multiplier": 0.0}, "turn DP off explicitly"),
    ({"lora-rank": "8"}, "'lora-rank' must be an integer"),
    ({"no-such-key": 1}, "unknown run config key(s) ['no-such-key']"),
])
def test_bad_values_name_key_and_fix(mapping, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(mapping)
    assert fragment in str(err.value)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        RunConfig(num_sites=0, lr=-1.0)
    assert "num-sites" in str(err.value) and "'lr'" in str(err.value)
