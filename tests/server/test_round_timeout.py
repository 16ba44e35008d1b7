"""`round-timeout`: how long the server waits for one exchange's replies before a silent
(online but hung) site is recorded as failed."""

from __future__ import annotations

import pytest
from flwr.app import Message, RecordDict

from fedadapt.config import ConfigError, RunConfig
from fedadapt.server.exchange import exchange as _exchange
from fedadapt.server.record import RoundLog


class _SilentGrid:
    """Answers nothing, and remembers how long it was asked to wait."""

    def __init__(self) -> None:
        self.timeout = None

    def send_and_receive(self, messages, timeout=None):
        self.timeout = timeout
        for i, m in enumerate(messages):  # as Flower's Grid does when it pushes
            m.metadata.__dict__["_message_id"] = f"m{i}"
        return []


def test_a_silent_site_is_a_failure_after_the_configured_timeout(task_identity):
    grid, rlog = _SilentGrid(), RoundLog(3)
    messages = [Message(RecordDict(), dst_node_id=9, message_type="train")]
    assert _exchange(grid, messages, rlog, "train", {9: "hospital-c"}, 90.0) == []
    assert grid.timeout == 90.0
    assert rlog.failures == [{"node_id": 9, "site": "hospital-c", "stage": "train",
                              "reason": "no reply within 90 s"}]


def test_round_timeout_must_be_positive_and_reaches_the_cli():
    with pytest.raises(ConfigError, match="round-timeout"):
        RunConfig(round_timeout=0)
    import argparse

    from fedadapt import cmd_simulate

    parser = argparse.ArgumentParser()
    cmd_simulate.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", "--round-timeout", "120"])
    assert args.round_timeout == 120.0
    assert RunConfig().round_timeout == 3600.0
