"""Bad site data fails fast: `fedadapt simulate` checks every site before the federation
starts (exit 2, naming site, file, key, expected and found), and a run in which a site
failed every round exits non-zero naming that site."""

import json

import numpy as np
import pytest
from PIL import Image

from fedadapt.cli import main
from fedadapt.imaging.datacheck import check_datalist
from fedadapt.imaging.datalist import ImageSpec
from fedadapt.simulations.outcome import persistent_failures

RNG = np.random.default_rng(0)


def _png(path, channels=1):
    shape = (12, 12) if channels == 1 else (12, 12, channels)
    Image.fromarray(RNG.integers(0, 255, shape).astype(np.uint8)).save(path)
    return path.name


def _site(folder, n_train=6, n_test=2, labels=None, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    labels = labels or [i % 2 for i in range(n_train + n_test)]
    entries = [{"image": _png(folder / f"{i}.png"), "label": labels[i]}
               for i in range(n_train + n_test)]
    doc = {"training": entries[:n_train], "test": entries[n_train:], **overrides}
    (folder / "datalist.json").write_text(json.dumps(doc))
    return folder / "datalist.json"


def _scenario(tmp_path, names):
    text = 'name = "t"\nnum_classes = 2\nimage_size = 16\n'
    for n in names:
        text += f'[[site]]\nname = "{n}"\ndatalist = "{n}/datalist.json"\n'
    (tmp_path / "t.toml").write_text(text)
    return str(tmp_path / "t.toml")


def test_check_datalist_lists_every_problem(tmp_path):
    path = _site(tmp_path / "a", labels=[0, 1, 2, 0, 1, 7, 0, 1])
    _png(tmp_path / "a" / "rgb.png", channels=3)
    doc = json.loads(path.read_text())
    doc["training"][0]["image"] = "missing.png"
    doc["training"][1]["image"] = "rgb.png"
    doc["test"] = []
    path.write_text(json.dumps(doc))
    report = check_datalist(path, ImageSpec(num_classes=2, spatial_size=(16, 16)))
    text = "\n".join(report.problems)
    assert not report.ok and len(report.problems) == 5
    assert "training[0]" in text and "file not found" in text and "missing.png" in text
    assert "training[1]" in text and "expected 1 channel(s), found 3" in text
    assert "training[2]" in text and "label 2 out of range; expected 0..1" in text
    assert "training[5]" in text and "label 7 out of range" in text
    assert "key 'test' must hold at least 1 record" in text and "it is empty" in text
    good = check_datalist(_site(tmp_path / "b"), ImageSpec(num_classes=2))
    assert good.ok and good.sizes == {"training": 6, "test": 2}
    assert good.labels["training"] == {0: 3, 1: 3}


@pytest.mark.parametrize("breakage,needles", [
    ("no-datalist", ["site hospital-b", "datalist", "file not found"]),
    ("label", ["site hospital-b", "training[3]", "label 5 out of range; expected 0..1"]),
    ("empty", ["site hospital-b", "key 'training' must hold at least 1 record",
               "it is empty"]),
])
def test_simulate_refuses_bad_site_data_before_starting(tmp_path, capsys, breakage, needles):
    _site(tmp_path / "hospital-a")
    if breakage == "label":
        _site(tmp_path / "hospital-b", labels=[0, 1, 0, 5, 1, 0, 1, 0])
    elif breakage == "empty":
        _site(tmp_path / "hospital-b", n_train=0, n_test=2)
    runs = tmp_path / "runs"
    code = main(["simulate", "--scenario", _scenario(tmp_path, ["hospital-a", "hospital-b"]),
                 "--rounds", "1", "--out", str(runs), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the federation was not started" in err
    for needle in needles:
        assert needle in err
    assert "site hospital-a" not in err
    # Nothing trained: no ledger entry anywhere, no summary.
    assert not list(runs.glob("*/sites/*/ledger/*.jsonl"))
    assert not list(runs.glob("*/summary.json"))


def test_simulate_refuses_an_invalid_site_policy(tmp_path, capsys):
    _site(tmp_path / "hospital-a")
    sites = tmp_path / "sites"
    (sites / "hospital-a").mkdir(parents=True)
    (sites / "hospital-a" / "policy.toml").write_text("epsilon_cap = -1.0\ndelta = 1e-3\n")
    code = main(["simulate", "--scenario", _scenario(tmp_path, ["hospital-a"]),
                 "--rounds", "1", "--out", str(tmp_path / "runs"), "--device", "cpu",
                 "--sites-dir", str(sites)])
    err = capsys.readouterr().err
    assert code == 2 and "site hospital-a: privacy policy" in err
    assert str(sites / "hospital-a" / "policy.toml") in err


def _summary(rounds):
    return {"rounds": [{"round": i + 1, "train": t, "failures": f}
                       for i, (t, f) in enumerate(rounds)]}


def test_persistent_failures_name_the_site_that_failed_every_round():
    boom = {"node_id": 7, "site": None, "stage": "train", "reason": "ClientApp: DataError x"}
    ok = {"a": {"loss": 1.0}}
    assert persistent_failures(_summary([(ok, [boom]), (ok, [dict(boom, site="b")])])) == [
        "site b (node 7) failed to train in all 2 round(s); last reason: ClientApp: "
        "DataError x"]
    assert persistent_failures(_summary([(ok, [boom]), (ok, [])])) == []  # it recovered
    evaluate_only = dict(boom, stage="evaluate")
    assert persistent_failures(_summary([(ok, [evaluate_only])])) == []
    assert persistent_failures({"rounds": []}) == []


def test_simulate_exit_code_reads_the_summary(tmp_path, capsys):
    from fedadapt.cmd_simulate import _outcome

    boom = {"node_id": 3, "site": "hospital-c", "stage": "train", "reason": "OSError: gone"}
    (tmp_path / "summary.json").write_text(json.dumps(_summary([({}, [boom])] * 2)))
    assert _outcome(tmp_path) == 1
    err = capsys.readouterr().err
    assert "site hospital-c (node 3) failed to train in all 2 round(s)" in err
    assert "OSError: gone" in err
    (tmp_path / "summary.json").write_text(json.dumps(_summary([({"a": {}}, [])])))
    assert _outcome(tmp_path) == 0
