"""`fedadapt site check` reads every record of a site's data and fails with exit 2,
naming the file, key, expected and found (PNG files the test makes)."""

import json

import numpy as np
from PIL import Image

from fedadapt.cli import main

RNG = np.random.default_rng(1)


def _folder(tmp_path, labels, n_train):
    d = tmp_path / "site"
    assert main(["site", "init", str(d), "--name", "a", "--data", "data/datalist.json",
                 "--epsilon-cap", "8"]) == 0
    (d / "data").mkdir(exist_ok=True)
    entries = []
    for i, y in enumerate(labels):
        Image.fromarray(RNG.integers(0, 255, (10, 10)).astype(np.uint8)).save(
            d / "data" / f"{i}.png")
        entries.append({"image": f"{i}.png", "label": y})
    (d / "data" / "datalist.json").write_text(json.dumps(
        {"training": entries[:n_train], "test": entries[n_train:]}))
    return d


def test_site_check_reads_every_record(tmp_path, capsys):
    d = _folder(tmp_path, [0, 1, 0, 1, 1, 0], 4)
    capsys.readouterr()
    assert main(["site", "check", str(d), "--num-classes", "2"]) == 0
    out = capsys.readouterr().out
    assert "training 4, test 2 records" in out and "training labels {0: 2, 1: 2}" in out


def test_site_check_exit_2_on_bad_label_missing_file_and_empty_split(tmp_path, capsys):
    d = _folder(tmp_path, [0, 3, 1, 0], 4)  # test split empty, label 3 of 2 classes
    (d / "data" / "2.png").unlink()
    capsys.readouterr()
    assert main(["site", "check", str(d), "--num-classes", "2"]) == 2
    err = capsys.readouterr().err
    assert "site a: its data cannot be trained on" in err
    assert "training[1]" in err and "label 3 out of range; expected 0..1" in err
    assert "training[2]" in err and "2.png" in err and "file not found" in err
    assert "key 'test' must hold at least 1 record" in err
    (d / "data" / "datalist.json").unlink()
    assert main(["site", "check", str(d)]) == 2
    assert "not found" in capsys.readouterr().err
