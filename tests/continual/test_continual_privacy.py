"""Continual methods under DP through the real Flower apps: who pays for what.

- site-incremental ``ewc`` (FedCurv-style): at the end of phase 0 the phase's site sends
  a DP Fisher, which is charged to its ledger *before* it leaves (σ, q = 1, one step,
  clip ``ewc-clip``), reported in ``summary.json`` and sent with phase 1's rounds;
- site-incremental ``replay``: the site of phase 0 rehearses a reservoir of
  ``replay-size`` of its records in phase 1, charged to its own data's ledger;
- domain-incremental ``replay``: a round on current data + reservoir is charged to the
  ledger of *each* dataset the union holds records of, so every ledger bounds the ε of
  its own records.
"""

from __future__ import annotations

import json
import math

import pytest

from fedadapt.config import RunConfig
from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.audit import audit_ledger
from fedadapt.simulations.runner import simulate

TINY = dict(phases=2, num_server_rounds=2, num_sites=2, site_train_size=48, site_test_size=24,
            local_epochs=1, batch_size=16, replay_size=16, epsilon_cap=100.0,
            cross_site_eval=False, backbone_weights="random")


def _run(tmp_path_factory, **kw):
    cfg = RunConfig(out_dir=str(tmp_path_factory.mktemp("runs")), **{**TINY, **kw})
    run_dir = simulate(cfg)
    return cfg, run_dir, json.loads((run_dir / "summary.json").read_text())


def _entries(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def ewc(tmp_path_factory):
    return _run(tmp_path_factory, scenario="site-incremental", continual="ewc")


def test_site_incremental_ewc_fisher_is_dp_and_in_the_ledger(ewc):
    cfg, run_dir, summary = ewc
    (report,) = summary["continual"]["fisher"]
    assert report["round"] == 1 and report["phase"] == 0
    assert set(report["sites"]) == {"hospital-a"} and not report["refused"]
    (ledger,) = (run_dir / "sites" / "hospital-a" / "ledger").glob("*.jsonl")
    train, release = _entries(ledger)
    assert (train["round"], release["round"]) == (1, 1)
    assert (release["noise_multiplier"], release["sample_rate"], release["steps"],
            release["clip_norm"]) == (cfg.noise_multiplier, 1.0, 1, cfg.ewc_clip)
    # The ε the site reported for the release composes both mechanisms (Opacus RDP) ...
    expected = epsilon([Mechanism(cfg.noise_multiplier, train["sample_rate"], train["steps"]),
                        Mechanism(cfg.noise_multiplier, 1.0, 1)], delta=cfg.delta)
    assert report["sites"]["hospital-a"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    # ... and is the site's ε in the summary, equal to what an audit of its ledger finds.
    audit = audit_ledger(ledger)
    assert audit.ok and summary["sites"]["hospital-a"]["epsilon"] == pytest.approx(audit.eps_spent)
    # The aggregate travels with phase 1's round: more bytes down than the adapter alone.
    r1, r2 = summary["rounds"]
    assert set(r2["train"]) == {"hospital-b"}
    assert r2["bytes"]["down"] > r1["bytes"]["down"]
    assert (run_dir / "continual_fisher-r1.safetensors").is_file()


def test_site_incremental_replay_rehearses_under_the_sites_own_ledger(tmp_path_factory):
    cfg, run_dir, summary = _run(tmp_path_factory, scenario="site-incremental",
                                 continual="replay")
    r1, r2 = summary["rounds"]
    assert set(r1["train"]) == {"hospital-a"}
    assert set(r2["train"]) == {"hospital-a", "hospital-b"}  # a rehearses, b learns
    rehearsal = r2["train"]["hospital-a"]
    assert rehearsal["num_examples"] == cfg.replay_size
    assert rehearsal["sample_rate"] == 1 / math.ceil(cfg.replay_size / cfg.batch_size)
    (ledger,) = (run_dir / "sites" / "hospital-a" / "ledger").glob("*.jsonl")
    assert [e["round"] for e in _entries(ledger)] == [1, 2]  # the data's own ledger
    audit = audit_ledger(ledger)
    assert audit.ok and summary["sites"]["hospital-a"]["epsilon"] == pytest.approx(audit.eps_spent)


def test_domain_incremental_replay_is_charged_to_every_source_ledger(tmp_path_factory):
    cfg, run_dir, summary = _run(tmp_path_factory, scenario="domain-incremental",
                                 continual="replay", num_sites=1)
    ledgers = sorted((run_dir / "sites" / "hospital-a" / "ledger").glob("*.jsonl"),
                     key=lambda p: len(_entries(p)))
    phase1, phase0 = ledgers  # phase 0's data: rounds 1 and 2; phase 1's data: round 2
    assert [e["round"] for e in _entries(phase0)] == [1, 2]
    assert [e["round"] for e in _entries(phase1)] == [2]
    r1, r2 = (r["train"]["hospital-a"] for r in summary["rounds"])
    union = r1["num_examples"] + cfg.replay_size  # phase 1's records + the reservoir
    assert r2["num_examples"] == union
    assert _entries(phase1)[0]["sample_rate"] == 1 / math.ceil(union / cfg.batch_size)
    # The site reports the largest ε of the ledgers it charged: phase 0's records'.
    assert r2["epsilon"] == pytest.approx(audit_ledger(phase0).eps_spent)
    # Its reservoir and anchor are kept in its folder under the run's name (restarts).
    key = (run_dir / "run-key").read_text().strip()
    memory = run_dir / "sites" / "hospital-a" / "continual" / key
    assert {p.name for p in memory.iterdir()} >= {"cl-replay.safetensors",
                                                  "cl-anchor.safetensors", "cl-phase.json"}


def test_lwf_runs_site_incremental_with_dp_from_the_cli(tmp_path):
    """The README's command line, every phase evaluated: `fedadapt simulate --scenario
    site-incremental --continual lwf` with DP on (the other methods: the tests above and
    tests/test_continual_e2e.py)."""
    from fedadapt.cli import main

    assert main(["simulate", "--scenario", "site-incremental", "--continual", "lwf",
                 "--phases", "2", "--rounds", "2", "--sites", "2", "--train-size", "32",
                 "--test-size", "16", "--local-epochs", "1", "--epsilon-cap", "100",
                 "--backbone-weights", "random", "--out", str(tmp_path)]) == 0
    (summary_path,) = tmp_path.glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    c = summary["continual"]
    assert c["method"] == "lwf" and len(c["R"]) == 2 and "error" not in c
    assert summary["privacy"]["dp"] and all(s["epsilon"] > 0 for s in summary["sites"].values())


def test_the_running_fisher_survives_a_checkpoint(tmp_path):
    import torch

    from fedadapt.server.continual import ContinualTracker, save_fisher

    cfg = RunConfig(scenario="site-incremental", continual="ewc", **TINY)
    tracker = ContinualTracker(cfg)
    fisher = {"a.lora_B": torch.rand(3, 2), "head.weight": torch.rand(3)}
    tracker.fisher_file = save_fisher(tmp_path, fisher, 1)
    state = json.loads(json.dumps(tracker.state()))  # as the checkpoint stores it
    resumed = ContinualTracker(cfg)
    resumed.restore(state)
    got = resumed.fisher(tmp_path)
    assert set(got) == set(fisher) and all(torch.equal(got[n], fisher[n]) for n in fisher)
    (tmp_path / tracker.fisher_file).unlink()
    with pytest.raises(FileNotFoundError, match="continual_fisher-r1"):
        resumed.fisher(tmp_path)
    assert ContinualTracker(cfg).fisher(tmp_path) is None  # no phase has ended yet
