"""Per-record budgets (issue 19): identities, manifests, migration of format-1 ledgers,
the per-record audit, and the guard's answer to every kind of numeric input."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math

import numpy as np
import pytest

from fedadapt.cli import main
from fedadapt.config import RunConfig
from fedadapt.deploy.site_config import SiteConfig, load_site_config, write_site_config
from fedadapt.imaging.datalist import DataError, datalist_identity
from fedadapt.privacy.audit import audit_ledger
from fedadapt.privacy.guard import TrainRequest, check
from fedadapt.identity import DatasetIdentity, IdentityError, identity_of
from fedadapt.privacy.ledger import LedgerError, fingerprint, read_entries
from fedadapt.privacy.policy import SitePolicy, write_policy
from fedadapt.privacy.site_budget import open_site_budget
from tests.privacy.records_oracle import rdp_epsilon

REQ = TrainRequest(1.5, 1.0, 0.1, 20)


def _site(tmp_path, cap=3.0):
    site = tmp_path / "a"
    write_policy(site / "policy.toml", SitePolicy(epsilon_cap=cap, delta=1e-4))
    return site


def _ids(lo, hi, dataset_id="ct"):
    return DatasetIdentity(dataset_id, tuple(f"r{i}" for i in range(lo, hi)))


def test_adding_records_keeps_old_ones_spent_and_removing_lowers_nothing(tmp_path):
    site = _site(tmp_path)
    b = open_site_budget(site, "a", "", n_records=100, identity=_ids(0, 10))
    b.record(REQ, run_id="r", round=1)
    one = rdp_epsilon([(1.5, 0.1, 20)], 1e-4)
    grown = open_site_budget(site, "a", "", n_records=100, identity=_ids(0, 20))
    assert grown.decide(REQ, run_id="r").eps_spent == pytest.approx(one)  # r0..r9 spent
    grown.record(REQ, run_id="r", round=2)
    shrunk = open_site_budget(site, "a", "", n_records=100, identity=_ids(5, 10))
    assert shrunk.spent() == pytest.approx(rdp_epsilon([(1.5, 0.1, 20)] * 2, 1e-4))
    groups = sorted((len(g.entries), g.n_records, eps) for g, eps in grown.spent_by_group())
    assert groups == [(1, 10, pytest.approx(one)),  # r10..r19: the second round only
                      (2, 10, pytest.approx(rdp_epsilon([(1.5, 0.1, 20)] * 2, 1e-4)))]
    (ledger,) = (site / "ledger").glob("*.jsonl")
    entries = read_entries(ledger)
    assert [e["n_records"] for e in entries] == [10, 20] and entries[1]["seq"] == 1
    assert {e["dataset_id"] for e in entries} == {"ct"} and entries[0]["v"] == 2


def test_format1_ledgers_count_against_every_record_and_audit_shows_them(tmp_path):
    site = _site(tmp_path)
    old = open_site_budget(site, "a", fingerprint(b"old tensors"), n_records=100)
    old.record(REQ, run_id="before-upgrade", round=1)
    b = open_site_budget(site, "a", "", n_records=100, identity=_ids(0, 4, "new-id"))
    assert b.decide(REQ, run_id="r").eps_spent == pytest.approx(old.spent())
    b.record(REQ, run_id="r", round=1)
    ledger = b.ledger.path
    report = audit_ledger(ledger)
    assert report.ok and report.format == 2, report.error
    (group,) = report.groups
    assert (group["n_records"], group["entries"], group["legacy_entries"]) == (4, 2, 1)
    assert report.eps_spent == pytest.approx(rdp_epsilon([(1.5, 0.1, 20)] * 2, 1e-4))
    assert audit_ledger(old.ledger.path).ok  # format 1 still audits alone, as before
    assert main(["audit", str(ledger), str(old.ledger.path)]) == 0


def test_audit_fails_closed_on_missing_or_altered_manifest(tmp_path):
    site = _site(tmp_path)
    b = open_site_budget(site, "a", "", n_records=100, identity=_ids(0, 4))
    b.record(REQ, run_id="r", round=1)
    (manifest,) = (site / "ledger" / "manifests").glob("*.json")
    manifest.write_text(json.dumps(["r0", "r1"]))  # drops records: would lower spending
    report = audit_ledger(b.ledger.path)
    assert not report.ok and "altered" in report.error
    assert main(["audit", str(b.ledger.path)]) == 1
    with pytest.raises(LedgerError, match="altered"):
        open_site_budget(site, "a", "", n_records=100, identity=_ids(0, 4))
    manifest.unlink()
    assert "missing" in audit_ledger(b.ledger.path).error
    with pytest.raises(LedgerError, match="missing"):
        open_site_budget(site, "a", "", n_records=100, identity=_ids(0, 4))


def test_audit_fails_when_a_record_is_over_the_cap(tmp_path):
    site = _site(tmp_path, cap=100.0)
    b = open_site_budget(site, "a", "", n_records=100, identity=_ids(0, 4))
    for rnd in range(3):
        b.record(REQ, run_id="r", round=rnd)
    write_policy(site / "policy.toml", SitePolicy(epsilon_cap=1.0, delta=1e-4))
    report = audit_ledger(b.ledger.path)
    assert not report.ok and "cap" in report.error


def test_refusals_never_write(tmp_path):
    site = _site(tmp_path, cap=0.5)
    b = open_site_budget(site, "a", "", n_records=100, identity=_ids(0, 4))
    assert not b.decide(REQ, run_id="r").allowed
    assert not list((site / "ledger").glob("*.jsonl"))


# --- identities ---------------------------------------------------------------------

def _datalist(tmp_path, items, **top):
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in {i["image"] for i in items}:
        np.save(tmp_path / name, np.full((4, 4), len(name), dtype=np.float32))
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": items, **top}))
    return path


def test_datalist_ids_follow_source_files_and_record_id_column(tmp_path):
    items = [{"image": f"img/p{i}.npy", "label": 0} for i in range(3)]
    path = _datalist(tmp_path, items, dataset_id="chest-2024")
    a = datalist_identity(path, "training")
    assert a.dataset_id == "chest-2024" and len(a.records) == 3
    path.write_text(json.dumps({"training": items[::-1], "dataset_id": "chest-2024"}))
    assert datalist_identity(path, "training").records == a.records  # order-free
    mapped = [{**item, "record_id": f"patient-{i}"} for i, item in enumerate(items)]
    path.write_text(json.dumps({"training": mapped}))
    assert datalist_identity(path, "training", dataset_id="x").record_ids == (
        "patient-0", "patient-1", "patient-2")
    path.write_text(json.dumps({"training": items, "dataset_id": "other"}))
    with pytest.raises(DataError, match="disagrees"):
        datalist_identity(path, "training", dataset_id="chest-2024")
    path.write_text(json.dumps({"training": [{**items[0], "record_id": 7}]}))
    with pytest.raises(DataError, match="record_id"):
        datalist_identity(path, "training")


def test_site_toml_dataset_id_round_trips(tmp_path):
    write_site_config(tmp_path, SiteConfig(name="a", dataset_id="ct-2024"))
    assert load_site_config(tmp_path).dataset_id == "ct-2024"
    write_site_config(tmp_path, SiteConfig(name="a"))
    assert load_site_config(tmp_path).dataset_id == ""
    assert "# dataset_id" in (tmp_path / "site.toml").read_text()


def test_simulated_identity_is_stable_across_preprocessing():
    from fedadapt.client.site import _simulated_site

    def ids(**kw):
        cfg = RunConfig(num_sites=2, site_train_size=12, site_test_size=4, **kw)
        return identity_of(_simulated_site(cfg, {"partition-id": 1}).datasets()[0])

    small, large = ids(image_size=16), ids(image_size=32)
    assert small == large and small.dataset_id.startswith("sim:")
    assert ids(image_size=16, seed=1).records.isdisjoint(small.records)
    with pytest.raises(IdentityError):
        identity_of([1, 2, 3])


# --- numeric inputs of the guard ------------------------------------------------------

POLICY = SitePolicy(epsilon_cap=8.0, delta=1e-5, min_noise_multiplier=0.5)
REFUSED = {
    "sigma inf": (TrainRequest(math.inf, 1.0, 0.1, 10), "above the largest"),
    "sigma 1e30": (TrainRequest(1e30, 1.0, 0.1, 10), "above the largest"),
    "q 1e-300": (TrainRequest(1.0, 1.0, 1e-300, 10), "sample rate"),
    "steps 0": (TrainRequest(1.0, 1.0, 0.1, 0), "0 steps"),
    "clip inf": (TrainRequest(1.0, math.inf, 0.1, 10), "clip norm"),
}
ERRORS = {
    "sigma nan": ((math.nan, 1.0, 0.1, 10), "noise_multiplier is NaN"),
    "clip nan": ((1.0, math.nan, 0.1, 10), "clip_norm is NaN"),
    "q nan": ((1.0, 1.0, math.nan, 10), "sample_rate is NaN"),
    "sigma < 0": ((-1.0, 1.0, 0.1, 10), "noise_multiplier must be >= 0"),
    "clip < 0": ((1.0, -1.0, 0.1, 10), "clip_norm must be > 0"),
    "q < 0": ((1.0, 1.0, -0.1, 10), r"sample_rate must be in \(0, 1\]"),
    "q > 1": ((1.0, 1.0, 1.5, 10), r"sample_rate must be in \(0, 1\]"),
    "steps < 0": ((1.0, 1.0, 0.1, -1), "steps must be an integer"),
    "steps float": ((1.0, 1.0, 0.1, 2.5), "steps must be an integer"),
    "sigma str": (("1.0", 1.0, 0.1, 10), "must be a number"),
}


def _decide(request):
    return check(POLICY, [], request, rounds_this_run=0)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_guard_refuses_unusable_requests_in_bounded_time(name):
    request, reason = REFUSED[name]
    with cf.ThreadPoolExecutor(1) as pool:  # a hang fails the test instead of the suite
        decision = pool.submit(_decide, request).result(timeout=30)
    assert not decision.allowed and reason in decision.reason
    assert not decision.reason.startswith("budget")


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_malformed_requests_are_errors(name):
    args, message = ERRORS[name]
    with pytest.raises(ValueError, match=message):
        TrainRequest(*args)


def test_legacy_history_with_huge_sigma_is_accounted_in_bounded_time():
    from fedadapt.privacy.accounting import Mechanism, epsilon

    with cf.ThreadPoolExecutor(1) as pool:
        eps = pool.submit(epsilon, [Mechanism(math.inf, 0.5, 10), Mechanism(1e30, 0.1, 5)],
                          delta=1e-5).result(timeout=30)
    assert 0 < eps < 1  # accounted as σ = 100: an upper bound, tiny
