"""Live progress of a run on the console: one block per round, per-site metrics and ε."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from fedadapt.server.record import RoundLog


class Progress:
    """Prints rounds as they finish; ``done`` prints where the run directory is."""

    def __init__(self, num_rounds: int, *, dp: bool, stream: TextIO = sys.stdout) -> None:
        self.num_rounds, self.dp, self.stream = num_rounds, dp, stream

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def round(self, log: RoundLog) -> None:
        acc = log.accuracy()
        bar = "#" * log.round + "." * (self.num_rounds - log.round)
        head = f"[fedadapt] round {log.round}/{self.num_rounds} [{bar}]"
        if acc is not None:
            head += f"  accuracy {acc:.3f}"
        dice = log.weighted("dice")  # segmentation: the mean foreground Dice
        if dice is not None:
            head += f"  dice {dice:.3f}"
        head += f"  sent {log.bytes_down / 1e3:.1f} kB down, {log.bytes_up / 1e3:.1f} kB up"
        lines = [head]
        for site in sorted(set(log.train) | set(log.evaluate)):
            t, e = log.train.get(site, {}), log.evaluate.get(site, {})
            parts = [f"  {site:<12}"]
            if e:
                parts.append(f"acc {e['accuracy']:.3f}")
                if "dice" in e:
                    parts.append(f"dice {e['dice']:.3f}")
            if t:
                parts.append(f"loss {t['loss']:.3f}")
                parts.append(f"eps {t['epsilon']:.2f}" if self.dp else "eps inf (no DP)")
            lines.append("  ".join(parts))
        for item in log.refusals:
            lines.append(f"  {item['site']:<12}  refused: {item['reason']}")
        for item in log.failures:
            lines.append(f"  node {item['node_id']}  failed ({item['stage']}): {item['reason']}")
        self._print("\n".join(lines))

    def done(self, summary: dict[str, Any]) -> None:
        self._print(f"[fedadapt] done in {summary['duration_s']:.0f} s; run directory: "
                    f"{summary['run_dir']}")
