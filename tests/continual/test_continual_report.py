"""continual.report: summary section and heatmap file."""

import json

import pytest

from fedadapt.continual.report import continual_section, write_heatmap

R = [[0.9, 0.1], [0.6, 0.8]]


def test_section_values_and_json(tmp_path):
    s = continual_section(R, method="ewc", scenario="site-incremental", baseline=[0.5, 0.5])
    # ACC = (0.6 + 0.8)/2 = 0.7 ; BWT = 0.6 - 0.9 = -0.3 ; FWT = 0.1 - 0.5 = -0.4
    assert s["ACC"] == pytest.approx(0.7) and s["BWT"] == pytest.approx(-0.3)
    assert s["FWT"] == pytest.approx(-0.4) and s["forgetting"] == pytest.approx(0.3)
    assert s["method"] == "ewc" and s["scenario"] == "site-incremental"
    json.dumps(s)


def test_heatmap_is_a_png(tmp_path):
    p = write_heatmap(R, tmp_path / "continual_R.png", title="naive")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
