"""Patches of the MNI ICBM152 2009 template that the installed nilearn wheel ships
(``pip install --no-deps nilearn==0.14.1``; .ci/run installs it): the files are the
package's own, the grid and tissue volumes are the template's, held-out voxels are never
trained on, and a missing package stops with the install command."""

import importlib.metadata
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedadapt.cli import main
from fedadapt.imaging import packaged
from fedadapt.imaging.datalist import DataError
from fedadapt.imaging.mni152 import (MIN_BRAIN, SHAPE_1MM, VolumeSite, held_out_tiles,
                                     load_template, template_paths, train_corners)
from fedadapt.imaging.scenario import load_scenario, site_data

INSTALL = "pip install --no-deps nilearn==0.14.1"
needs_nilearn = pytest.mark.skipif(importlib.util.find_spec("nilearn") is None,
                                   reason=INSTALL)


def test_shipped_scenario_parses():
    sc = load_scenario("mni152-tissue")
    assert (sc.task, sc.spatial_dims, sc.num_classes, sc.image_size, sc.voxel_mm) == (
        "segmentation", 3, 3, 16, 2)
    vols = [s.volume for s in sc.sites]
    assert len(vols) == 3 and all(v is not None and v.volume == "mni152" for v in vols)
    assert len({v.train_size for v in vols}) == 3  # unequal sizes
    assert len({v.ap_range for v in vols}) == 3  # different parts of the brain
    assert len({v.shift for v in vols}) == 3  # and scanners


@needs_nilearn
def test_template_is_the_installed_nilearn_files():
    paths = template_paths()
    root = Path(list(importlib.util.find_spec("nilearn").submodule_search_locations)[0])
    assert {p.parent for p in paths.values()} == {root / "datasets" / "data"}
    record = {str(f) for f in importlib.metadata.files("nilearn")}  # the wheel's RECORD
    assert {f"nilearn/datasets/data/{p.name}" for p in paths.values()} <= record
    for p in paths.values():
        img = nib.load(str(p))
        assert img.shape == SHAPE_1MM == (197, 233, 189)
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        np.testing.assert_array_equal(img.affine, [[1, 0, 0, -98], [0, 1, 0, -134],
                                                   [0, 0, 1, -72], [0, 0, 0, 1]])


@needs_nilearn
def test_downsampled_template_and_its_tissues():
    t = load_template(2)
    assert t.t1.shape == t.labels.shape == (98, 116, 94)
    # voxel (0, 0, 0) at 2 mm is the block of 1 mm voxels 0-1: its centre is at -97.5 mm
    np.testing.assert_allclose(t.affine, [[2, 0, 0, -97.5], [0, 2, 0, -133.5],
                                          [0, 0, 2, -71.5], [0, 0, 0, 1]])
    ml = {k: float((t.labels == k).sum()) * 8 / 1000 for k in (1, 2)}  # 8 mm^3 a voxel
    assert 900 < ml[1] < 1300 and 500 < ml[2] < 750  # grey, white matter of an adult brain
    mean = [float(t.t1[t.labels == k].mean()) for k in range(3)]
    assert mean[0] < 0.1 < mean[1] < mean[2]  # T1: white brighter than grey; no skull
    assert set(np.unique(t.labels)) == {0, 1, 2}


@needs_nilearn
@pytest.mark.parametrize("ap_range", [(0.0, 1.0), (0.0, 0.5), (0.5, 1.0)])
def test_training_patches_never_touch_held_out_voxels(ap_range):
    t, side = load_template(2), 16
    tiles = held_out_tiles(t, side, (0.0, 1.0))  # every site's held-out tiles
    held = np.zeros(t.labels.shape, bool)
    for x, y, z in tiles:
        held[x:x + side, y:y + side, z:z + side] = True
    corners = train_corners(t, side, ap_range)
    assert len(corners) > 1000 and len(held_out_tiles(t, side, ap_range)) >= 10
    for x, y, z in corners[::17]:
        patch = (slice(x, x + side), slice(y, y + side), slice(z, z + side))
        assert not held[patch].any()
        assert (t.labels[patch] > 0).mean() >= MIN_BRAIN
    ys = np.nonzero((t.labels > 0).any(axis=(0, 2)))[0]
    rel = [(y + (side - 1) / 2 - ys.min()) / (ys.max() - ys.min()) for _, y, _ in corners]
    assert ap_range[0] <= min(rel) and (ap_range[1] == 1.0 or max(rel) < ap_range[1])


@needs_nilearn
def test_site_patches_are_seeded_and_scanned():
    sc = load_scenario("mni152-tissue")
    train, test = site_data(sc, 1)  # neuro-centre: anterior half, darker scanner
    assert train.tensors[0].shape == (96, 1, 16, 16, 16) and len(test) == 8
    y = train.tensors[1]
    assert y.shape == (96, 1, 16, 16, 16) and set(y.unique().tolist()) == {0, 1, 2}
    again = site_data(sc, 1)[0]
    assert np.array_equal(train.tensors[0].numpy(), again.tensors[0].numpy())
    other = site_data(sc, 2)[0]  # district-hospital: brighter (gain 1.2, gamma 0.8)
    bright = [float(ds.tensors[0][ds.tensors[1] == 2].mean()) for ds in (train, other)]
    assert bright[0] < 0.8 < bright[1]  # white matter is 0.84 on the clean template


@needs_nilearn
def test_a_site_asking_for_more_than_its_region_holds():
    t = load_template(2)
    with pytest.raises(DataError, match="holds 13 held-out patches .* asks for 40"):
        from fedadapt.imaging.mni152 import site_patches

        site_patches(t, VolumeSite("mni152", 8, 40, (0.5, 1.0)), 16,
                     np.random.default_rng(0))


def test_bad_volume_sites_name_the_key(tmp_path):
    base = ('task = "segmentation"\nspatial_dims = 3\nimage_size = 16\nnum_classes = 3\n'
            '[[site]]\nname = "a"\nvolume = "mni152"\ntrain_size = 8\ntest_size = 2\n')
    for extra, needle in (('ap_range = [0.6, 0.2]\n', "ap_range=.*0 <= start < stop"),
                          ('', None)):
        (tmp_path / "s.toml").write_text(base + extra)
        if needle is None:
            assert load_scenario(tmp_path / "s.toml").sites[0].volume.ap_range == (0.0, 1.0)
        else:
            with pytest.raises(ValueError, match=needle):
                load_scenario(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text(base.replace("num_classes = 3", "num_classes = 2"))
    with pytest.raises(ValueError, match="site\\[0\\]: a 'volume' site is 3-D tissue"):
        load_scenario(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text(base.replace('"mni152"', '"colin27"'))
    with pytest.raises(ValueError, match="volume='colin27': use one of \\['mni152'\\]"):
        load_scenario(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text("voxel_mm = 5\n" + base)
    with pytest.raises(ValueError, match="voxel_mm=5; use an integer 1-4"):
        load_scenario(tmp_path / "s.toml")


def test_missing_nilearn_stops_before_the_federation(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(packaged.importlib.util, "find_spec",
                        lambda name, *a: None if name == "nilearn" else real(name, *a))
    load_template.cache_clear()
    with pytest.raises(DataError, match=f"package 'nilearn' is not installed.*`{INSTALL}`"):
        template_paths()
    code = main(["simulate", "--scenario", "mni152-tissue", "--rounds", "1",
                 "--out", str(tmp_path / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "site university-hospital:" in err and INSTALL in err
    assert not list((tmp_path / "runs").glob("*/summary.json"))
