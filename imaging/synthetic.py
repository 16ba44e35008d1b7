"""Synthetic 2-D medical images with a scanner shift per hospital.

Each image is an elliptical organ with smooth texture on a dark background; the label
says whether it holds no lesion (0), a hyperintense lesion (1) or a hypointense lesion
(2). Each site sees the same anatomy through its own scanner: intensity scale and
gamma, bias field, blur and noise, applied with MONAI transforms, then the site's
preprocessing (z-score intensity normalisation, MONAI ``NormalizeIntensity``).
Sites also differ in size and in label mix. Everything is deterministic by seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import AdjustContrast, GaussianSmooth, NormalizeIntensity, RandBiasField
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class ScannerShift:
    """How one site's scanner distorts the underlying anatomy.

    Attributes:
        intensity_scale: Multiplies intensities (gain).
        gamma: Contrast curve exponent (MONAI ``AdjustContrast``).
        noise_std: Standard deviation of additive Gaussian noise.
        blur_sigma: Gaussian blur in pixels (resolution loss); 0 disables it.
        bias_coeff: Strength of the smooth multiplicative bias field (MONAI ``RandBiasField``).
    """

    intensity_scale: float = 1.0
    gamma: float = 1.0
    noise_std: float = 0.05
    blur_sigma: float = 0.0
    bias_coeff: float = 0.0

    def __post_init__(self) -> None:
        if self.intensity_scale <= 0 or self.gamma <= 0:
            raise ValueError(f"intensity_scale and gamma must be positive, got {self}")
        if self.noise_std < 0 or self.blur_sigma < 0 or self.bias_coeff < 0:
            raise ValueError(f"noise_std, blur_sigma and bias_coeff must be >= 0, got {self}")


@dataclass(frozen=True)
class SiteSpec:
    """One simulated hospital.

    Attributes:
        name: Display name of the site.
        train_size: Training records.
        test_size: Held-out evaluation records.
        shift: The site's scanner.
        label_weights: Relative frequency of each class at this site.
    """

    name: str
    train_size: int
    test_size: int
    shift: ScannerShift
    label_weights: tuple[float, ...] = (1.0, 1.0, 1.0)


# Three scanners that differ as real ones do: a bright, sharp one; a dim, noisy one
# with a strong bias field; a blurry one with a flattened contrast curve.
_DEFAULT_SHIFTS = (
    ScannerShift(intensity_scale=1.2, gamma=0.8, noise_std=0.03, blur_sigma=0.0, bias_coeff=0.1),
    ScannerShift(intensity_scale=0.7, gamma=1.2, noise_std=0.07, blur_sigma=0.0, bias_coeff=0.25),
    ScannerShift(intensity_scale=1.0, gamma=1.5, noise_std=0.05, blur_sigma=1.0, bias_coeff=0.2),
)
_DEFAULT_LABEL_WEIGHTS = ((1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (1.0, 1.0, 2.0))
HOSPITAL_NAMES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e",
                  "hospital-f", "hospital-g", "hospital-h")


def default_sites(num_sites: int, train_size: int, test_size: int, seed: int) -> list[SiteSpec]:
    """The default federation: sites of decreasing size with distinct scanners.

    The first three sites use hand-picked scanners; further sites draw theirs from
    ranges around them, deterministically from ``seed``. Site ``k`` has about
    ``train_size * (1 - 0.6 k / (num_sites - 1))`` training records.

    Args:
        num_sites: Number of hospitals.
        train_size: Training records at the largest site.
        test_size: Held-out records at the largest site.
        seed: Seed for the scanners of sites beyond the third.

    Returns:
        One ``SiteSpec`` per site.
    """
    rng = np.random.default_rng([seed, 7919])
    sites = []
    for k in range(num_sites):
        frac = 1.0 - 0.6 * k / max(num_sites - 1, 1)
        if k < len(_DEFAULT_SHIFTS):
            shift, weights = _DEFAULT_SHIFTS[k], _DEFAULT_LABEL_WEIGHTS[k]
        else:
            shift = ScannerShift(
                intensity_scale=float(rng.uniform(0.7, 1.3)), gamma=float(rng.uniform(0.7, 1.5)),
                noise_std=float(rng.uniform(0.02, 0.1)), blur_sigma=float(rng.uniform(0.0, 1.0)),
                bias_coeff=float(rng.uniform(0.0, 0.4)))
            weights = tuple(float(w) for w in rng.uniform(0.5, 2.0, size=3))
        name = HOSPITAL_NAMES[k] if k < len(HOSPITAL_NAMES) else f"hospital-{k}"
        sites.append(SiteSpec(name=name, train_size=max(8, round(train_size * frac)),
                              test_size=max(4, round(test_size * frac)), shift=shift,
                              label_weights=weights))
    return sites


def _anatomy(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """One clean image in [0, 1]: an organ with texture and, by label, a lesion."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    cy, cx = rng.uniform(-0.1, 0.1, 2)
    ry, rx = rng.uniform(0.55, 0.8, 2)
    organ = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0
    coarse = rng.normal(0, 1, (size // 4, size // 4)).astype(np.float32)
    texture = np.kron(coarse, np.ones((4, 4), np.float32))[:size, :size]
    img = np.where(organ, 0.5 + 0.06 * texture, 0.05).astype(np.float32)
    if label:
        r = rng.uniform(0.25, 0.4)
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.25)
        ly, lx = cy + dist * np.sin(ang), cx + dist * np.cos(ang)
        lesion = ((yy - ly) ** 2 + (xx - lx) ** 2) <= r**2
        img = np.where(lesion, 0.9 if label == 1 else 0.15, img).astype(np.float32)
    return img


def _scan(img: np.ndarray, shift: ScannerShift, rng: np.random.Generator) -> np.ndarray:
    """Apply the site's scanner (MONAI transforms) and its preprocessing."""
    x = torch.from_numpy(img)[None]  # (1, H, W): MONAI is channel-first
    if shift.bias_coeff > 0:
        bias = RandBiasField(coeff_range=(shift.bias_coeff, shift.bias_coeff), prob=1.0)
        bias.set_random_state(seed=int(rng.integers(2**31)))
        x = torch.as_tensor(bias(x + 0.0))
    x = torch.clamp(x * shift.intensity_scale, 0.0, None)
    x = torch.as_tensor(AdjustContrast(gamma=shift.gamma)(x))
    if shift.blur_sigma > 0:
        x = torch.as_tensor(GaussianSmooth(sigma=shift.blur_sigma)(x))
    x = x + torch.from_numpy(rng.normal(0, shift.noise_std, x.shape).astype(np.float32))
    x = torch.as_tensor(NormalizeIntensity()(x))
    return x.numpy().astype(np.float32)


def make_site_data(spec: SiteSpec, *, image_size: int, num_classes: int, seed: int,
                   site_index: int) -> tuple[TensorDataset, TensorDataset]:
    """Generate one site's training and held-out splits.

    Args:
        spec: The site.
        image_size: Image side in pixels.
        num_classes: 2 (lesion or not: classes 1 and 2 merge) or 3.
        seed: Federation seed.
        site_index: Index of the site (seeds its own stream).

    Returns:
        ``(train, test)`` datasets of ``(image (1, H, W) float32, label int64)``.
    """
    rng = np.random.default_rng([seed, site_index, 104729])
    w = np.asarray(spec.label_weights[:3], dtype=np.float64)
    n = spec.train_size + spec.test_size
    labels = rng.choice(3, size=n, p=w / w.sum())
    images = np.stack([_scan(_anatomy(rng, image_size, int(y)), spec.shift, rng) for y in labels])
    if num_classes == 2:
        labels = (labels > 0).astype(np.int64)
    x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    tr = spec.train_size
    return TensorDataset(x[:tr], y[:tr]), TensorDataset(x[tr:], y[tr:])


@dataclass(frozen=True)
class IntensityShift:
    """A change of the images a site receives, after its preprocessing (a new scanner or
    a changed reconstruction protocol): ``x' = gain · x + offset``, a contrast gain and a
    brightness offset on the normalised intensities, for any modality and dimensionality.

    Attributes:
        gain: Multiplies the normalised intensities (contrast).
        offset: Added to them (brightness).
    """

    gain: float = 1.5
    offset: float = 0.5

    def __post_init__(self) -> None:
        if not self.gain > 0:
            raise ValueError(f"IntensityShift.gain must be positive, got {self.gain}")

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The shifted images (a new tensor)."""
        return images * self.gain + self.offset


def window_images(spec: SiteSpec, n: int, *, image_size: int, seed: int, site_index: int,
                  window: int) -> torch.Tensor:
    """``n`` fresh unlabelled images of a simulated site: the anatomy, label mix and
    scanner of :func:`make_site_data`, from a stream of their own per ``window`` (a
    round), so windows are independent draws from the site's distribution.

    Returns:
        (n, 1, H, W) float32 images.
    """
    rng = np.random.default_rng([seed, site_index, window, 15485863])
    w = np.asarray(spec.label_weights[:3], dtype=np.float64)
    labels = rng.choice(3, size=n, p=w / w.sum())
    return torch.from_numpy(np.stack([_scan(_anatomy(rng, image_size, int(y)), spec.shift, rng)
                                      for y in labels]))
