"""Site data from disk: a Medical Segmentation Decathlon-style datalist read with MONAI.

A datalist is a JSON file ``{"training": [{"image": ..., "label": ...}], "validation":
[...], "test": [...]}`` (Simpson et al., "A large annotated medical image dataset for the
development and evaluation of segmentation algorithms", 2019). Images are NIfTI
(``.nii``/``.nii.gz``), DICOM (a file or a series folder), PNG/JPEG or NPY; relative paths
are resolved against the datalist's folder. Labels are a class index (``task =
"classification"``), a 0/1 vector (``"multilabel"``) or a mask file (``"segmentation"``).

Each image goes through MONAI ``LoadImage`` → ``EnsureChannelFirst`` → optional
``Spacing`` → ``Resize`` → ``ScaleIntensity``/``NormalizeIntensity``, configured per site
by an :class:`ImageSpec`. Every failure raises :class:`DataError` naming the file or key,
what was expected and what was found.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import (EnsureChannelFirst, LoadImage, NormalizeIntensity, Resize,
                              ScaleIntensity, Spacing)
from torch.utils.data import TensorDataset

from fedadapt.identity import DatasetIdentity, source_record_id

SPLITS = ("training", "validation", "test")
TASKS = ("classification", "multilabel", "segmentation")
INTENSITY = ("scale", "normalize", "none")
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".png", ".jpg", ".jpeg", ".npy")


class DataError(ValueError):
    """Site data that cannot be used; the message names the file/key, expected and found."""


@dataclass(frozen=True)
class ImageSpec:
    """How one site's images are read and brought to the model's input shape.

    Attributes:
        spatial_dims: 2 or 3.
        channels: Channels the model expects; an image with another count is refused.
        spatial_size: Output size per spatial axis after resizing.
        resize: Resize to ``spatial_size``; when False an image of another size is refused.
        pixdim: Target voxel spacing (MONAI ``Spacing``) applied before resizing, or None.
        intensity: ``"scale"`` (min-max to [0, 1]), ``"normalize"`` (zero mean, unit
            variance per image) or ``"none"``.
        task: ``"classification"``, ``"multilabel"`` or ``"segmentation"``.
        num_classes: Classes (segmentation: including background).
    """

    spatial_dims: int = 2
    channels: int = 1
    spatial_size: tuple[int, ...] = (32, 32)
    resize: bool = True
    pixdim: tuple[float, ...] | None = None
    intensity: str = "scale"
    task: str = "classification"
    num_classes: int = 3

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"ImageSpec.spatial_dims={self.spatial_dims!r}: use 2 or 3")
        if len(self.spatial_size) != self.spatial_dims or min(self.spatial_size) < 1:
            raise ValueError(f"ImageSpec.spatial_size={self.spatial_size!r}: give "
                             f"{self.spatial_dims} positive sizes")
        if self.pixdim is not None and len(self.pixdim) != self.spatial_dims:
            raise ValueError(f"ImageSpec.pixdim={self.pixdim!r}: give {self.spatial_dims} "
                             "spacings or None")
        if self.channels < 1:
            raise ValueError(f"ImageSpec.channels={self.channels!r}: must be >= 1")
        if self.intensity not in INTENSITY:
            raise ValueError(f"ImageSpec.intensity={self.intensity!r}: use one of {INTENSITY}")
        if self.task not in TASKS:
            raise ValueError(f"ImageSpec.task={self.task!r}: use one of {TASKS}")
        if self.num_classes < 2:
            raise ValueError(f"ImageSpec.num_classes={self.num_classes!r}: must be >= 2")


def read_datalist(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Parse and shape-check a datalist JSON (splits that are absent become empty lists)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"datalist {path}: file not found")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"datalist {path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise DataError(f"datalist {path}: expected an object with keys {SPLITS}, "
                        f"found {type(doc).__name__}")
    out: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        items = doc.get(split, [])
        if not isinstance(items, list):
            raise DataError(f"datalist {path}: '{split}' must be a list, "
                            f"found {type(items).__name__}")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise DataError(f"datalist {path}: {split}[{i}] must be an object with "
                                f"'image' and 'label', found {item!r}")
        out[split] = items
    return out


def datalist_identity(datalist: str | Path, split: str, *,
                      dataset_id: str | None = None) -> DatasetIdentity:
    """The record identity of one split of a datalist (``fedadapt.identity``).

    The dataset id is ``dataset_id`` (the site's ``site.toml``), else the datalist's
    top-level ``"dataset_id"``, else ``datalist:<file name>``. Record ``i`` is the entry's
    ``"record_id"`` when given (a site that re-exports its images keeps its records' ids
    this way), else the sha256 of its image file's bytes and its path as written in the
    datalist: independent of how the image is preprocessed, ordered or typed.

    Raises:
        DataError: On an unknown or empty split, a missing image, a bad ``record_id`` or
            a ``dataset_id`` that disagrees with the site's.
    """
    datalist = Path(datalist)
    items = read_datalist(datalist).get(split) if split in SPLITS else None
    doc = json.loads(datalist.read_text())
    if not items:
        raise DataError(f"datalist {datalist}: split {split!r} is missing or empty")
    declared = doc.get("dataset_id") if isinstance(doc, dict) else None
    if declared is not None and not (isinstance(declared, str) and declared.strip()):
        raise DataError(f"datalist {datalist}: 'dataset_id' must be a non-empty string, "
                        f"found {declared!r}")
    if dataset_id and declared and dataset_id != declared:
        raise DataError(f"datalist {datalist}: dataset_id {declared!r} disagrees with the "
                        f"site's dataset_id {dataset_id!r} (site.toml); make them equal")
    ids = []
    for i, item in enumerate(items):
        where = f"datalist {datalist}: {split}[{i}]"
        rid = item.get("record_id")
        if rid is None:
            rid = source_record_id(_resolve(datalist.parent, item["image"], where),
                                   str(item["image"]))
        elif not (isinstance(rid, str) and rid):
            raise DataError(f"{where}: 'record_id' must be a non-empty string, found {rid!r}")
        ids.append(rid)
    return DatasetIdentity(dataset_id or declared or f"datalist:{datalist.name}", tuple(ids))


def load_split(datalist: str | Path, split: str, spec: ImageSpec) -> TensorDataset:
    """Load one split of a datalist into memory as ``TensorDataset(images, labels)``.

    Images are ``float32`` of shape ``(N, channels, *spatial_size)``. Labels are ``int64``
    ``(N,)`` (classification), ``float32`` ``(N, num_classes)`` (multilabel) or ``int64``
    ``(N, 1, *spatial_size)`` (segmentation).

    Raises:
        DataError: On an unknown or empty split, or on any bad entry (see module doc).
    """
    if split not in SPLITS:
        raise DataError(f"datalist {datalist}: unknown split {split!r}; use one of {SPLITS}")
    datalist = Path(datalist)
    items = read_datalist(datalist)[split]
    if not items:
        raise DataError(f"datalist {datalist}: split '{split}' is empty; expected at least "
                        "one {'image': ..., 'label': ...} entry")
    base = datalist.parent
    images, labels = [], []
    for i, item in enumerate(items):
        where = f"datalist {datalist}: {split}[{i}]"
        images.append(load_image(_resolve(base, item["image"], where), spec))
        labels.append(_label(item["label"], base, spec, where))
    return TensorDataset(torch.stack(images), torch.stack(labels))


def load_image(path: Path, spec: ImageSpec, *, mask: bool = False) -> torch.Tensor:
    """Read one image (or mask) file/series folder and bring it to ``spec``'s shape."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    fmt = _format(path)
    try:
        img = LoadImage(image_only=True, ensure_channel_first=False)(str(path))
    except Exception as e:  # noqa: BLE001 - every reader raises its own type
        raise DataError(f"{path}: cannot read as {fmt} ({type(e).__name__}: {e})") from e
    sd = spec.spatial_dims
    if img.ndim == sd:
        channel_dim: Any = "no_channel"
    elif img.ndim == sd + 1:
        meta = img.meta.get("original_channel_dim", float("nan"))
        is_known = isinstance(meta, int) or (isinstance(meta, float) and not math.isnan(meta))
        channel_dim = int(meta) if is_known else (0 if fmt == "NPY" else -1)
    else:
        raise DataError(f"{path}: expected a {sd}-D image (optionally with a channel axis), "
                        f"found array of shape {tuple(img.shape)}")
    img = EnsureChannelFirst(channel_dim=channel_dim)(img)
    want_c = 1 if mask else spec.channels
    if img.shape[0] != want_c:
        raise DataError(f"{path}: expected {want_c} channel(s), found {img.shape[0]} "
                        f"(shape {tuple(img.shape)})")
    mode = "nearest" if mask else ("bilinear" if sd == 2 else "trilinear")
    if spec.pixdim is not None and fmt != "NPY":
        img = Spacing(pixdim=spec.pixdim, mode="nearest" if mask else "bilinear")(img)
    if tuple(img.shape[1:]) != tuple(spec.spatial_size):
        if not spec.resize:
            raise DataError(f"{path}: expected spatial size {tuple(spec.spatial_size)}, found "
                            f"{tuple(img.shape[1:])} (set resize=True to resample)")
        img = Resize(spatial_size=spec.spatial_size, mode=mode)(img)
    x = torch.as_tensor(np.asarray(img), dtype=torch.float32)
    if mask:
        return x.round().long()
    if spec.intensity == "scale":
        x = ScaleIntensity()(x)
    elif spec.intensity == "normalize":
        x = NormalizeIntensity()(x)
    return torch.as_tensor(x, dtype=torch.float32)


def _label(label: Any, base: Path, spec: ImageSpec, where: str) -> torch.Tensor:
    k = spec.num_classes
    if spec.task == "classification":
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f"{where}: expected a class index label (int), found {label!r}")
        if not 0 <= label < k:
            raise DataError(f"{where}: label {label} out of range; expected 0..{k - 1}")
        return torch.tensor(label, dtype=torch.long)
    if spec.task == "multilabel":
        if not isinstance(label, list) or len(label) != k or any(v not in (0, 1) for v in label):
            raise DataError(f"{where}: expected a multi-label vector of {k} zeros/ones, "
                            f"found {label!r}")
        return torch.tensor(label, dtype=torch.float32)
    if not isinstance(label, str):
        raise DataError(f"{where}: expected a segmentation mask file path, found {label!r}")
    path = _resolve(base, label, where)
    m = load_image(path, spec, mask=True)
    lo, hi = int(m.min()), int(m.max())
    if lo < 0 or hi >= k:
        raise DataError(f"{path}: mask values out of range; expected 0..{k - 1}, "
                        f"found {lo}..{hi}")
    return m


def _resolve(base: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: expected a file path, found {value!r}")
    p = Path(value)
    p = p if p.is_absolute() else base / p
    if not p.exists():
        raise DataError(f"{where}: file not found: {p}")
    return p


def _format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir() or name.endswith(".dcm"):
        return "DICOM"
    if name.endswith((".nii", ".nii.gz")):
        return "NIfTI"
    if name.endswith(".npy"):
        return "NPY"
    if name.endswith((".png", ".jpg", ".jpeg")):
        return "PNG/JPEG"
    raise DataError(f"{path}: unsupported image type; expected one of {IMAGE_SUFFIXES} "
                    "or a DICOM series folder")
