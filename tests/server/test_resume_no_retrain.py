"""A server that dies after the sites have trained a round, but before it aggregated and
checkpointed it, is resumed: the sites answer the repeated round with the reply they
kept (``client/replies.py``) instead of training and spending their budget again, so no
ledger records a round twice. Real Simulation Engine runs (2 sites, tiny data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.privacy.audit import audit_ledger
from fedadapt.server.app import run_federation
from fedadapt.server.checkpoint import load_checkpoint
from fedadapt.simulations.runner import simulate

BASE = dict(num_sites=2, num_server_rounds=3, site_train_size=32, site_test_size=16,
            local_epochs=1, batch_size=16, backbone_weights="random", device="cpu",
            cross_site_eval=False)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class _DiesAfterTraining:
    """A Grid whose server "dies" once the sites' replies to round ``rnd``'s training are in."""

    def __init__(self, grid: Grid, rnd: int) -> None:
        self.grid, self.rnd = grid, rnd

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        if any(m.metadata.message_type == "train"
               and int(m.content[keys.CONFIG][keys.SERVER_ROUND]) == self.rnd for m in messages):
            raise SystemExit(f"server killed after round {self.rnd}'s training")
        return replies


def _server(overrides: dict, run_dir: Path) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(_DiesAfterTraining(grid, 2), RunConfig.from_mapping(overrides), run_dir)

    return app


def _ledgers(run_dir: Path) -> dict[str, list[dict]]:
    return {p.parent.parent.name: [json.loads(x) for x in p.read_text().splitlines() if x]
            for p in sorted((run_dir / "sites").glob("*/ledger/*.jsonl"))}


def test_a_round_trained_before_the_crash_is_not_trained_again(tmp_path):
    from fedadapt.client.app import build_client_app

    cfg = RunConfig(out_dir=str(tmp_path), **BASE)
    with pytest.raises(RuntimeError, match="without writing"):
        simulate(cfg, apps=lambda o, d: (_server(o, d), build_client_app(o)))
    (run_dir,) = Path(cfg.out_dir).iterdir()
    assert load_checkpoint(run_dir).round == 1  # round 2 was trained, never aggregated
    before = _ledgers(run_dir)
    assert {s: [e["round"] for e in es] for s, es in before.items()} == {
        "hospital-a": [1, 2], "hospital-b": [1, 2]}
    key = (run_dir / "run-key").read_text().strip()
    kept = {p.name for p in (run_dir / "sites" / "hospital-a" / "replies" / key).iterdir()}
    assert kept == {"r1.json", "r1.safetensors", "r2.json", "r2.safetensors"}

    resumed = simulate(RunConfig.from_mapping({**load_checkpoint(run_dir).config,
                                               "resume-from": str(run_dir)}))
    summary = json.loads((resumed / "summary.json").read_text())
    after = _ledgers(run_dir)
    for site, entries in after.items():
        assert [e["round"] for e in entries] == [1, 2, 3]  # round 2 once, no re-spend
        assert entries[:2] == before[site]
        audit = audit_ledger(next((run_dir / "sites" / site / "ledger").glob("*.jsonl")))
        assert audit.ok and summary["sites"][site]["epsilon"] == pytest.approx(audit.eps_spent)
    # The repeated round's replies are the kept ones: same ε and loss as recorded then.
    r2 = summary["rounds"][1]["train"]
    for site in after:
        assert r2[site]["epsilon"] == pytest.approx(before[site][1]["epsilon"])
    # Only the last two rounds' replies are kept.
    assert {p.name for p in (run_dir / "sites" / "hospital-a" / "replies" / key).iterdir()} \
        == {"r2.json", "r2.safetensors", "r3.json", "r3.safetensors"}
