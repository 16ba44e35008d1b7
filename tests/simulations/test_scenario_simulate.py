"""``fedadapt simulate --scenario``: a federation where one site reads NIfTI files from a
datalist and another is a synthetic hospital, with DP on (the real Flower apps)."""

import json

import nibabel as nib
import numpy as np

from fedadapt.cli import main


def test_simulate_scenario_with_a_datalist_site(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "real"
    data.mkdir()
    entries = []
    for i in range(40):
        label = i % 3
        img = rng.normal(0, 0.1, (28, 28)).astype("f4") + (label == 1) * 1.0
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(data / f"{i}.nii.gz"))
        entries.append({"image": f"{i}.nii.gz", "label": label})
    (data / "datalist.json").write_text(json.dumps({"training": entries[:32],
                                                    "test": entries[32:]}))
    scenario = tmp_path / "two.toml"
    scenario.write_text("""
name = "two"
seed = 1
[[site]]
name = "synthetic-hospital"
train_size = 64
test_size = 32
shift = { intensity_scale = 0.8, noise_std = 0.05 }
[[site]]
name = "nifti-hospital"
datalist = "real/datalist.json"
""")
    code = main(["simulate", "--scenario", str(scenario), "--rounds", "1",
                 "--out", str(tmp_path / "runs"), "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    summary_path = next(line.split(": ", 1)[1] for line in out.splitlines()
                        if line.startswith("summary: "))
    summary = json.loads(open(summary_path).read())
    assert set(summary["sites"]) == {"synthetic-hospital", "nifti-hospital"}
    assert len(summary["rounds"]) == 1 and summary["rounds"][0]["failures"] == []
    real = summary["sites"]["nifti-hospital"]
    assert (real["num_train"], real["num_test"]) == (32, 8) and real["epsilon"] > 0


def test_simulate_refuses_an_unknown_scenario(capsys):
    assert main(["simulate", "--scenario", "no-such-scenario"]) == 2
    assert "unknown scenario 'no-such-scenario'" in capsys.readouterr().err
