"""``flwr run .`` runs the same app as a standard Flower app (local simulation).

``flwr run`` starts a background local SuperLink (state under ``$FLWR_HOME``); the test
uses its own ``FLWR_HOME`` and stops exactly the processes started for it, by PID.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedadapt.client.budget import provision_simulated_sites
from fedadapt.client.site import site_from_context
from fedadapt.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
CONNECTION = """[superlink]
default = "local-simulation"

[superlink.local-simulation]
address = ":local:"
options.num-supernodes = 3
options.backend.name = "ray"
options.backend.client-resources.num-cpus = 1
options.backend.client-resources.num-gpus = 0.0
options.backend.init-args.num-cpus = 1
"""  # init-args: one Ray CPU, one ClientApp actor (as tests/conftest.py gives simulate)


def _stop_processes_of(flwr_home: Path) -> None:
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(str(flwr_home) in part for part in (proc.info["cmdline"] or [])):
            for p in [proc, *proc.children(recursive=True)]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass


def test_flwr_run_local_simulation(tmp_path):
    bindir = Path(sys.executable).parent  # the venv's scripts, also when not activated
    flwr = shutil.which("flwr", path=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    if flwr is None:
        pytest.fail("the `flwr` CLI is not on PATH: install the project (README) first")
    home, out = tmp_path / "flwr-home", tmp_path / "runs"
    home.mkdir()
    # Flower 1.41 keeps SuperLink connections in $FLWR_HOME/config.toml (not pyproject).
    (home / "config.toml").write_text(CONNECTION)
    env = {**os.environ, "FLWR_HOME": str(home),
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Each site's own folder (policy.toml + ledger/); without one a site refuses to train.
    sites = tmp_path / "sites"
    cfg = RunConfig(num_server_rounds=1, site_train_size=64, site_test_size=32, out_dir=str(out),
                    sites_dir=str(sites))
    names = [site_from_context(cfg.to_mapping(), {"partition-id": i, "num-partitions": 3}).name
             for i in range(3)]
    provision_simulated_sites(cfg, sites, names)
    overrides = (f'num-server-rounds=1 site-train-size=64 site-test-size=32 '
                 f'cross-site-eval=false out-dir="{out}" sites-dir="{sites}"')
    try:
        proc = subprocess.run([flwr, "run", ".", "local-simulation", "--stream", "-c", overrides], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        _stop_processes_of(home)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    summaries = list(out.glob("*/summary.json"))
    assert len(summaries) == 1, log[-3000:]
    summary = json.loads(summaries[0].read_text())
    # The federation size comes from the connection's `options.num-supernodes = 3`.
    assert len(summary["sites"]) == 3
    assert summary["config"]["num-server-rounds"] == 1
    assert all(s["epsilon"] > 0 for s in summary["sites"].values())
    assert all(len(list((sites / name / "ledger").glob("*.jsonl"))) == 1 for name in names)
