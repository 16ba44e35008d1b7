"""A site's own view of itself: which hospital it is, its data, its device.

In simulation the site is derived from the run config (the researcher's scenario) and
Flower's node config (``partition-id``). A deployed site is described by its own folder:
the SuperNode's node config names it (``site-dir``, set by ``fedadapt site start``) and
its ``site.toml`` (``deploy/site_config.py``) gives the site's name, data and device.
Nothing here is taken from fedadapt.server messages.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from safetensors.torch import load_file, save
from torch.utils.data import TensorDataset

from fedadapt.deploy.site_config import SiteConfig, load_site_config
from fedadapt import atomic, keys
from fedadapt.config import RunConfig
from fedadapt.layout import PERSONAL_DIR, SITE_TOML
from fedadapt.imaging.backbones import ModelSpec
from fedadapt.imaging.datalist import ImageSpec, datalist_identity, load_split
from fedadapt.imaging.medmnist import load_medmnist, medmnist_identity
from fedadapt.imaging.synthetic import ScannerShift, SiteSpec, default_sites, make_site_data
from fedadapt.imaging.scenario import Scenario, load_scenario, site_data
from fedadapt.identity import DatasetIdentity, attach, synthetic_identity
from fedadapt.strategies.factory import freezes_lora_a
from fedadapt.imaging.run_spec import run_model_spec, run_task

if TYPE_CHECKING:
    from fedadapt.continual.scenarios import ContinualScenario




@dataclass(frozen=True)
class Site:
    """One hospital in a run.

    Attributes:
        index: The site's partition id (0-based).
        spec: Name, sizes, scanner shift and label mix.
        run: The run config the site was started with.
        scenario: The scenario the site comes from (``run.scenario``), or None.
        config: A deployed site's own ``site.toml``, or None in simulation.
        site_dir: The deployed site's folder (``config.data`` is relative to it).
    """

    index: int
    spec: SiteSpec
    run: RunConfig
    scenario: Scenario | None = None
    config: SiteConfig | None = None
    site_dir: Path | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def personalised_keys(self) -> tuple[str, ...]:
        """Tensor-name substrings this site keeps local: a deployed site's ``site.toml``,
        a simulated site's run config ``personal-keys``."""
        if self.config is not None:
            return self.config.personalised_keys
        return tuple(k.strip() for k in self.run.personal_keys.split(",") if k.strip())

    @property
    def personal_path(self) -> Path | None:
        """Where a deployed site keeps its personalised tensors between rounds and runs."""
        if self.site_dir is None or not self.personalised_keys:
            return None
        return self.site_dir / PERSONAL_DIR / f"{self.name}.safetensors"

    def personalise(self, received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``received`` with this site's own values for its personalised tensors.

        Personal layers in the manner of FedPer (Arivazhagan et al., "Federated Learning
        with Personalization Layers", 2019): tensors whose names contain a personalised
        key start from the site's stored copy instead of the server's aggregate (the
        server's value is used until the site has stored one). The site still replies
        with them, so every reply carries the same tensors for aggregation.

        Raises:
            ValueError: If a personalised key matches no received tensor, or a stored
                tensor's shape differs from the received one (the model changed).
        """
        out = dict(received)
        keys_ = self.personalised_keys
        if not keys_:
            return out
        unmatched = [k for k in keys_ if not any(k in name for name in out)]
        if unmatched:
            raise ValueError(f"site {self.name}: personalised key(s) {unmatched} in "
                             f"{self.site_dir / SITE_TOML if self.site_dir else 'site.toml'} "
                             f"match no tensor of the model; names look like "
                             f"{sorted(out)[:3]}")
        path = self.personal_path
        if path is None or not path.is_file():
            return out
        for name, t in load_file(str(path)).items():
            if name not in out:
                continue
            if tuple(out[name].shape) != tuple(t.shape):
                raise ValueError(f"site {self.name}: stored personal tensor {name!r} in {path} "
                                 f"has shape {tuple(t.shape)}, the run's model has "
                                 f"{tuple(out[name].shape)}; the model changed (LoRA rank, "
                                 f"classes?): move {path} away to start afresh")
            out[name] = t.to(dtype=out[name].dtype)
        return out

    def store_personal(self, state: Mapping[str, torch.Tensor]) -> Path | None:
        """Keep this round's personalised tensors for the next one (atomic replace).

        Returns:
            The file written, or None when the site personalises nothing.
        """
        path = self.personal_path
        if path is None:
            return None
        mine = {n: t.detach().cpu().contiguous() for n, t in state.items()
                if any(k in n for k in self.personalised_keys)}
        atomic.write_bytes(path, save(mine))
        return path

    @property
    def lora_rank(self) -> int:
        """The LoRA rank this site trains at: a deployed site's ``site.toml``
        ``lora_rank`` (0: the run's), a simulated site's ``site-ranks`` entry, else the
        run's (global) rank. Below the run's rank the site receives the global adapter by
        truncated SVD and replies zero-padded to the run's rank
        (:func:`strategies.lora_math.change_rank`), as in FLoRA (Wang et al. 2024)."""
        if self.config is not None:
            return self.config.lora_rank or self.run.lora_rank
        return self.run.rank_of_site(self.index)

    @property
    def task(self) -> str:
        """The run's task (``imaging.tasks.TASKS``): its scenario's, else classification."""
        return run_task(self.run)[0]

    def model_spec(self) -> ModelSpec:
        """The architecture every site and the server share, at this site's LoRA rank."""
        return dataclasses.replace(run_model_spec(self.run), lora_rank=self.lora_rank)

    def continual(self) -> ContinualScenario | None:
        """The continual scenario the run follows, or None."""
        if not self.run.is_continual:
            return None
        from fedadapt.continual.scenarios import ContinualScenario

        return ContinualScenario(self.run.scenario, self.run.num_sites, self.run.phases,
                                 self.run.rounds_per_phase)

    def datasets(self, phase: int = 0) -> tuple[TensorDataset, TensorDataset]:
        """``(train, test)`` for this site (see :meth:`load_datasets`), loaded once per
        process and phase and then kept (``client.runtime``)."""
        from fedadapt.client import runtime

        return runtime.datasets_for((repr(self), phase), lambda: self.load_datasets(phase))

    def load_datasets(self, phase: int = 0) -> tuple[TensorDataset, TensorDataset]:
        """``(train, test)`` for this site: a deployed site's files (datalist or MedMNIST),
        else from its scenario (files or generated), else, in a continual scenario, its
        data in phase ``phase``'s domain, else generated locally and deterministically.

        The training set carries its record identity (``fedadapt.identity``), which its
        privacy budget is kept under."""
        if self.config is not None and not self.config.synthetic:
            return self._files()
        cl = self.continual()
        if cl is not None:
            from fedadapt.continual.scenarios import phase_site_data

            train, test = phase_site_data(self.spec, cl.site_domain(self.index, phase),
                                          image_size=self.run.image_size,
                                          num_classes=self.run.num_classes, seed=self.run.seed,
                                          site_index=self.index, phase=phase)
            return self._synthetic(train, f"{cl.name}:phase{phase}"), test
        if self.scenario is not None:
            train, test = site_data(self.scenario, self.index)
            datalist = self.scenario.sites[self.index].datalist
            if datalist is not None:
                return attach(train, datalist_identity(datalist, "training")), test
            return self._synthetic(train, f"scenario:{self.scenario.name}",
                                   self.scenario.seed), test
        train, test = make_site_data(self.spec, image_size=self.run.image_size,
                                     num_classes=self.run.num_classes, seed=self.run.seed,
                                     site_index=self.index)
        return self._synthetic(train, "default"), test

    def _synthetic(self, train: TensorDataset, scope: str, seed: int | None = None
                   ) -> TensorDataset:
        """Generated records: ids from site, scope and seed (not from image size)."""
        seed = self.run.seed if seed is None else seed
        return attach(train, synthetic_identity(self.name, scope, seed, len(train)))

    def _files(self) -> tuple[TensorDataset, TensorDataset]:
        """A deployed site's images from disk, read as the shared model expects them."""
        assert self.config is not None and self.site_dir is not None
        path = self.config.data_path(self.site_dir)
        assert path is not None
        img, model = self.config.image, self.model_spec()
        spec = ImageSpec(spatial_dims=model.spatial_dims, channels=1,
                         spatial_size=(model.image_size,) * model.spatial_dims,
                         resize=img.resize, pixdim=img.pixdim, intensity=img.intensity,
                         task=model.task, num_classes=model.num_classes)
        declared = self.config.dataset_id or None
        if path.suffix == ".npz":  # MedMNIST (Yang et al., 2023)
            identity = medmnist_identity(path, "train", dataset_id=declared
                                         or f"{self.name}:{self.config.data}")
            return (attach(load_medmnist(path, "train", spec), identity),
                    load_medmnist(path, "test", spec))
        identity = datalist_identity(path, "training", dataset_id=declared)
        if declared is None and identity.dataset_id == f"datalist:{path.name}":
            identity = DatasetIdentity(f"{self.name}:{self.config.data}", identity.record_ids)
        return (attach(load_split(path, "training", spec), identity),
                load_split(path, "test", spec))


def site_from_context(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Site:
    """Resolve the site a ClientApp runs as.

    A deployed site (node config ``site-dir`` whose ``site.toml`` exists) is built from
    its own folder; otherwise the site is a simulated one, from the run config and the
    node config's ``partition-id``.

    Raises:
        ValueError: If the node config lacks a usable ``partition-id``, or a deployed
            site's ``site.toml`` is invalid or refuses the run.
    """
    cfg = RunConfig.from_mapping(run_config)
    folder = str(node_config.get(keys.NODE_SITE_DIR, ""))
    if folder and (Path(folder) / SITE_TOML).is_file():
        return deployed_site(cfg, Path(folder), node_config)
    return _simulated_site(cfg, node_config)


def _simulated_site(cfg: RunConfig, node_config: Mapping[str, Any]) -> Site:
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
    if cfg.scenario and not cfg.is_continual:
        sc = load_scenario(cfg.scenario)
        if len(sc.sites) != num_sites:
            raise ValueError(f"scenario {cfg.scenario!r} has {len(sc.sites)} sites but the "
                             f"federation has {num_sites}; start one SuperNode per site")
        return Site(index=index, spec=sc.sites[index].spec, run=cfg, scenario=sc)
    sites = default_sites(num_sites, cfg.site_train_size, cfg.site_test_size, cfg.seed)
    return Site(index=index, spec=sites[index], run=cfg)


def deployed_site(cfg: RunConfig, site_dir: Path, node_config: Mapping[str, Any]) -> Site:
    """The site described by ``<site_dir>/site.toml``.

    The site's name, data and device come from its own file. ``partition-id`` and
    ``num-partitions`` of the node config (``fedadapt site start`` sets them from the
    file) seed the site's sampling; a ``synthetic`` site generates the same demo data
    as simulated site ``partition-id`` of the same run, so a deployed run of synthetic
    sites has the semantics of a simulation with the same seed.

    Raises:
        ValueError: On an invalid ``site.toml``, a missing data file, a partition outside
            the federation, or a run below the site's LoRA rank (or FFA-LoRA with the
            site at a smaller rank, or SCAFFOLD with a smaller rank or personalised keys).
    """
    sc = load_site_config(site_dir)
    index = int(node_config.get(keys.NODE_PARTITION_ID, sc.partition_id))
    num_sites = int(node_config.get(keys.NODE_NUM_PARTITIONS, sc.num_sites))
    if not 0 <= index < num_sites:
        raise ValueError(f"site {sc.name}: partition-id {index} is outside 0..{num_sites - 1}")
    if sc.lora_rank > cfg.lora_rank:
        raise ValueError(f"site {sc.name} refuses the run: {site_dir / SITE_TOML} sets "
                         f"lora_rank = {sc.lora_rank}, above the run's LoRA rank "
                         f"{cfg.lora_rank}; a site trains at the run's rank or below it: set "
                         f"lora_rank to at most {cfg.lora_rank} (0 trains at the run's rank)")
    if 0 < sc.lora_rank < cfg.lora_rank and freezes_lora_a(cfg.strategy):
        raise ValueError(f"site {sc.name} refuses the run: {site_dir / SITE_TOML} sets "
                         f"lora_rank = {sc.lora_rank} but the run's strategy {cfg.strategy} "
                         f"keeps lora_A frozen at the run's rank {cfg.lora_rank}; set "
                         f"lora_rank = 0 for this run, or run the federation with strategy "
                         f"exact")
    if cfg.strategy == "scaffold" and (0 < sc.lora_rank < cfg.lora_rank
                                        or sc.personalised_keys):
        what = (f"lora_rank = {sc.lora_rank} (below the run's {cfg.lora_rank})"
                if 0 < sc.lora_rank < cfg.lora_rank
                else f"personalised_keys = {list(sc.personalised_keys)}")
        raise ValueError(f"site {sc.name} refuses the run: {site_dir / SITE_TOML} sets {what}, "
                         "but the run's strategy scaffold computes each site's control variate "
                         "from an update that starts from the global tensors at the run's "
                         "rank; remove it from site.toml for this run, or run the federation "
                         "with another strategy")
    run = cfg.replace(device=sc.device)  # the site's hardware is the site's decision
    if sc.synthetic:
        sim = _simulated_site(run, {keys.NODE_PARTITION_ID: index,
                                    keys.NODE_NUM_PARTITIONS: num_sites})
        return dataclasses.replace(sim, spec=dataclasses.replace(sim.spec, name=sc.name),
                                   config=sc, site_dir=site_dir)
    spec = SiteSpec(sc.name, 0, 0, ScannerShift())  # sizes and scanner: those of the files
    return Site(index=index, spec=spec, run=run, config=sc, site_dir=site_dir)


def set_threads() -> None:
    """One intra-op thread per ClientApp (the simulation runs sites side by side), and
    no console noise from warnings that are known and harmless here."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
