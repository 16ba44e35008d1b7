"""Fixtures shared by the whole suite (pytest finds them here, no import needed)."""

from tests.flower_helpers import task_identity  # noqa: F401 -- the fixture, for every test
