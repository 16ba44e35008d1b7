"""The console progress line shows the federation's weighted Dice for segmentation runs."""

import io

from fedadapt.server.progress import Progress
from fedadapt.server.record import RoundLog


def test_round_line_shows_weighted_dice_and_per_site_dice():
    log = RoundLog(1)
    log.evaluate = {"a": {"accuracy": 0.9, "dice": 0.5, "num_examples": 10},
                    "b": {"accuracy": 0.8, "dice": 0.8, "num_examples": 30}}
    out = io.StringIO()
    Progress(2, dp=True, stream=out).round(log)
    head, site_a, site_b = out.getvalue().splitlines()
    assert "accuracy 0.825" in head and "dice 0.725" in head  # (0.5·10 + 0.8·30) / 40
    assert "dice 0.500" in site_a and "dice 0.800" in site_b


def test_classification_round_line_has_no_dice():
    log = RoundLog(1)
    log.evaluate = {"a": {"accuracy": 0.9, "num_examples": 10}}
    out = io.StringIO()
    Progress(1, dp=False, stream=out).round(log)
    assert "dice" not in out.getvalue()
