"""End-to-end one-run canary audits of the real site training path (tiny, CPU, seed 0).

The scenario is ``AuditConfig``'s default (m=128 noise canaries, r=40, σ=40, one round of
60 local epochs). Checked by hand for seeds 0, 1, 2: correct DP gave ε_lower 0.00/0.13/0.00
vs ε_claimed ≈ 0.3; noise-zero gave 1.12/1.50/0.70; non-private (lr 0.01) 0.83/2.06/1.30.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedadapt.cli import main
from privacy.audit_bounds import one_run_epsilon_lower


def _audit(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict]:
    code = main(["audit-empirical", "--json", "--audit-seed", "0", *extra])
    out = json.loads(capsys.readouterr().out)
    return code, out


def test_correct_dp_path_is_consistent(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    png = tmp_path / "scores.png"
    code, out = _audit(capsys, "--plot", str(png))
    assert code == 0
    assert out["violated"] is False
    assert 0 < out["epsilon_claimed"] < 1
    assert out["epsilon_lower"] <= out["epsilon_claimed"]
    assert out["epsilon_lower"] == pytest.approx(
        one_run_epsilon_lower(out["canaries"], out["guesses"], out["correct"],
                              delta=1e-5, confidence=0.95))
    assert len(out["scores_in"]) + len(out["scores_out"]) == 128
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "does NOT prove" in out["statement"]


def test_noise_zero_wiring_is_caught(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _audit(capsys, "--broken", "noise-zero")
    assert code == 1
    assert out["violated"] is True
    assert out["epsilon_lower"] > 3 * out["epsilon_claimed"]
    assert out["epsilon_lower"] > 1.0
    assert out["auroc"] > 0.8


def test_non_private_training_gives_a_large_lower_bound(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _audit(capsys, "--no-dp", "--lr", "0.01")
    assert code == 0  # no claim to violate
    assert out["epsilon_claimed"] is None
    assert out["epsilon_lower"] > 0.5
    assert out["auroc"] > 0.7
    assert math.isfinite(out["epsilon_lower"])


def test_bad_options_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit-empirical", "--guesses", "200"]) == 2
    assert "guesses" in capsys.readouterr().err
    assert main(["audit-empirical", "--no-dp", "--broken", "noise-zero"]) == 2
