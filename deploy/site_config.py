"""A deployed site's own configuration: ``<site-dir>/site.toml``.

The site engineer owns this file; nothing in it comes from the server. Together with
``<site-dir>/policy.toml`` (the privacy policy, ``privacy/policy.py``) and
``<site-dir>/ledger/`` (the privacy ledger, ``privacy/ledger.py``) it makes up the
site folder that ``fedadapt site init`` writes and ``fedadapt site start`` hands to the
SuperNode through ``--node-config "site-dir='...'"``. Example::

    name = "hospital-a"
    data = "data/datalist.json"   # or a MedMNIST .npz, or "synthetic" (demo)
    device = "auto"
    lora_rank = 0                 # 0: the run's rank; r: train at rank r (<= the run's)
    personalised_keys = []
    partition_id = 0
    num_sites = 3

    [image]
    intensity = "scale"
    resize = true
    # pixdim = [1.0, 1.0]
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedadapt import atomic
from fedadapt.config import DEVICES
from fedadapt.imaging.datalist import INTENSITY
from fedadapt.layout import SITE_TOML

SYNTHETIC = "synthetic"
DATA_SUFFIXES = (".json", ".npz")  # datalist (MSD style) or MedMNIST
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SiteConfigError(ValueError):
    """``site.toml`` is missing, unreadable or invalid; the message says how to fix it."""


@dataclass(frozen=True)
class ImageReading:
    """How a site's images on disk are brought to the model's input.

    The model fixes the rest of ``imaging.datalist.ImageSpec`` (2-D, one channel,
    the run's ``image-size`` and ``num-classes``, classification).

    Attributes:
        intensity: ``scale`` (min-max to [0, 1]), ``normalize`` or ``none``.
        resize: Resize to the run's image size; False refuses images of another size.
        pixdim: Target pixel spacing (MONAI ``Spacing``) before resizing, or None.
    """

    intensity: str = "scale"
    resize: bool = True
    pixdim: tuple[float, float] | None = None

    def errors(self) -> list[str]:
        """Everything wrong with the values, as messages naming key, value and fix."""
        out = []
        if self.intensity not in INTENSITY:
            out.append(f"image.intensity={self.intensity!r}: use one of {list(INTENSITY)}")
        if not isinstance(self.resize, bool):
            out.append(f"image.resize={self.resize!r}: use true or false")
        if self.pixdim is not None and (
                len(self.pixdim) != 2
                or not all(isinstance(v, (int, float)) and v > 0 for v in self.pixdim)):
            out.append(f"image.pixdim={self.pixdim!r}: give two positive spacings, "
                       "e.g. [1.0, 1.0], or leave it out")
        return out


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's deployment settings (``site.toml``).

    Attributes:
        name: The site's name: its ledger file name and ``site-id`` in replies; use the
            name its authentication key was made for (``fedadapt certs --sites``).
        data: ``synthetic`` (generated demo data, no patient records), or the path of a
            datalist JSON (Medical Segmentation Decathlon layout; Simpson et al., 2019)
            or of a MedMNIST ``.npz`` (Yang et al., 2023). Relative paths are relative
            to the site folder.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. The site's own
            hardware: it overrides the run config's ``device``.
        lora_rank: 0 to train at whatever rank the run uses, else the LoRA rank this
            site trains at (e.g. a small GPU): at most the run's rank; the site gets the
            global adapter truncated to it (SVD) and replies zero-padded to the run's
            rank (heterogeneous ranks, ``strategies.lora_math.change_rank``). A run of a
            smaller rank, or an FFA-LoRA run (its frozen A has the run's rank), is refused.
        personalised_keys: Substrings of tensor names (e.g. ``head``) the site keeps
            to itself between rounds instead of taking the server's values.
        partition_id: The site's index in the federation (0-based), assigned by the
            federation operator; it seeds the site's sampling.
        num_sites: Sites in the federation.
        image: How images on disk are read (unused for ``synthetic``).
        dataset_id: The site-declared identity of its training data: its privacy budget
            is kept under it, per record (``docs/privacy/identity.md``). Keep it when the
            images are re-exported. Empty: the datalist's ``dataset_id``, else
            ``<name>:<data>``.
    """

    name: str
    data: str = SYNTHETIC
    device: str = "auto"
    lora_rank: int = 0
    personalised_keys: tuple[str, ...] = ()
    partition_id: int = 0
    num_sites: int = 1
    image: ImageReading = field(default_factory=ImageReading)
    dataset_id: str = ""

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.dataset_id, str) or (self.dataset_id
                                                    and not self.dataset_id.strip()):
            errors.append(f"dataset_id={self.dataset_id!r}: use a non-empty string naming "
                          "the data (e.g. \"chest-xray-2024\"), or leave it out")
        if not (isinstance(self.name, str) and NAME_RE.match(self.name)):
            errors.append(f"name={self.name!r}: use letters, digits, '-', '_' or '.' "
                          "(the name given to `fedadapt certs --sites`)")
        if not isinstance(self.data, str) or not self.data:
            errors.append(f"data={self.data!r}: give \"{SYNTHETIC}\" or a path to a "
                          "datalist .json or a MedMNIST .npz")
        elif self.data != SYNTHETIC and not self.data.endswith(DATA_SUFFIXES):
            errors.append(f"data={self.data!r}: expected \"{SYNTHETIC}\", a datalist "
                          "(.json) or a MedMNIST file (.npz)")
        if self.device not in DEVICES:
            errors.append(f"device={self.device!r}: use one of {list(DEVICES)}")
        if not (_is_int(self.lora_rank) and self.lora_rank >= 0):
            errors.append(f"lora_rank={self.lora_rank!r}: use 0 (the run's rank) or a "
                          "positive integer")
        if not (isinstance(self.personalised_keys, tuple)
                and all(isinstance(k, str) and k for k in self.personalised_keys)):
            errors.append(f"personalised_keys={self.personalised_keys!r}: use a list of "
                          "non-empty tensor-name substrings, e.g. [\"head\"]")
        if not (_is_int(self.num_sites) and self.num_sites >= 1):
            errors.append(f"num_sites={self.num_sites!r}: use an integer >= 1")
        elif not (_is_int(self.partition_id) and 0 <= self.partition_id < self.num_sites):
            errors.append(f"partition_id={self.partition_id!r}: use an integer in "
                          f"0..{self.num_sites - 1} (num_sites={self.num_sites})")
        errors += self.image.errors()
        if errors:
            raise SiteConfigError("invalid site config:\n  " + "\n  ".join(errors))

    @property
    def synthetic(self) -> bool:
        return self.data == SYNTHETIC

    def data_path(self, site_dir: str | Path) -> Path | None:
        """Absolute path of the site's data file, or None for ``synthetic``."""
        if self.synthetic:
            return None
        p = Path(self.data).expanduser()
        return (p if p.is_absolute() else Path(site_dir) / p).resolve()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TOP = {f.name for f in fields(SiteConfig)}
_IMAGE = {f.name for f in fields(ImageReading)}


def site_config_from_dict(doc: dict[str, Any], *, where: str = SITE_TOML) -> SiteConfig:
    """Build and validate a ``SiteConfig`` from parsed TOML.

    Raises:
        SiteConfigError: On unknown or missing keys and on bad values (all at once).
    """
    unknown = sorted(set(doc) - _TOP)
    if unknown:
        raise SiteConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TOP)}")
    if "name" not in doc:
        raise SiteConfigError(f"{where}: missing 'name'; add e.g. name = \"hospital-a\"")
    values = dict(doc)
    image = values.pop("image", {})
    if not isinstance(image, dict):
        raise SiteConfigError(f"{where}: 'image' must be a table [image], found {image!r}")
    bad = sorted(set(image) - _IMAGE)
    if bad:
        raise SiteConfigError(f"{where}: unknown key(s) {bad} in [image]; allowed: "
                              f"{sorted(_IMAGE)}")
    if isinstance(image.get("pixdim"), list):
        image = {**image, "pixdim": tuple(image["pixdim"])}
    if isinstance(values.get("personalised_keys"), list):
        values["personalised_keys"] = tuple(values["personalised_keys"])
    try:
        return SiteConfig(**values, image=ImageReading(**image))
    except SiteConfigError as err:
        raise SiteConfigError(f"{where}: {err}") from None


def load_site_config(site_dir: str | Path, *, check_data: bool = True) -> SiteConfig:
    """Read and validate ``<site_dir>/site.toml``.

    Args:
        site_dir: The site folder (``fedadapt site init`` wrote it).
        check_data: Also require the data file to exist.

    Raises:
        SiteConfigError: If the folder or file is missing, not TOML, invalid, or its
            data file does not exist.
    """
    site_dir = Path(site_dir)
    path = site_dir / SITE_TOML
    if not path.is_file():
        raise SiteConfigError(f"site config {path} not found; create the site folder with "
                              f"`fedadapt site init {site_dir} --name NAME`")
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise SiteConfigError(f"site config {path} is unreadable: {err}") from err
    cfg = site_config_from_dict(doc, where=f"site config {path}")
    data = cfg.data_path(site_dir)
    if check_data and data is not None and not data.is_file():
        raise SiteConfigError(f"site config {path}: data file {data} not found (data = "
                              f"{cfg.data!r}, relative to {site_dir}); fix 'data' or put "
                              "the file there")
    return cfg


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def render_site_config(cfg: SiteConfig) -> str:
    """``cfg`` as a commented ``site.toml`` that :func:`load_site_config` reads back."""
    img = cfg.image
    pixdim = (f"pixdim = {_toml(img.pixdim)}" if img.pixdim is not None
              else "# pixdim = [1.0, 1.0]")
    dataset_id = (f"dataset_id = {_toml(cfg.dataset_id)}" if cfg.dataset_id
                  else '# dataset_id = "chest-xray-2024"')
    return f"""\
# fedadapt site config. Owned by this site; nothing here comes from the server.
# Checked by `fedadapt site start` before the SuperNode connects.

# This site's name: its ledger file name and its site-id in replies. Use the name its
# SuperNode authentication key was made for (`fedadapt certs --sites ...`).
name = {_toml(cfg.name)}

# Where the images are: "synthetic" (generated demo data, no patient records), a
# datalist JSON ({{"training": [{{"image": ..., "label": ...}}], "test": [...]}}; NIfTI,
# DICOM, PNG/JPEG or NPY images) or a MedMNIST .npz (train_/test_images/labels).
# Relative paths are relative to this folder.
data = {_toml(cfg.data)}

# auto (CUDA when available), cpu or cuda. Overrides the run's device at this site.
device = {_toml(cfg.device)}

# 0: train at the run's LoRA rank; > 0: train at this smaller rank (e.g. a small GPU;
# the run's rank or less; a run of a smaller rank, or an ffa-lora run, is refused).
lora_rank = {cfg.lora_rank}

# Substrings of tensor names the site keeps to itself between rounds, e.g. ["head"].
personalised_keys = {_toml(cfg.personalised_keys)}

# Position in the federation, assigned by the federation operator (seeds sampling).
partition_id = {cfg.partition_id}
num_sites = {cfg.num_sites}

# The identity of this site's training data: its privacy budget is kept under it, one
# epsilon per patient record (docs/privacy/identity.md). Keep it when re-exporting the
# images; unset: the datalist's "dataset_id", else "<name>:<data>".
{dataset_id}

# How images on disk are read (ignored for "synthetic"); the model fixes the size.
[image]
intensity = {_toml(img.intensity)}   # scale | normalize | none
resize = {_toml(img.resize)}         # false: refuse images of another size
{pixdim}
"""


def write_site_config(site_dir: str | Path, cfg: SiteConfig) -> Path:
    """Write ``<site_dir>/site.toml`` (commented); returns its path."""
    path = Path(site_dir) / SITE_TOML
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_site_config(cfg)
    if site_config_from_dict(tomllib.loads(text)) != cfg:  # the file must read back as cfg
        raise RuntimeError("render_site_config does not round-trip; this is a bug")
    atomic.write_text(path, text)
    return path
