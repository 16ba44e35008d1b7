"""End to end: site-owned privacy budgets enforced in a real Flower simulation.

Two hospitals with their own policies in a kept ``sites-dir``. hospital-b's cap lets it
train one round only: from round 2 it refuses, the server records the refusal, stops
asking it, and completes the run with hospital-a. A second run on the same site folders
shows that spending composes across runs (hospital-b refuses at once) and that a request
below a site's noise floor is refused, not trained.
"""

import json

import pytest

from fedadapt.client.budget import planned_round
from fedadapt.privacy.audit import audit_ledger
from fedadapt.config import RunConfig
from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.policy import SitePolicy, write_policy
from fedadapt.simulations.runner import simulate

BASE = dict(num_sites=2, num_server_rounds=3, site_train_size=96, site_test_size=32,
            noise_multiplier=1.0, local_epochs=1, lr=0.03)


def _ledger(sites, name):
    (path,) = (sites / name / "ledger").glob("*.jsonl")
    return path


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    sites = tmp_path_factory.mktemp("sites")
    write_policy(sites / "hospital-a" / "policy.toml", SitePolicy(epsilon_cap=100.0, delta=1e-5))
    # hospital-b's cap lies between the ε of one and of two rounds at its size.
    q, steps = planned_round(38, batch_size=32, epochs=BASE["local_epochs"])
    one, two = (epsilon([Mechanism(1.0, q, steps)] * k, delta=1e-5) for k in (1, 2))
    write_policy(sites / "hospital-b" / "policy.toml",
                 SitePolicy(epsilon_cap=round((one + two) / 2, 3), delta=1e-5))
    cfg = RunConfig(out_dir=str(tmp_path_factory.mktemp("runs")), sites_dir=str(sites), **BASE)
    summary = json.loads((simulate(cfg) / "summary.json").read_text())
    assert summary["sites"]["hospital-b"]["num_train"] == 38
    return cfg, sites, summary


def test_small_cap_site_refuses_and_run_completes(capped):
    cfg, sites, summary = capped
    a, b = summary["sites"]["hospital-a"], summary["sites"]["hospital-b"]
    assert len(summary["rounds"]) == cfg.num_server_rounds and not summary["stopped_early"]
    assert a["rounds_trained"] == 3 and "refused_from_round" not in a
    assert b["rounds_trained"] == 1 and b["refused_from_round"] == 2
    assert b["epsilon"] <= b["epsilon_cap"]
    assert b["refusal"].startswith("budget:")
    r1, r2, r3 = summary["rounds"]
    assert set(r1["train"]) == {"hospital-a", "hospital-b"} and not r1["refusals"]
    assert set(r2["train"]) == {"hospital-a"}
    (refusal,) = r2["refusals"]
    assert refusal["site"] == "hospital-b" and refusal["budget_spent"] is True
    assert refusal["epsilon_spent"] == pytest.approx(b["epsilon"])
    assert refusal["epsilon_remaining"] == pytest.approx(b["epsilon_cap"] - b["epsilon"])
    # The server stopped asking: no message and no refusal for hospital-b in round 3.
    assert set(r3["train"]) == {"hospital-a"} and not r3["refusals"]
    assert summary["privacy"]["refusals"] == [refusal]
    # The refused site still evaluates the global model every round.
    assert set(r3["evaluate"]) == {"hospital-a", "hospital-b"}


def test_ledgers_agree_with_audit_and_never_exceed_cap(capped):
    _, sites, summary = capped
    for name, rounds in (("hospital-a", 3), ("hospital-b", 1)):
        path = _ledger(sites, name)
        assert len(path.read_text().splitlines()) == rounds
        audit = audit_ledger(path).to_dict()
        assert audit["ok"] and audit["eps_spent"] <= audit["cap"]
        assert audit["eps_spent"] == pytest.approx(summary["sites"][name]["epsilon"], rel=1e-9)


def test_budget_composes_across_runs_and_noise_floor_refuses(capped, tmp_path):
    _, sites, first = capped
    # hospital-a's privacy officer raises its noise floor above the server's σ = 1.0.
    write_policy(sites / "hospital-a" / "policy.toml",
                 SitePolicy(epsilon_cap=100.0, delta=1e-5, min_noise_multiplier=1.5))
    before = {n: _ledger(sites, n).read_bytes() for n in ("hospital-a", "hospital-b")}
    cfg = RunConfig(out_dir=str(tmp_path), sites_dir=str(sites), **{**BASE, "num_server_rounds": 2})
    summary = json.loads((simulate(cfg) / "summary.json").read_text())
    r1, r2 = summary["rounds"]
    assert not r1["train"] and not r2["train"]  # nobody trained
    reasons = {r["site"]: r for r in r1["refusals"]}
    assert reasons["hospital-b"]["budget_spent"]  # spent in the first run
    assert reasons["hospital-b"]["epsilon_spent"] == pytest.approx(
        first["sites"]["hospital-b"]["epsilon"])
    assert "below the site's floor 1.5" in reasons["hospital-a"]["reason"]
    assert not reasons["hospital-a"]["budget_spent"]
    # A floor refusal is not a spent budget: the server asks hospital-a again.
    assert [r["site"] for r in r2["refusals"]] == ["hospital-a"]
    # Refusals never touch the ledgers.
    assert {n: _ledger(sites, n).read_bytes() for n in before} == before
