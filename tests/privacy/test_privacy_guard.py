import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.guard import TrainRequest, check, noise_for_target
from fedadapt.privacy.ledger import Ledger
from fedadapt.privacy.policy import SitePolicy

POL = SitePolicy(epsilon_cap=3.0, delta=1e-5, min_noise_multiplier=0.5,
                 clip_norm_min=0.1, clip_norm_max=5.0, max_rounds_per_run=50)


def test_refusals():
    ok = TrainRequest(2.0, 1.0, 0.05, 10)
    assert check(POL, [], ok, rounds_this_run=0).allowed
    assert "floor" in check(POL, [], TrainRequest(0.3, 1.0, 0.1, 10), rounds_this_run=0).reason
    assert "clip" in check(POL, [], TrainRequest(1.0, 9.0, 0.1, 10), rounds_this_run=0).reason
    assert "max rounds" in check(POL, [], ok, rounds_this_run=50).reason
    big = check(POL, [], TrainRequest(0.5, 1.0, 1.0, 100), rounds_this_run=0)
    assert not big.allowed and big.reason.startswith("budget") and big.eps_remaining == 3.0


request = st.builds(TrainRequest, st.floats(0.2, 3.0), st.floats(0.05, 6.0),
                    st.floats(0.01, 1.0), st.integers(1, 30))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(request, min_size=1, max_size=6))
def test_recorded_epsilon_never_exceeds_cap(tmp_path_factory, requests):
    led = Ledger(tmp_path_factory.mktemp("l") / "ledger.jsonl")
    for i, req in enumerate(requests):
        d = check(POL, led.history(), req, rounds_this_run=i)
        if d.allowed:
            led.append(run_id="r", round=i, noise_multiplier=req.noise_multiplier,
                       sample_rate=req.sample_rate, steps=req.steps, clip_norm=req.clip_norm,
                       delta=POL.delta, accountant=POL.accountant, epsilon=d.eps_after)
    for e in led.entries():
        assert e["epsilon"] <= POL.epsilon_cap
    assert epsilon(led.history(), delta=POL.delta) <= POL.epsilon_cap


def test_noise_for_target():
    sigma = noise_for_target(1.0, delta=1e-5, sample_rate=0.1, steps=20)
    got = epsilon([Mechanism(sigma, 0.1, 20)], delta=1e-5)
    assert got <= 1.0 and got == pytest.approx(1.0, rel=0.05)
