import json
import signal
import subprocess
import sys
import time

import pytest

from fedadapt.privacy.ledger import Ledger, LedgerError, fingerprint, ledger_path, read_entries


def _append(led, i, run="r1"):
    return led.append(run_id=run, round=i, noise_multiplier=1.0, sample_rate=0.1, steps=5,
                      clip_norm=1.0, delta=1e-5, accountant="rdp", epsilon=0.1 * i)


def _make(tmp_path, n=4):
    led = Ledger(ledger_path(tmp_path / "ledger", "site-a", fingerprint(b"data")))
    for i in range(1, n + 1):
        _append(led, i)
    return led


def test_append_and_read(tmp_path):
    led = _make(tmp_path)
    assert [e["round"] for e in led.entries()] == [1, 2, 3, 4]
    assert len(led.history()) == 4


def _lines(led):
    return led.path.read_text().splitlines(keepends=True)


@pytest.mark.parametrize("kind,bad_line", [("edit", 3), ("delete", 2), ("reorder", 2)])
def test_tamper_detected(tmp_path, kind, bad_line):
    led = _make(tmp_path)
    lines = _lines(led)
    if kind == "edit":
        e = json.loads(lines[1])
        e["noise_multiplier"] = 5.0
        lines[1] = json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
    elif kind == "delete":
        del lines[1]
    else:
        lines[1], lines[2] = lines[2], lines[1]
    led.path.write_text("".join(lines))
    with pytest.raises(LedgerError) as err:
        read_entries(led.path)
    assert err.value.line == bad_line


def test_truncated_last_line_reported_not_repaired(tmp_path):
    led = _make(tmp_path)
    data = led.path.read_bytes()
    led.path.write_bytes(data[:-10])
    with pytest.raises(LedgerError, match="truncated") as err:
        read_entries(led.path)
    assert err.value.line == 4
    with pytest.raises(LedgerError):
        _append(led, 5)
    assert led.path.read_bytes() == data[:-10]


_WRITER = """
import sys
from fedadapt.privacy.ledger import Ledger
led = Ledger(__import__('pathlib').Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    led.append(run_id=sys.argv[3], round=i, noise_multiplier=1.0, sample_rate=0.1,
               steps=1, clip_norm=1.0, delta=1e-5, accountant='rdp', epsilon=0.0)
    print(i, flush=True)
"""


def test_two_processes_serialised_by_lock(tmp_path):
    path = tmp_path / "l.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), "15", f"run{k}"],
                              stdout=subprocess.DEVNULL) for k in range(2)]
    assert all(p.wait(60) == 0 for p in procs)
    entries = read_entries(path)
    assert len(entries) == 30


def test_sigkill_mid_append_loses_nothing_silently(tmp_path):
    path = tmp_path / "l.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), "100000", "crash"],
                            stdout=subprocess.PIPE, text=True)
    acknowledged = -1
    deadline = time.time() + 30
    while acknowledged < 20 and time.time() < deadline:
        acknowledged = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        entries = read_entries(path)
    except LedgerError as err:
        assert "truncated" in str(err) or "invalid JSON" in str(err)
    else:
        # every acknowledged (fsync'ed) append is present, in order
        assert len(entries) >= acknowledged + 1
        assert [e["round"] for e in entries] == list(range(len(entries)))
