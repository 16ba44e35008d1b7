import pytest

from fedadapt.cli import main
from fedadapt.privacy.guard import TrainRequest
from fedadapt.privacy.ledger import LedgerError, fingerprint
from fedadapt.privacy.policy import PolicyError, SitePolicy, write_policy
from fedadapt.privacy.site_budget import open_site_budget


def test_budget_refuses_after_cap_and_audit_passes(tmp_path):
    site = tmp_path / "hospital-a"
    write_policy(site / "policy.toml", SitePolicy(epsilon_cap=0.6, delta=1e-4))
    b = open_site_budget(site, "hospital-a", fingerprint(b"x"), n_records=100)
    req = TrainRequest(2.0, 1.0, 0.05, 10)
    trained = 0
    for rnd in range(1, 10):
        d = b.decide(req, run_id="r1")
        if not d.allowed:
            assert d.reason.startswith("budget") and 0 < d.eps_remaining < 0.6
            break
        b.record(req, run_id="r1", round=rnd)
        trained += 1
    assert 0 < trained < 9
    # spending composes across runs and reopenings
    b2 = open_site_budget(site, "hospital-a", fingerprint(b"x"), n_records=100)
    assert not b2.decide(req, run_id="r2").allowed
    assert main(["audit", str(b.ledger.path)]) == 0


def test_fail_closed(tmp_path):
    with pytest.raises(PolicyError):
        open_site_budget(tmp_path / "none", "s", "ab", n_records=10)
    site = tmp_path / "s"
    write_policy(site / "policy.toml", SitePolicy(epsilon_cap=2.0, delta=1e-3))
    b = open_site_budget(site, "s", "ab", n_records=10)
    b.ledger.path.parent.mkdir(parents=True)
    b.ledger.path.write_text('{"broken')
    with pytest.raises(LedgerError):
        open_site_budget(site, "s", "ab", n_records=10)
