"""Run a federation on Flower's Simulation Engine (Ray backend), in this process.

The real ServerApp and ClientApp of ``server.app`` / ``client.app`` run here; the
Simulation Engine gives each virtual SuperNode a ``partition-id``, which the ClientApp
turns into its hospital.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from fedadapt import keys
from fedadapt.config import RunConfig


def backend_config(cfg: RunConfig, *, gpu_fraction: float) -> dict:
    """Ray resources: one CPU per site; a GPU fraction per site when CUDA is used."""
    import torch

    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    num_gpus = gpu_fraction if use_cuda else 0.0
    return {"client_resources": {"num_cpus": 1, "num_gpus": num_gpus},
            "init_args": {"num_cpus": os.cpu_count() or 1,
                          "num_gpus": torch.cuda.device_count() if use_cuda else 0,
                          "include_dashboard": False}}


def simulate(cfg: RunConfig, *, gpu_fraction: float = 0.5, verbose: bool = False) -> Path:
    """Run the federation described by ``cfg`` and return its run directory.

    Args:
        cfg: The run config.
        gpu_fraction: Share of one GPU each site's ClientApp reserves when CUDA is used.
        verbose: Keep Flower's and Ray's INFO logs on the console.

    Returns:
        The run directory, holding ``summary.json`` and ``adapter/``.

    Raises:
        RuntimeError: If the run ended without writing its summary.
    """
    if not 0 < gpu_fraction <= 1:
        raise ValueError(f"gpu_fraction must be in (0, 1], got {gpu_fraction}")
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app
    from server.rundir import new_run_dir

    from client.budget import provision_simulated_sites
    from client.site import site_from_context

    run_dir = new_run_dir(cfg.out_dir)
    # Each simulated hospital gets its own folder (policy.toml + ledger/): fresh inside
    # the run directory, or the kept `sites-dir` whose ledgers compose across runs.
    if not cfg.sites_dir:
        cfg = cfg.replace(sites_dir=str(run_dir / "sites"))
    overrides = cfg.to_mapping()
    names = [site_from_context(overrides, {keys.NODE_PARTITION_ID: i,
                                           keys.NODE_NUM_PARTITIONS: cfg.num_sites}).name
             for i in range(cfg.num_sites)]
    provision_simulated_sites(cfg, Path(cfg.sites_dir), names)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=build_server_app(overrides, run_dir),
                       client_app=build_client_app(overrides), num_supernodes=cfg.num_sites,
                       backend_config=backend_config(cfg, gpu_fraction=gpu_fraction))
    if not (run_dir / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without writing {run_dir / 'summary.json'}; "
                           "rerun with --verbose to see Flower's log")
    return run_dir
