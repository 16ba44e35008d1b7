"""Classification beyond the default through the federation: multi-label (two hospitals
read PNG images with 0/1 label vectors from their datalists; the default pretrained ViT
trains LoRA with BCE-with-logits under DP-SGD; accuracy, balanced accuracy and AUC per
site), and a 3-D classification round (NIfTI volumes, the registry's 3-D ViT)."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedadapt import keys
from fedadapt.cli import main
from fedadapt.config import RunConfig
from fedadapt.imaging.run_spec import run_model_spec
from tests.imaging.test_segmentation_e2e import site_round


def _site(folder, seed):
    """24 PNGs; label k is on when pattern k (a bright band) is in the image."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(24):
        label = [i % 2, (i // 2) % 2, (i // 4) % 2]  # every combination in 8 records
        img = rng.normal(60, 20, (32, 32))
        for k, on in enumerate(label):
            if on:
                img[8 * k + 2: 8 * k + 8, :] += 150
        Image.fromarray(np.clip(img, 0, 255).astype("u1")).save(folder / f"{i}.png")
        entries.append({"image": f"{i}.png", "label": label})
    (folder / "datalist.json").write_text(json.dumps({"training": entries[:16],
                                                      "test": entries[16:]}))


def test_multilabel_scenario_runs_under_dp(tmp_path):
    _site(tmp_path / "a", 0)
    _site(tmp_path / "b", 1)
    (tmp_path / "ml.toml").write_text("""
task = "multilabel"
image_size = 32
num_classes = 3
[[site]]
name = "png-a"
datalist = "a/datalist.json"
[[site]]
name = "png-b"
datalist = "b/datalist.json"
image = { intensity = "normalize" }
""")
    out = tmp_path / "runs"
    assert main(["simulate", "--scenario", str(tmp_path / "ml.toml"), "--rounds", "1",
                 "--out", str(out), "--device", "cpu", "--batch-size", "8"]) == 0
    summary = json.loads((next(out.iterdir()) / "summary.json").read_text())
    spec = run_model_spec(RunConfig.from_mapping(summary["config"]))
    assert (spec.task, spec.backbone, spec.num_classes) == ("multilabel", "", 3)
    assert summary["config"]["backbone-weights"] == "builtin"  # the pretrained default ViT
    rnd = summary["rounds"][0]
    assert rnd["failures"] == [] and "dice" not in rnd
    for site in ("png-a", "png-b"):
        info = summary["sites"][site]
        assert (info["num_train"], info["num_test"]) == (16, 8) and info["epsilon"] > 0
        for metric in ("final_accuracy", "final_balanced_accuracy", "final_auc"):
            assert 0.0 <= info[metric] <= 1.0
        ev = rnd["evaluate"][site]
        assert ev["auc"] == info["final_auc"] and ev["balanced_accuracy"] >= 0
    assert rnd["auc"] == pytest.approx(
        sum(rnd["evaluate"][s]["auc"] for s in ("png-a", "png-b")) / 2)


def test_multilabel_scenario_needs_datalist_sites(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "multilabel"\n[[site]]\nname = "a"\ntrain_size = 8\ntest_size = 4\n')
    assert main(["simulate", "--scenario", str(bad)]) == 2


def test_3d_classification_round_at_a_site(tmp_path, task_identity):
    rng = np.random.default_rng(0)
    entries = []
    for i in range(12):
        vol = rng.normal(0, 0.2, (12, 12, 12)).astype("f4") + (i % 2) * np.eye(12)[None]
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / f"{i}.nii.gz"))
        entries.append({"image": f"{i}.nii.gz", "label": i % 2})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries[:8],
                                                        "test": entries[8:]}))
    (tmp_path / "c3d.toml").write_text("""
spatial_dims = 3
image_size = 16
num_classes = 2
[[site]]
name = "volumes"
datalist = "datalist.json"
""")
    cfg, train_m, eval_m = site_round(tmp_path, tmp_path / "c3d.toml", "volumes")
    spec = run_model_spec(cfg)
    assert (spec.task, spec.spatial_dims, spec.backbone) == ("classification", 3, "vit-3d")
    assert train_m[keys.NUM_EXAMPLES] == 8 and eval_m[keys.NUM_EXAMPLES] == 4
    assert 0.0 <= eval_m[keys.EVAL_ACC] <= 1.0 and 0.0 <= eval_m[keys.EVAL_METRICS["auc"]] <= 1.0
