"""``fedadapt site check``: read every record of a deployed site's data, as training will.

``check_site`` (``deploy/site_folder.py``) checks the folder's files; this reads the
data itself: the datalist (or MedMNIST ``.npz``), every image and label through the same
MONAI path as the ClientApp, the required splits' sizes, and the site's privacy policy
with the real number of training records (δ ≤ 1/(10·N)). Every problem is reported at
once, each naming the file, the key, what was expected and what was found.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedadapt.deploy.site_config import SiteConfig, SiteConfigError
from fedadapt.layout import POLICY_TOML
from fedadapt.imaging.datacheck import DataReport, check_datalist
from fedadapt.imaging.datalist import DataError, ImageSpec


@dataclass(frozen=True)
class DataExpectation:
    """What the federation's model expects of a site's data (the run's settings).

    Attributes:
        task: ``classification``, ``multilabel`` or ``segmentation``.
        spatial_dims: 2 or 3.
        image_size: Side the images are resized to.
        num_classes: Classes of the run; 0 when not known (labels are then only
            checked to be non-negative class indices and their range is reported).
    """

    task: str = "classification"
    spatial_dims: int = 2
    image_size: int = 32
    num_classes: int = 0

    def spec(self, cfg: SiteConfig) -> ImageSpec:
        img = cfg.image
        return ImageSpec(spatial_dims=self.spatial_dims, channels=1,
                         spatial_size=(self.image_size,) * self.spatial_dims,
                         resize=img.resize, pixdim=img.pixdim, intensity=img.intensity,
                         task=self.task, num_classes=self.num_classes or 2 ** 31 - 1)


def check_site_data(site_dir: str | Path, cfg: SiteConfig,
                    expect: DataExpectation) -> DataReport | None:
    """Read all of the site's data and check its policy for that many records.

    Returns:
        The data report (None for a ``synthetic`` site).

    Raises:
        SiteConfigError: Listing every problem found.
    """
    path = cfg.data_path(site_dir)
    if path is None:
        return None
    spec = expect.spec(cfg)
    if path.suffix == ".npz":
        report = _check_npz(path, spec)
    else:
        report = check_datalist(path, spec)
    problems = list(report.problems)
    if report.ok:
        problems += _policy_problems(Path(site_dir) / POLICY_TOML, report.sizes["training"])
    if problems:
        raise SiteConfigError(f"site {cfg.name}: its data cannot be trained on:\n  "
                              + "\n  ".join(problems))
    return report


def _check_npz(path: Path, spec: ImageSpec) -> DataReport:
    from fedadapt.imaging.medmnist import load_medmnist

    sizes, problems = {}, []
    for split, key in (("train", "training"), ("test", "test")):
        try:
            sizes[key] = len(load_medmnist(path, split, spec))
        except DataError as e:
            problems.append(str(e))
    return DataReport(path, sizes, {}, tuple(problems))


def _policy_problems(path: Path, n_records: int) -> list[str]:
    from fedadapt.privacy.policy import PolicyError, policy_from_dict

    try:
        policy_from_dict(tomllib.loads(path.read_text()), n_records=n_records)
    except (OSError, tomllib.TOMLDecodeError, PolicyError, TypeError) as e:
        return [f"privacy policy {path} (for N={n_records} training records): {e}"]
    return []
