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


@pytest.fixture
def one_thread():
    """Tiny convolutions are faster on one thread than contending for shared cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: Test modules that run real processes or several federations, minutes each on 2 cores,
#: longest first. The suite runs on 2 workers, one module per worker
#: (``-n 2 --dist loadscope``, README); collected first, these start while the rest of the
#: suite runs on the other worker, so their waits (SuperNode heartbeats, process start-ups,
#: Ray start-ups) overlap other work instead of ending the run (longest processing time
#: first; ``pytest_configure`` turns off xdist's own reordering by test count, which would
#: run these last). Only the order changes; every test runs.
SLOW_MODULES_FIRST = (  # worker-seconds measured on 2 cores, 2026-12-03 (base of 1037 s)
    "tests/deploy/test_deployment.py",  # 270
    "tests/deploy/test_deployment_faults.py",  # 167, mostly heartbeat waits
    "tests/server/test_secagg_e2e.py",  # 208
    "tests/test_benchmarks.py",  # 194
    "tests/privacy/test_budget_e2e.py",  # 108
    "tests/continual/test_continual_privacy.py",  # 101
    "tests/continual/test_continual_e2e.py",  # 89
    "tests/simulations/test_e2e_simulation.py",  # 68
    "tests/simulations/test_br35h.py",  # 65
    "tests/simulations/test_flwr_run.py",  # 65
    "tests/simulations/test_drift_e2e.py",  # 63
    "tests/strategies/test_byzantine_e2e.py",  # 56
    "tests/server/test_faults.py",  # 50
    "tests/server/test_resume_no_retrain.py",  # 48
    "tests/simulations/test_local_backbone_e2e.py",  # 47
    "tests/strategies/test_strategies_dp_e2e.py",  # 41
    "tests/imaging/test_segmentation_e2e.py",  # 39
    "tests/client/test_hetero_ranks.py",  # 33
    "tests/server/test_release.py",  # 30
    "tests/simulations/test_mni152_tissue.py",  # 28
    "tests/imaging/test_multilabel_e2e.py",  # 26
)


def pytest_collection_modifyitems(session, config, items):
    """Slow modules first (``SLOW_MODULES_FIRST``), the rest in collection order."""
    rank = {module: i for i, module in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_configure(config):
    """Under ``-n N`` each worker's torch uses one thread and each worker's simulations one
    Ray CPU (one ClientApp actor: ``simulations.runner.simulation_cpus``): N workers on N
    cores, not N² threads, and one actor start-up (torch, PEFT, MONAI imports: ~7 CPU-s)
    per simulation instead of one per core (a ClientApp sets one thread too,
    ``client/site.py``). A test that needs sites training at once sets its own value."""
    import os

    # xdist's loadscope orders modules by their number of tests unless told not to, which
    # would start the few-test, minutes-long modules of SLOW_MODULES_FIRST last.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ.setdefault("FEDADAPT_SIMULATION_CPUS", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_ray_session_per_worker():
    """Under ``-n N``, one Ray session serves every simulation of a worker: Flower's Ray
    backend starts Ray when none is running and stops it after each run
    (``RayBackend.terminate``); here it only terminates the run's ClientApp actors, and Ray
    stops when the worker ends. Each simulation still gets fresh actors (fresh site
    runtimes); it saves Ray's start-up (GCS, raylet, agents: ~4 CPU-s) per simulation."""
    import os

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    def terminate(self) -> None:
        if self.pool:
            self.pool.terminate_all_actors()

    real = RayBackend.terminate
    RayBackend.terminate = terminate
    try:
        yield
    finally:
        RayBackend.terminate = real
        import ray

        if ray.is_initialized():
            ray.shutdown()
