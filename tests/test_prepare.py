"""`prepare`, the processed folder, VQADataset and collate, on hand-written official-format files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import write_adaptive_h5

from isubg.data.dataset import VQADataset, collate
from isubg.data.inspect import inspect_processed
from isubg.data.loaders import make_batches
from isubg.data.prepare import SplitFiles, discover_splits, prepare, read_manifest
from isubg.data.scene_graphs import GraphVocab
from isubg.data.tables import GraphTable, QuestionTable
from isubg.data.text import Dictionary
from isubg.errors import DataError
from isubg.resolve import resolve_config

GRAPHS = {
    "101": {
        "width": 640,
        "height": 480,
        "objects": {
            "1": {"name": "dog", "x": 10, "y": 20, "w": 100, "h": 80, "attributes": ["brown", "small"],
                  "relations": [{"name": "to the left of", "object": "2"}]},
            "2": {"name": "tennis racket", "x": 300, "y": 200, "w": 50, "h": 120, "attributes": ["red"],
                  "relations": []},
        },
    },
    "102": {
        "width": 500,
        "height": 400,
        "objects": {"7": {"name": "cat", "x": 0, "y": 0, "w": 250, "h": 200, "attributes": ["white"], "relations": []}},
    },
    "103": {"width": 320, "height": 240, "objects": {}},
}  # fmt: skip

QUESTIONS = {
    "train": {
        "q1": {"imageId": "101", "question": "Is the dog brown?", "answer": "yes",
               "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "q2": {"imageId": "101", "question": "What is the tennis racket to the right of?", "answer": "dog",
               "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
        "q3": {"imageId": "102", "question": "What color is the cat?", "answer": "white",
               "types": {"structural": "query", "semantic": "attr", "detailed": "queryAttr"}},
    },
    "val": {
        "q4": {"imageId": "103", "question": "Is there a dog?", "answer": "no",
               "types": {"structural": "verify", "semantic": "obj", "detailed": "exist"}},
        "q5": {"imageId": "102", "question": "Is the cat black?", "answer": "maybe",
               "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
    },
}  # fmt: skip


def _gqa_raw(root: Path) -> Path:
    raw = root / "gqa"
    (raw / "questions").mkdir(parents=True)
    (raw / "sceneGraphs").mkdir()
    for split, questions in QUESTIONS.items():
        (raw / "questions" / f"{split}_balanced_questions.json").write_text(json.dumps(questions))
        graphs = {k: v for k, v in GRAPHS.items() if any(q["imageId"] == k for q in questions.values())}
        (raw / "sceneGraphs" / f"{split}_sceneGraphs.json").write_text(json.dumps(graphs))
    write_adaptive_h5(root / "feats.h5", {101: 12, 102: 30, 103: 60})
    return raw


@pytest.fixture
def gqa(tmp_path: Path) -> Path:
    raw = _gqa_raw(tmp_path)
    out = tmp_path / "processed"
    prepare("gqa", discover_splits("gqa", raw, ["train", "val"]), tmp_path / "feats.h5", out)
    return out


def _graphs(folder: Path, kind: str) -> GraphTable:
    return GraphTable(folder / f"graphs_{kind}", GraphVocab.load(folder / "graph_vocab.json"))


def test_prepare_gqa_writes_the_processed_folder(gqa: Path) -> None:
    manifest = read_manifest(gqa)
    assert manifest["format_version"] == 3
    assert manifest["splits"] == {"train": {"questions": 3, "images": 2}, "val": {"questions": 2, "images": 2}}
    assert manifest["unanswerable"] == {"train": 0, "val": 2}  # "no" and "maybe" are not training answers
    assert manifest["scene_graphs"] == {
        "gt_splits": ["train", "val"], "detected": True, "images_without_gt": {"train": 0, "val": 0},
        "detector_labels": [],
    }  # fmt: skip
    for name in ("dictionary.json", "answers.json", "graph_vocab.json", "graphs_gt/table.json",
                 "graphs_detected/names.npy", "questions_train/tokens.npy", "tfidf.npz"):  # fmt: skip
        assert name in manifest["files"]
    answers = json.loads((gqa / "answers.json").read_text())["answers"]
    assert sorted(answers) == ["dog", "white", "yes"]
    records = QuestionTable(gqa / "questions_train")
    racket = records[1]
    assert racket["answer"] == "dog" and racket["labels"] == [answers.index("dog")] and racket["scores"] == [1.0]
    # "tennis racket" is a two-word object name: both tokens are entity words; "dog" too.
    words = ["what", "is", "the", "tennis", "racket", "to", "the", "right", "of"]
    assert [w for w, e in zip(words, racket["entity"], strict=True) if e] == ["tennis", "racket"]
    for kind in ("gt", "detected"):
        assert set(_graphs(gqa, kind).rows) == {"101", "102", "103"}
    # Without detector labels, detector graphs name every box "object" and give no stat words.
    detected = _graphs(gqa, "detected")
    assert detected.graph_of("101").names == ["object"] * 12
    assert [detected.stat(row).tolist() for row in detected.rows.values()] == [[], [], []]
    # Ground-truth stat words: every name and attribute of image 101 once, in order; "tennis racket" -> "racket".
    words = Dictionary.load(gqa / "dictionary.json")
    gt = _graphs(gqa, "gt")
    stats = gt.stat(gt.rows["101"])
    assert [words.id_to_word(i) for i in stats] == ["dog", "brown", "small", "racket", "red"]


def test_prepare_warns_when_the_detected_stat_words_are_empty(tmp_path: Path) -> None:
    raw = _gqa_raw(tmp_path)
    lines: list[str] = []
    files = discover_splits("gqa", raw, ["train"])
    report = prepare("gqa", files, tmp_path / "feats.h5", tmp_path / "p", log=lines.append)
    (warning,) = report.warnings
    assert "feats.h5 has no detector labels" in warning and "detected stat words are empty" in warning
    assert warning in lines


def test_dataset_and_collate(gqa: Path) -> None:
    data = VQADataset(gqa, "train", question_len=6, max_boxes=20, num_stat_word=4)
    assert len(data) == 3 and data.num_answers == 3 and data.feature_dim == 8
    batch = collate([data[0], data[2]], data.num_answers)
    assert batch.q_tokens.shape == (2, 6) and batch.q_tokens.dtype == torch.int64
    assert batch.features.shape == (2, 20, 8)  # 12 and 30 boxes, 30 cut to max_boxes = 20
    assert batch.box_mask.sum(1).tolist() == [12, 20]
    assert not batch.features[0, 12:].any()  # padding is zero and masked
    assert batch.q_mask[0].tolist() == [True, True, True, True, False, False]  # "is the dog brown"
    assert batch.targets is not None and batch.targets.shape == (2, 3) and batch.targets.sum().item() == 2.0
    assert batch.graphs.num_graphs == 2 and batch.graphs.x.shape[1] == 4
    assert batch.stat_tokens.shape == (2, 4) and batch.stat_mask.dtype == torch.bool
    assert batch.question_types == ["verify", "query"] and batch.image_ids == ["101", "102"]
    moved = batch.to("cpu")
    assert moved.features.data_ptr() == batch.features.data_ptr()


def test_loader_order_depends_only_on_seed_and_epoch(gqa: Path) -> None:
    data = VQADataset(gqa, "train", question_len=6, max_boxes=20, num_stat_word=4)

    def order(seed: int, epoch: int) -> list[str]:
        cfg = resolve_config("default", sets=[f"train.seed={seed}", "batch_size=1", "data.num_workers=0"]).config
        loader = make_batches(data, cfg, epoch=epoch, train=True)
        return [qid for batch in loader for qid in batch.question_ids]

    assert order(1, 0) == order(1, 0)
    assert sorted(order(1, 0)) == ["q1", "q2", "q3"]
    assert len({tuple(order(s, e)) for s in range(4) for e in range(3)}) > 1


def test_val_split_without_training_answers_keeps_them_out(gqa: Path) -> None:
    data = VQADataset(gqa, "val", question_len=6, max_boxes=50, num_stat_word=4)
    targets = collate([data[0], data[1]], data.num_answers).targets
    assert targets is not None and targets[1].sum() == 0  # "maybe": no label, never label 0


def test_missing_scene_graph_names_file_image_and_question(tmp_path: Path) -> None:
    raw = _gqa_raw(tmp_path)
    path = raw / "sceneGraphs" / "val_sceneGraphs.json"
    graphs = json.loads(path.read_text())
    del graphs["103"]
    path.write_text(json.dumps(graphs))
    with pytest.raises(DataError, match=r"val_sceneGraphs\.json: no scene graph for image 103 \(question q4 of val\)"):
        prepare("gqa", discover_splits("gqa", raw, ["train", "val"]), tmp_path / "feats.h5", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_image_missing_from_the_features(tmp_path: Path) -> None:
    raw = _gqa_raw(tmp_path)
    write_adaptive_h5(tmp_path / "few.h5", {101: 5, 102: 5})
    with pytest.raises(DataError, match=r"few\.h5: 1 image\(s\) of split val have no features, e.g. image 103"):
        prepare("gqa", discover_splits("gqa", raw, ["train", "val"]), tmp_path / "few.h5", tmp_path / "out")


def test_a_failed_prepare_keeps_the_previous_folder(gqa: Path, tmp_path: Path) -> None:
    before = (gqa / "manifest.json").read_text()
    bad = tmp_path / "bad_questions.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match="holds no questions"):
        prepare("gqa", {"train": SplitFiles(bad, scene_graphs=bad)}, tmp_path / "feats.h5", gqa)
    assert (gqa / "manifest.json").read_text() == before


def test_discover_reports_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train_balanced_questions\.json"):
        discover_splits("gqa", tmp_path, ["train"])
    with pytest.raises(DataError, match=r"v2_OpenEnded_mscoco_val2014_questions\.json"):
        discover_splits("vqa", tmp_path, ["val"])


def _vqa_raw(root: Path) -> Path:
    raw = root / "vqa"
    raw.mkdir()
    humans = {
        1: ["2", "two", "2", "2", "3", "2", "2", "2", "2", "2"],
        2: ["red"] * 3 + ["Red"] * 2 + ["maroon"] * 5,
        3: ["yes"] * 10,
    }
    mc = {1: "2", 2: "red", 3: "yes"}
    images = {1: 11, 2: 11, 3: 12}
    qs = [{"image_id": images[q], "question": t, "question_id": q}
          for q, t in ((1, "How many dogs?"), (2, "What color is the bus?"), (3, "Is it sunny?"))]  # fmt: skip
    notes = [
        {"question_type": "how many", "multiple_choice_answer": mc[q], "image_id": images[q], "question_id": q,
         "answer_type": "number" if q == 1 else "other",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(humans[q])]}
        for q in humans
    ]  # fmt: skip
    (raw / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps({"questions": qs}))
    (raw / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({"annotations": notes}))
    write_adaptive_h5(root / "vqa.h5", {11: 15, 12: 10})
    import h5py

    with h5py.File(root / "vqa.h5", "a") as f:
        f.create_dataset("objects_id", data=np.arange(25, dtype=np.int64) % 3)
    (root / "objects_vocab.txt").write_text("dog,doggy\nbus\ntree\n")
    return raw


def test_prepare_vqa_builds_spatial_graphs_with_detector_names(tmp_path: Path) -> None:
    raw = _vqa_raw(tmp_path)
    out = tmp_path / "vqa_processed"
    report = prepare(
        "vqa", discover_splits("vqa", raw, ["train"]), tmp_path / "vqa.h5", out,
        min_answer_count=1, object_vocab=tmp_path / "objects_vocab.txt",
    )  # fmt: skip
    assert report.splits["train"] == {"questions": 3, "images": 2}
    records = {r["question_id"]: r for r in QuestionTable(out / "questions_train")}
    answers = json.loads((out / "answers.json").read_text())["answers"]
    # Official soft scores over normalised human answers: "two" counts as "2" (10 of 10 -> 1.0).
    two = records["1"]
    assert dict(zip((answers[i] for i in two["labels"]), two["scores"], strict=True))["2"] == 1.0
    detected = _graphs(out, "detected")
    graph = detected.graph_of("11")
    assert set(graph.names) == {"dog", "bus", "tree"}
    assert len(graph.names) == 15 and graph.relations
    assert len(_graphs(out, "gt")) == 0
    assert read_manifest(out)["scene_graphs"]["gt_splits"] == []
    data = VQADataset(out, "train", question_len=8, max_boxes=50, num_stat_word=5)
    assert data.graph_sources == {"graphs": "detector", "stat_words": "detector"}
    assert collate([data[i] for i in range(3)], data.num_answers).graphs.num_graphs == 3
    # Detector stat words by count (no confidences in this file): image 12's 10 boxes are dog, bus, tree, dog, ...
    words = Dictionary.load(out / "dictionary.json")
    stats = detected.stat(detected.rows["12"])
    assert [words.id_to_word(i) for i in stats] == ["dog", "bus", "tree"]
    with pytest.raises(DataError, match=r"split 'train' have no ground-truth scene graph.*VQA has none"):
        VQADataset(out, "train", question_len=8, max_boxes=50, num_stat_word=5, scene_graphs="gt")


def test_inspect_processed_passes_and_catches_tampering(gqa: Path) -> None:
    report = inspect_processed(gqa)
    assert report.problems == [], report.problems
    assert "majority" in report.summary["split train"]
    tokens = np.load(gqa / "questions_val" / "tokens.npy")
    tokens[0] = 10_000
    np.save(gqa / "questions_val" / "tokens.npy", tokens)
    problems = inspect_processed(gqa).problems
    assert any("checksum differs" in p for p in problems)
    assert any("word ids outside the dictionary" in p for p in problems)


def test_one_features_file_is_recorded_as_path_and_paths_and_an_older_entry_still_reads(gqa: Path) -> None:
    manifest = read_manifest(gqa)
    entry = manifest["features"]
    assert entry["paths"] == [entry["path"]] and entry["path"].endswith("feats.h5") and entry["layout"] == "adaptive"
    new = VQADataset(gqa, "train", question_len=6, max_boxes=20, num_stat_word=4)[0].features
    del entry["paths"]  # as written before features could be several files
    (gqa / "manifest.json").write_text(json.dumps(manifest))
    old = VQADataset(gqa, "train", question_len=6, max_boxes=20, num_stat_word=4)[0].features
    np.testing.assert_array_equal(old, new)


def test_dataset_errors(gqa: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no split 'test'"):
        VQADataset(gqa, "test", question_len=4, max_boxes=4, num_stat_word=2)
    with pytest.raises(DataError, match="not a processed data folder"):
        VQADataset(tmp_path, "train", question_len=4, max_boxes=4, num_stat_word=2)


def test_prepare_with_glove_stores_the_dictionary_rows(tmp_path: Path) -> None:
    raw = _gqa_raw(tmp_path)
    glove = tmp_path / "glove.6B.4d.txt"
    glove.write_text("the 0.1 0.2 0.3 0.4\ndog 1 2 3 4\nunrelated 9 9 9 9\n")
    out = tmp_path / "p"
    prepare("gqa", discover_splits("gqa", raw, ["train"]), tmp_path / "feats.h5", out, glove=glove)
    words = Dictionary.load(out / "dictionary.json")
    stored = np.load(out / "glove.npz")
    assert stored["vectors"].shape == (len(words), 4) and int(stored["found"]) == 2
    np.testing.assert_allclose(stored["vectors"][words.word_to_id("dog")], [1, 2, 3, 4])
    assert not stored["vectors"][0].any()  # <pad>
    tfidf = np.load(out / "tfidf.npz")
    assert tuple(tfidf["shape"]) == (len(words), len(words)) and len(tfidf["rows"]) == len(tfidf["values"])


# --------------------------------------------------------------------------------------------------
# Ground-truth and detector scene graphs (data.scene_graphs)

TESTDEV = {
    "q6": {"imageId": "104", "question": "What is the dog holding?", "answer": "racket",
           "types": {"structural": "query", "semantic": "rel", "detailed": "relO"}},
    "q7": {"imageId": "103", "question": "Is there a cat?", "answer": "no",
           "types": {"structural": "verify", "semantic": "obj", "detailed": "exist"}},
}  # fmt: skip

# Image 104's four detector boxes (the last four feature rows): class, its confidence, attribute, its confidence.
BOXES_104 = [(0, 0.3, 0, 0.5), (1, 0.9, 1, 0.1), (0, 0.4, 1, 0.2), (2, 0.2, 0, 0.05)]


def _gqa_with_testdev(root: Path) -> Path:
    """The GQA files plus a testdev split without a scene-graph file (as in the official release), whose image
    104 has no ground-truth graph and whose image 103 has one in val's file; features with detector labels."""
    raw = _gqa_raw(root)
    (raw / "questions" / "testdev_balanced_questions.json").write_text(json.dumps(TESTDEV))
    write_adaptive_h5(root / "feats.h5", {101: 12, 102: 30, 103: 60, 104: 4})
    rows = 12 + 30 + 60
    columns = np.asarray([[0, 0.5, 1, 0.5]] * rows + BOXES_104)
    import h5py

    with h5py.File(root / "feats.h5", "a") as f:
        for key, column, dtype in (("objects_id", 0, np.int64), ("objects_conf", 1, np.float32),
                                   ("attrs_id", 2, np.int64), ("attrs_conf", 3, np.float32)):  # fmt: skip
            f.create_dataset(key, data=columns[:, column].astype(dtype))
    (root / "objects_vocab.txt").write_text("dog\ntennis racket,racquet\ntree\n")
    (root / "attributes_vocab.txt").write_text("brown\nsmall\n")
    return raw


@pytest.fixture
def with_testdev(tmp_path: Path) -> Path:
    raw = _gqa_with_testdev(tmp_path)
    files = discover_splits("gqa", raw, ["train", "val", "testdev"])
    assert files["testdev"].scene_graphs is None and files["val"].scene_graphs is not None
    out = tmp_path / "processed"
    vocabs = {"object_vocab": tmp_path / "objects_vocab.txt", "attribute_vocab": tmp_path / "attributes_vocab.txt"}
    report = prepare("gqa", files, tmp_path / "feats.h5", out, **vocabs)
    assert report.gt_splits == ["train", "val"] and report.warnings == []
    return out


def _open(folder: Path, split: str, mode: str = "auto") -> VQADataset:
    return VQADataset(folder, split, question_len=6, max_boxes=50, num_stat_word=10, scene_graphs=mode)  # type: ignore[arg-type]


def test_a_gqa_split_without_scene_graphs_gets_detector_graphs(with_testdev: Path) -> None:
    manifest = read_manifest(with_testdev)
    assert manifest["scene_graphs"]["gt_splits"] == ["train", "val"]
    assert manifest["scene_graphs"]["images_without_gt"] == {"train": 0, "val": 0, "testdev": 1}
    assert set(_graphs(with_testdev, "gt").rows) == {"101", "102", "103"}
    assert set(_graphs(with_testdev, "detected").rows) == {"101", "102", "103", "104"}
    testdev = _open(with_testdev, "testdev")
    assert testdev.graph_sources == {
        "graphs": "ground truth + detector (1 image without ground truth)", "stat_words": "detector",
    }  # fmt: skip
    detected = testdev.graph("104")  # no ground truth: the detector's boxes, named by the vocabularies
    assert detected.names == ["dog", "tennis racket", "dog", "tree"]
    assert detected.attributes == [["brown"], ["small"], ["small"], ["brown"]]
    assert testdev.graph("103").names == ["<empty>"]  # val's ground-truth graph of the same image
    assert collate([testdev[0], testdev[1]], testdev.num_answers).graphs.num_nodes == 4 + 1
    assert inspect_processed(with_testdev).problems == []
    assert "train, val prepared with scene graphs" in inspect_processed(with_testdev).summary["ground-truth graphs"]
    with pytest.raises(DataError) as error:
        _open(with_testdev, "testdev", "gt")
    message = str(error.value)
    assert f"{with_testdev}: data.scene_graphs is 'gt', but 1 of the 2 images of split 'testdev'" in message
    assert "--set data.scene_graphs=auto" in message
    assert _open(with_testdev, "train", "gt").graph_sources == {"graphs": "ground truth", "stat_words": "ground truth"}


def test_detected_stat_words_rank_the_detector_labels_by_confidence(with_testdev: Path) -> None:
    words = Dictionary.load(with_testdev / "dictionary.json")
    detected = _graphs(with_testdev, "detected")
    stats = {image: detected.stat(row).tolist() for image, row in detected.rows.items()}
    # tennis racket 0.9, dog 0.3 + 0.4, brown 0.5 + 0.05, small 0.1 + 0.2, tree 0.2 (a name's last word each).
    assert [words.id_to_word(i) for i in stats["104"]] == ["racket", "dog", "brown", "small", "tree"]
    sample = _open(with_testdev, "testdev")[0]
    assert sample.stat_tokens[: sample.stat_len].tolist() == stats["104"]
    # auto reads the detector's stat words even where the ground-truth graph is used; gt reads the graph's.
    train = _open(with_testdev, "train")
    assert train.graph_sources == {"graphs": "ground truth", "stat_words": "detector"}
    assert [words.id_to_word(i) for i in stats["101"]] == ["dog", "small"]  # every box: dog 0.5, small 0.5
    assert train[0].stat_tokens[: train[0].stat_len].tolist() == stats["101"]
    gt = _open(with_testdev, "train", "gt")[0]
    assert [words.id_to_word(i) for i in gt.stat_tokens[: gt.stat_len]] == ["dog", "brown", "small", "racket", "red"]


def test_detected_mode_gives_a_gqa_train_split_detector_graphs(with_testdev: Path) -> None:
    train = _open(with_testdev, "train", "detected")
    assert train.graph_sources == {"graphs": "detector", "stat_words": "detector"}
    graph = train.graph("101")
    assert graph.object_ids == [str(i) for i in range(12)] and set(graph.names) == {"dog"}  # 12 boxes, not 2 objects
    assert train[0].graph.num_nodes == 12
    assert _open(with_testdev, "train").graph("101").names == ["dog", "tennis racket"]  # auto: the official graph


def test_a_folder_of_an_older_processed_format_is_rejected(gqa: Path) -> None:
    manifest = json.loads((gqa / "manifest.json").read_text())
    (gqa / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    expected = r"was prepared by an older isubg \(processed format 1; .*run `isubg data prepare` again"
    with pytest.raises(DataError, match=expected):
        read_manifest(gqa)
    with pytest.raises(DataError, match=expected):
        VQADataset(gqa, "train", question_len=4, max_boxes=4, num_stat_word=2)
    assert any("older isubg" in p for p in inspect_processed(gqa).problems)


def test_prepare_reports_progress_per_file_and_step(tmp_path: Path) -> None:
    raw = _gqa_raw(tmp_path)
    calls: dict[str, list[tuple[int, int]]] = {}
    prepare("gqa", discover_splits("gqa", raw, ["train", "val"]), tmp_path / "feats.h5", tmp_path / "out",
            progress=lambda what, done, total: calls.setdefault(what, []).append((done, total)))  # fmt: skip
    expected = {"detector scene graphs": 3, "writing questions_train": 3, "writing questions_val": 2}
    for split in ("train", "val"):
        for name in (f"questions/{split}_balanced_questions.json", f"sceneGraphs/{split}_sceneGraphs.json"):
            expected[f"reading {Path(name).name}"] = (raw / name).stat().st_size
    assert set(calls) == set(expected)
    for what, total in expected.items():
        assert calls[what][-1] == (total, total), what
        assert what.startswith("reading") or calls[what][0] == (0, total), what  # a bar shows before the work
        assert [d for d, _ in calls[what]] == sorted(d for d, _ in calls[what])


def test_prepare_is_idempotent_and_cleans_up_after_a_killed_run(tmp_path: Path) -> None:
    raw = _gqa_raw(tmp_path)
    files = discover_splits("gqa", raw, ["train", "val"])
    out = tmp_path / "out"
    prepare("gqa", files, tmp_path / "feats.h5", out)
    first = read_manifest(out)["files"]
    stale = tmp_path / ".out.tmp-1"  # what a prepare killed mid-way leaves
    (stale / "questions_train").mkdir(parents=True)
    logged: list[str] = []
    prepare("gqa", files, tmp_path / "feats.h5", out, log=logged.append)
    assert read_manifest(out)["files"] == first  # byte for byte the same files
    assert not stale.exists() and any("interrupted prepare" in line for line in logged)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
