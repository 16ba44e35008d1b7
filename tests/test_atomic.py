"""``fedadapt.atomic``: whole-file writes that a crash cannot leave half-done."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedadapt import atomic


def test_write_replaces_the_content_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "summary.json"
    atomic.write_json(path, {"a": 1})
    atomic.write_json(path, {"a": 2, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1, 2]}
    assert path.read_text() == json.dumps({"a": 2, "b": [1, 2]}, indent=2)
    atomic.write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_bytes() == "héllo\n".encode()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "summary.json", "t.txt"]


def test_a_crash_before_the_rename_keeps_the_old_file(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic.write_bytes(path, b"old")

    def crash(*_a: object) -> None:
        raise OSError("power loss")

    monkeypatch.setattr(os, "replace", crash)  # the process dies between write and rename
    with pytest.raises(OSError, match="power loss"):
        atomic.write_bytes(path, b"new content")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # temp removed


def test_a_failing_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "run-key"
    atomic.write_text(path, "k1\n")
    with pytest.raises(TypeError):
        atomic.write_json(path, {"x": object()})  # not JSON: fails before any write
    with pytest.raises(TypeError):
        atomic.write_bytes(path, "not bytes")  # type: ignore[arg-type]  # raises in write
    assert path.read_text() == "k1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run-key"]


def test_mode_of_a_secret(tmp_path: Path) -> None:
    path = atomic.write_text(tmp_path / "superexec.secret", "s3cret", mode=0o600)
    assert path.stat().st_mode & 0o777 == 0o600
