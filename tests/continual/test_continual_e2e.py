"""End to end: continual learning through the real Flower apps on the Simulation Engine.

domain-incremental (2 hospitals, 3 phases: own scanner → new protocol → inverted
contrast, 1 round each) with the same seed: naive fine-tuning forgets earlier phases
(BWT clearly negative), and METHOD forgets less (higher BWT). A site-incremental run with
DP on shows the rest of the wiring: sites idle outside their phase, each phase's test
sets in R, every trained round in the site's own ledger.
"""

import json

import pytest

from fedadapt.config import RunConfig
from fedadapt.privacy.audit import audit_ledger
from fedadapt.simulations.runner import simulate

METHOD = "olora"
DOMAIN = dict(scenario="domain-incremental", phases=3, num_server_rounds=3, num_sites=2,
              site_train_size=96, site_test_size=48, local_epochs=4, dp=False,
              cross_site_eval=False)


def _run(tmp_path_factory, **kw):
    cfg = RunConfig(out_dir=str(tmp_path_factory.mktemp("runs")), **kw)
    run_dir = simulate(cfg)
    return cfg, run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def naive(tmp_path_factory):
    return _run(tmp_path_factory, continual="naive", **DOMAIN)


@pytest.fixture(scope="module")
def method(tmp_path_factory):
    return _run(tmp_path_factory, continual=METHOD, **DOMAIN)


def test_naive_forgets_and_method_forgets_less(naive, method):
    n, m = naive[2]["continual"], method[2]["continual"]
    assert len(n["R"]) == 3 and all(len(row) == 3 for row in n["R"])
    assert n["BWT"] < -0.05  # clear forgetting of earlier phases
    assert m["BWT"] > n["BWT"]
    assert n["method"] == "naive" and m["method"] == METHOD
    assert (naive[1] / n["heatmap"]).stat().st_size > 1000
    assert n["FWT"] is not None and len(n["baseline"]) == 3


def test_site_incremental_with_dp(tmp_path_factory):
    cfg, run_dir, summary = _run(
        tmp_path_factory, scenario="site-incremental", continual="olora", phases=2,
        num_server_rounds=2, num_sites=2, site_train_size=64, site_test_size=32,
        local_epochs=1, epsilon_cap=100.0, cross_site_eval=False)
    c = summary["continual"]
    assert len(c["R"]) == 2 and all(v is not None for row in c["R"] for v in row)
    r1, r2 = summary["rounds"]
    # hospital-a trains in phase 1 only, hospital-b in phase 2 only; idle is no failure
    assert set(r1["train"]) == {"hospital-a"} and set(r2["train"]) == {"hospital-b"}
    assert not r1["failures"] and not r2["failures"]
    for site in ("hospital-a", "hospital-b"):
        (ledger,) = (run_dir / "sites" / site / "ledger").glob("*.jsonl")
        audit = audit_ledger(ledger)
        assert audit.ok and audit.rounds == 1
