"""Build the processed data folder that training reads, from official GQA / VQA v2 files and box features.

`prepare()` checks every cross-reference up front (each question's image has features and, for GQA,
a scene graph) and writes, into a temporary folder renamed into place at the end:

    manifest.json          dataset, splits and counts, settings, isubg version, sha256 of every file
    dictionary.json        question words (+ scene-graph words, so stat words embed with the same table)
    answers.json           the answer vocabulary (from the training split)
    graph_vocab.json       scene-graph tokens (names, attributes, relations as whole phrases)
    questions_<split>.json one record per question: ids, text, word ids, entity flags, targets, raw answers
    graphs.json            image id -> scene graph (GQA: the official graph; VQA: built from the boxes)
    stat_words.json        image id -> statistical word ids, most frequent first (up to 50)
    tfidf.npz              the tf-idf weights over the training questions (rows, cols, values, shape)
    glove.npz              GloVe rows for the dictionary (only when a GloVe file is given)

Word dictionary: built from the question text of every split (no answers are used, so nothing leaks)
plus the scene-graph names and attributes. Answer vocabulary: the training split only.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from isubg import __version__
from isubg.data import answers as ans
from isubg.data.features import FeatureStore
from isubg.data.files import read_json, sha256_file, write_json_atomic
from isubg.data.questions import Question, load_gqa_questions, load_vqa_questions
from isubg.data.scene_graphs import GraphVocab, SceneGraph, load_gqa_scene_graphs, spatial_scene_graph, stat_words
from isubg.data.text import Dictionary, load_glove, tfidf_matrix, tokenize
from isubg.errors import DataError

__all__ = ["MAX_STAT_WORDS", "PrepareReport", "SplitFiles", "prepare"]

MAX_STAT_WORDS = 50  # stored per image; training takes the first data.num_stat_word
Log = Callable[[str], None]


@dataclass(frozen=True)
class SplitFiles:
    """The official files of one split."""

    questions: Path
    annotations: Path | None = None  # VQA labelled splits
    scene_graphs: Path | None = None  # GQA


@dataclass
class PrepareReport:
    """What `prepare` wrote."""

    output: Path
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    dictionary: int = 0
    answers: int = 0
    out_of_vocab: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _load_questions(dataset: str, files: SplitFiles) -> list[Question]:
    if dataset == "gqa":
        return load_gqa_questions(files.questions)
    return load_vqa_questions(files.questions, files.annotations)


def _check_features(store: FeatureStore, questions: dict[str, list[Question]]) -> None:
    for split, items in questions.items():
        missing = sorted({q.image_id for q in items if q.image_id not in store})
        if missing:
            example = next(q for q in items if q.image_id == missing[0])
            raise DataError(
                f"{store.path}: {len(missing)} image(s) of split {split} have no features, e.g. image "
                f"{missing[0]} of question {example.question_id}"
            )


def _gqa_graphs(splits: dict[str, SplitFiles], questions: dict[str, list[Question]]) -> dict[str, SceneGraph]:
    graphs: dict[str, SceneGraph] = {}
    for split, files in splits.items():
        if files.scene_graphs is None:
            raise DataError(f"GQA split {split}: no scene-graph file given (--scene-graphs)")
        loaded = load_gqa_scene_graphs(files.scene_graphs)
        for q in questions[split]:
            if q.image_id not in loaded and q.image_id not in graphs:
                raise DataError(
                    f"{files.scene_graphs}: no scene graph for image {q.image_id} (question {q.question_id} of {split})"
                )
        graphs.update({k: v for k, v in loaded.items() if k not in graphs})
    return graphs


def _read_vocab_lines(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the detector vocabulary ({exc})") from None
    # The bottom-up release lists synonyms on one line ("bicycle,bike"); the first one names the class.
    return [line.split(",")[0].strip() for line in lines]


def _name(vocab: list[str] | None, index: int, what: str, path: Path | None) -> str:
    if vocab is None:
        return "object" if what == "object" else ""
    if not 0 <= index < len(vocab):
        raise DataError(f"{path}: the features use {what} class {index}, but the file lists {len(vocab)} classes")
    return vocab[index]


def _vqa_graphs(
    store: FeatureStore, image_ids: Iterable[str], objects: Path | None, attributes: Path | None
) -> dict[str, SceneGraph]:
    """Scene graphs from the boxes (and detector labels when the features carry them)."""
    object_names, attribute_names = _read_vocab_lines(objects), _read_vocab_lines(attributes)
    graphs = {}
    for image_id in image_ids:
        boxes = store.get(image_id)
        size = store.image_size(image_id)
        # Without a recorded image size, the normalised spatials are the boxes of a 1 x 1 image.
        pixel, (width, height) = (boxes.boxes, size) if size else (boxes.spatials[:, :4], (1.0, 1.0))
        labels = None
        if boxes.labels is not None:
            labels = [_name(object_names, int(i), "object", objects) for i in boxes.labels]
        attrs = None
        if boxes.attributes is not None and attribute_names is not None:
            attrs = [[_name(attribute_names, int(i), "attribute", attributes)] for i in boxes.attributes]
        graphs[image_id] = spatial_scene_graph(pixel, width, height, labels=labels, attributes=attrs)
    return graphs


def _entity_flags(tokens: Sequence[str], names: set[tuple[str, ...]], longest: int) -> list[int]:
    """1 on question tokens that spell a scene-graph object name (longest match first), else 0."""
    flags = [0] * len(tokens)
    i = 0
    while i < len(tokens):
        for span in range(min(longest, len(tokens) - i), 0, -1):
            if tuple(tokens[i : i + span]) in names:
                flags[i : i + span] = [1] * span
                i += span
                break
        else:
            i += 1
    return flags


def _answer_vocab(dataset: str, train: list[Question], min_count: int | None) -> ans.AnswerVocab:
    labelled = [q.answer for q in train if q.answer is not None]
    if not labelled:
        raise DataError("the training split has no answers; cannot build the answer vocabulary")
    if dataset == "vqa":
        return ans.build_vqa_vocab(labelled, min_count=min_count or ans.VQA_MIN_COUNT)
    return ans.build_gqa_vocab(labelled, min_count=min_count or ans.GQA_MIN_COUNT)


def _target(dataset: str, q: Question, vocab: ans.AnswerVocab) -> ans.Target | None:
    if q.answer is None:
        return None
    if dataset == "vqa":
        return ans.vqa_target(q.human_answers, vocab)
    return ans.gqa_target(q.answer, vocab)


def _records(
    dataset: str,
    items: list[Question],
    words: Dictionary,
    vocab: ans.AnswerVocab,
    names: set[tuple[str, ...]],
) -> tuple[list[dict[str, Any]], int]:
    longest = max((len(n) for n in names), default=1)
    out, unanswerable = [], 0
    for q in items:
        tokens = tokenize(q.text)
        target = _target(dataset, q, vocab)
        if target is not None and target.is_empty:
            unanswerable += 1
        out.append(
            {
                "question_id": q.question_id,
                "image_id": q.image_id,
                "question": q.text,
                "tokens": [words.word_to_id(t) for t in tokens],
                "entity": _entity_flags(tokens, names, longest),
                "labels": None if target is None else list(target.labels),
                "scores": None if target is None else list(target.scores),
                "answer": q.answer,
                "answers": list(q.human_answers),
                "qtype": q.qtype,
                "detail": q.detail,
            }
        )
    return out, unanswerable


def _graph_words(graphs: Iterable[SceneGraph]) -> Iterable[str]:
    for graph in graphs:
        yield from graph.names
        for attrs in graph.attributes:
            yield from attrs


def prepare(
    dataset: Literal["gqa", "vqa"],
    splits: dict[str, SplitFiles],
    features: Path,
    output: Path,
    *,
    train_split: str = "train",
    glove: Path | None = None,
    min_answer_count: int | None = None,
    object_vocab: Path | None = None,
    attribute_vocab: Path | None = None,
    log: Log = lambda _: None,
) -> PrepareReport:
    """Check and convert one dataset into a processed folder (see the module docstring).

    Raises:
        DataError: any unreadable or inconsistent input: the message names the file and record.
    """
    start = time.perf_counter()
    if train_split not in splits:
        raise DataError(f"the training split '{train_split}' is not among the given splits {sorted(splits)}")
    log("reading questions")
    questions = {name: _load_questions(dataset, files) for name, files in splits.items()}
    store = FeatureStore(features)
    _check_features(store, questions)
    log("building scene graphs")
    image_ids = sorted({q.image_id for items in questions.values() for q in items})
    if dataset == "gqa":
        graphs = _gqa_graphs(splits, questions)
        graphs = {i: graphs[i] for i in image_ids}
    else:
        graphs = _vqa_graphs(store, image_ids, object_vocab, attribute_vocab)
    log("building vocabularies")
    texts = [q.text for items in questions.values() for q in items]
    words = Dictionary.build([*texts, *(" ".join(tokenize(w)) for w in _graph_words(graphs.values()))])
    vocab = _answer_vocab(dataset, questions[train_split], min_answer_count)
    graph_vocab = GraphVocab.build(graphs.values())
    names = {tuple(tokenize(n)) for g in graphs.values() for n in g.names if n != "<empty>"}
    return _write(
        output,
        dataset=dataset,
        questions=questions,
        graphs=graphs,
        words=words,
        vocab=vocab,
        graph_vocab=graph_vocab,
        names=names,
        features=store,
        glove=glove,
        train_split=train_split,
        log=log,
        start=start,
    )


def _write(output: Path, **parts: Any) -> PrepareReport:
    """Write every file into a temporary folder, then move it into place."""
    tmp = output.with_name(f".{output.name}.tmp-{int(time.time() * 1000)}")
    tmp.mkdir(parents=True)
    try:
        report = _write_files(tmp, output, **parts)
        if output.exists():
            old = output.with_name(f".{output.name}.old-{int(time.time() * 1000)}")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return report


def _write_files(
    tmp: Path,
    output: Path,
    *,
    dataset: str,
    questions: dict[str, list[Question]],
    graphs: dict[str, SceneGraph],
    words: Dictionary,
    vocab: ans.AnswerVocab,
    graph_vocab: GraphVocab,
    names: set[tuple[str, ...]],
    features: FeatureStore,
    glove: Path | None,
    train_split: str,
    log: Log,
    start: float,
) -> PrepareReport:
    report = PrepareReport(output=output, dictionary=len(words), answers=len(vocab))
    words.save(tmp / "dictionary.json")
    write_json_atomic(tmp / "answers.json", vocab.to_json())
    graph_vocab.save(tmp / "graph_vocab.json")
    log("writing questions")
    for split, items in questions.items():
        records, unanswerable = _records(dataset, items, words, vocab, names)
        write_json_atomic(tmp / f"questions_{split}.json", records)
        report.splits[split] = {"questions": len(records), "images": len({q.image_id for q in items})}
        report.out_of_vocab[split] = unanswerable
    write_json_atomic(tmp / "graphs.json", {i: g.to_json() for i, g in graphs.items()})
    stats = {i: [words.word_to_id(w) for w in _stat_tokens(g)] for i, g in graphs.items()}
    write_json_atomic(tmp / "stat_words.json", stats)
    log("computing tf-idf")
    train_docs = [[words.word_to_id(t) for t in tokenize(q.text)] for q in questions[train_split]]
    tfidf = tfidf_matrix(train_docs, len(words))
    np.savez(tmp / "tfidf.npz", rows=tfidf.rows, cols=tfidf.cols, values=tfidf.values, shape=np.asarray(tfidf.shape))
    if glove is not None:
        log("reading GloVe")
        matrix, found = load_glove(glove, words)
        np.savez(tmp / "glove.npz", vectors=matrix, found=np.asarray(found))
    report.seconds = time.perf_counter() - start
    _write_manifest(tmp, report, dataset=dataset, features=features, glove=glove, train_split=train_split)
    return report


def _stat_tokens(graph: SceneGraph) -> list[str]:
    # Stat words are single dictionary words: a multi-word name contributes its last word ("tennis racket" ->
    # "racket"), which carries the object class.
    out: list[str] = []
    for phrase in stat_words(graph, MAX_STAT_WORDS):
        tokens = tokenize(phrase)
        if tokens and tokens[-1] not in out:
            out.append(tokens[-1])
    return out


def _write_manifest(tmp: Path, report: PrepareReport, **info: Any) -> None:
    features: FeatureStore = info.pop("features")
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()
    }
    manifest = {
        "format": "isubg-processed",
        "format_version": 1,
        "isubg_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": info["dataset"],
        "train_split": info["train_split"],
        "splits": report.splits,
        "unanswerable": report.out_of_vocab,
        "dictionary_size": report.dictionary,
        "answer_count": report.answers,
        "features": {
            "path": str(features.path.resolve()),
            "bytes": features.path.stat().st_size,
            "layout": features.layout,
            "feature_dim": features.feature_dim,
            "images": len(features),
        },
        "glove": None if info["glove"] is None else str(Path(info["glove"]).resolve()),
        "files": files,
    }
    write_json_atomic(tmp / "manifest.json", manifest, indent=2)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a processed folder, checked to be one.

    Raises:
        DataError: the folder has no manifest or it is not an isubg processed folder.
    """
    path = folder / "manifest.json"
    if not path.exists():
        raise DataError(f"{folder}: not a processed data folder (no manifest.json); build one with isubg data prepare")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != "isubg-processed":
        raise DataError(f"{path}: not an isubg processed-data manifest")
    return manifest


# -------------------------------------------------------------------------------------------------
# Finding the official files in a download folder

# Our split names -> the official VQA v2 subtype names.
VQA_SUBTYPES = {"train": "train2014", "val": "val2014", "testdev": "test-dev2015", "test": "test2015"}


def _find(raw: Path, name: str) -> Path | None:
    """`raw/name` or `raw/*/name` (the official archives unpack into one sub-folder)."""
    direct = raw / name
    if direct.is_file():
        return direct
    return next((p for p in sorted(raw.glob(f"*/{name}")) if p.is_file()), None)


def discover_splits(dataset: Literal["gqa", "vqa"], raw: Path, splits: Sequence[str]) -> dict[str, SplitFiles]:
    """Locate each split's official files under `raw` by their release names.

    GQA: `{split}_balanced_questions.json` (or `{split}_all_questions.json`) and `{split}_sceneGraphs.json`.
    VQA v2: `v2_OpenEnded_mscoco_{sub}_questions.json` and `v2_mscoco_{sub}_annotations.json`, where
    `sub` is train2014 / val2014 / test-dev2015 / test2015 for train / val / testdev / test (an
    annotations file is optional: test splits have none).

    Raises:
        DataError: a split's questions (or GQA scene graphs) cannot be found; the message lists the names tried.
    """
    found: dict[str, SplitFiles] = {}
    for split in splits:
        if dataset == "gqa":
            names = [f"{split}_balanced_questions.json", f"{split}_all_questions.json"]
            questions = next((p for n in names if (p := _find(raw, n))), None)
            graphs = _find(raw, f"{split}_sceneGraphs.json")
            if questions is None or graphs is None:
                tried = names if questions is None else [f"{split}_sceneGraphs.json"]
                raise DataError(
                    f"{raw}: split {split}: none of {', '.join(tried)} found (searched {raw} and its sub-folders)"
                )
            found[split] = SplitFiles(questions=questions, scene_graphs=graphs)
        else:
            sub = VQA_SUBTYPES.get(split, split)
            name = f"v2_OpenEnded_mscoco_{sub}_questions.json"
            questions = _find(raw, name)
            if questions is None:
                raise DataError(f"{raw}: split {split}: {name} not found (searched {raw} and its sub-folders)")
            found[split] = SplitFiles(questions=questions, annotations=_find(raw, f"v2_mscoco_{sub}_annotations.json"))
    return found
