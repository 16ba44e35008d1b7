"""``fedadapt`` CLI: bad input exits non-zero with a message that says what to do."""

import subprocess
import sys

import pytest

from fedadapt.cli import main


@pytest.mark.parametrize("argv, fragment", [
    (["simulate", "--sites", "0"], "--sites: expected an integer >= 1, got 0"),
    (["simulate", "--rounds", "-2"], "--rounds: expected an integer >= 1, got -2"),
    (["simulate", "--rounds", "two"], "--rounds: expected an integer, got 'two'"),
    (["simulate", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["simulate", "--noise-multiplier", "-1"], "expected a number >= 0"),
])
def test_argparse_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert fragment in capsys.readouterr().err


def test_config_errors_exit_2(capsys):
    # Passes argparse, fails RunConfig validation: sigma 0 with DP on is no privacy.
    assert main(["simulate", "--noise-multiplier", "0"]) == 2
    assert "turn DP off explicitly" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "fedadapt.cli", "simulate", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--rounds", "--sites", "--seed", "--out", "--device", "--no-dp",
                 "--noise-multiplier"):
        assert flag in out


def test_backbone_path_errors_exit_2(tmp_path, capsys):
    assert main(["simulate", "--backbone", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "--backbone:" in err and "found nothing (not found)" in err
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    assert main(["simulate", "--backbone", str(tmp_path), "--scenario",
                 "segmentation-2d"]) == 2
    assert "Segmentation would need a decoder" in capsys.readouterr().err
