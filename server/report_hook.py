"""Write a run's report after its summary; a report failure never loses the summary."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def write_report(run_dir: Path) -> Path | None:
    """Build ``run_dir/report.html`` from the ``summary.json`` already written there.

    Returns the report's path, or None (with a warning) if it could not be built: the
    summary is on disk first and ``fedadapt report RUN_DIR`` can rebuild the report later.
    """
    try:
        from fedadapt.report import build_report

        return build_report(Path(run_dir))
    except Exception as err:  # noqa: BLE001 - a plot must never cost the run its summary
        log.warning("report for %s not written (%s); rebuild with `fedadapt report %s`",
                    run_dir, err, run_dir)
        return None
