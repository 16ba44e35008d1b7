"""End to end: the sites' drift monitors in a real federation (Flower Simulation Engine).

One tiny DP federation of two sites, three rounds, ``drift-shift`` moving hospital-b's
images from round 2 on: the shifted site raises its alert within two rounds of the
shift, the unshifted one never does; the alerts reach ``summary.json`` and the report's
drift panels, and each site's reference window stays in its own folder.
"""

import json

import pytest

from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.layout import DRIFT_DIR, DRIFT_REFERENCE, REPORT_HTML, SITES_DIR
from fedadapt.simulations.runner import simulate

CFG = dict(num_sites=2, num_server_rounds=3, site_train_size=48, site_test_size=16,
           local_epochs=1, batch_size=16, noise_multiplier=1.0, epsilon_cap=100.0,
           cross_site_eval=False, drift_monitor=True, drift_alpha=0.01, drift_window=32,
           drift_shift="hospital-b:2")


@pytest.fixture(scope="module")
def drift_run(tmp_path_factory):
    cfg = RunConfig(out_dir=str(tmp_path_factory.mktemp("runs")), **CFG)
    run_dir = simulate(cfg)
    return cfg, run_dir, json.loads((run_dir / "summary.json").read_text())


def test_shifted_site_alerts_within_two_rounds_and_the_other_never(drift_run):
    cfg, _, summary = drift_run
    drift = summary["drift"]
    assert (drift["alpha"], drift["window"], drift["shift"]) == (0.01, 32, "hospital-b:2")
    a, b = drift["sites"]["hospital-a"], drift["sites"]["hospital-b"]
    assert [e["round"] for e in a] == [e["round"] for e in b] == [1, 2, 3]
    assert [e["tested"] for e in b] == [False, True, True]  # round 1 built the reference
    assert all(e["reference_round"] == 1 for e in a + b)
    first = min(e["round"] for e in b if e["alert"])
    assert 2 <= first <= 3  # the shift starts in round 2
    assert not any(e["alert"] for e in a)
    assert {x["site"] for x in drift["alerts"]} == {"hospital-b"}
    assert drift["released"] == [keys.DRIFT_ALERT, keys.DRIFT_MMD_P, keys.DRIFT_KS_P,
                                 keys.DRIFT_PRED_P, keys.DRIFT_REFERENCE_ROUND]
    assert len(summary["rounds"]) == cfg.num_server_rounds  # the run itself went on


def test_reference_kept_at_each_site_and_report_has_a_drift_panel_per_site(drift_run):
    _, run_dir, summary = drift_run
    for site in ("hospital-a", "hospital-b"):
        refs = list((run_dir / SITES_DIR / site / DRIFT_DIR).glob(f"*/{DRIFT_REFERENCE}"))
        assert len(refs) == 1
        assert (run_dir / f"drift-{site}.png").is_file()
    html = (run_dir / REPORT_HTML).read_text()
    assert "<h2 class=warn>Drift</h2>" in html
    assert "<h3>hospital-a</h3>" in html and "<h3>hospital-b</h3>" in html
    assert "ALERT" in html and "reference built" in html
