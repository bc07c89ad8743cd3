"""The demo dataset generator: real formats, answers that follow from the world, balance, noise and features."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import isubg.data.demo as demo
from isubg.data.answers import normalize_answer
from isubg.data.convert import TsvRow, iter_tsv_rows, parse_tsv_row
from isubg.data.demo import (
    COLORS,
    FEATURE_DIM,
    GENERATOR_VERSION,
    MATERIALS,
    NAMES,
    RELATIONS,
    SIZES,
    SPLITS,
    generate_demo,
)
from isubg.data.features import FeatureStore
from isubg.errors import ConfigError

VQA_SUBTYPES = {"train": "train2014", "val": "val2014", "testdev": "test-dev2015"}
TEMPLATES = {
    "existColor",
    "count",
    "queryColor",
    "queryMaterial",
    "queryName",
    "relQuery",
    "sameColor",
    "sameMaterial",
    "existOr",
    "existAnd",
}


@dataclass
class Generated:
    """One tiny dataset generated once for the module, and how long it took."""

    out: Path
    report: demo.DemoReport
    seconds: float
    messages: list[str]

    def json(self, relative: str) -> Any:
        return json.loads((self.out / relative).read_text(encoding="utf-8"))

    def questions(self, split: str) -> dict[str, Any]:
        return self.json(f"gqa/questions/{split}_balanced_questions.json")

    def scene_graphs(self, split: str) -> dict[str, Any]:
        return self.json(f"gqa/sceneGraphs/{split}_sceneGraphs.json")

    def tsv_rows(self) -> dict[str, TsvRow]:
        path = self.out / "features" / "demo.tsv"
        return {
            row.image_id: row
            for row in (parse_tsv_row(fields, f"{path}:{n}") for n, _, fields in iter_tsv_rows(path) if fields)
        }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    out = tmp_path_factory.mktemp("demo") / "data"
    messages: list[str] = []
    start = time.perf_counter()
    report = generate_demo(out, "tiny", seed=0, progress=messages.append)
    return Generated(out, report, time.perf_counter() - start, messages)


def _data_files(root: Path) -> Iterator[Path]:
    """The files whose bytes must not depend on anything but (size, seed); the HDF5 is checked by content."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".tsv", ".txt"):
            yield path


# -------------------------------------------------------------------------------------------------
# Determinism, files, errors


def test_same_seed_gives_identical_files_across_processes(tiny: Generated, tmp_path: Path) -> None:
    # A fresh interpreter with another hash seed: set iteration order must not leak into the output.
    code = "import sys; from pathlib import Path; from isubg.data.demo import generate_demo; "
    code += "generate_demo(Path(sys.argv[1]), 'tiny', seed=0)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, env=env)
    ours = [p.relative_to(tiny.out) for p in _data_files(tiny.out)]
    theirs = [p.relative_to(tmp_path / "again") for p in _data_files(tmp_path / "again")]
    assert ours == theirs and len(ours) == 17
    for relative in ours:
        assert (tiny.out / relative).read_bytes() == (tmp_path / "again" / relative).read_bytes(), relative


def test_another_seed_gives_another_world(tiny: Generated, tmp_path: Path) -> None:
    generate_demo(tmp_path, "tiny", seed=1)
    for relative in ("gqa/questions/train_balanced_questions.json", "gqa/sceneGraphs/val_sceneGraphs.json"):
        assert (tiny.out / relative).read_bytes() != (tmp_path / relative).read_bytes()
    assert (tiny.out / "features/demo.tsv").read_bytes() != (tmp_path / "features/demo.tsv").read_bytes()


def test_tiny_is_fast(tiny: Generated) -> None:
    assert tiny.seconds < 3.0


def test_report_manifest_and_progress(tiny: Generated) -> None:
    report = tiny.report
    assert report.images == {"train": 40, "val": 12, "testdev": 12}
    for split in SPLITS:
        assert 8 * report.images[split] <= report.questions[split] <= 12 * report.images[split]
    assert all(path.is_file() for path in report.files.values())
    assert 0 < report.seconds <= tiny.seconds
    assert tiny.messages and all(isinstance(m, str) for m in tiny.messages)
    manifest = tiny.json("demo.json")
    assert set(manifest) == {"generator", "version", "size", "seed", "feature_dim", "splits", "files"}
    assert (manifest["generator"], manifest["version"], manifest["size"], manifest["seed"]) == (
        "isubg demo",
        GENERATOR_VERSION,
        "tiny",
        0,
    )
    assert manifest["feature_dim"] == FEATURE_DIM == 128
    assert manifest["splits"] == {s: {"images": report.images[s], "questions": report.questions[s]} for s in SPLITS}
    files = manifest["files"]
    assert files["gqa_questions"]["testdev"] == "gqa/questions/testdev_balanced_questions.json"
    assert files["vqa_annotations"]["val"] == "vqa/v2_mscoco_val2014_annotations.json"
    assert files["features_h5"] == "features/demo.h5"
    for value in files.values():
        for relative in value.values() if isinstance(value, dict) else [value]:
            assert (tiny.out / relative).is_file(), relative


def test_unknown_size_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tiny, small, medium"):
        generate_demo(tmp_path, "huge")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_an_interrupted_run_keeps_the_previous_files_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generate_demo(tmp_path, "tiny", seed=0)
    before = {p: p.read_bytes() for p in _data_files(tmp_path)}
    rows = {"n": 0}
    original = demo._tsv_row

    def failing_row(image_id: int, detections: Any) -> str:
        rows["n"] += 1
        if rows["n"] > 45:  # in the middle of the train split's TSV rows
            raise KeyboardInterrupt
        return original(image_id, detections)

    monkeypatch.setattr(demo, "_tsv_row", failing_row)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(tmp_path, "tiny", seed=1)
    assert {p: p.read_bytes() for p in _data_files(tmp_path)} == before
    assert json.loads((tmp_path / "demo.json").read_text())["seed"] == 0
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or "staging" in p.name]


# -------------------------------------------------------------------------------------------------
# GQA


QUESTION_KEYS = {
    "imageId",
    "question",
    "answer",
    "fullAnswer",
    "isBalanced",
    "groups",
    "entailed",
    "equivalent",
    "types",
    "annotations",
    "semantic",
    "semanticStr",
}


def _check_question(qid: str, q: dict[str, Any], graphs: dict[str, Any]) -> None:
    assert set(q) == QUESTION_KEYS
    assert q["imageId"] in graphs
    assert q["question"].endswith("?") and q["answer"] == q["answer"].strip().lower() and q["answer"]
    assert q["fullAnswer"].endswith(".") and q["isBalanced"] is True
    assert set(q["groups"]) == {"global", "local"} and isinstance(q["groups"]["local"], str)
    assert q["groups"]["global"] is None or isinstance(q["groups"]["global"], str)
    assert q["entailed"] == [] and q["equivalent"] == [qid]
    assert set(q["types"]) == {"structural", "semantic", "detailed"}
    assert q["types"]["structural"] in {"verify", "query", "choose", "logical", "compare"}
    assert q["types"]["semantic"] in {"obj", "attr", "cat", "rel", "global"}
    assert q["types"]["detailed"] in TEMPLATES
    assert set(q["annotations"]) == {"question", "answer", "fullAnswer"}
    objects = graphs[q["imageId"]]["objects"]
    assert all(oid in objects for oid in q["annotations"]["question"].values())
    assert q["semantic"] and all(set(step) == {"operation", "argument", "dependencies"} for step in q["semantic"])
    for i, step in enumerate(q["semantic"]):
        assert all(0 <= d < i for d in step["dependencies"])
    assert q["semanticStr"].split("->")[0] == f"{q['semantic'][0]['operation']}: {q['semantic'][0]['argument']}"


def test_gqa_questions_are_in_the_gqa_format_with_ids_unique_across_splits(tiny: Generated) -> None:
    all_ids: list[str] = []
    for split in SPLITS:
        questions, graphs = tiny.questions(split), tiny.scene_graphs(split)
        assert len(questions) == tiny.report.questions[split]
        for qid, q in questions.items():
            _check_question(qid, q, graphs)
        all_ids += list(questions)
        assert {q["imageId"] for q in questions.values()} == set(graphs)
    assert len(all_ids) == len(set(all_ids))


def _relation(source: dict[str, Any], target: dict[str, Any]) -> str:
    dx = (source["x"] + source["w"] / 2) - (target["x"] + target["w"] / 2)
    dy = (source["y"] + source["h"] / 2) - (target["y"] + target["h"] / 2)
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def test_scene_graphs_are_in_the_gqa_format_with_geometric_relations(tiny: Generated) -> None:
    image_ids: list[str] = []
    for split in SPLITS:
        graphs = tiny.scene_graphs(split)
        assert len(graphs) == tiny.report.images[split]
        image_ids += list(graphs)
        for graph in graphs.values():
            assert set(graph) == {"width", "height", "objects"} and (graph["width"], graph["height"]) == (640, 480)
            objects = graph["objects"]
            assert 3 <= len(objects) <= 6
            for obj in objects.values():
                assert set(obj) == {"name", "x", "y", "w", "h", "attributes", "relations"}
                assert all(isinstance(obj[k], int) for k in "xywh") and obj["name"] in NAMES
                assert obj["x"] >= 0 and obj["y"] >= 0 and obj["x"] + obj["w"] <= 640 and obj["y"] + obj["h"] <= 480
                color, material, size = obj["attributes"]
                assert color in COLORS and material in MATERIALS and size in SIZES
                assert 2 <= len(obj["relations"]) <= 3
                for edge in obj["relations"]:
                    assert set(edge) == {"name", "object"} and edge["name"] in RELATIONS
                    assert edge["name"] == _relation(obj, objects[edge["object"]])
    assert len(image_ids) == len(set(image_ids)) and all(i.isdigit() for i in image_ids)


# -------------------------------------------------------------------------------------------------
# Answers follow from the scene graph


def _find(objects: dict[str, Any], phrase: str) -> list[str]:
    """Ids of the objects a phrase like "large red ball" or "metal object" describes."""
    *adjectives, noun = phrase.split()
    return [
        oid
        for oid, o in objects.items()
        if (noun == "object" or o["name"] == noun) and all(a in o["attributes"] for a in adjectives)
    ]


def _the(objects: dict[str, Any], phrase: str) -> dict[str, Any]:
    found = _find(objects, phrase)
    assert len(found) == 1, f"'{phrase}' is ambiguous or absent: {found}"
    return objects[found[0]]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _expected(detailed: str, question: str, objects: dict[str, Any]) -> str:
    """Recompute a template question's answer from the scene graph alone."""
    plurals = {name + ("es" if name.endswith("x") else "s"): name for name in NAMES}
    if detailed == "existColor":
        return _yes(bool(_find(objects, re.fullmatch(r"Is there an? (.+)\?", question)[1])))
    if detailed == "count":
        name = plurals[re.fullmatch(r"How many (\w+) are there\?", question)[1]]
        return str(sum(o["name"] == name for o in objects.values()))
    if detailed in ("queryColor", "queryMaterial"):
        kind, phrase = re.fullmatch(r"What (color|material) is the (.+)\?", question).groups()
        return _the(objects, phrase)["attributes"][0 if kind == "color" else 1]
    if detailed == "queryName":
        return _the(objects, re.fullmatch(r"What is the (.+ object)\?", question)[1])["name"]
    if detailed == "relQuery":
        rel, phrase = re.fullmatch(
            r"What is (to the left of|to the right of|above|below) the (.+)\?", question
        ).groups()
        target = next(oid for oid, o in objects.items() if o is _the(objects, phrase))
        names = {o["name"] for o in objects.values() if {"name": rel, "object": target} in o["relations"]}
        assert len(names) == 1, question
        return names.pop()
    if detailed in ("sameColor", "sameMaterial"):
        a, b, kind = re.fullmatch(r"Are the (.+) and the (.+) the same (color|material)\?", question).groups()
        index = 0 if kind == "color" else 1
        return _yes(_the(objects, a)["attributes"][index] == _the(objects, b)["attributes"][index])
    if detailed == "existOr":
        a, b = re.fullmatch(r"Is there an? (.+) or an? (.+)\?", question).groups()
        return _yes(bool(_find(objects, a)) or bool(_find(objects, b)))
    a, b = re.fullmatch(r"Are there both an? (.+) and an? (.+)\?", question).groups()
    return _yes(bool(_find(objects, a)) and bool(_find(objects, b)))


def test_every_answer_follows_from_the_scene_graph(tiny: Generated) -> None:
    seen: Counter[str] = Counter()
    for split in SPLITS:
        graphs = tiny.scene_graphs(split)
        for q in tiny.questions(split).values():
            detailed = q["types"]["detailed"]
            objects = graphs[q["imageId"]]["objects"]
            assert _expected(detailed, q["question"], objects) == q["answer"], q["question"]
            seen[detailed] += 1
    assert set(seen) == TEMPLATES and min(seen.values()) >= 10


def test_questions_of_an_image_are_distinct(tiny: Generated) -> None:
    for split in SPLITS:
        per_image = Counter((q["imageId"], q["question"]) for q in tiny.questions(split).values())
        assert max(per_image.values()) == 1


def test_answers_are_balanced(tiny: Generated) -> None:
    for split in SPLITS:
        answers = Counter(q["answer"] for q in tiny.questions(split).values())
        total = sum(answers.values())
        assert answers.most_common(1)[0][1] / total < 0.30, (split, answers.most_common(3))
        assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6
    train = Counter(q["answer"] for q in tiny.questions("train").values() if q["types"]["detailed"] == "count")
    assert set(train) == {"0", "1", "2", "3", "4"}
    assert max(train.values()) <= 4 * min(train.values())


# -------------------------------------------------------------------------------------------------
# VQA v2


def test_vqa_files_are_in_the_vqa_format_and_match_gqa(tiny: Generated) -> None:
    for split in SPLITS:
        sub = VQA_SUBTYPES[split]
        questions = tiny.json(f"vqa/v2_OpenEnded_mscoco_{sub}_questions.json")
        annotations = tiny.json(f"vqa/v2_mscoco_{sub}_annotations.json")
        assert set(questions) == {"info", "task_type", "data_type", "license", "data_subtype", "questions"}
        assert (questions["task_type"], questions["data_type"], questions["data_subtype"]) == (
            "Open-Ended",
            "mscoco",
            sub,
        )
        assert (
            set(annotations) == {"info", "license", "data_subtype", "annotations"}
            and annotations["data_subtype"] == sub
        )
        gqa = tiny.questions(split)
        assert [q["question_id"] for q in questions["questions"]] == [int(k) for k in gqa]
        for q in questions["questions"]:
            assert set(q) == {"image_id", "question", "question_id"} and isinstance(q["image_id"], int)
            record = gqa[str(q["question_id"])]
            assert (q["question"], str(q["image_id"])) == (record["question"], record["imageId"])
        for a in annotations["annotations"]:
            assert set(a) == {
                "question_type",
                "multiple_choice_answer",
                "answers",
                "image_id",
                "answer_type",
                "question_id",
            }
            assert a["multiple_choice_answer"] == gqa[str(a["question_id"])]["answer"]
            assert a["answer_type"] in {"yes/no", "number", "other"} and a["question_type"]
            assert (a["answer_type"] == "yes/no") == (a["multiple_choice_answer"] in ("yes", "no"))
            assert [h["answer_id"] for h in a["answers"]] == list(range(1, 11))
            assert all(set(h) == {"answer", "answer_confidence", "answer_id"} for h in a["answers"])
            assert all(h["answer_confidence"] in {"yes", "maybe", "no"} for h in a["answers"])


def test_vqa_human_answers_are_noisy_but_agree_after_normalisation(tiny: Generated) -> None:
    agree = total = variants = wrong = 0
    for split in SPLITS:
        annotations = tiny.json(f"vqa/v2_mscoco_{VQA_SUBTYPES[split]}_annotations.json")["annotations"]
        for a in annotations:
            truth = a["multiple_choice_answer"]
            raw = [h["answer"] for h in a["answers"]]
            normalised = [normalize_answer(text) for text in raw]
            agree += Counter(normalised).most_common(1)[0][0] == truth
            total += 1
            variants += sum(r != truth and n == truth for r, n in zip(raw, normalised, strict=True))
            wrong += sum(n != truth for n in normalised)
    assert agree / total >= 0.95
    # The noise is really there: variants a normaliser must undo, and some plain mistakes.
    assert variants > total and 0 < wrong < total * 2


# -------------------------------------------------------------------------------------------------
# Features


def _real_boxes(tiny: Generated, rows: dict[str, TsvRow]) -> Iterator[tuple[str, dict[str, Any], int, str]]:
    """(image id, scene-graph object, its row in the TSV boxes, split) for every real object."""
    for split in SPLITS:
        for image_id, graph in tiny.scene_graphs(split).items():
            boxes = rows[image_id].boxes
            for obj in graph["objects"].values():
                box = np.array([obj["x"], obj["y"], obj["x"] + obj["w"], obj["y"] + obj["h"]], dtype=np.float32)
                hits = np.flatnonzero((boxes == box).all(axis=1))
                assert len(hits) == 1, (image_id, obj)
                yield image_id, obj, int(hits[0]), split


def test_tsv_has_10_to_100_boxes_per_image_mostly_up_to_40(tiny: Generated) -> None:
    rows = tiny.tsv_rows()
    assert len(rows) == sum(tiny.report.images.values())
    counts = np.array([len(row.boxes) for row in rows.values()])
    assert counts.min() >= 10 and counts.max() <= 100 and np.mean(counts <= 40) >= 0.75
    assert counts.sum() == tiny.report.boxes
    for row in rows.values():
        assert (row.width, row.height) == (640.0, 480.0) and row.features.shape[1] == FEATURE_DIM
        assert (row.features > 0).all()  # softplus: positive like pooled ReLU features
        x1, y1, x2, y2 = row.boxes.T
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 640).all() and (y2 <= 480).all() and (x2 > x1).all()


def test_detector_labels_and_vocabularies(tiny: Generated) -> None:
    objects_vocab = (tiny.out / "features/objects_vocab.txt").read_text().splitlines()
    attributes_vocab = (tiny.out / "features/attributes_vocab.txt").read_text().splitlines()
    assert objects_vocab == [*NAMES, "clutter"] and set(COLORS) <= set(attributes_vocab)
    rows = tiny.tsv_rows()
    right = real = 0
    real_rows: dict[str, set[int]] = {}
    for image_id, obj, index, _ in _real_boxes(tiny, rows):
        labels = rows[image_id].labels
        real += 1
        right += objects_vocab[labels["objects_id"][index]] == obj["name"]
        assert attributes_vocab[labels["attrs_id"][index]] == obj["attributes"][0]
        real_rows.setdefault(image_id, set()).add(index)
    assert 0.88 <= right / real < 1.0  # about 5% detector errors
    for image_id, row in rows.items():
        others = [i for i in range(len(row.boxes)) if i not in real_rows[image_id]]
        assert all(objects_vocab[row.labels["objects_id"][i]] == "clutter" for i in others)
        assert row.labels["objects_conf"].dtype == np.float32 and row.labels["attrs_conf"].dtype == np.float32


def test_features_decode_to_colour_and_name(tiny: Generated) -> None:
    # Prototypes (class means) from the train objects; nearest prototype on the val and testdev objects.
    rows = tiny.tsv_rows()
    found = list(_real_boxes(tiny, rows))
    features = np.stack([rows[image_id].features[index] for image_id, _, index, _ in found])
    train = np.array([split == "train" for *_, split in found])
    for labels, classes in (
        (np.array([COLORS.index(obj["attributes"][0]) for _, obj, _, _ in found]), len(COLORS)),
        (np.array([NAMES.index(obj["name"]) for _, obj, _, _ in found]), len(NAMES)),
    ):
        prototypes = np.stack([features[train & (labels == c)].mean(axis=0) for c in range(classes)])
        distances = ((features[~train, None] - prototypes[None]) ** 2).sum(axis=-1)
        accuracy = np.mean(distances.argmin(axis=1) == labels[~train])
        assert accuracy > 0.9, accuracy


def test_real_objects_stand_out_from_the_clutter(tiny: Generated) -> None:
    # A detector responds more strongly to objects than to background; without that contrast the demo's box
    # models learned little beyond question priors (generator version 2).
    rows = tiny.tsv_rows()
    real = {(image_id, index) for image_id, _, index, _ in _real_boxes(tiny, rows)}
    norms: dict[bool, list[float]] = {True: [], False: []}
    for image_id, row in rows.items():
        for index, vector in enumerate(row.features):
            norms[(image_id, index) in real].append(float(np.linalg.norm(vector)))
    assert np.mean(norms[True]) > 1.5 * np.mean(norms[False]), (np.mean(norms[True]), np.mean(norms[False]))


def test_hdf5_holds_the_tsv_and_every_question_image(tiny: Generated) -> None:
    store = FeatureStore(tiny.out / "features" / "demo.h5")
    rows = tiny.tsv_rows()
    assert store.feature_dim == FEATURE_DIM and len(store) == len(rows)
    for split in SPLITS:
        assert {q["imageId"] for q in tiny.questions(split).values()} <= set(store.image_ids)
    for image_id in list(rows)[::7]:
        got = store.get(image_id)
        np.testing.assert_array_equal(got.features, rows[image_id].features)
        np.testing.assert_array_equal(got.boxes, rows[image_id].boxes)
        np.testing.assert_array_equal(got.labels, rows[image_id].labels["objects_id"])
    assert store.image_size(next(iter(rows))) == (640.0, 480.0)
