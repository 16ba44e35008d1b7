"""Fixtures shared by the whole suite (pytest finds them here, no import needed)."""

import pytest

from tests.flower_helpers import task_identity  # noqa: F401 -- the fixture, for every test


@pytest.fixture(autouse=True)
def _fresh_site_runtime():
    """Each test starts without the models and datasets a ClientApp process keeps
    (``client.runtime``), as a new SuperNode process would."""
    from fedadapt.client import runtime

    runtime.clear()
    yield
    runtime.clear()


#: Test modules that run real processes or several federations, minutes each on 2 cores,
#: longest first. The suite runs on 2 workers, one module per worker
#: (``-n 2 --dist loadscope``, README); collected first, these start while the rest of the
#: suite runs on the other worker, so their waits (SuperNode heartbeats, process start-ups,
#: Ray start-ups) overlap other work instead of ending the run (longest processing time
#: first). Only the order changes; every test runs.
SLOW_MODULES_FIRST = (
    "tests/deploy/test_deployment.py",
    "tests/deploy/test_deployment_faults.py",
    "tests/simulations/test_flwr_run.py",
    "tests/test_benchmarks.py",
    "tests/server/test_secagg_e2e.py",
    "tests/simulations/test_e2e_simulation.py",
    "tests/continual/test_continual_e2e.py",
    "tests/continual/test_continual_privacy.py",
    "tests/server/test_faults.py",
    "tests/simulations/test_br35h.py",
    "tests/strategies/test_byzantine_e2e.py",
    "tests/strategies/test_strategies_dp_e2e.py",
    "tests/simulations/test_drift_e2e.py",
    "tests/simulations/test_mni152_tissue.py",
    "tests/server/test_resume_no_retrain.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Slow modules first (``SLOW_MODULES_FIRST``), the rest in collection order."""
    rank = {module: i for i, module in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_configure(config):
    """Under ``-n N`` each worker's torch uses one thread: N workers on N cores, not N²
    threads (a ClientApp sets one thread too, ``client/site.py``)."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
