"""Each benchmark script runs in --quick mode and ends with its headline number (no timing asserts)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["bench_aggregation.py", "bench_dp_overhead.py", "bench_runtime_overhead.py",
           "bench_secagg.py",
           # one real Flower simulation each; bench_scale reads its round times back from
           # the run's TensorBoard events, so it also checks server.tracking end to end
           "bench_utility.py", "bench_scale.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick(script):
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / script),
                           "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+(\.\d+)?", last), last
