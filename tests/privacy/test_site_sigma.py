"""Per-site σ: a site calibrates its own noise multiplier to a per-run ε target
(``target_epsilon_per_run``), and the simulator provisions it (``site-target-epsilon``)."""

import pytest

from fedadapt.client.budget import provision_simulated_sites
from fedadapt.client.site_round import plan_round
from fedadapt.config import ConfigError, RunConfig
from fedadapt.layout import policy_path
from fedadapt.messages import TrainConfig
from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.guard import check
from fedadapt.privacy.policy import PolicyError, SitePolicy, load_policy

ROUNDS, DELTA = 10, 1e-5


def _cfg(sigma: float = 0.5) -> TrainConfig:
    return TrainConfig(server_round=1, local_epochs=1, lr=0.005, batch_size=32,
                       dp_enabled=True, noise_multiplier=sigma, max_grad_norm=1.0)


def _policy(target: float) -> SitePolicy:
    return SitePolicy(epsilon_cap=12.0, delta=DELTA, max_rounds_per_run=ROUNDS,
                      target_epsilon_per_run=target)


def test_each_site_reaches_the_run_target_with_its_own_sigma():
    sigmas = {}
    for n in (396, 132):
        req = plan_round(n, _cfg(), _policy(8.0))
        sigmas[n] = req.noise_multiplier
        history = [Mechanism(req.noise_multiplier, req.sample_rate, req.steps)] * ROUNDS
        eps = epsilon(history, delta=DELTA, accountant="rdp")  # composed round by round
        assert 7.8 < eps <= 8.0, (n, eps)
    # the larger site (smaller q) needs less noise for the same ε: the point of it
    assert sigmas[396] < sigmas[132] - 0.2


def test_server_sigma_above_the_target_wins_and_the_guard_still_decides():
    req = plan_round(396, _cfg(sigma=3.0), _policy(8.0))
    assert req.noise_multiplier == 3.0  # never less than the server asked
    own = plan_round(396, _cfg(), _policy(8.0))
    # the target is a calibration; the cap, floor and round limit still refuse
    tight = SitePolicy(epsilon_cap=8.0, delta=DELTA, max_rounds_per_run=ROUNDS,
                       min_noise_multiplier=2.0, target_epsilon_per_run=8.0)
    assert "floor" in check(tight, [], own, rounds_this_run=0).reason
    history = [Mechanism(own.noise_multiplier, own.sample_rate, own.steps)] * ROUNDS
    assert "max rounds" in check(_policy(8.0), history, own,
                                 rounds_this_run=ROUNDS).reason


def test_target_above_cap_or_negative_is_refused():
    for bad in (13.0, -1.0, float("nan")):
        with pytest.raises(PolicyError, match="target_epsilon_per_run"):
            _policy(bad)


def test_simulator_provisions_the_run_target(tmp_path):
    cfg = RunConfig(num_server_rounds=ROUNDS, site_target_epsilon=8.0, noise_multiplier=0.5)
    provision_simulated_sites(cfg, tmp_path, ["a", "b"])
    pol = load_policy(policy_path(tmp_path / "a"), n_records=396)
    assert (pol.target_epsilon_per_run, pol.max_rounds_per_run) == (8.0, ROUNDS)
    assert pol.epsilon_cap == cfg.epsilon_cap and pol.min_noise_multiplier == 0.5
    off = tmp_path / "off"
    provision_simulated_sites(RunConfig(), off, ["a"])
    assert load_policy(policy_path(off / "a"), n_records=396).target_epsilon_per_run == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(site_target_epsilon=20.0), "site-target-epsilon"),
    (dict(site_target_epsilon=8.0, dp=False), "site-target-epsilon"),
])
def test_run_config_rejects_bad_site_target(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**kwargs)
