"""Summarise data files and check their cross-references, listing every problem found (not just the first).

A processed folder's images must all have features, a detector graph and detector stat words; the images the
manifest counts as having a ground-truth scene graph must be in graphs_gt.json and stat_words_gt.json. The
summary says which scene-graph sources the folder holds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isubg.data.features import FeatureShards, FeatureStore, open_features, recorded_paths
from isubg.errors import DataError

__all__ = ["InspectReport", "box_histogram", "inspect_features", "inspect_path", "inspect_processed"]

# Rows read per step when scanning a whole file for non-finite values: bounded memory on any size.
_SCAN_ROWS = 65536
# The per-image files of a processed folder (image id -> graph or stat word ids).
_PER_IMAGE = ("graphs_gt.json", "graphs_detected.json", "stat_words_gt.json", "stat_words_detected.json")
_EVERY_IMAGE = ("graphs_detected.json", "stat_words_detected.json")  # the others only where ground truth exists


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


def _majority(records: list[dict[str, Any]], answer: int | None) -> float:
    """Accuracy of always answering `answer`: the soft score it earns, averaged over questions."""
    if answer is None or not records:
        return 0.0
    total = 0.0
    for r in records:
        if answer in (r["labels"] or []):
            total += r["scores"][r["labels"].index(answer)]
    return total / len(records)


def _check_split(
    split: str, records: list[dict[str, Any]], refs: dict[str, Any], problems: list[str]
) -> dict[str, int]:
    """Cross-reference one split's records; returns per-split counts."""
    store: FeatureStore | FeatureShards = refs["store"]
    missing: dict[str, set[str]] = {"features": set(), **{name: set() for name in _EVERY_IMAGE}}
    bad_tokens = bad_labels = unanswerable = 0
    for r in records:
        image = r["image_id"]
        if image not in store:
            missing["features"].add(image)
        for name in _EVERY_IMAGE:
            if image not in refs[name]:
                missing[name].add(image)
        bad_tokens += any(not 0 <= t < refs["words"] for t in r["tokens"])
        if r["labels"] is not None:
            bad_labels += any(not 0 <= a < refs["answers"] for a in r["labels"])
            bad_labels += any(not 0 < s <= 1 for s in r["scores"])
            unanswerable += not r["labels"]
    for what, images in missing.items():
        if images:
            problems.append(f"split {split}: {len(images)} image(s) missing from {what}, e.g. {sorted(images)[0]}")
    if bad_tokens:
        problems.append(f"split {split}: {bad_tokens} question(s) hold word ids outside the dictionary")
    if bad_labels:
        problems.append(f"split {split}: {bad_labels} question(s) hold answer ids or scores out of range")
    _check_gt(split, {r["image_id"] for r in records}, refs, problems)
    return {"questions": len(records), "images": len({r["image_id"] for r in records}), "unanswerable": unanswerable}


def _check_gt(split: str, images: set[str], refs: dict[str, Any], problems: list[str]) -> None:
    """The split's ground-truth graphs agree with the manifest's count, and each has its stat words."""
    without = images - refs["graphs_gt.json"].keys()
    recorded = refs["images_without_gt"].get(split)
    if recorded != len(without):
        problems.append(
            f"split {split}: the manifest counts {recorded} image(s) without a ground-truth scene graph, "
            f"graphs_gt.json lacks {len(without)}"
        )
    lacking = sorted((images - without) - refs["stat_words_gt.json"].keys())
    if lacking:
        problems.append(f"split {split}: {len(lacking)} image(s) missing from stat_words_gt.json, e.g. {lacking[0]}")


def _sources_summary(manifest: dict[str, Any], refs: dict[str, Any]) -> dict[str, str]:
    """Which scene graphs and stat words the folder holds, in words."""
    info = manifest["scene_graphs"]
    gt_splits = ", ".join(info["gt_splits"]) or "no split"
    labels = " and ".join(info["detector_labels"])
    return {
        "ground-truth graphs": f"{len(refs['graphs_gt.json'])} images ({gt_splits} prepared with scene graphs)",
        "detector graphs": f"{len(refs['graphs_detected.json'])} images (every image)",
        "detector stat words": f"from the {labels}" if labels else "empty (no detector labels could be named)",
    }


def inspect_processed(folder: Path) -> InspectReport:
    """Summarise a processed folder and check every cross-reference (see `isubg data inspect`)."""
    from isubg.data.files import read_json
    from isubg.data.prepare import read_manifest
    from isubg.data.text import Dictionary

    report = InspectReport(path=folder)
    try:
        manifest = read_manifest(folder)
        _check_checksums(folder, manifest, report.problems)
        store = open_features(recorded_paths(manifest["features"]))
        answers = read_json(folder / "answers.json")["answers"]
        refs = {
            "store": store,
            **{name: read_json(folder / name) for name in _PER_IMAGE},
            "images_without_gt": manifest["scene_graphs"]["images_without_gt"],
            "words": len(Dictionary.load(folder / "dictionary.json")),
            "answers": len(answers),
        }
        splits = {s: read_json(folder / f"questions_{s}.json") for s in manifest["splits"]}
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    train = splits.get(manifest.get("train_split", "train"), [])
    counts = Counter(a for r in train if r["labels"] for a, s in zip(r["labels"], r["scores"], strict=True) if s == 1)
    top = counts.most_common(1)[0][0] if counts else None
    report.summary = {"dataset": manifest["dataset"], "answers": len(answers), "dictionary": refs["words"]}
    report.summary.update(_sources_summary(manifest, refs))
    for split, records in splits.items():
        info = _check_split(split, records, refs, report.problems)
        if not records:
            report.problems.append(f"split {split}: empty")
        baseline = f", majority '{answers[top]}' {_majority(records, top):.1%}" if top is not None else ""
        labelled = records and records[0]["labels"] is not None
        report.summary[f"split {split}"] = (
            f"{info['questions']} questions, {info['images']} images, {info['unanswerable']} unanswerable"
            + (baseline if labelled else ", no answers")
        )
    top5 = ", ".join(f"{answers[a]} {c / max(1, len(train)):.1%}" for a, c in counts.most_common(5))
    report.summary["top train answers"] = top5 or "-"
    used = sorted({r["image_id"] for records in splits.values() for r in records if r["image_id"] in store})
    report.box_histogram = box_histogram([store.num_boxes(i) for i in used])
    return report


def inspect_path(path: Path) -> InspectReport:
    """Inspect a processed folder or a features HDF5 file, whichever `path` is."""
    return inspect_processed(path) if path.is_dir() else inspect_features(path)
