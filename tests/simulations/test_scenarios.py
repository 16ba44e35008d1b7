"""TOML scenarios: shipped ones parse, data is deterministic by seed, datalist sites read files."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from fedadapt.imaging.scenario import SCENARIO_DIR, load_scenario, site_data


def test_shipped_scenarios_parse():
    names = {p.stem for p in SCENARIO_DIR.glob("*.toml")}
    assert {"three-hospitals", "segmentation-2d", "segmentation-3d-small",
            "datalist-sites"} <= names
    for name in names:
        sc = load_scenario(name)
        assert sc.sites and sc.task in ("classification", "segmentation")
    sc = load_scenario("three-hospitals")
    assert [s.spec.name for s in sc.sites] == ["hospital-a", "hospital-b", "hospital-c"]
    assert sc.sites[1].spec.shift.bias_coeff == 0.4


def _small(tmp_path, text):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


SEG3D = """
task = "segmentation"
spatial_dims = 3
image_size = 8
[[site]]
name = "a"
train_size = 3
test_size = 2
shift = { intensity_scale = 0.8, gamma = 1.3, noise_std = 0.1, blur_sigma = 0.5, bias_coeff = 0.2 }
"""


def test_segmentation_3d_site_data_is_deterministic(tmp_path):
    sc = load_scenario(_small(tmp_path, SEG3D))
    (tr, te), (tr2, _) = site_data(sc, 0), site_data(sc, 0)
    assert tr.tensors[0].shape == (3, 1, 8, 8, 8) and tr.tensors[1].shape == (3, 1, 8, 8, 8)
    assert len(te) == 2
    torch.testing.assert_close(tr.tensors[0], tr2.tensors[0])
    assert set(tr.tensors[1].unique().tolist()) <= {0, 1}


def test_datalist_site_reads_files(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    entries = []
    for i in range(3):
        nib.save(nib.Nifti1Image(np.random.rand(20, 20).astype("f4"), np.eye(4)),
                 str(d / f"{i}.nii.gz"))
        entries.append({"image": f"{i}.nii.gz", "label": i})
    (d / "datalist.json").write_text(json.dumps({"training": entries, "test": entries[:1]}))
    sc = load_scenario(_small(tmp_path, """
[[site]]
name = "real"
datalist = "data/datalist.json"
image = { intensity = "normalize" }
"""))
    tr, te = site_data(sc, 0)
    assert tr.tensors[0].shape == (3, 1, 32, 32) and te.tensors[1].tolist() == [0]


@pytest.mark.parametrize("text, needle", [
    ("[[site]]\nname='a'\ntrain_size=4\ntest_size=2\ncolour='red'", "unknown key(s) ['colour']"),
    ("[[site]]\nname='a'\ntrain_size=0\ntest_size=2", "'train_size' must be a positive integer"),
    ("[[site]]\nname='a'\ntrain_size=4\ntest_size=2\nshift={gama=1.0}", "site[0].shift: unknown"),
    ("task='detection'\n[[site]]\nname='a'", "task='detection'"),
    ("name='empty'", "no [[site]] tables"),
])
def test_bad_scenarios_name_the_key(tmp_path, text, needle):
    with pytest.raises(ValueError) as err:
        load_scenario(_small(tmp_path, text))
    assert needle in str(err.value) and "s.toml" in str(err.value)
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        load_scenario("nope")
