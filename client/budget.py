"""A site's privacy budget as the ClientApp sees it: where the site's folder is, which
dataset it is spending on, and what a round will cost before it is run.

The policy and ledger live in the site's own folder (``policy.toml``, ``ledger/``), found
from the SuperNode's node config (``site-dir``, set by the site engineer) or, for a
simulated federation, ``<sites-dir>/<site name>``. Nothing here comes from a server
message: the server only *asks* for a noise multiplier and clip norm.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch.utils.data import Dataset, TensorDataset

from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.layout import policy_path
from fedadapt.identity import DatasetIdentity, identity_of
from fedadapt.privacy.policy import SitePolicy, write_policy
from fedadapt.privacy.record_budget import RecordBudget
from fedadapt.privacy.site_budget import open_site_budget


class SiteFolderError(RuntimeError):
    """The site has no folder holding its privacy policy and ledger."""


def site_dir(site_name: str, run: RunConfig, node_config: Mapping[str, Any]) -> Path:
    """The folder holding this site's ``policy.toml`` and ``ledger/``.

    Raises:
        SiteFolderError: If neither the node config (``site-dir``) nor the run config
            (``sites-dir``, simulation) names one: the site refuses to train without
            its own policy (privacy fails closed).
    """
    if keys.NODE_SITE_DIR in node_config and str(node_config[keys.NODE_SITE_DIR]):
        return Path(str(node_config[keys.NODE_SITE_DIR]))
    if run.sites_dir:
        return Path(run.sites_dir) / site_name
    raise SiteFolderError(
        f"site {site_name!r} has no folder for its privacy policy and ledger: start the "
        f"SuperNode with --node-config \"{keys.NODE_SITE_DIR}='/path/to/site'\" (see "
        f"`fedadapt site init`), or, for a simulation, set the run config 'sites-dir'")


def dataset_budgets(folder: Path, site: str, datasets: Iterable[Dataset]
                    ) -> list[RecordBudget]:
    """The per-record budget of each declared dataset a round draws records from.

    Each dataset must carry its record identity (``fedadapt.identity``; the datasets of
    ``Site.datasets`` do); two datasets declaring one dataset id are charged as one (the
    union of their records). A round is then allowed only if it fits the cap for every
    record it may touch, composed over every ledger of the site.

    Raises:
        fedadapt.identity.IdentityError: If a dataset has no identity (fail closed).
    """
    merged: dict[str, tuple[DatasetIdentity, int]] = {}
    for d in datasets:
        ident = identity_of(d)
        if ident.dataset_id in merged:
            old, n = merged[ident.dataset_id]
            ident = DatasetIdentity(ident.dataset_id, old.record_ids + tuple(
                r for r in ident.record_ids if r not in old.records))
        merged[ident.dataset_id] = (ident, len(ident.record_ids))
    return [open_site_budget(folder, site, "", n_records=n, identity=ident)  # type: ignore[misc]
            for ident, n in merged.values()]


def dataset_fingerprint(dataset: Dataset) -> str:
    """sha256 over a training set's tensors: the key of format-1 ledgers (before
    per-record accounting; kept for reading them). Any change of bytes changes it, so
    it is no longer what a budget is kept under (see :func:`dataset_budgets`).
    """
    h = hashlib.sha256()
    tensors: Iterable[torch.Tensor]
    if isinstance(dataset, TensorDataset):
        tensors = dataset.tensors
    else:
        tensors = (torch.as_tensor(t) for i in range(len(dataset))  # type: ignore[arg-type]
                   for t in _as_tuple(dataset[i]))
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _as_tuple(item: Any) -> tuple:
    if isinstance(item, dict):
        return tuple(item[k] for k in sorted(item))
    return tuple(item) if isinstance(item, (tuple, list)) else (item,)


def planned_round(num_records: int, *, batch_size: int, epochs: int) -> tuple[float, int]:
    """``(sample_rate, steps)`` of a DP-SGD round, known before training.

    Mirrors ``privacy.dp.make_private``: Poisson sampling at q = 1 / ⌈N / B⌉ and
    ⌈N / B⌉ steps per epoch, so the guard can price the round before it runs.
    """
    if num_records < 1:
        raise ValueError(f"the site has no training records (N={num_records})")
    per_epoch = math.ceil(num_records / batch_size)
    return 1.0 / per_epoch, epochs * per_epoch


def provision_simulated_sites(cfg: RunConfig, sites_dir: Path, names: Iterable[str]) -> None:
    """Write a ``policy.toml`` for each simulated site that has none yet.

    A simulated site's policy caps ε at ``cfg.epsilon_cap`` with δ = ``cfg.delta``, a
    noise floor no higher than the run's σ, and allows non-DP rounds only when the run
    has DP off. With ``cfg.site_target_epsilon`` > 0 it also targets that ε over the run
    (``target_epsilon_per_run``, ``max_rounds_per_run`` = the run's rounds), so each site
    picks σ for its own sample rate. An existing policy is never overwritten: its ledger
    keeps composing.
    """
    per_run = ({"target_epsilon_per_run": cfg.site_target_epsilon,
                "max_rounds_per_run": cfg.num_server_rounds}
               if cfg.site_target_epsilon > 0 else {})
    for name in names:
        path = policy_path(Path(sites_dir) / name)
        if path.exists():
            continue
        write_policy(path, SitePolicy(
            epsilon_cap=cfg.epsilon_cap, delta=cfg.delta,
            min_noise_multiplier=min(0.5, cfg.noise_multiplier) if cfg.dp else 0.5,
            allow_non_dp=not cfg.dp, **per_run))
