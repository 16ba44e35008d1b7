"""Faults with real Flower 1.41 processes on loopback, all over TLS with SuperNode
authentication (``tests/process_helpers.Federation``; the command lines are those
``fedadapt server start`` / ``site start`` exec, built by ``deploy.commands``).

One scenario, run once for the module (each ClientApp start costs seconds to a minute on
a loaded machine): three sites, two rounds.

1. Site c's SuperNode (with its ClientApp) is SIGKILLed once it received round 1's
   training; round 1 goes on with a and b.
2. Right after round 1 is aggregated (its checkpoint appears), the whole server is
   SIGKILLed: SuperLink, the ServerApp executor and the ServerApp it runs.
3. The server is started again on the same state database, site c rejoins, and the run
   is resumed with ``flwr run . hospitals -c '... resume-from="<run dir>"'``.

What Flower does with a dead site (flwr 1.41, read in its source): a SuperNode sends a
heartbeat every ~20 s (``flwr/supercore/heartbeat.py``: (30 − 5) × 0.8 ± 0.1, interval
``HEARTBEAT_DEFAULT_INTERVAL`` = 30, not configurable); the SuperLink keeps it online until
``HEARTBEAT_PATIENCE`` × 30 = 60 s after its last heartbeat
(``acknowledge_node_heartbeat`` in ``flwr/server/superlink/linkstate/sql_linkstate.py``);
after that, a pull of a reply for a message sent to it returns an error reply
``NODE_UNAVAILABLE`` (code 5) from the SuperLink (``check_node_availability_for_in_message``
in ``flwr/server/superlink/linkstate/utils.py``) and the node is no longer in
``grid.get_node_ids()``. So a killed site costs a round 40–60 s, never ``ROUND_TIMEOUT_S``.
A killed ServerApp stops its task heartbeat; the SuperLink fails its run 60 s later and
never starts it again (``sql_corestate.claim_task`` claims only pending tasks).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedadapt.server.checkpoint import EVALUATED
from tests.process_helpers import BIN, CONNECTION, Federation, kill, wait_for

needs_flower = pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                                  reason="flower-superlink not installed next to python")

SITES = ("a", "b", "c")
# Tiny rounds (≈10 training images a site, one DP-SGD step); no shipped weights in the FAB.
BASE = ("num-sites=3 site-train-size=32 site-test-size=16 local-epochs=1 batch-size=16 "
        'backbone-weights="random" cross-site-eval=false')


def _node_id(log: Path) -> int:
    found = re.findall(r"SuperNode ID: (\d+)", log.read_text())
    assert found, log.read_text()
    return int(found[-1])


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    from fedadapt.server.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("faults")
    fed = Federation(root, SITES)
    out = root / "runs"
    overrides = f'{BASE} num-server-rounds=2 out-dir="{out}"'
    t0 = time.monotonic()
    times = {}
    try:
        server = fed.start_server(via_cli=False)
        fed.register_sites()
        nodes = {s: fed.start_site(s, f"supernode-{s}.log", via_cli=False) for s in SITES}
        fed.wait_joined([f"supernode-{s}.log" for s in SITES])
        times["federation up"] = time.monotonic() - t0
        dead = _node_id(root / "supernode-c.log")
        run = fed.flwr("run", ".", CONNECTION, "-c", overrides)
        assert run.returncode == 0, run.stdout + run.stderr

        # 1. site c dies mid-round
        assert wait_for(root / "supernode-c.log", "Receiving: train", 420), fed.logs()
        kill(nodes["c"])
        killed_site = time.monotonic()
        times["site c killed"] = killed_site - t0

        # 2. the server dies once round 1 is aggregated (while it is being evaluated)
        end = time.monotonic() + 600
        while time.monotonic() < end and not list(out.glob("*/checkpoint.pt")):
            time.sleep(0.1)
        (ck_file,) = list(out.glob("*/checkpoint.pt")) or [None]
        assert ck_file is not None, fed.logs()
        kill(*server)  # with the flwr-serverapp the executor runs
        times["round 1 aggregated without c (after the kill)"] = \
            time.monotonic() - killed_site
        run_dir = ck_file.parent
        ck = load_checkpoint(run_dir)
        ledgers_at_kill = {s: fed.ledger(s) for s in SITES}
        summary_at_kill = (run_dir / "summary.json").exists()

        # 3. the server comes back, c rejoins, the run resumes
        killed_server = time.monotonic()
        fed.start_server(log="superlink-restarted.log", via_cli=False)
        for _ in range(120):  # until the restarted SuperLink answers
            if fed.flwr("supernode", "ls", CONNECTION).returncode == 0:
                break
            time.sleep(1)
        fed.start_site("c", "supernode-c-rejoined.log", via_cli=False)
        resumed = fed.flwr("run", ".", CONNECTION, "--stream", "-c",
                           f'{overrides} resume-from="{run_dir}"', timeout=900)
        assert resumed.returncode == 0 and (run_dir / "summary.json").exists(), \
            resumed.stdout[-3000:] + resumed.stderr[-2000:] + fed.logs()
        times["resumed run (after the server kill)"] = time.monotonic() - killed_server
        rejoined = _node_id(root / "supernode-c-rejoined.log")
    finally:
        fed.stop()
    times["total"] = time.monotonic() - t0
    print("\n" + "; ".join(f"{k}: {v:.0f} s" for k, v in times.items()))
    return {"fed": fed, "out": out, "run_dir": run_dir, "dead": dead, "rejoined": rejoined,
            "ck": ck, "ledgers_at_kill": ledgers_at_kill, "summary_at_kill": summary_at_kill,
            "summary": json.loads((run_dir / "summary.json").read_text())}


@pytest.mark.heavy
@needs_flower
def test_dead_site_round_completes_with_the_others(scenario):
    """Round 1 trained a and b; c's failure is recorded with its node id, as the
    SuperLink reported it (code 5 is Flower's NODE_UNAVAILABLE)."""
    rnd = scenario["summary"]["rounds"][0]
    assert sorted(rnd["train"]) == ["a", "b"]
    failures = [f for f in rnd["failures"] if f["stage"] == "train"]
    assert len(failures) == 1, rnd["failures"]
    assert failures[0]["node_id"] == scenario["dead"]
    assert failures[0]["reason"].startswith("5: ") and "Node Unavailable" in \
        failures[0]["reason"]


@pytest.mark.heavy
@needs_flower
def test_server_killed_after_aggregation_resumes_without_training_it_again(scenario):
    ck, ledgers = scenario["ck"], scenario["ledgers_at_kill"]
    # written after aggregation, before evaluation: the resumed run only evaluates round 1
    assert ck.round == 1 and ck.extra[EVALUATED] is False and not scenario["summary_at_kill"]
    for s in ("a", "b"):  # killed before any site trained round 2
        assert [e["round"] for e in ledgers[s]] == [1], (s, ledgers[s])
    # c may have recorded round 1 before it died (spent, its update lost)
    assert [e["round"] for e in ledgers["c"]] in ([], [1])
    summary = scenario["summary"]
    # resumed in place: one run directory, round 1's training is the checkpoint's
    assert [p.parent for p in scenario["out"].glob("*/summary.json")] == [scenario["run_dir"]]
    assert summary["rounds"][0]["train"] == ck.log.rounds[0].train


@pytest.mark.heavy
@needs_flower
def test_no_ledger_records_a_round_twice(scenario):
    fed, before = scenario["fed"], scenario["ledgers_at_kill"]
    first_run = {e["run_id"] for s in SITES for e in before[s]}
    assert len(first_run) == 1
    for s in SITES:
        entries = fed.ledger(s)
        rounds = [e["round"] for e in entries]
        assert len(rounds) == len(set(rounds)), (s, entries)
        assert entries[:len(before[s])] == before[s]  # run 1's entries, unchanged
        assert [e["round"] for e in entries[len(before[s]):]] == [2]  # then the resumed run
        assert entries[-1]["run_id"] not in first_run


@pytest.mark.heavy
@needs_flower
def test_resumed_summary_has_every_round_and_the_rejoined_site(scenario):
    summary = scenario["summary"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    r1, r2 = summary["rounds"]
    # round 1 was evaluated by the resumed run (the first died before); c was back
    assert sorted(r1["evaluate"]) == list(SITES)
    assert sorted(r2["train"]) == list(SITES) and sorted(r2["evaluate"]) == list(SITES)
    assert not r2["failures"]
    assert summary["sites"]["a"]["rounds_trained"] == 2
    assert summary["sites"]["c"]["rounds_trained"] == 1
    # c came back with the same key, hence the same node id (Flower keys nodes by it)
    assert scenario["rejoined"] == scenario["dead"]


# --- the server's side of it, without processes -------------------------------------


class _Grid:
    """Answers the first message with the SuperLink's NODE_UNAVAILABLE error, as for a
    dead node, and the others not at all (as when ROUND_TIMEOUT_S runs out)."""

    def send_and_receive(self, messages, timeout=None):
        for i, m in enumerate(messages):  # as Flower's Grid does when it pushes
            m.metadata.__dict__["_message_id"] = f"m{i}"
        return [Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"),
                        reply_to=messages[0])]


def test_dead_and_silent_sites_are_failures_of_their_node_and_site(task_identity):
    from fedadapt.server.exchange import ROUND_TIMEOUT_S
    from fedadapt.server.exchange import exchange as _exchange
    from fedadapt.server.record import RoundLog

    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (7, 8)]
    rlog = RoundLog(1)
    assert _exchange(_Grid(), messages, rlog, "train", {7: "c"}) == []
    assert rlog.failures == [
        {"node_id": 7, "site": "c", "stage": "train", "reason": "5: Node Unavailable"},
        {"node_id": 8, "site": None, "stage": "train",
         "reason": f"no reply within {ROUND_TIMEOUT_S:.0f} s"}]


def test_after_the_first_round_no_round_waits_for_every_site():
    from fedadapt.config import RunConfig
    from fedadapt.server.exchange import go_on_without_dead_sites as _go_on_without_dead_sites
    from fedadapt.strategies.factory import build_strategy

    cfg = RunConfig(num_sites=3, site_dp=True, min_train_sites=2)
    strategy = build_strategy(cfg.strategy, cfg)
    chain, s = [], strategy
    while s is not None:
        chain.append(s)
        s = vars(s).get("inner")
    waits = [s for s in chain if "min_available_nodes" in vars(s)]
    assert waits and all(s.min_available_nodes == 3 for s in waits)  # a run starts with all
    _go_on_without_dead_sites(strategy, cfg.min_train_sites)
    assert all(s.min_available_nodes == 2 for s in waits)


def test_spent_sites_survive_a_resume_by_name(tmp_path):
    """The checkpoint keeps node id → site name; a resumed run skips the spent site."""
    import torch
    from flwr.app import ArrayRecord

    from fedadapt.config import RunConfig
    from fedadapt.server.checkpoint import NODE_SITES, load_checkpoint, save_checkpoint, spent_node_ids
    from fedadapt.server.record import RunLog
    from fedadapt.strategies.factory import build_strategy

    log = RunLog()
    log.new_round(1).refusals.append({"site": "c", "node_id": 9, "budget_spent": True})
    log.rounds[0].refusals.append({"site": "b", "node_id": 8, "budget_spent": False})
    cfg = RunConfig()
    save_checkpoint(tmp_path, cfg, 1, ArrayRecord({"w": torch.zeros(2)}),
                    build_strategy(cfg.strategy, cfg), log, started=0.0,
                    extra={NODE_SITES: {7: "a", 8: "b", 9: "c"}})
    ck = load_checkpoint(tmp_path)
    assert ck.spent_sites == ["c"] and spent_node_ids(ck) == {9}
