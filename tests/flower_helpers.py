"""Shared helpers for tests that drive Flower strategies with real Messages (no Grid)."""

import pytest


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps run/node/task ids on Messages; a ServerApp sets them, tests do here."""
    from flwr.supercore.task_identity import TaskIdentity
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


class FakeGrid:
    """The one Grid method a strategy's ``configure_*`` calls: the connected node ids."""

    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))
