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
