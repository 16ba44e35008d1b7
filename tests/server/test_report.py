"""The run report: plots + self-contained HTML from summary.json, and `fedadapt report` errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedadapt.cli import main
from fedadapt.report import ReportError, build_report


def _round(rnd: int, acc: float) -> dict:
    train = {s: {"loss": 1.0 / rnd, "epsilon": 0.5 * rnd, "epsilon_round": 0.5, "delta": 1e-5,
                 "steps": 4, "sample_rate": 0.25, "num_examples": 64} for s in ("site-0", "site-1")}
    ev = {s: {"loss": 0.9 / rnd, "accuracy": acc, "num_examples": 32} for s in ("site-0", "site-1")}
    return {"round": rnd, "train": train, "evaluate": ev, "accuracy": acc,
            "bytes": {"down": 1000, "up": 1000, "total": 2000},
            "refusals": [{"site": "site-1", "reason": "budget"}] if rnd == 2 else [],
            "failures": [], "rejected": []}


def _summary(**extra) -> dict:
    s = {"schema": 1, "run_dir": "x", "started": "2026", "duration_s": 1.0,
         "config": {"num-server-rounds": 2}, "strategy": {"name": "fedavg"},
         "privacy": {"dp": True, "delta": 1e-5, "noise_multiplier": 1.0, "accountant": "rdp"},
         "sites": {"site-0": {"num_train": 64, "epsilon": 1.0, "epsilon_cap": 2.0},
                   "site-1": {"num_train": 64, "epsilon": 1.0}},
         "rounds": [_round(1, 0.5), _round(2, 0.7)]}
    s.update(extra)
    return s


def _write(tmp_path: Path, summary) -> Path:
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def _check(run_dir: Path, names: set[str]) -> str:
    text = (run_dir / "report.html").read_text()
    for name in names:
        png = run_dir / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f'src="{name}.png"' in text
    assert set(re.findall(r'src="([^"]+)"', text)) == {f"{n}.png" for n in names}
    assert not re.search(r"<(script|link)\b", text, re.I)
    assert "http://" not in text and "https://" not in text
    return text


def test_report_with_every_plot(tmp_path):
    cross = {"models": ["global", "site-0"], "sites": ["site-0", "site-1"],
             "accuracy": [[0.7, 0.6], [0.8, 0.5]]}
    run = _write(tmp_path, _summary(cross_site=cross, continual={"R": [[0.9], [0.8, 0.85]]}))
    assert build_report(run) == run / "report.html"
    text = _check(run, {"metrics", "epsilon", "bytes", "cross_site", "continual"})
    assert "budget" in text  # the refusal is shown


def test_report_without_optional_sections(tmp_path):
    run = _write(tmp_path, _summary(privacy={"dp": False}))
    build_report(run)
    text = _check(run, {"metrics", "epsilon", "bytes"})
    assert "not recorded in this run" in text
    assert not (run / "cross_site.png").exists()


def test_cli_report_rebuilds(tmp_path, capsys):
    run = _write(tmp_path, _summary())
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()


@pytest.mark.parametrize("content, needle", [
    (None, "summary.json is missing"),
    ("{not json", "not valid JSON"),
    (json.dumps({"rounds": []}), "missing key(s) config, sites"),
    (json.dumps({"config": {}, "sites": {}, "rounds": []}), "no rounds"),
    (json.dumps({"config": {}, "sites": {}, "rounds": [{"train": {}}]}), "rounds[0]"),
])
def test_cli_report_errors(tmp_path, capsys, content, needle):
    if content is not None:
        (tmp_path / "summary.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "summary.json" in err
    with pytest.raises(ReportError):
        build_report(tmp_path)


def test_cli_report_missing_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_has_a_drift_panel_per_site(tmp_path):
    def entry(rnd, alert, p):
        return {"round": rnd, "alert": alert, "tested": rnd > 1, "mmd_p": p, "ks_p": p,
                "pred_p": 0.5, "reference_round": 1}
    drift = {"alpha": 0.05, "window": 64, "shift": "site-1:2", "released": [],
             "sites": {"site-0": [entry(1, False, 1.0), entry(2, False, 0.4)],
                       "site-1": [entry(1, False, 1.0), entry(2, True, 1e-6)]},
             "alerts": [{"site": "site-1", "round": 2}]}
    run = _write(tmp_path, _summary(drift=drift))
    build_report(run)
    text = _check(run, {"metrics", "epsilon", "bytes", "drift-site-0", "drift-site-1"})
    assert "<h2 class=warn>Drift</h2>" in text and "1 alert(s)" in text
    assert "<h3>site-0</h3>" in text and "<h3>site-1</h3>" in text
    site1 = text.split("<h3>site-1</h3>")[1]
    assert "ALERT" in site1 and "ALERT" not in text.split("<h3>site-1</h3>")[0]
    (tmp_path / "off").mkdir()
    off = _write(tmp_path / "off", _summary())
    build_report(off)
    assert "Drift monitor: off in this run" in (off / "report.html").read_text()
