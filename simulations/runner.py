"""Run a federation on Flower's Simulation Engine (Ray backend), in this process.

The real ServerApp and ClientApp of ``server.app`` / ``client.app`` run here; the
Simulation Engine gives each virtual SuperNode a ``partition-id``, which the ClientApp
turns into its hospital.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from fedadapt import keys
from fedadapt.config import ConfigError, RunConfig
from fedadapt.layout import SITES_DIR, SUMMARY_JSON

#: Flower 1.41 marks ``flwr.simulation.run_simulation`` deprecated in favour of
#: ``flwr run`` (a local SuperLink in separate processes) and has no public in-process
#: replacement. ``fedadapt simulate`` keeps the in-process engine (one Ray start, the apps
#: built with their run config in this process) and hides only that one notice; the
#: same apps run unchanged under ``flwr run .`` (``tests/simulations/test_flwr_run.py``),
#: which is the migration path once Flower removes the function.
RUN_SIMULATION_NOTICE = "`run_simulation` function is deprecated"


class _HideRunSimulationNotice(logging.Filter):
    """Drops Flower's deprecation notice of ``run_simulation`` and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("DEPRECATED FEATURE")
                    and any(RUN_SIMULATION_NOTICE in str(a) for a in (record.args or ())))


#: Environment variable: how many CPUs the Simulation Engine gives Ray, hence how many
#: sites train at once (one CPU each). Unset: every CPU this process may run on.
SIMULATION_CPUS_ENV = "FEDADAPT_SIMULATION_CPUS"


def simulation_cpus() -> int:
    """CPUs for Ray: ``$FEDADAPT_SIMULATION_CPUS`` if set, else the CPUs this process may
    run on (its affinity mask: a container's or ``taskset``'s limit, not the host's count).

    Raises:
        ConfigError: If the variable is set to anything but a positive integer.
    """
    raw = os.environ.get(SIMULATION_CPUS_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"{SIMULATION_CPUS_ENV} must be a positive integer (how many "
                             f"sites train at once), got {raw!r}; unset it to use every CPU")
        return int(raw)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def backend_config(cfg: RunConfig, *, gpu_fraction: float) -> dict:
    """Ray resources: one CPU per site (:func:`simulation_cpus` of them train at once); a
    GPU fraction per site when CUDA is used."""
    import torch

    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    num_gpus = gpu_fraction if use_cuda else 0.0
    return {"client_resources": {"num_cpus": 1, "num_gpus": num_gpus},
            "init_args": {"num_cpus": simulation_cpus(),
                          "num_gpus": torch.cuda.device_count() if use_cuda else 0,
                          "include_dashboard": False}}


def simulate(cfg: RunConfig, *, gpu_fraction: float = 0.5, verbose: bool = False,
             apps: Callable[[dict, Path], tuple[Any, Any]] | None = None) -> Path:
    """Run the federation described by ``cfg`` and return its run directory.

    With ``cfg.resume_from`` set, the run continues in that run directory from its
    checkpoint (``server.checkpoint``), with the checkpoint's sites folder, so the sites'
    ledgers already hold the completed rounds.

    Args:
        cfg: The run config.
        gpu_fraction: Share of one GPU each site's ClientApp reserves when CUDA is used.
        verbose: Keep Flower's and Ray's INFO logs on the console.
        apps: Test hook: ``(run config overrides, run dir) -> (ServerApp, ClientApp)``
            in place of the real apps (``tests/test_faults.py`` kills a site or the server).

    Returns:
        The run directory, holding ``summary.json`` and ``adapter/``.

    Raises:
        RuntimeError: If the run ended without writing its summary.
        simulations.preflight.PreflightError: If a site's data or policy is unusable
            (checked before the federation starts).
        server.checkpoint.CheckpointError: If ``cfg.resume_from`` has no valid checkpoint
            of this run config (checked before anything starts or is written).
    """
    if not 0 < gpu_fraction <= 1:
        raise ValueError(f"gpu_fraction must be in (0, 1], got {gpu_fraction}")
    simulation_cpus()  # a bad $FEDADAPT_SIMULATION_CPUS stops here, before anything is written
    from flwr.simulation import run_simulation

    from fedadapt.client.app import build_client_app
    from fedadapt.server.app import build_server_app
    from fedadapt.server.rundir import new_run_dir

    from fedadapt.client.budget import provision_simulated_sites
    from fedadapt.client.site import site_from_context
    from fedadapt.simulations.preflight import preflight

    if cfg.resume_from:
        from fedadapt.server.checkpoint import check_config, load_checkpoint

        run_dir = Path(cfg.resume_from)
        check_config(load_checkpoint(run_dir), cfg, run_dir)
    else:
        run_dir = new_run_dir(cfg.out_dir)
    started = time.time()
    # Each simulated hospital gets its own folder (policy.toml + ledger/): fresh inside
    # the run directory, or the kept `sites-dir` whose ledgers compose across runs.
    if not cfg.sites_dir:
        cfg = cfg.replace(sites_dir=str(run_dir / SITES_DIR))
    overrides = cfg.to_mapping()
    names = [site_from_context(overrides, {keys.NODE_PARTITION_ID: i,
                                           keys.NODE_NUM_PARTITIONS: cfg.num_sites}).name
             for i in range(cfg.num_sites)]
    provision_simulated_sites(cfg, Path(cfg.sites_dir), names)
    flwr_log = logging.getLogger("flwr")
    preflight(cfg, Path(cfg.sites_dir))  # bad data or policy: exit 2 before any round
    if not verbose:
        flwr_log.setLevel(logging.WARNING)
    notice = _HideRunSimulationNotice()
    flwr_log.addFilter(notice)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server_app, client_app = (apps(overrides, run_dir) if apps else
                                      (build_server_app(overrides, run_dir),
                                       build_client_app(overrides)))
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=cfg.num_sites,
                           backend_config=backend_config(cfg, gpu_fraction=gpu_fraction))
    finally:
        flwr_log.removeFilter(notice)
    summary = run_dir / SUMMARY_JSON
    if not summary.exists() or summary.stat().st_mtime < started:
        raise RuntimeError(f"the simulation ended without writing {summary}; "
                           "rerun with --verbose to see Flower's log")
    return run_dir
