"""Two processes (multiprocessing, spawn) run rounds at once on one site folder, on
overlapping record sets under two dataset ids: the site lock keeps every record's ε,
recomputed independently from the raw ledgers and manifests, within the cap."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from fedadapt.privacy.audit import audit_ledger
from fedadapt.privacy.guard import TrainRequest
from fedadapt.identity import DatasetIdentity
from fedadapt.privacy.policy import SitePolicy, write_policy
from fedadapt.privacy.site_budget import BudgetExceeded, open_site_budget
from tests.privacy.records_oracle import ledger_mechanisms_per_record, rdp_epsilon

CAP, DELTA = 1.0, 1e-3
REQ = (3.0, 1.0, 0.2, 5)  # ε 0.47 alone, 0.96 after 4 rounds, 1.08 after 5


def _worker(site: str, dataset_id: str, first: int, rounds: int, start) -> int:
    """Run ``rounds`` rounds on records ``first..first+9``; returns how many trained."""
    identity = DatasetIdentity(dataset_id, tuple(f"rec-{i}" for i in range(first, first + 10)))
    start.wait()
    trained = 0
    for rnd in range(rounds):
        budget = open_site_budget(site, "a", "", n_records=20, identity=identity)
        req = TrainRequest(*REQ)
        if not budget.decide(req, run_id=dataset_id).allowed:
            continue
        try:
            budget.record(req, run_id=dataset_id, round=rnd)
            trained += 1
        except BudgetExceeded:
            pass
    return trained


def test_concurrent_rounds_keep_every_record_within_the_cap(tmp_path):
    site = tmp_path / "a"
    write_policy(site / "policy.toml", SitePolicy(epsilon_cap=CAP, delta=DELTA))
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            jobs = [pool.apply_async(_worker, (str(site), "ds-x", 0, 6, start)),
                    pool.apply_async(_worker, (str(site), "ds-y", 5, 6, start))]
            trained = [j.get(timeout=300) for j in jobs]
    per_record = ledger_mechanisms_per_record(site / "ledger")
    assert sum(trained) >= 1
    for record, mechs in per_record.items():
        assert rdp_epsilon(mechs, DELTA) <= CAP * (1 + 1e-9), record
    # the shared records rec-5..rec-9 were charged by both processes' rounds
    assert len(per_record["rec-5"]) == sum(trained)
    assert rdp_epsilon([REQ[:1] + REQ[2:]] * (sum(trained) + 1), DELTA) > CAP
    for ledger in sorted((site / "ledger").glob("*.jsonl")):
        report = audit_ledger(ledger)
        assert report.ok, report.error
        assert report.format == 2 and report.groups
    assert sorted(Path(p).name for p in (site / "ledger").glob("*.jsonl")) == sorted(
        p.name for p in (site / "ledger").glob("a-ds-*.jsonl"))
