"""Faults: a site that dies mid-round, a server that dies and resumes, bad checkpoints.

Real Simulation Engine runs (2 sites, tiny data); the faults are injected through the
``apps`` test hook of ``simulations.runner.simulate``: a ClientApp that raises for one
site in one round, and a Grid that raises (the server dies) once round 2's checkpoint
is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedadapt.client.app import handle_evaluate, handle_train
from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.privacy.audit import audit_ledger
from fedadapt.server.app import build_server_app, run_federation
from fedadapt.server.checkpoint import (CheckpointError, checkpoint_path, load_checkpoint,
                               restore_strategy, save_checkpoint, strategy_state)
from fedadapt.server.record import RunLog
from fedadapt.simulations.runner import simulate
from fedadapt.strategies.factory import build_strategy

BASE = dict(num_sites=3, num_server_rounds=3, site_train_size=32, site_test_size=16,
            local_epochs=1, batch_size=16, backbone_weights="random", device="cpu")
# The killed server's thread ends with an exception, as a real crash would.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


def _client(overrides: dict, deaths: frozenset[tuple[int, int]] = frozenset()) -> ClientApp:
    """The real ClientApp handlers; site ``p`` raises mid-training in round ``r`` for each
    ``(p, r)`` in ``deaths``."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        rnd = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
        if (int(context.node_config[keys.NODE_PARTITION_ID]), rnd) in deaths:
            raise RuntimeError(f"site killed in round {rnd}")
        return handle_train(msg, context, overrides)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, overrides)

    return app


class _DyingGrid:
    """A Grid whose server process "dies" when round ``die_round`` is about to be sent."""

    def __init__(self, grid: Grid, die_round: int) -> None:
        self.grid, self.die_round = grid, die_round

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if any(int(m.content[keys.CONFIG][keys.SERVER_ROUND]) == self.die_round
               for m in messages if keys.CONFIG in m.content):
            raise SystemExit(f"server killed before round {self.die_round}")
        return self.grid.send_and_receive(messages, timeout=timeout)


def _server(overrides: dict, run_dir: Path, die_round: int) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(_DyingGrid(grid, die_round), RunConfig.from_mapping(overrides), run_dir)

    return app


def _ledger_rounds(run_dir: Path) -> dict[str, list[int]]:
    out = {}
    for path in sorted((run_dir / "sites").glob("*/ledger/*.jsonl")):
        out[path.parent.parent.name] = [json.loads(line)["round"]
                                        for line in path.read_text().splitlines() if line]
    return out


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    """3 sites, min-train-sites=2, 3 rounds. Round 1: site 2 dies mid-round (two train:
    the round completes). Round 2: sites 1 and 2 die (one trains: the round fails). The
    server dies before round 3; ``simulate`` then resumes the run from its checkpoint."""
    cfg = RunConfig(out_dir=str(tmp_path_factory.mktemp("crash")), min_train_sites=2, **BASE)
    deaths = frozenset({(2, 1), (1, 2), (2, 2)})
    with pytest.raises(RuntimeError, match="without writing"):
        simulate(cfg, apps=lambda o, d: (_server(o, d, die_round=3), _client(o, deaths)))
    (run_dir,) = Path(cfg.out_dir).iterdir()
    before = load_checkpoint(run_dir)
    ledgers_before = _ledger_rounds(run_dir)
    resumed = simulate(RunConfig.from_mapping({**before.config, "resume-from": str(run_dir)}))
    return run_dir, before, ledgers_before, json.loads((resumed / "summary.json").read_text())


def _train_failures(rnd: dict) -> list[dict]:
    return [f for f in rnd["failures"] if f["stage"] == "train"]


def test_round_completes_without_the_dead_site_and_it_rejoins(crashed_and_resumed):
    r1, r2, r3 = crashed_and_resumed[3]["rounds"]
    assert len(r1["train"]) == 2 and len(r1["evaluate"]) == 3  # aggregated without site 2
    (fail,) = _train_failures(r1)
    assert "killed in round 1" in fail["reason"]
    assert not [f for f in r1["failures"] if f["stage"] == "round"]
    assert len(r3["train"]) == 3 and not r3["failures"]  # both dead sites rejoined


def test_min_train_sites_fails_the_round_and_keeps_the_adapter(crashed_and_resumed):
    r1, r2, _ = crashed_and_resumed[3]["rounds"]
    assert len(_train_failures(r2)) == 2
    assert any(f["stage"] == "round" and "min-train-sites=2" in f["reason"]
               for f in r2["failures"])
    assert len(r2["train"]) == 1  # the surviving site trained (and spent), but alone
    # The global adapter was not updated: round 2 evaluated round 1's adapter again.
    assert r2["evaluate"] == r1["evaluate"]


def test_server_crash_then_resume_continues_without_respending(crashed_and_resumed):
    run_dir, before, ledgers_before, summary = crashed_and_resumed
    assert before.round == 2
    assert sorted(ledgers_before.values()) == [[1], [1, 2]]  # site 2 never trained yet
    assert summary["run_dir"] == str(run_dir)
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    ledgers = _ledger_rounds(run_dir)  # one entry per (site, round) it trained: none twice
    assert sorted(ledgers.values()) == [[1, 2, 3], [1, 3], [3]]
    for path in (run_dir / "sites").glob("*/ledger/*.jsonl"):
        audit = audit_ledger(path)
        assert audit.ok, audit.error
    after = load_checkpoint(run_dir)
    assert after.round == 3
    # The resumed run kept the crashed run's rounds 1-2 and continued from its adapter.
    assert [r.to_json() for r in after.log.rounds[:2]] == \
        [r.to_json() for r in before.log.rounds]
    assert any(not torch.equal(after.arrays[k], before.arrays[k]) for k in before.arrays)


def test_resume_refuses_another_config_and_overwrites_nothing(crashed_and_resumed):
    run_dir = crashed_and_resumed[0]
    ck = load_checkpoint(run_dir)
    stamp = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    other = RunConfig.from_mapping({**ck.config, "resume-from": str(run_dir), "lr": 0.5})
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.05, now 0.5"):
        simulate(other)
    fewer = RunConfig.from_mapping({**ck.config, "resume-from": str(run_dir),
                                    "num-server-rounds": 2})
    with pytest.raises(CheckpointError, match="already completed round 3"):
        simulate(fewer)
    assert stamp == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path), resume_from=str(tmp_path / "nope"), **BASE)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        simulate(cfg)
    bad = tmp_path / "bad"
    bad.mkdir()
    checkpoint_path(bad).write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        simulate(cfg.replace(resume_from=str(bad)))
    assert checkpoint_path(bad).read_bytes() == b"not a checkpoint at all"
    assert sorted(p.name for p in bad.iterdir()) == ["checkpoint.pt"]
    torch.save({"format": "something/9"}, checkpoint_path(bad))
    with pytest.raises(CheckpointError, match="expected 'fedadapt.checkpoint/1'"):
        load_checkpoint(bad)


@pytest.mark.parametrize("name,site_dp", [("fedadam", False), ("fedyogi", True),
                                          ("exact", False), ("scaffold", False)])
def test_strategy_state_round_trips(tmp_path, name, site_dp):
    cfg = RunConfig(strategy=name, site_dp=site_dp, **BASE)
    s = build_strategy(name, cfg)
    chain = [s]
    while "inner" in vars(chain[-1]):
        chain.append(chain[-1].inner)
    inner = chain[-1]
    rng = np.random.default_rng(0)
    if hasattr(inner, "m_t"):
        inner.m_t = {"a": rng.normal(size=(2, 3)).astype(np.float32)}
        inner.v_t = {"a": rng.random((2, 3)).astype(np.float32)}
    if hasattr(inner, "residuals"):
        inner.residuals = {1: 0.5, 2: 0.0}
    if hasattr(inner, "site_c"):  # SCAFFOLD's control variates, by node id
        inner.c = {"a": torch.randn(2, 3)}
        inner.site_c = {"north": {"a": torch.randn(2, 3)}, "south": {"a": torch.randn(2, 3)}}
        inner.site_n = {"north": 30.0, "south": 12.0}
        inner.node_site = {7: "north", 9: "south"}
        inner.skipped = {2: [{"site": "south", "reason": "rank"}]}
    s.rejected = {2: [{"site": "x", "node_id": 3, "reason": "norm"}]}
    if site_dp:
        from fedadapt.privacy.accounting import Mechanism

        chain[1].history = [Mechanism(1.0, 0.5, 1)]
        chain[1].norms = {1: {"x": 0.3}}
        torch.normal(0.0, 1.0, size=(5,), generator=chain[1]._gen)
    arrays = ArrayRecord({"w": torch.arange(4.0)})
    save_checkpoint(tmp_path, cfg, 2, arrays, s, RunLog(rounds=[]), started=0.0,
                    extra={"phase": 1})
    raw = torch.load(checkpoint_path(tmp_path), weights_only=True)
    fresh = build_strategy(name, cfg)
    restore_strategy(fresh, raw["strategy"])
    assert strategy_state(fresh).keys() == strategy_state(s).keys()
    f_chain = [fresh]
    while "inner" in vars(f_chain[-1]):
        f_chain.append(f_chain[-1].inner)
    if hasattr(inner, "m_t"):
        np.testing.assert_array_equal(f_chain[-1].m_t["a"], inner.m_t["a"])
        np.testing.assert_array_equal(f_chain[-1].v_t["a"], inner.v_t["a"])
    if hasattr(inner, "residuals"):
        assert f_chain[-1].residuals == inner.residuals
    if hasattr(inner, "site_c"):
        assert torch.equal(f_chain[-1].c["a"], inner.c["a"])
        f = f_chain[-1]
        assert f.site_n == inner.site_n and set(f.site_c) == {"north", "south"}
        assert f.node_site == inner.node_site and f.skipped == inner.skipped
        assert all(torch.equal(f.site_c[k]["a"], inner.site_c[k]["a"]) for k in inner.site_c)
    assert fresh.rejected == s.rejected
    if site_dp:
        assert f_chain[1].history == chain[1].history and f_chain[1].norms == chain[1].norms
        assert torch.equal(torch.normal(0.0, 1.0, size=(3,), generator=f_chain[1]._gen),
                           torch.normal(0.0, 1.0, size=(3,), generator=chain[1]._gen))
    # A checkpoint of a fedavg run does not restore into this strategy.
    with pytest.raises(CheckpointError, match="resume with the run config"):
        restore_strategy(build_strategy("fedprox", RunConfig(**BASE)), raw["strategy"])


def test_cli_resume_takes_the_stored_config_and_rejects_other_flags(crashed_and_resumed):
    from fedadapt.cmd_simulate import _resumed
    from fedadapt.config import ConfigError

    run_dir = crashed_and_resumed[0]
    ck = load_checkpoint(run_dir)
    cfg = _resumed(RunConfig(), str(run_dir))
    assert cfg.to_mapping() == {**ck.config, "resume-from": str(run_dir)}
    assert _resumed(RunConfig(num_server_rounds=7), str(run_dir)).num_server_rounds == 7
    with pytest.raises(ConfigError, match="lr: given 0.5, checkpoint 0.05"):
        _resumed(RunConfig(lr=0.5), str(run_dir))
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        _resumed(RunConfig(), str(run_dir / "missing"))
