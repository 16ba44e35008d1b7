"""A site's continual state survives a restarted SuperNode (a fresh ``context.state``) and a
resumed server (the same run key), and refuses a run key that is not a plain name."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from fedadapt.client.memory import SiteMemory, memory_folder


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_state_is_written_through_and_read_back_after_a_restart(tmp_path):
    folder = memory_folder(tmp_path / "site", "20261123-160328")
    assert folder == tmp_path / "site" / "continual" / "20261123-160328"
    before = SiteMemory(_context(), folder)
    anchor = {"lora_B": torch.arange(6.0).reshape(2, 3), "head.bias": torch.ones(3)}
    before.put_arrays("cl-anchor", anchor)
    before.put_number("cl-phase", 2)
    after = SiteMemory(_context(), folder)  # a new process: empty context.state
    got = after.arrays("cl-anchor")
    assert set(got) == set(anchor) and all(torch.equal(got[n], anchor[n]) for n in anchor)
    assert after.number("cl-phase") == 2
    assert after.arrays("cl-fisher") is None and after.number("other") is None
    assert not list(folder.glob("*.tmp"))  # atomic writes leave no temporary file


def test_without_a_folder_it_is_context_state_only(tmp_path):
    ctx = _context()
    mem = SiteMemory(ctx, memory_folder(tmp_path, ""))  # no run key: memory only
    mem.put_number("cl-phase", 0)
    assert SiteMemory(ctx, None).number("cl-phase") == 0
    assert SiteMemory(_context(), None).number("cl-phase") is None
    assert not (tmp_path / "continual").exists()


@pytest.mark.parametrize("key", ["../escape", "a/b", "/abs", ".hidden", "x" * 200])
def test_a_run_key_that_is_not_a_plain_name_is_refused(tmp_path, key):
    with pytest.raises(ValueError, match="not a plain name"):
        memory_folder(tmp_path, key)
