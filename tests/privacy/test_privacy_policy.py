import os

import pytest

from fedadapt.privacy.policy import PolicyError, SitePolicy, load_policy, max_delta, write_policy


def test_defaults_delta_and_roundtrip(tmp_path):
    p = tmp_path / "policy.toml"
    p.write_text('epsilon_cap = 4.0\naccountant = "prv"\n')
    pol = load_policy(p, n_records=1000)
    assert pol.delta == pytest.approx(1e-4) and pol.accountant == "prv"
    write_policy(tmp_path / "b.toml", pol)
    assert load_policy(tmp_path / "b.toml", n_records=1000) == pol


def test_delta_above_bound_is_error(tmp_path):
    p = tmp_path / "policy.toml"
    p.write_text("epsilon_cap = 4.0\ndelta = 1e-3\n")
    with pytest.raises(PolicyError, match="delta"):
        load_policy(p, n_records=1000)


@pytest.mark.parametrize("text,field", [
    ("epsilon_cap = -1.0", "epsilon_cap"),
    ("epsilon_cap = 1.0\naccountant = 'gdp'", "accountant"),
    ("epsilon_cap = 1.0\nmin_noise_multiplier = 0.0", "min_noise_multiplier"),
    ("epsilon_cap = 1.0\nclip_norm_min = 2.0\nclip_norm_max = 1.0", "clip_norm_max"),
    ("epsilon_cap = 1.0\nmax_rounds_per_run = 0", "max_rounds_per_run"),
    ("epsilon_cap = 1.0\nbogus = 1", "bogus"),
    ("delta = 1e-6", "epsilon_cap"),
])
def test_invalid_fields_named(tmp_path, text, field):
    p = tmp_path / "policy.toml"
    p.write_text(text + "\n")
    with pytest.raises(PolicyError, match=field):
        load_policy(p, n_records=100)


def test_missing_or_unreadable_fails_closed(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "nope.toml", n_records=10)
    p = tmp_path / "policy.toml"
    p.write_text("epsilon_cap = = 3\n")
    with pytest.raises(PolicyError, match="unreadable"):
        load_policy(p, n_records=10)
    if os.geteuid() != 0:
        p.write_text("epsilon_cap = 3.0\n")
        p.chmod(0)
        with pytest.raises(PolicyError, match="unreadable"):
            load_policy(p, n_records=10)


def test_max_delta():
    assert max_delta(10) == pytest.approx(0.01)
    with pytest.raises(PolicyError):
        SitePolicy(epsilon_cap=1.0, delta=1.5)
