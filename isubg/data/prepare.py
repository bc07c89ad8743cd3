"""Build the processed data folder that training reads, from official GQA / VQA v2 files and box features.

`prepare()` checks every cross-reference up front (each question's image has features and, for a GQA split
given a scene-graph file, a scene graph) and writes, into a temporary folder renamed into place at the end:

    manifest.json            dataset, splits and counts, scene-graph sources, settings, isubg version, sha256s
    dictionary.json          question words (+ the words of both kinds of graphs, so stat words embed alike)
    answers.json             the answer vocabulary (from the training split)
    graph_vocab.json         scene-graph tokens of both kinds of graphs (names, attributes, whole relations)
    questions_<split>/       one row per question: ids, text, word ids, entity flags, targets, raw answers, and
                             the rows of its image's graphs (a memory-mapped table, isubg.data.tables)
    graphs_gt/               the official GQA scene graphs, with the stat word ids taken from each (most frequent
                             first, <= 50); only images that have one (no rows for VQA)
    graphs_detected/         scene graphs built from the detector boxes and labels, with the detector's stat word
                             ids (most confident first, <= 50); every image
    tfidf.npz                the tf-idf weights over the training questions (rows, cols, values, shape)
    glove.npz                GloVe rows for the dictionary (only when a GloVe file is given)

Two kinds of scene graphs and stat words are kept because they are not equally honest: GQA's testdev and
test images have no public scene graphs, so a model that reads ground-truth graphs (or stat words taken from
them) sees more than it can at test time. Readers pick per `data.scene_graphs` (see `graph_sources`): `auto`
takes the ground-truth graph where the image has one, else the detector's, and always the detector's stat
words; `gt` takes both from the ground truth; `detected` both from the detector.

Word dictionary: built from the question text of every split (no answers are used, so nothing leaks)
plus the names and attributes of both kinds of graphs. Answer vocabulary: the training split only.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from isubg import __version__
from isubg.data import answers as ans
from isubg.data.features import FeatureShards, FeatureStore, open_features
from isubg.data.files import read_json, sha256_file, write_json_atomic
from isubg.data.questions import Question, load_gqa_questions, load_vqa_questions
from isubg.data.scene_graphs import (
    GraphVocab,
    SceneGraph,
    detector_stat_words,
    load_gqa_scene_graphs,
    spatial_scene_graph,
    stat_words,
)
from isubg.data.tables import GraphWriter, QuestionWriter
from isubg.data.text import Dictionary, load_glove, tfidf_matrix, tokenize
from isubg.errors import DataError

__all__ = [
    "FORMAT_VERSION",
    "MAX_STAT_WORDS",
    "PrepareReport",
    "SceneGraphMode",
    "SplitFiles",
    "describe_sources",
    "discover_splits",
    "graph_sources",
    "prepare",
    "read_manifest",
]

MAX_STAT_WORDS = 50  # stored per image; training takes the first data.num_stat_word
# 2: graphs_gt/graphs_detected and stat_words_gt/stat_words_detected replace graphs.json and stat_words.json.
# 3: questions and scene graphs (with their stat words) are memory-mapped tables (isubg.data.tables), not JSON.
FORMAT_VERSION = 3
Log = Callable[[str], None]
# progress(what, done, total): called as each long step advances ("reading train_balanced_questions.json" in
# bytes, "detector scene graphs" in images, "writing questions_train" in questions), last with done == total.
Progress = Callable[[str, int, int], None]
T = TypeVar("T")
_EVERY = 2000  # items between progress calls


def _no_progress(what: str, done: int, total: int) -> None:
    """The default progress hook: report nothing."""


def _reporting(items: Iterable[T], total: int, what: str, progress: Progress) -> Iterator[T]:
    """`items`, reporting `what` to `progress` before the first, every `_EVERY` items and after the last."""
    for done, item in enumerate(items):
        if done % _EVERY == 0:
            progress(what, done, total)
        yield item
    progress(what, total, total)


SceneGraphMode = Literal["auto", "gt", "detected"]  # data.scene_graphs


@dataclass(frozen=True)
class SplitFiles:
    """The official files of one split."""

    questions: Path
    annotations: Path | None = None  # VQA labelled splits
    scene_graphs: Path | None = None  # GQA; None for a split without public scene graphs (testdev, test)


@dataclass
class PrepareReport:
    """What `prepare` wrote."""

    output: Path
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    dictionary: int = 0
    answers: int = 0
    out_of_vocab: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    gt_splits: list[str] = field(default_factory=list)  # splits prepared with ground-truth scene graphs
    warnings: list[str] = field(default_factory=list)  # worth a user's attention, e.g. empty detected stat words


def _reading(progress: Progress, *paths: Path | None) -> Callable[[int, int], None]:
    """The byte-progress hook of the file loaders, reported as "reading NAME[ + NAME]"."""
    what = "reading " + " + ".join(p.name for p in paths if p is not None)
    return lambda done, total: progress(what, done, total)


def _load_questions(dataset: str, files: SplitFiles, progress: Progress = _no_progress) -> list[Question]:
    if dataset == "gqa":
        return load_gqa_questions(files.questions, on_progress=_reading(progress, files.questions))
    on_progress = _reading(progress, files.annotations, files.questions)
    return load_vqa_questions(files.questions, files.annotations, on_progress=on_progress)


def _check_features(store: FeatureStore, questions: dict[str, list[Question]]) -> None:
    for split, items in questions.items():
        missing = sorted({q.image_id for q in items if q.image_id not in store})
        if missing:
            example = next(q for q in items if q.image_id == missing[0])
            raise DataError(
                f"{store.path}: {len(missing)} image(s) of split {split} have no features, e.g. image "
                f"{missing[0]} of question {example.question_id}"
            )


def _gqa_graphs(
    splits: dict[str, SplitFiles], questions: dict[str, list[Question]], progress: Progress = _no_progress
) -> dict[str, SceneGraph]:
    """The official graphs of the splits that have a scene-graph file; each of their images must have one."""
    graphs: dict[str, SceneGraph] = {}
    for split, files in splits.items():
        if files.scene_graphs is None:
            continue  # no public graphs (GQA testdev/test): its images get detector graphs only
        loaded = load_gqa_scene_graphs(files.scene_graphs, on_progress=_reading(progress, files.scene_graphs))
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


def _named_labels(store: FeatureStore, objects: Path | None, attributes: Path | None) -> list[str]:
    """Which detector labels can be named, and so give stat words: "object names" and/or "attribute names"."""
    named = []
    if "objects_id" in store.optional and objects is not None:
        named.append("object names")
    if "attrs_id" in store.optional and attributes is not None:
        named.append("attribute names")
    return named


def _label_warning(store: FeatureStore, objects: Path | None, attributes: Path | None) -> str | None:
    """A warning line when no detector label can be named, so that every detected stat-word list is empty."""
    if _named_labels(store, objects, attributes):
        return None
    if not {"objects_id", "attrs_id"} & set(store.optional):
        why = f"{store.path} has no detector labels (objects_id / attrs_id)"
    else:
        why = "neither --object-vocab nor --attribute-vocab names the detector labels of the features"
    return f"warning: {why}, so the detected stat words are empty (data.scene_graphs auto and detected use them)"


def _detected_graphs(
    store: FeatureStore,
    image_ids: Sequence[str],
    objects: Path | None,
    attributes: Path | None,
    progress: Progress = _no_progress,
) -> tuple[dict[str, SceneGraph], dict[str, list[str]]]:
    """Scene graphs and stat-word phrases built from the detector, for every image.

    Graph nodes are the boxes, named by the detector's class when the features carry `objects_id` (else
    "object"), with the box's attribute when they carry `attrs_id` and an attribute vocabulary is given. Stat
    words rank only labels a vocabulary names (`detector_stat_words`): a box called "object" for want of a
    vocabulary tells the model nothing.
    """
    object_names, attribute_names = _read_vocab_lines(objects), _read_vocab_lines(attributes)
    graphs, words = {}, {}
    for image_id in _reporting(image_ids, len(image_ids), "detector scene graphs", progress):
        boxes = store.get(image_id)
        size = store.image_size(image_id)
        # Without a recorded image size, the normalised spatials are the boxes of a 1 x 1 image.
        pixel, (width, height) = (boxes.boxes, size) if size else (boxes.spatials[:, :4], (1.0, 1.0))
        labels = None
        if boxes.labels is not None:
            labels = [_name(object_names, int(i), "object", objects) for i in boxes.labels]
        named_attrs = None
        if boxes.attributes is not None and attribute_names is not None:
            named_attrs = [_name(attribute_names, int(i), "attribute", attributes) for i in boxes.attributes]
        attrs = None if named_attrs is None else [[a] for a in named_attrs]
        graphs[image_id] = spatial_scene_graph(pixel, width, height, labels=labels, attributes=attrs)
        words[image_id] = detector_stat_words(
            labels if object_names is not None else None,
            named_attrs,
            MAX_STAT_WORDS,
            name_conf=boxes.label_conf,
            attribute_conf=boxes.attribute_conf,
        )
    return graphs, words


@dataclass(frozen=True)
class _SceneGraphs:
    """Both kinds of scene graphs of the images used, and what the manifest records about them."""

    gt: dict[str, SceneGraph]  # only images with an official graph
    detected: dict[str, SceneGraph]  # every image
    detected_words: dict[str, list[str]]  # every image: stat-word phrases from the detector labels
    sources: dict[str, Any]  # the manifest's "scene_graphs" entry

    @property
    def every(self) -> list[SceneGraph]:
        """Every graph of both kinds: the dictionary, graph vocabulary and entity names cover them all."""
        return [*self.gt.values(), *self.detected.values()]


def _scene_graphs(
    dataset: str,
    splits: dict[str, SplitFiles],
    questions: dict[str, list[Question]],
    store: FeatureStore,
    vocabs: tuple[Path | None, Path | None],
    progress: Progress = _no_progress,
) -> _SceneGraphs:
    """Official graphs (GQA splits with a scene-graph file) and detector graphs and stat words (every image)."""
    image_ids = sorted({q.image_id for items in questions.values() for q in items})
    loaded = _gqa_graphs(splits, questions, progress) if dataset == "gqa" else {}
    gt = {i: loaded[i] for i in image_ids if i in loaded}
    detected, words = _detected_graphs(store, image_ids, *vocabs, progress=progress)
    sources = {
        "gt_splits": [s for s, f in splits.items() if dataset == "gqa" and f.scene_graphs is not None],
        "detected": True,
        # Per split, not per file: an image may have a graph from another split's file.
        "images_without_gt": {s: len({q.image_id for q in items} - gt.keys()) for s, items in questions.items()},
        "detector_labels": _named_labels(store, *vocabs),
    }
    return _SceneGraphs(gt=gt, detected=detected, detected_words=words, sources=sources)


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
) -> Iterator[dict[str, Any]]:
    """One question record (the keys of `QuestionTable.record`) at a time: never a whole split of dicts."""
    longest = max((len(n) for n in names), default=1)
    for q in items:
        tokens = tokenize(q.text)
        target = _target(dataset, q, vocab)
        yield {
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


def _graph_words(graphs: Iterable[SceneGraph]) -> Iterable[str]:
    for graph in graphs:
        yield from graph.names
        for attrs in graph.attributes:
            yield from attrs


def prepare(
    dataset: Literal["gqa", "vqa"],
    splits: dict[str, SplitFiles],
    features: Path | Sequence[Path],
    output: Path,
    *,
    train_split: str = "train",
    glove: Path | None = None,
    min_answer_count: int | None = None,
    object_vocab: Path | None = None,
    attribute_vocab: Path | None = None,
    log: Log = lambda _: None,
    progress: Progress = _no_progress,
) -> PrepareReport:
    """Check and convert one dataset into a processed folder (see the module docstring).

    Every image gets a graph and stat words built from the detector (`object_vocab` / `attribute_vocab` name
    the features' `objects_id` / `attrs_id`); GQA images of splits given a scene-graph file also get the
    official graph and stat words taken from it. When no detector label can be named, the detected stat words
    are empty and `PrepareReport.warnings` (and `log`) says so.

    Raises:
        DataError: any unreadable or inconsistent input: the message names the file and record.
    """
    start = time.perf_counter()
    if train_split not in splits:
        raise DataError(f"the training split '{train_split}' is not among the given splits {sorted(splits)}")
    log("reading questions")
    questions = {name: _load_questions(dataset, files, progress) for name, files in splits.items()}
    store = open_features(features)  # several files: shards with one image-id map (FeatureShards)
    _check_features(store, questions)
    log("building scene graphs")
    graphs = _scene_graphs(dataset, splits, questions, store, (object_vocab, attribute_vocab), progress)
    warning = _label_warning(store, object_vocab, attribute_vocab)
    if warning:
        log(warning)
    log("building vocabularies")
    texts = [q.text for items in questions.values() for q in items]
    words = Dictionary.build([*texts, *(" ".join(tokenize(w)) for w in _graph_words(graphs.every))])
    vocab = _answer_vocab(dataset, questions[train_split], min_answer_count)
    graph_vocab = GraphVocab.build(graphs.every)
    names = {tuple(tokenize(n)) for g in graphs.every for n in g.names if n != "<empty>"}
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
        warnings=[warning] if warning else [],
        log=log,
        progress=progress,
        start=start,
    )


def _write(output: Path, **parts: Any) -> PrepareReport:
    """Write every file into a temporary folder, then move it into place.

    So `output` is either the old folder or the complete new one, never a mix; a rerun after a crash removes
    the crashed run's temporary folder and writes the same files (prepare is deterministic).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in sorted(output.parent.glob(f".{output.name}.tmp-*")) + sorted(
        output.parent.glob(f".{output.name}.old-*")
    ):
        # Left by a prepare that was killed: it never became `output`, and a rerun rebuilds it all.
        shutil.rmtree(stale, ignore_errors=True)
        parts["log"](f"removed {stale}, left by an interrupted prepare")
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
    graphs: _SceneGraphs,
    words: Dictionary,
    vocab: ans.AnswerVocab,
    graph_vocab: GraphVocab,
    names: set[tuple[str, ...]],
    features: FeatureStore,
    glove: Path | None,
    train_split: str,
    warnings: list[str],
    log: Log,
    progress: Progress,
    start: float,
) -> PrepareReport:
    report = PrepareReport(output=output, dictionary=len(words), answers=len(vocab), warnings=list(warnings))
    report.gt_splits = list(graphs.sources["gt_splits"])
    words.save(tmp / "dictionary.json")
    write_json_atomic(tmp / "answers.json", vocab.to_json())
    graph_vocab.save(tmp / "graph_vocab.json")
    gt, detected = _write_graphs(tmp, graphs, words, graph_vocab, log)
    log("writing questions")
    for split, items in questions.items():
        table, unanswerable = QuestionWriter(), 0
        records = _records(dataset, items, words, vocab, names)
        for record in _reporting(records, len(items), f"writing questions_{split}", progress):
            unanswerable += record["labels"] == []
            table.add(record, gt.rows.get(record["image_id"], -1), detected.rows[record["image_id"]])
        table.write(tmp / f"questions_{split}")
        report.splits[split] = {"questions": len(table), "images": len({q.image_id for q in items})}
        report.out_of_vocab[split] = unanswerable
    log("computing tf-idf")
    train_docs = [[words.word_to_id(t) for t in tokenize(q.text)] for q in questions[train_split]]
    tfidf = tfidf_matrix(train_docs, len(words))
    np.savez(tmp / "tfidf.npz", rows=tfidf.rows, cols=tfidf.cols, values=tfidf.values, shape=np.asarray(tfidf.shape))
    if glove is not None:
        log("reading GloVe")
        matrix, found = load_glove(glove, words)
        np.savez(tmp / "glove.npz", vectors=matrix, found=np.asarray(found))
    report.seconds = time.perf_counter() - start
    _write_manifest(
        tmp,
        report,
        dataset=dataset,
        features=features,
        glove=glove,
        train_split=train_split,
        scene_graphs=graphs.sources,
    )
    return report


def _write_graphs(
    tmp: Path, graphs: _SceneGraphs, words: Dictionary, vocab: GraphVocab, log: Log
) -> tuple[GraphWriter, GraphWriter]:
    """Write graphs_gt/ and graphs_detected/ (each graph with its image's stat-word ids); return their writers."""
    log("writing scene graphs")
    gt = GraphWriter(vocab, object_ids=True)
    for image_id, graph in graphs.gt.items():
        gt.add(image_id, graph, _stat_tokens(stat_words(graph, MAX_STAT_WORDS), words))
    gt.write(tmp / "graphs_gt")
    detected = GraphWriter(vocab, object_ids=False)
    for image_id, graph in graphs.detected.items():
        detected.add(image_id, graph, _stat_tokens(graphs.detected_words[image_id], words))
    detected.write(tmp / "graphs_detected")
    return gt, detected


def _stat_tokens(phrases: Iterable[str], words: Dictionary) -> list[int]:
    """Dictionary ids of ranked stat-word phrases, one word per phrase, first occurrence kept."""
    # Stat words are single dictionary words: a multi-word name contributes its last word ("tennis racket" ->
    # "racket"), which carries the object class.
    out: list[str] = []
    for phrase in phrases:
        tokens = tokenize(phrase)
        if tokens and tokens[-1] not in out:
            out.append(tokens[-1])
    return [words.word_to_id(w) for w in out]


def _write_manifest(tmp: Path, report: PrepareReport, **info: Any) -> None:
    features: FeatureStore | FeatureShards = info.pop("features")
    files = {
        p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    manifest = {
        "format": "isubg-processed",
        "format_version": FORMAT_VERSION,
        "isubg_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": info["dataset"],
        "train_split": info["train_split"],
        "splits": report.splits,
        "unanswerable": report.out_of_vocab,
        "dictionary_size": report.dictionary,
        "answer_count": report.answers,
        "features": {
            # "path" for one file (readable at a glance), "paths" always; readers use features.recorded_paths.
            **({"path": str(features.paths[0].resolve())} if len(features.paths) == 1 else {}),
            "paths": [str(p.resolve()) for p in features.paths],
            "bytes": sum(p.stat().st_size for p in features.paths),
            "layout": features.layout,
            "feature_dim": features.feature_dim,
            "images": len(features),
        },
        "glove": None if info["glove"] is None else str(Path(info["glove"]).resolve()),
        "scene_graphs": info["scene_graphs"],
        "files": files,
    }
    write_json_atomic(tmp / "manifest.json", manifest, indent=2)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a processed folder, checked to be one this isubg reads.

    Raises:
        DataError: the folder has no manifest, it is not an isubg processed folder, or it has another
            processed format (an older one must be prepared again).
    """
    path = folder / "manifest.json"
    if not path.exists():
        raise DataError(f"{folder}: not a processed data folder (no manifest.json); build one with isubg data prepare")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != "isubg-processed":
        raise DataError(f"{path}: not an isubg processed-data manifest")
    version = manifest.get("format_version")
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise DataError(
            f"{folder} was prepared by an older isubg (processed format {version}; this isubg reads format "
            f"{FORMAT_VERSION}, memory-mapped question and scene-graph tables); run `isubg data prepare` "
            "again to rebuild it"
        )
    if version != FORMAT_VERSION:
        raise DataError(
            f"{folder}: processed format {version!r} is not format {FORMAT_VERSION}, the one this isubg reads; "
            "prepare it with this isubg"
        )
    return manifest


def _gt_coverage(manifest: Mapping[str, Any], split: str) -> tuple[int, int]:
    """(images of `split` without a ground-truth scene graph, images of `split`) from a manifest."""
    images = int(manifest["splits"][split]["images"])
    return int(manifest["scene_graphs"]["images_without_gt"].get(split, images)), images


def graph_sources(manifest: Mapping[str, Any], split: str, mode: SceneGraphMode, folder: Path) -> dict[str, str]:
    """Where the questions of `split` get their scene graphs and stat words under `mode` (data.scene_graphs).

    Returns:
        {"graphs": "ground truth" | "detector" | "ground truth + detector (N image(s) without ground truth)",
         "stat_words": "ground truth" | "detector"}; "detector" stat words read "detector (empty: ...)" when the
        folder was prepared without nameable detector labels.

    Raises:
        DataError: mode "gt" and some image of the split has no ground-truth scene graph.
    """
    missing, images = _gt_coverage(manifest, split)
    if mode == "gt":
        if missing:
            raise DataError(
                f"{folder}: data.scene_graphs is 'gt', but {missing} of the {images} images of split '{split}' have "
                "no ground-truth scene graph. Only GQA splits prepared with their scene-graph file have them "
                "(GQA's testdev and test have none; VQA has none at all). Set data.scene_graphs to 'auto' "
                "(ground-truth graphs where they exist, detector graphs elsewhere) or 'detected' (detector "
                "graphs and stat words everywhere): --set data.scene_graphs=auto to train, --scene-graphs auto "
                "to evaluate."
            )
        return {"graphs": "ground truth", "stat_words": "ground truth"}
    named = manifest["scene_graphs"]["detector_labels"]
    stats = "detector" if named else "detector (empty: the features' detector labels were not named)"
    if mode == "detected" or missing == images:
        graphs = "detector"
    elif missing == 0:
        graphs = "ground truth"
    else:
        graphs = f"ground truth + detector ({missing} image{'s' * (missing != 1)} without ground truth)"
    return {"graphs": graphs, "stat_words": stats}


def describe_sources(manifest: Mapping[str, Any], splits: Sequence[str], mode: SceneGraphMode, folder: Path) -> str:
    """One line naming each split's scene-graph source and the stat words' source, e.g.
    "scene graphs: ground truth (train), detector (testdev); stat words: detector".

    Raises:
        DataError: as `graph_sources`.
    """
    sources = {split: graph_sources(manifest, split, mode, folder) for split in dict.fromkeys(splits)}
    graphs = ", ".join(f"{s['graphs']} ({split})" for split, s in sources.items())
    stats = " / ".join(dict.fromkeys(s["stat_words"] for s in sources.values()))
    return f"scene graphs: {graphs}; stat words: {stats}"


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

    GQA: `{split}_balanced_questions.json` (or `{split}_all_questions.json`) and, when present,
    `{split}_sceneGraphs.json` (testdev and test have none in the official release: `scene_graphs` is None).
    VQA v2: `v2_OpenEnded_mscoco_{sub}_questions.json` and `v2_mscoco_{sub}_annotations.json`, where
    `sub` is train2014 / val2014 / test-dev2015 / test2015 for train / val / testdev / test (an
    annotations file is optional: test splits have none).

    Raises:
        DataError: a split's questions cannot be found; the message lists the names tried.
    """
    found: dict[str, SplitFiles] = {}
    for split in splits:
        if dataset == "gqa":
            names = [f"{split}_balanced_questions.json", f"{split}_all_questions.json"]
            questions = next((p for n in names if (p := _find(raw, n))), None)
            if questions is None:
                raise DataError(
                    f"{raw}: split {split}: none of {', '.join(names)} found (searched {raw} and its sub-folders)"
                )
            found[split] = SplitFiles(questions=questions, scene_graphs=_find(raw, f"{split}_sceneGraphs.json"))
        else:
            sub = VQA_SUBTYPES.get(split, split)
            name = f"v2_OpenEnded_mscoco_{sub}_questions.json"
            questions = _find(raw, name)
            if questions is None:
                raise DataError(f"{raw}: split {split}: {name} not found (searched {raw} and its sub-folders)")
            found[split] = SplitFiles(questions=questions, annotations=_find(raw, f"v2_mscoco_{sub}_annotations.json"))
    return found
