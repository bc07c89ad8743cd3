"""Summarise data files and check their cross-references, listing every problem found (not just the first).

A processed folder's images must all have features and a detector graph (with its stat words); the images the
manifest counts as having a ground-truth scene graph must be in graphs_gt. The
summary says which scene-graph sources the folder holds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isubg.data.features import FeatureShards, FeatureStore, open_features, recorded_paths
from isubg.data.tables import GraphTable, QuestionTable
from isubg.errors import DataError

__all__ = ["InspectReport", "box_histogram", "inspect_features", "inspect_path", "inspect_processed"]

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


def _scan_non_finite(store: FeatureStore | FeatureShards, problems: list[str]) -> None:
    import h5py

    for path in store.paths:
        with h5py.File(path, "r", locking=False) as handle:
            data = handle["image_features"]
            rows = data.shape[0]
            for start in range(0, rows, _SCAN_ROWS):
                block = np.asarray(data[start : start + _SCAN_ROWS])
                bad = ~np.isfinite(block)
                if bad.any():
                    first = start + int(np.argwhere(bad)[0][0])
                    problems.append(
                        f"{path}: image_features holds {int(bad.sum())} NaN/inf value(s) in rows "
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


def _check_checksums(folder: Path, manifest: dict[str, Any], problems: list[str]) -> None:
    from isubg.data.files import sha256_file

    for name, info in manifest.get("files", {}).items():
        path = folder / name
        if not path.exists():
            problems.append(f"{path}: listed in the manifest but missing")
        elif sha256_file(path) != info.get("sha256"):
            problems.append(f"{path}: checksum differs from the manifest (edited or corrupted after prepare)")


def _rows_with(offsets: np.ndarray, bad: np.ndarray) -> int:
    """How many rows of a ragged column (given by its offsets) hold at least one flagged value."""
    return len(np.unique(np.searchsorted(offsets, np.flatnonzero(bad), side="right") - 1))


def _majority(table: QuestionTable, answer: int | None) -> float:
    """Accuracy of always answering `answer`: the soft score it earns, averaged over questions."""
    if answer is None or not len(table):
        return 0.0
    hits = np.asarray(table.a["labels"]) == answer
    return float(np.asarray(table.a["scores"])[hits].sum()) / len(table)


def _check_split(
    split: str, table: QuestionTable, image_ids: list[str], refs: dict[str, Any], problems: list[str]
) -> dict[str, int]:
    """Cross-reference one split's questions (`image_ids`: each question's image); returns per-split counts."""
    store: FeatureStore | FeatureShards = refs["store"]
    a = table.a
    images = set(image_ids)
    detected = refs["graphs_detected"]
    missing = {
        "features": {i for i in images if i not in store},
        "graphs_detected": {i for i in images if i not in detected},
    }
    missing["graphs_detected"] |= {image_ids[r] for r in np.flatnonzero(np.asarray(a["detected_row"]) < 0)}
    for what, ids in missing.items():
        if ids:
            problems.append(f"split {split}: {len(ids)} image(s) missing from {what}, e.g. {sorted(ids)[0]}")
    tokens = np.asarray(a["tokens"])
    bad_tokens = _rows_with(a["tokens_offsets"], (tokens < 0) | (tokens >= refs["words"]))
    if bad_tokens:
        problems.append(f"split {split}: {bad_tokens} question(s) hold word ids outside the dictionary")
    labels, scores = np.asarray(a["labels"]), np.asarray(a["scores"])
    bad = (labels < 0) | (labels >= refs["answers"]) | (scores <= 0) | (scores > 1)
    if bad_labels := _rows_with(a["labels_offsets"], bad):
        problems.append(f"split {split}: {bad_labels} question(s) hold answer ids or scores out of range")
    answered = np.asarray(a["answered"]).astype(bool)
    unanswerable = int((answered & (np.diff(a["labels_offsets"]) == 0)).sum())
    without = {image_ids[r] for r in np.flatnonzero(np.asarray(a["gt_row"]) < 0)}
    _check_gt(split, images, without, refs, problems)
    return {"questions": len(table), "images": len(images), "unanswerable": unanswerable}


def _check_gt(split: str, images: set[str], without: set[str], refs: dict[str, Any], problems: list[str]) -> None:
    """The split's ground-truth graphs agree with the manifest's count and with the graphs_gt table."""
    recorded = refs["images_without_gt"].get(split)
    if recorded != len(without):
        problems.append(
            f"split {split}: the manifest counts {recorded} image(s) without a ground-truth scene graph, "
            f"its questions point {len(without)} to none"
        )
    lacking = sorted(i for i in images - without if i not in refs["graphs_gt"])
    if lacking:
        problems.append(f"split {split}: {len(lacking)} image(s) missing from graphs_gt, e.g. {lacking[0]}")


def _sources_summary(manifest: dict[str, Any], refs: dict[str, Any]) -> dict[str, str]:
    """Which scene graphs and stat words the folder holds, in words."""
    info = manifest["scene_graphs"]
    gt_splits = ", ".join(info["gt_splits"]) or "no split"
    labels = " and ".join(info["detector_labels"])
    return {
        "ground-truth graphs": f"{len(refs['graphs_gt'])} images ({gt_splits} prepared with scene graphs)",
        "detector graphs": f"{len(refs['graphs_detected'])} images (every image)",
        "detector stat words": f"from the {labels}" if labels else "empty (no detector labels could be named)",
    }


def _open_processed(folder: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, QuestionTable]]:
    """(references the checks use, split -> questions) of a processed folder; DataError when unreadable."""
    from isubg.data.files import read_json
    from isubg.data.scene_graphs import GraphVocab
    from isubg.data.text import Dictionary

    vocab = GraphVocab.load(folder / "graph_vocab.json")
    refs = {
        "store": open_features(recorded_paths(manifest["features"])),
        "graphs_gt": GraphTable(folder / "graphs_gt", vocab),
        "graphs_detected": GraphTable(folder / "graphs_detected", vocab),
        "images_without_gt": manifest["scene_graphs"]["images_without_gt"],
        "words": len(Dictionary.load(folder / "dictionary.json")),
        "answer_names": read_json(folder / "answers.json")["answers"],
    }
    refs["answers"] = len(refs["answer_names"])
    return refs, {s: QuestionTable(folder / f"questions_{s}") for s in manifest["splits"]}


def _top_answers(train: QuestionTable | None) -> list[tuple[int, int]]:
    """(answer id, questions whose full-score answer it is), most frequent first."""
    if train is None:
        return []
    labels, scores = np.asarray(train.a["labels"]), np.asarray(train.a["scores"])
    ids, counts = np.unique(labels[scores == 1], return_counts=True)
    order = np.lexsort((ids, -counts))
    return [(int(ids[i]), int(counts[i])) for i in order]


def inspect_processed(folder: Path) -> InspectReport:
    """Summarise a processed folder and check every cross-reference (see `isubg data inspect`)."""
    from isubg.data.prepare import read_manifest

    report = InspectReport(path=folder)
    try:
        manifest = read_manifest(folder)
        _check_checksums(folder, manifest, report.problems)
        refs, splits = _open_processed(folder, manifest)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    answers, store = refs["answer_names"], refs["store"]
    train = splits.get(manifest.get("train_split", "train"))
    counts = _top_answers(train)
    top = counts[0][0] if counts else None
    report.summary = {"dataset": manifest["dataset"], "answers": len(answers), "dictionary": refs["words"]}
    report.summary.update(_sources_summary(manifest, refs))
    used: set[str] = set()
    for split, table in splits.items():
        image_ids = table.column_text("image_id")
        info = _check_split(split, table, image_ids, refs, report.problems)
        if not len(table):
            report.problems.append(f"split {split}: empty")
        baseline = f", majority '{answers[top]}' {_majority(table, top):.1%}" if top is not None else ""
        labelled = len(table) and table.answered(0)
        report.summary[f"split {split}"] = (
            f"{info['questions']} questions, {info['images']} images, {info['unanswerable']} unanswerable"
            + (baseline if labelled else ", no answers")
        )
        used.update(i for i in set(image_ids) if i in store)
    total = max(1, len(train) if train is not None else 0)
    report.summary["top train answers"] = ", ".join(f"{answers[a]} {c / total:.1%}" for a, c in counts[:5]) or "-"
    report.box_histogram = box_histogram([store.num_boxes(i) for i in sorted(used)])
    return report


def inspect_path(path: Path) -> InspectReport:
    """Inspect a processed folder or a features HDF5 file, whichever `path` is."""
    return inspect_processed(path) if path.is_dir() else inspect_features(path)
