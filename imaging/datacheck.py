"""Check a site's data *before* a federation starts, reporting every problem at once.

:func:`check_datalist` reads a datalist as :func:`imaging.datalist.load_split` would,
but instead of stopping at the first bad entry it collects one message per problem
(missing datalist, unknown/empty split, missing or unreadable file, wrong channel count,
label out of range), in the manner of Opacus' ``ModuleValidator`` which lists all
offending modules. A site that would fail inside the running ClientApp every round
then fails here, with exit code 2, before any process starts or any ledger is opened.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedadapt.imaging.datalist import (DataError, ImageSpec, _label, _resolve, load_image,
                                       read_datalist)

#: Splits a site needs: records to train on and held-out records to evaluate on.
REQUIRED_SPLITS = ("training", "test")
#: Problems listed per datalist before the rest are summarised as a count.
MAX_LISTED = 10


@dataclass(frozen=True)
class DataReport:
    """What :func:`check_datalist` found.

    Attributes:
        path: The datalist checked.
        sizes: Records per split.
        labels: Label counts per split (classification only; empty otherwise).
        problems: One message per problem (empty when the data is usable).
    """

    path: Path
    sizes: dict[str, int] = field(default_factory=dict)
    labels: dict[str, dict[int, int]] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def check_datalist(path: str | Path, spec: ImageSpec, *,
                   splits: tuple[str, ...] = REQUIRED_SPLITS,
                   min_records: dict[str, int] | None = None) -> DataReport:
    """Read every entry of ``splits`` of the datalist at ``path`` and list every problem.

    Every image (and mask) is loaded through the same MONAI path as training, so a file
    that loads here loads in the ClientApp.

    Args:
        path: The datalist JSON.
        spec: How the site's images are read (channels, size, task, classes).
        splits: Splits that must be present and non-empty.
        min_records: Fewest records a split must hold (default 1 each).

    Returns:
        A :class:`DataReport`; ``report.problems`` is empty when the data is usable.
    """
    path = Path(path)
    try:
        doc = read_datalist(path)
    except DataError as e:
        return DataReport(path, problems=(str(e),))
    problems: list[str] = []
    sizes, labels = {}, {}
    need = {s: 1 for s in splits} | dict(min_records or {})
    for split in splits:
        items = doc[split]
        sizes[split] = len(items)
        if len(items) < need[split]:
            found = "it is empty" if not items else f"found {len(items)}"
            problems.append(f"datalist {path}: key '{split}' must hold at least "
                            f"{need[split]} record(s) ({{'image': ..., 'label': ...}}); "
                            f"{found}")
        counts: Counter[int] = Counter()
        for i, item in enumerate(items):
            problem = _check_entry(path, split, i, item, spec, counts)
            if problem:
                problems.append(problem)
        if spec.task == "classification":
            labels[split] = dict(sorted(counts.items()))
    if len(problems) > MAX_LISTED:
        problems = problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more "
                                            f"problem(s) in {path}"]
    return DataReport(path, sizes, labels, tuple(problems))


def _check_entry(path: Path, split: str, i: int, item: dict[str, Any], spec: ImageSpec,
                 counts: Counter[int]) -> str | None:
    where = f"datalist {path}: {split}[{i}]"
    try:
        load_image(_resolve(path.parent, item["image"], where), spec)
        y = _label(item["label"], path.parent, spec, where)
    except DataError as e:
        msg = str(e)
        return msg if msg.startswith("datalist") else f"{where} ('image' "\
            f"{item['image']!r}): {msg}"
    if spec.task == "classification":
        counts[int(y)] += 1
    return None
