"""Personalisation (FedPer / FedBN-style personal keys) in a simulated federation."""

import json

import pytest
from safetensors.torch import load_file

from fedadapt.client.site import PERSONAL_DIR, _simulated_site
from fedadapt import keys
from fedadapt.config import ConfigError, RunConfig
from fedadapt.server.record import RoundLog
from fedadapt.simulations.runner import simulate


def test_personal_keys_parse_and_validate():
    cfg = RunConfig(personal_keys="head, norm")
    site = _simulated_site(cfg, {keys.NODE_PARTITION_ID: 0})
    assert site.personalised_keys == ("head", "norm")
    assert _simulated_site(RunConfig(), {keys.NODE_PARTITION_ID: 0}).personalised_keys == ()
    with pytest.raises(ConfigError, match="personal-keys"):
        RunConfig(personal_keys="head,,norm")


def test_round_log_reports_personal_accuracy_only_when_present():
    log = RoundLog(1)
    log.evaluate = {"a": {"accuracy": 0.5, "num_examples": 10}}
    assert log.accuracy_personal() is None
    log.evaluate["a"]["accuracy_personal"] = 0.9
    log.evaluate["b"] = {"accuracy": 0.1, "accuracy_personal": 0.3, "num_examples": 30}
    assert log.accuracy_personal() == pytest.approx((9 + 9) / 40)
    assert log.to_json()["accuracy_personal"] == pytest.approx(0.45)


@pytest.fixture(scope="module")
def personal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("personal")
    cfg = RunConfig(out_dir=str(out), num_sites=2, num_server_rounds=2, site_train_size=64,
                    site_test_size=32, dp=False, local_epochs=1, strategy="ffa-lora",
                    personal_keys="head")
    run_dir = simulate(cfg)
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def test_each_site_keeps_its_own_head(personal_run):
    run_dir, summary = personal_run
    sites = sorted(summary["sites"])
    assert len(sites) == 2
    stored = []
    for name in sites:
        path = run_dir / "sites" / name / PERSONAL_DIR / f"{name}.safetensors"
        assert path.is_file(), path
        tensors = load_file(str(path))
        assert tensors and all("head" in n for n in tensors)
        stored.append(tensors)
    # Each site trained its own head from its own copy: the two differ.
    assert any((stored[0][n] - stored[1][n]).abs().max() > 0 for n in stored[0])


def test_summary_has_global_and_personal_scores(personal_run):
    _, summary = personal_run
    for rnd in summary["rounds"]:
        assert rnd["accuracy"] is not None and rnd["accuracy_personal"] is not None
        for m in rnd["evaluate"].values():
            assert 0 <= m["accuracy_personal"] <= 1 and m["loss_personal"] > 0
    last = summary["rounds"][-1]["evaluate"].values()
    # The global head is the sites' mean, each personal head is one site's own: the
    # losses of the two models differ.
    assert any(m["loss"] != m["loss_personal"] for m in last)
    assert all("final_accuracy_personal" in i for i in summary["sites"].values())
