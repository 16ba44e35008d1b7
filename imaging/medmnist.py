"""MedMNIST ``.npz`` files as distributed (Yang et al., "MedMNIST v2", Scientific Data 2023).

A file holds ``{split}_images`` (uint8, ``(N, H, W)``, ``(N, H, W, 3)`` or, for the 3-D
sets, ``(N, D, H, W)``) and ``{split}_labels`` (``(N, 1)`` class index, or ``(N, K)`` 0/1
for the multi-label ChestMNIST) for ``split`` in train/val/test. Nothing is downloaded:
the site points at a file on its disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.transforms import Resize
from torch.utils.data import TensorDataset

from fedadapt.imaging.datalist import DataError, ImageSpec
from fedadapt.identity import DatasetIdentity, array_record_id

MEDMNIST_SPLITS = ("train", "val", "test")


def load_medmnist(path: str | Path, split: str, spec: ImageSpec) -> TensorDataset:
    """Load one split of a MedMNIST npz as ``TensorDataset(images, labels)``.

    Images become ``float32`` in [0, 1], shape ``(N, channels, *spec.spatial_size)``;
    labels ``int64`` ``(N,)`` (``task="classification"``) or ``float32`` ``(N, K)``
    (``task="multilabel"``).

    Raises:
        DataError: Missing file or key, empty split, wrong channel count or
            dimensionality, label out of range; the message names file and key.
    """
    path = Path(path)
    if split not in MEDMNIST_SPLITS:
        raise DataError(f"{path}: unknown split {split!r}; use one of {MEDMNIST_SPLITS}")
    if spec.task == "segmentation":
        raise DataError(f"{path}: MedMNIST has no masks; use task 'classification' or "
                        "'multilabel'")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        npz = np.load(path)
    except Exception as e:  # noqa: BLE001 - zipfile/ValueError/OSError
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    with npz:
        ik, lk = f"{split}_images", f"{split}_labels"
        for key in (ik, lk):
            if key not in npz.files:
                raise DataError(f"{path}: missing key '{key}'; found keys {sorted(npz.files)}")
        images, labels = npz[ik], npz[lk]
    if len(images) == 0:
        raise DataError(f"{path}: '{ik}' is empty; expected at least one image")
    if len(labels) != len(images):
        raise DataError(f"{path}: '{lk}' has {len(labels)} rows, expected {len(images)} "
                        f"(one per image in '{ik}')")
    x = _images(images, spec, f"{path}: '{ik}'")
    y = _labels(labels, spec, f"{path}: '{lk}'")
    return TensorDataset(x, y)


def medmnist_identity(path: str | Path, split: str, *, dataset_id: str) -> DatasetIdentity:
    """The record identity of one split of a MedMNIST npz (``fedadapt.identity``): record
    ``i`` is the sha256 of its raw image array as stored in the file (before resizing or
    scaling), so preprocessing and order leave it unchanged.

    Raises:
        DataError: If the file or the split's images are missing.
    """
    path = Path(path)
    try:
        with np.load(path) as npz:
            images = npz[f"{split}_images"]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: cannot read '{split}_images' ({type(e).__name__}: {e})") from e
    return DatasetIdentity(dataset_id, tuple(array_record_id("medmnist", np.ascontiguousarray(a))
                                             for a in images))


def _images(a: np.ndarray, spec: ImageSpec, where: str) -> torch.Tensor:
    sd = spec.spatial_dims
    if a.ndim == sd + 1:
        a = a[:, None]  # (N, 1, *spatial)
    elif a.ndim == sd + 2 and sd == 2:
        a = np.moveaxis(a, -1, 1)  # (N, H, W, C) -> (N, C, H, W)
    else:
        raise DataError(f"{where}: expected shape (N, {'D, ' if sd == 3 else ''}H, W"
                        f"{'' if sd == 3 else '[, C]'}) for {sd}-D images, found {a.shape}")
    if a.shape[1] != spec.channels:
        raise DataError(f"{where}: expected {spec.channels} channel(s), found {a.shape[1]}")
    x = torch.as_tensor(a.astype(np.float32))
    if np.issubdtype(a.dtype, np.integer):
        x = x / 255.0
    if tuple(x.shape[2:]) != tuple(spec.spatial_size):
        if not spec.resize:
            raise DataError(f"{where}: expected spatial size {tuple(spec.spatial_size)}, "
                            f"found {tuple(x.shape[2:])} (set resize=True to resample)")
        resize = Resize(spatial_size=spec.spatial_size, mode="bilinear" if sd == 2 else "trilinear")
        x = torch.stack([torch.as_tensor(resize(xi)) for xi in x])
    return x.float()


def _labels(a: np.ndarray, spec: ImageSpec, where: str) -> torch.Tensor:
    k = spec.num_classes
    a = a.reshape(len(a), -1)
    if spec.task == "classification":
        if a.shape[1] != 1:
            raise DataError(f"{where}: expected one class index per image (N, 1), found "
                            f"{a.shape}; for multi-label sets use task 'multilabel'")
        y = a[:, 0].astype(np.int64)
        if y.min() < 0 or y.max() >= k:
            raise DataError(f"{where}: label out of range; expected 0..{k - 1}, found "
                            f"{int(y.min())}..{int(y.max())}")
        return torch.as_tensor(y)
    if a.shape[1] != k or not np.isin(a, (0, 1)).all():
        raise DataError(f"{where}: expected (N, {k}) zeros/ones for multi-label, found "
                        f"shape {a.shape} with values {np.unique(a)[:5].tolist()}")
    return torch.as_tensor(a.astype(np.float32))
