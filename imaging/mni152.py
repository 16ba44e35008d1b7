"""3-D tissue segmentation on a real brain volume: the MNI ICBM152 2009 template.

The ``nilearn`` wheel ships the symmetric ICBM152 2009a nonlinear template (Fonov et al.,
NeuroImage 2011; Fonov et al., OHBM 2009) as 1 mm NIfTI files in
``nilearn/datasets/data/``: the skull-stripped T1 and the grey- and white-matter
probability maps (uint8, 197 x 233 x 189 voxels, RAS, origin at (-98, -134, -72) mm).
They are found with ``importlib.util.find_spec`` (nilearn is never imported, so none of
its dependencies is needed: install it with ``--no-deps``) and read in place with
nibabel; nothing is copied.

The volume is block-averaged to ``voxel_mm`` (an integer factor); each voxel's label is
the most probable of background (outside the brain and CSF: ``1 - GM - WM``), grey
matter and white matter. Sites hold cubic patches of ``side`` voxels:

* **Held-out voxels are never trained on**: the volume is cut into axial slabs of
  ``side`` voxels; odd slabs are for evaluation, even ones for training, at every site.
  A test record is a tile of a ``side``-stride grid inside an odd slab; a training record
  is a patch at any in-plane position inside an even slab.
* **Sites differ** in size, in the anterior-posterior part of the brain their patches'
  centres lie in (``ap_range``, fractions of the brain's extent, 0 = posterior) and in
  their scanner (:class:`imaging.synthetic.ScannerShift`: one bias field over the whole
  head, then per patch gain, gamma contrast, blur and noise through
  :func:`imaging.packaged.scan`; MONAI transforms, no re-normalisation).
* Only patches whose share of brain voxels is at least :data:`MIN_BRAIN` are used.

Every site draws from one template brain: a record is a patch, not a subject, so a
record-level ε here is per patch. The scenario exercises the 3-D segmentation path on
real anatomy; it is not a claim about privacy between patients.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import RandBiasField
from torch.utils.data import TensorDataset

from fedadapt.imaging.datalist import DataError
from fedadapt.imaging.packaged import package_folder, scan
from fedadapt.imaging.synthetic import ScannerShift

#: Volume sets a scenario site may name (``volume = "mni152"``): the folder inside the
#: installed package, and the file of each map.
VOLUMES = {"mni152": "nilearn/datasets/data"}
FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
         "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
         "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
#: The template's grid at 1 mm, as nilearn ships it.
SHAPE_1MM = (197, 233, 189)
#: Label of each class index.
TISSUES = ("background", "grey matter", "white matter")
#: Fewest brain (grey or white matter) voxels a patch holds, as a share.
MIN_BRAIN = 0.25


@dataclass(frozen=True)
class Template:
    """The template at ``voxel_mm``: ``t1`` in [0, 1] and ``labels`` (:data:`TISSUES`
    indices), both ``(X, Y, Z)`` in RAS order, and the ``affine`` of that grid."""

    t1: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    voxel_mm: int


@dataclass(frozen=True)
class VolumeSite:
    """A site whose records are patches of a packaged volume.

    Attributes:
        volume: A key of :data:`VOLUMES`.
        train_size: Training patches.
        test_size: Held-out tiles.
        ap_range: Where in the brain, posterior (0) to anterior (1), patch centres lie.
        shift: The site's scanner.
    """

    volume: str
    train_size: int
    test_size: int
    ap_range: tuple[float, float] = (0.0, 1.0)
    shift: ScannerShift = ScannerShift(noise_std=0.0)

    def __post_init__(self) -> None:
        if self.volume not in VOLUMES:
            raise ValueError(f"volume={self.volume!r}: use one of {sorted(VOLUMES)}")
        for key in ("train_size", "test_size"):
            v = getattr(self, key)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{key}={v!r}: give a positive integer (patches)")
        a, b = self.ap_range if len(self.ap_range) == 2 else (1.0, 0.0)
        if not 0.0 <= a < b <= 1.0:
            raise ValueError(f"ap_range={list(self.ap_range)!r}: give [start, stop] with "
                             "0 <= start < stop <= 1 (0 = posterior, 1 = anterior)")


def template_paths(volume: str = "mni152") -> dict[str, Path]:
    """The files of ``volume`` inside its installed package.

    Raises:
        DataError: If the package is missing (naming the install command) or lacks a file.
    """
    folder = package_folder(VOLUMES[volume], layout=FILES["t1"])
    out = {k: folder / f for k, f in FILES.items()}
    missing = [str(p) for p in out.values() if not p.is_file()]
    if missing:
        raise DataError(f"volume {volume!r}: {', '.join(missing)} not found in the installed "
                        f"package; expected the files {sorted(FILES.values())} "
                        "(nilearn >= 0.10 ships them)")
    return out


@functools.lru_cache(maxsize=2)
def load_template(voxel_mm: int = 2, volume: str = "mni152") -> Template:
    """The template block-averaged to ``voxel_mm`` (1-4), with its tissue labels (read
    once per process: every site of a scenario crops the same volume; read-only arrays).

    Raises:
        DataError: If a file is missing or unreadable, or the maps' grids disagree.
    """
    import nibabel as nib

    if voxel_mm not in (1, 2, 3, 4):
        raise ValueError(f"voxel_mm={voxel_mm!r}: use an integer 1-4 (mm)")
    maps, affine = {}, None
    for key, path in template_paths(volume).items():
        try:
            img = nib.load(str(path))
            a = np.asarray(img.dataobj, dtype=np.float32)
        except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as e:
            raise DataError(f"{path}: cannot read as NIfTI ({e})") from e
        if a.shape != SHAPE_1MM or (affine is not None and not np.allclose(img.affine, affine)):
            raise DataError(f"{path}: grid {a.shape} differs from the template's {SHAPE_1MM} "
                            "(or from the other maps'); reinstall nilearn")
        affine = img.affine
        maps[key] = downsample(a / 255.0, voxel_mm)
    assert affine is not None
    prob = np.stack([np.clip(1.0 - maps["gm"] - maps["wm"], 0.0, None), maps["gm"], maps["wm"]])
    scaled = affine.copy()
    scaled[:3, :3] *= voxel_mm
    scaled[:3, 3] += affine[:3, :3] @ np.full(3, (voxel_mm - 1) / 2)  # centre of each block
    out = Template(maps["t1"], prob.argmax(0).astype(np.int64), scaled, voxel_mm)
    for a in (out.t1, out.labels, out.affine):
        a.setflags(write=False)
    return out


def downsample(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``^3 blocks (the trailing partial blocks are dropped)."""
    if factor == 1:
        return a.astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return torch.nn.functional.avg_pool3d(x, factor)[0, 0].numpy()


def held_out_tiles(t: Template, side: int, ap_range: tuple[float, float]) -> list[tuple[int, ...]]:
    """Corners ``(x, y, z)`` of every eligible held-out tile: a ``side``-stride grid in the
    odd axial slabs, centre within ``ap_range``, at least :data:`MIN_BRAIN` brain."""
    frac, ok_y = _brain_share(t, side), _centre_in(t, side, ap_range)
    out = []
    for z in _slabs(t, side, held_out=True):
        for x in range(0, frac.shape[0], side):
            for y in range(0, frac.shape[1], side):
                if ok_y[y] and frac[x, y, z] >= MIN_BRAIN:
                    out.append((x, y, z))
    return out


def train_corners(t: Template, side: int, ap_range: tuple[float, float]
                  ) -> list[tuple[int, ...]]:
    """Corners of every eligible training patch: any in-plane position in an even slab,
    centre within ``ap_range``, at least :data:`MIN_BRAIN` brain."""
    frac, ok_y = _brain_share(t, side), _centre_in(t, side, ap_range)
    out = []
    for z in _slabs(t, side, held_out=False):
        xs, ys = np.nonzero((frac[:, :, z] >= MIN_BRAIN) & ok_y[None, :])
        out += [(int(x), int(y), z) for x, y in zip(xs, ys)]
    return out


def site_patches(t: Template, site: VolumeSite, side: int, rng: np.random.Generator
                 ) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` of a site: ``(N, 1, side, side, side)`` images through the site's
    scanner and ``(N, 1, side, side, side)`` long masks.

    Raises:
        DataError: If the site's part of the brain holds fewer patches than it asks for.
    """
    head = _bias_field(t.t1, site.shift.bias_coeff, rng)
    shift = dataclasses.replace(site.shift, bias_coeff=0.0)  # applied to the head above
    out = []
    for kind, n, corners in (("training", site.train_size, train_corners(t, side, site.ap_range)),
                             ("held-out", site.test_size, held_out_tiles(t, side, site.ap_range))):
        if len(corners) < n:
            raise DataError(f"volume {site.volume}: ap_range={list(site.ap_range)} holds "
                            f"{len(corners)} {kind} patches of {side}^3 voxels at "
                            f"{t.voxel_mm} mm, the site asks for {n}; lower the size, widen "
                            "ap_range or lower image_size")
        picks = [corners[i] for i in sorted(rng.choice(len(corners), n, replace=False))]
        x = scan(np.stack([_crop(head, c, side) for c in picks]), shift, rng)
        y = np.stack([_crop(t.labels, c, side) for c in picks])
        out.append(TensorDataset(torch.from_numpy(x)[:, None],
                                 torch.from_numpy(y)[:, None]))
    return out[0], out[1]


def _bias_field(vol: np.ndarray, coeff: float, rng: np.random.Generator) -> np.ndarray:
    """``vol`` times one smooth multiplicative field over the whole head (MONAI
    ``RandBiasField``, degree 3, coefficients uniform in ``[-coeff, coeff]``), as one
    scanner's coil would give; ``coeff = 0`` leaves it unchanged."""
    if coeff <= 0:
        return vol
    bias = RandBiasField(coeff_range=(-coeff, coeff), prob=1.0)
    bias.set_random_state(seed=int(rng.integers(2**31)))
    return np.asarray(bias(torch.tensor(vol)[None]), dtype=np.float32)[0]


def _crop(a: np.ndarray, corner: tuple[int, ...], side: int) -> np.ndarray:
    x, y, z = corner
    return np.ascontiguousarray(a[x:x + side, y:y + side, z:z + side])


def _slabs(t: Template, side: int, *, held_out: bool) -> list[int]:
    """First axial index of each whole slab: odd slabs are held out, even ones train."""
    return [k * side for k in range(t.labels.shape[2] // side) if (k % 2 == 1) == held_out]


def _brain_share(t: Template, side: int) -> np.ndarray:
    """Share of brain voxels of the ``side``^3 patch at every corner, ``(X', Y', Z')``
    (a summed-volume table: eight lookups per corner)."""
    c = np.pad((t.labels > 0).astype(np.int64), ((1, 0),) * 3).cumsum(0).cumsum(1).cumsum(2)
    hi, lo = slice(side, None), slice(None, -side)
    total = (c[hi, hi, hi] - c[lo, hi, hi] - c[hi, lo, hi] - c[hi, hi, lo]
             + c[lo, lo, hi] + c[lo, hi, lo] + c[hi, lo, lo] - c[lo, lo, lo])
    return total / side**3


def _centre_in(t: Template, side: int, ap_range: tuple[float, float]) -> np.ndarray:
    """Whether a patch with corner ``y`` has its centre within ``ap_range`` of the brain's
    posterior-anterior extent, for every ``y``."""
    ys = np.nonzero((t.labels > 0).any(axis=(0, 2)))[0]
    lo, hi = float(ys.min()), float(ys.max())
    centre = np.arange(t.labels.shape[1] - side + 1) + (side - 1) / 2
    rel = (centre - lo) / (hi - lo)
    return (rel >= ap_range[0]) & (rel < ap_range[1]) if ap_range[1] < 1 else \
        (rel >= ap_range[0])
