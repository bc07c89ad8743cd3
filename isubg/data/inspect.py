"""Summarise data files and check their cross-references, listing every problem found (not just the first)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isubg.data.features import FeatureStore
from isubg.errors import DataError

__all__ = ["InspectReport", "box_histogram", "inspect_features"]

# Rows read per step when scanning a whole file for non-finite values: bounded memory on any size.
_SCAN_ROWS = 65536


@dataclass
class InspectReport:
    """What `isubg data inspect` prints: a summary, a box-count histogram and every problem found."""

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    box_histogram: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "summary": self.summary,
            "box_histogram": self.box_histogram,
            "problems": self.problems,
            "ok": not self.problems,
        }


def box_histogram(counts: list[int]) -> dict[str, int]:
    """Images per box-count bucket of width 10 ("1-10", "11-20", ...), in order."""
    buckets = Counter((max(c, 1) - 1) // 10 for c in counts)
    return {f"{b * 10 + 1}-{b * 10 + 10}": buckets[b] for b in sorted(buckets)}


def _scan_non_finite(store: FeatureStore, problems: list[str]) -> None:
    import h5py

    with h5py.File(store.path, "r") as handle:
        data = handle["image_features"]
        rows = data.shape[0]
        for start in range(0, rows, _SCAN_ROWS):
            block = np.asarray(data[start : start + _SCAN_ROWS])
            bad = ~np.isfinite(block)
            if bad.any():
                first = start + int(np.argwhere(bad)[0][0])
                problems.append(
                    f"{store.path}: image_features holds {int(bad.sum())} NaN/inf value(s) in rows "
                    f"{start}-{start + len(block) - 1} (first at row {first})"
                )


def inspect_features(path: Path) -> InspectReport:
    """Open a features file, summarise it and list its problems.

    A file that cannot be opened at all (not HDF5, missing datasets, bad `pos_boxes`) is reported
    as a single problem rather than raised, so `inspect` always prints a report.
    """
    report = InspectReport(path=path)
    try:
        store = FeatureStore(path)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    counts = [store.num_boxes(i) for i in store.image_ids]
    report.summary = {
        "layout": store.layout,
        "images": len(store),
        "boxes": int(sum(counts)),
        "feature dim": store.feature_dim,
        "boxes per image (min/mean/max)": f"{min(counts)}/{np.mean(counts):.1f}/{max(counts)}" if counts else "-",
        "label fields": ", ".join(store.optional) or "-",
    }
    report.box_histogram = box_histogram(counts)
    if len(store) != store.num_images:
        report.problems.append(
            f"{path}: the id map names {len(store)} images but the file holds {store.num_images}; "
            "rows without an id can never be read"
        )
    _scan_non_finite(store, report.problems)
    store.close()
    return report
