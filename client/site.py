"""A site's own view of itself: which hospital it is, its data, its device.

In simulation the site is derived from the run config (the researcher's scenario) and
Flower's node config (``partition-id``); nothing here is taken from server messages.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.data import TensorDataset

from fedadapt import keys
from fedadapt.config import RunConfig
from fedimaging.backbones import ModelSpec
from fedimaging.synthetic import SiteSpec, default_sites, make_site_data
from simulations.scenario import Scenario, load_scenario, site_data


@dataclass(frozen=True)
class Site:
    """One hospital in a run.

    Attributes:
        index: The site's partition id (0-based).
        spec: Name, sizes, scanner shift and label mix.
        run: The run config the site was started with.
        scenario: The scenario the site comes from (``run.scenario``), or None.
    """

    index: int
    spec: SiteSpec
    run: RunConfig
    scenario: Scenario | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def model_spec(self) -> ModelSpec:
        """The architecture every site and the server share."""
        return self.run.model_spec()

    def datasets(self) -> tuple[TensorDataset, TensorDataset]:
        """``(train, test)`` for this site: from its scenario (files or generated), else
        generated locally and deterministically."""
        if self.scenario is not None:
            return site_data(self.scenario, self.index)
        return make_site_data(self.spec, image_size=self.run.image_size,
                              num_classes=self.run.num_classes, seed=self.run.seed,
                              site_index=self.index)


def site_from_context(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Site:
    """Resolve the site a ClientApp runs as.

    Raises:
        ValueError: If the node config lacks a usable ``partition-id``.
    """
    cfg = RunConfig.from_mapping(run_config)
    if keys.NODE_PARTITION_ID not in node_config:
        raise ValueError(f"node config has no '{keys.NODE_PARTITION_ID}'; start the SuperNode "
                         f"with --node-config \"{keys.NODE_PARTITION_ID}=<index>\"")
    index = int(node_config[keys.NODE_PARTITION_ID])
    # The federation's real size: Flower's num-partitions (e.g. `options.num-supernodes`
    # under `flwr run`) when the node config has it, else the run config's num-sites.
    num_sites = int(node_config.get(keys.NODE_NUM_PARTITIONS, cfg.num_sites))
    if not 0 <= index < num_sites:
        raise ValueError(f"partition-id {index} is outside 0..{num_sites - 1} "
                         f"(the federation has {num_sites} sites)")
    if cfg.scenario:
        sc = load_scenario(cfg.scenario)
        if len(sc.sites) != num_sites:
            raise ValueError(f"scenario {cfg.scenario!r} has {len(sc.sites)} sites but the "
                             f"federation has {num_sites}; start one SuperNode per site")
        return Site(index=index, spec=sc.sites[index].spec, run=cfg, scenario=sc)
    sites = default_sites(num_sites, cfg.site_train_size, cfg.site_test_size, cfg.seed)
    return Site(index=index, spec=sites[index], run=cfg)


def set_threads() -> None:
    """One intra-op thread per ClientApp (the simulation runs sites side by side), and
    no console noise from warnings that are known and harmless here."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
