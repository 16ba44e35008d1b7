"""``fedadapt simulate`` hides Flower's ``run_simulation`` deprecation notice, only it."""

import inspect
import logging

from flwr.simulation import run_simulation
from flwr.supercore.logger import warn_deprecated_feature

from fedadapt.simulations.runner import RUN_SIMULATION_NOTICE, _HideRunSimulationNotice


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_filter_matches_flowers_own_notice_and_nothing_else():
    # The text the filter looks for is the one Flower 1.41 logs (pinned on its source).
    assert RUN_SIMULATION_NOTICE in inspect.getsource(run_simulation)
    log = logging.getLogger("flwr")
    records, notice = _Records(), _HideRunSimulationNotice()
    log.addHandler(records)
    log.addFilter(notice)
    try:
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be "
                                "removed in a future version of Flower.")
        warn_deprecated_feature("`start_simulation()` is deprecated.")
        log.warning("a site failed")
    finally:
        log.removeFilter(notice)
        log.removeHandler(records)
    assert len(records.messages) == 2
    assert "start_simulation" in records.messages[0]
    assert records.messages[1] == "a site failed"
