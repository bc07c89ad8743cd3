"""Synthetic GQA and VQA v2 files at a fraction of the real sizes, in the exact official formats (for bench_scale).

`generate(folder, scale, seed)` writes, under `folder`:

    raw/gqa/questions/{train,val,testdev}_balanced_questions.json   GQA balanced questions
    raw/gqa/sceneGraphs/{train,val}_sceneGraphs.json                GQA scene graphs (testdev has none, as released)
    raw/vqa/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json  VQA v2 questions
    raw/vqa/v2_mscoco_{train2014,val2014}_annotations.json          VQA v2 annotations, ten human answers each
    features/{gqa,vqa}.h5 (+ <stem>_imgid2idx.json)                  adaptive HDF5 box features, one file per dataset
    features/objects_vocab.txt, features/attributes_vocab.txt        the detector's 1600 / 400 classes
    scale.json                                                       what was written (written last)

Counts are the real ones (the constants below) times `scale`, rounded, with a floor of a few per split so that a
tiny scale still gives a usable dataset. Field sizes follow the real files: a GQA question record carries its
semantic program, annotations, entailed/equivalent ids and types (about 1.4 KB of JSON); a GQA scene graph has
about 16 objects, each with 0-4 attributes (mean 1.5) and about 10 relations to other objects of the image; a VQA
question is about 30 characters. Words are pseudo-words built from syllables (they tokenize like real ones), drawn
from Zipf distributions so a few names, attributes, relations and answers dominate as in the real data.

Box features: 10-100 boxes per image (10 + a gamma draw with mean 25, so the mean is about 35), 2048-d float16
(half the disk of float32; FeatureStore reads both), with image_bb, spatial_features, pos_boxes, image_ids,
image_size and the detector labels objects_id / objects_conf / attrs_id / attrs_conf, laid out as
`isubg data convert-features` writes them (chunks of 256 rows). Feature rows are copies of rows of a small random
pool: the bytes on disk and the read pattern are what matter here, not the values.

Everything is streamed: JSON documents are written record by record and the features in blocks of 16k rows, so the
generator needs well under a gigabyte at any scale. Files are written under temporary names and renamed when done;
`scale.json` is written last, so its presence with the same scale, seed and version means the folder is complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

# Bumped whenever the same (scale, seed) would give different files, so an old work folder is regenerated.
GENERATOR_VERSION = 2  # 2: GQA answers from 1,842 words, VQA answers from 8,000 (3,129 reach 9 uses)

# Real sizes (official releases), scaled by S.
# GQA 1.2 balanced questions per split and the images they ask about (testdev-balanced: 12,578 questions on
# 398 images); the scene-graph files hold a few more images than the balanced questions use.
GQA_QUESTIONS = {"train": 943_000, "val": 132_062, "testdev": 12_578}
GQA_IMAGES = {"train": 72_140, "val": 10_234, "testdev": 398}
GQA_GRAPH_IMAGES = {"train": 74_942, "val": 10_696}  # train_sceneGraphs.json / val_sceneGraphs.json
GQA_FEATURE_IMAGES = 148_854  # images in the GQA object-features release (all splits, test included)
# VQA v2 (COCO train2014 / val2014): questions, images, ten human answers per question.
VQA_QUESTIONS = {"train": 443_757, "val": 214_354}
VQA_IMAGES = {"train": 82_783, "val": 40_504}
VQA_FEATURE_IMAGES = 123_287  # bottom-up features of train2014 + val2014
VQA_HUMANS = 10
VQA_SUBTYPES = {"train": "train2014", "val": "val2014"}

FEATURE_DIM = 2048
MIN_BOXES, MAX_BOXES, MEAN_EXTRA_BOXES = 10, 100, 25.0  # boxes = 10 + Gamma(2, 12.5), clipped: mean ~35
OBJECT_CLASSES, ATTRIBUTE_CLASSES = 1600, 400  # the bottom-up (Visual Genome) detector's vocabularies
GQA_NAMES, GQA_ATTRIBUTES, GQA_RELATIONS = 1703, 617, 310  # distinct names in the GQA scene graphs
GQA_ANSWERS = 1842  # distinct answers of the GQA balanced training questions
# VQA answers are drawn from this many words with Zipf exponent 0.98: at full size about 3,100 of them are
# the consensus answer of 9 or more training questions, the real vocabulary's 3,129 at isubg's min count 9.
VQA_ANSWER_WORDS, VQA_ANSWER_ZIPF = 8000, 0.98
OBJECTS_PER_IMAGE, ATTRIBUTES_PER_OBJECT, RELATIONS_PER_OBJECT = 16, 1.5, 10  # means
MIN_PER_SPLIT = 2  # images (and so questions) per split at least, whatever the scale

_POOL_ROWS = 4096  # distinct feature rows; every written row is a copy of one
_BLOCK_ROWS = 16_384  # feature rows per HDF5 write (64 MiB at 2048-d float16)
_FLUSH_CHARS = 4 << 20  # JSON text buffered before a write
_CHUNK_ROWS = 256  # HDF5 chunk rows, as isubg's converter writes them


@dataclass(frozen=True)
class ScalePlan:
    """How many of everything a scale gives (see `plan`)."""

    scale: float
    gqa_questions: dict[str, int]
    gqa_images: dict[str, int]  # images the questions of each split ask about
    gqa_graph_images: dict[str, int]  # images in each split's scene-graph file (none for testdev)
    gqa_feature_images: int
    vqa_questions: dict[str, int]
    vqa_images: dict[str, int]
    vqa_feature_images: int

    @property
    def feature_rows_estimate(self) -> int:
        """Expected box rows of both feature files (about 35 per image)."""
        return int((self.gqa_feature_images + self.vqa_feature_images) * (MIN_BOXES + MEAN_EXTRA_BOXES))


def _count(real: int, scale: float, floor: int = MIN_PER_SPLIT) -> int:
    return max(floor, round(real * scale))


def plan(scale: float) -> ScalePlan:
    """The counts of a scale: each real size times `scale`, rounded, at least `MIN_PER_SPLIT` per split.

    Every asked image has at least one question and every image that has questions or a scene graph has
    features, so the floors can raise a count above its scaled value at tiny scales.

    Raises:
        ValueError: a scale outside (0, 1].
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must lie in (0, 1], got {scale}")
    gqa_images = {s: _count(n, scale) for s, n in GQA_IMAGES.items()}
    graphs = {s: max(_count(n, scale), gqa_images[s]) for s, n in GQA_GRAPH_IMAGES.items()}
    needed = sum(graphs.values()) + gqa_images["testdev"]
    vqa_images = {s: _count(n, scale) for s, n in VQA_IMAGES.items()}
    return ScalePlan(
        scale=scale,
        gqa_questions={s: max(_count(n, scale), gqa_images[s]) for s, n in GQA_QUESTIONS.items()},
        gqa_images=gqa_images,
        gqa_graph_images=graphs,
        gqa_feature_images=max(_count(GQA_FEATURE_IMAGES, scale), needed),
        vqa_questions={s: max(_count(n, scale), vqa_images[s]) for s, n in VQA_QUESTIONS.items()},
        vqa_images=vqa_images,
        vqa_feature_images=max(_count(VQA_FEATURE_IMAGES, scale), sum(vqa_images.values())),
    )


# Bytes per item, measured on generated files (scale 0.02), for the disk estimate before generating.
_BYTES = {
    "gqa_question": 1_400,
    "gqa_graph_image": 7_700,
    "vqa_question": 85,
    "vqa_annotation": 720,
    "feature_row": FEATURE_DIM * 2 + 4 * 4 + 6 * 4 + 8 + 4 + 8 + 4,
    # The processed folders `isubg data prepare` writes: questions (with tf-idf), and per image the detector
    # graph, GQA's ground-truth graph and the stat words.
    "processed_question": 400,
    "processed_image": 10_000,
}


def disk_estimate(p: ScalePlan) -> dict[str, int]:
    """Bytes the raw files and the two processed folders of a plan take, roughly (+-20%)."""
    raw = (
        sum(p.gqa_questions.values()) * _BYTES["gqa_question"]
        + sum(p.gqa_graph_images.values()) * _BYTES["gqa_graph_image"]
        + sum(p.vqa_questions.values()) * (_BYTES["vqa_question"] + _BYTES["vqa_annotation"])
    )
    features = p.feature_rows_estimate * _BYTES["feature_row"]
    questions = sum(p.gqa_questions.values()) + sum(p.vqa_questions.values())
    images = sum(p.gqa_images.values()) + sum(p.vqa_images.values())
    processed = questions * _BYTES["processed_question"] + images * _BYTES["processed_image"]
    return {"raw_json": raw, "features": features, "processed": processed, "total": raw + features + processed}


# -------------------------------------------------------------------------------------------------
# Words


_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70
_SPREAD = 7919  # a prime: consecutive word indices get unrelated-looking words


def pseudo_words(start: int, count: int) -> list[str]:
    """`count` distinct three-syllable pseudo-words ("kotesi"), the `start`-th onward of one fixed sequence."""
    n = len(_SYLLABLES)
    out = []
    for i in range(start, start + count):
        j = (i * _SPREAD) % n**3
        out.append(_SYLLABLES[j // n**2] + _SYLLABLES[(j // n) % n] + _SYLLABLES[j % n])
    return out


# Frequent real relation names first (in GQA "to the left of" / "to the right of" are the most common).
_REAL_RELATIONS = (
    "to the left of", "to the right of", "on", "wearing", "of", "near", "in", "behind", "in front of", "holding",
    "on top of", "next to", "above", "below", "sitting on", "standing on", "with", "under", "by", "carrying",
)  # fmt: skip


@dataclass(frozen=True)
class Vocab:
    """The words of the synthetic world: scene-graph names, attributes and relations, detector classes."""

    names: list[str]
    attributes: list[str]
    relations: list[str]
    gqa_answers: list[str]
    vqa_answers: list[str]

    @classmethod
    def build(cls) -> Vocab:
        used = GQA_NAMES + GQA_ATTRIBUTES + GQA_RELATIONS + GQA_NAMES
        words = pseudo_words(0, used)
        names = words[:GQA_NAMES]
        seconds = words[-GQA_NAMES:]
        # One name in eight has two words ("tennis racket"), as multi-word names exercise entity matching.
        names = [f"{seconds[i]} {n}" if i % 8 == 7 else n for i, n in enumerate(names)]
        attributes = words[GQA_NAMES : GQA_NAMES + GQA_ATTRIBUTES]
        extra = words[GQA_NAMES + GQA_ATTRIBUTES : GQA_NAMES + GQA_ATTRIBUTES + GQA_RELATIONS]
        relations = list(_REAL_RELATIONS) + [f"{w} on" for w in extra[: GQA_RELATIONS - len(_REAL_RELATIONS)]]
        # Every attribute can answer a "choose" question; names fill the rest of GQA's answer count.
        gqa_answers = [*attributes, *names[: GQA_ANSWERS - len(attributes)]]
        vqa_answers = [*attributes, *names, *pseudo_words(used, VQA_ANSWER_WORDS)][:VQA_ANSWER_WORDS]
        return cls(names, attributes, relations, gqa_answers, vqa_answers)

    def object_vocab_lines(self) -> list[str]:
        # The release lists synonyms on some lines ("bicycle,bike"); the first one names the class.
        return [f"{n},{n}s" if i % 10 == 9 else n for i, n in enumerate(self.names[:OBJECT_CLASSES])]

    def attribute_vocab_lines(self) -> list[str]:
        return self.attributes[:ATTRIBUTE_CLASSES]


class Zipf:
    """Draws indices 0..n-1 with P(i) proportional to 1 / (i + 1) ** exponent."""

    def __init__(self, n: int, exponent: float = 1.0) -> None:
        weights = 1.0 / np.arange(1, n + 1) ** exponent
        self.cdf = np.cumsum(weights / weights.sum())

    def draw(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(size), side="right"), len(self.cdf) - 1)


# -------------------------------------------------------------------------------------------------
# Streaming writers


class JsonStream:
    """One JSON document written piece by piece: `head`, the items joined by commas, `tail`; renamed when closed.

    Args:
        path: the final file; the text goes to a temporary name beside it until `close`.
        head: the text before the first item, e.g. "{" or '{"info": {...}, "questions": ['.
        tail: the text after the last item, e.g. "}" or "]}".
    """

    def __init__(self, path: Path, head: str, tail: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tail = path, tail
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.handle = self.tmp.open("w", encoding="utf-8")
        self.handle.write(head)
        self.parts: list[str] = []
        self.chars = 0
        self.items = 0

    def add(self, text: str) -> None:
        """Append one item's JSON text."""
        self.parts.append(("," if self.items else "") + text)
        self.items += 1
        self.chars += len(text)
        if self.chars >= _FLUSH_CHARS:
            self._flush()

    def _flush(self) -> None:
        self.handle.write("".join(self.parts))
        self.parts, self.chars = [], 0

    def close(self) -> int:
        """Finish the document, move it into place and return its size in bytes."""
        self._flush()
        self.handle.write(self.tail)
        self.handle.close()
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size

    def discard(self) -> None:
        """Drop an unfinished document (after an error)."""
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def write_map(path: Path, items: Iterator[tuple[str, dict[str, Any]]]) -> int:
    """Stream a {key: record} JSON object to `path`; returns the bytes written."""
    stream = JsonStream(path, "{", "}")
    try:
        for key, record in items:
            stream.add(f"{json.dumps(key)}:{json.dumps(record, separators=(',', ':'))}")
    except BaseException:
        stream.discard()
        raise
    return stream.close()


def write_listed(path: Path, header: dict[str, Any], key: str, items: Iterator[dict[str, Any]]) -> int:
    """Stream `{**header, key: [items]}` (the VQA layout) to `path`; returns the bytes written."""
    head = json.dumps(header)[:-1] + f', "{key}": ['
    stream = JsonStream(path, head, "]}")
    try:
        for record in items:
            stream.add(json.dumps(record, separators=(",", ":")))
    except BaseException:
        stream.discard()
        raise
    return stream.close()


# -------------------------------------------------------------------------------------------------
# GQA


def _per_image(rng: np.random.Generator, questions: int, images: int, base: int = 1) -> np.ndarray:
    """For each question, the index of its image: every image gets `base` (or fewer) questions, the rest at random."""
    base = min(base, questions // images)
    counts = base + rng.multinomial(questions - base * images, np.full(images, 1.0 / images))
    return rng.permutation(np.repeat(np.arange(images), counts))


_MAX_ENTAILED = 80  # entailed question ids per record: 0-80, so a record is about 1.4 KB of JSON
_QID_STRIDE = _MAX_ENTAILED + 1  # question ids step over the entailed ids of the question before
_STRUCTURAL = ("query", "verify", "logical", "choose", "compare")
_STRUCTURAL_P = (0.48, 0.22, 0.10, 0.12, 0.08)  # close to GQA's balanced training split
_SEMANTIC = ("rel", "attr", "obj", "cat", "global")
_DETAILED = {
    "query": ("relS", "queryAttr", "categoryRelS", "directOf", "placeVerify"),
    "verify": ("existRelS", "verifyAttr", "existAttr", "relVerify"),
    "logical": ("logicOr", "logicAnd", "existAttrOr"),
    "choose": ("chooseAttr", "chooseRel", "choosePosition"),
    "compare": ("sameRelate", "compare", "diffAnimals"),
}


@dataclass
class _GqaDraws:
    """Everything random about a block of GQA questions, drawn at once (per-question draws are slow)."""

    names: np.ndarray  # (n, 2)
    attributes: np.ndarray  # (n, 2)
    relations: np.ndarray  # (n,)
    structural: np.ndarray  # (n,)
    semantic: np.ndarray  # (n,)
    detail: np.ndarray  # (n,)
    answers: np.ndarray  # (n,) index into names + attributes
    entailed: np.ndarray  # (n,) how many entailed question ids
    oids: np.ndarray  # (n, 2) object ids referred to
    yes: np.ndarray  # (n,) bool
    filters: np.ndarray  # (n,) filter steps in the program


def _gqa_draws(rng: np.random.Generator, n: int, zipf: dict[str, Zipf]) -> _GqaDraws:
    return _GqaDraws(
        names=zipf["names"].draw(rng, (n, 2)),
        attributes=zipf["attributes"].draw(rng, (n, 2)),
        relations=zipf["relations"].draw(rng, n),
        structural=rng.choice(len(_STRUCTURAL), size=n, p=_STRUCTURAL_P),
        semantic=rng.integers(0, len(_SEMANTIC), n),
        detail=rng.integers(0, 1 << 16, n),
        answers=zipf["answers"].draw(rng, n),
        entailed=rng.integers(0, _MAX_ENTAILED + 1, n),
        oids=rng.integers(100_000, 4_000_000, (n, 2)),
        yes=rng.random(n) < 0.5,
        filters=rng.integers(0, 4, n),
    )


def _gqa_text(structural: str, name: str, other: str, attr: str, attr2: str, rel: str) -> tuple[str, str]:
    """(question, full-answer template with {answer}) for a structural type."""
    if structural == "query":
        return f"What is the {attr} {name} {rel} the {other}?", f"The {{answer}} is {rel} the {other}."
    if structural == "verify":
        return f"Is the {name} {rel} the {attr} {other}?", f"{{answer}}, the {name} is {rel} the {other}."
    if structural == "logical":
        return f"Are there either {attr} {name}s or {other}s in the picture?", f"{{answer}}, there is a {name}."
    if structural == "choose":
        return f"Is the {name} {attr} or {attr2}?", f"The {name} is {{answer}}."
    return f"Do the {name} and the {other} have the same color?", f"{{answer}}, both are {attr}."


def _gqa_program(name: str, other: str, attrs: Sequence[str], rel: str, oids: Sequence[int]) -> list[dict[str, Any]]:
    """select, one filter per attribute, relate, query: 3-6 steps, as GQA's programs mostly have."""
    a, b = (str(o) for o in oids)
    steps: list[dict[str, Any]] = [{"operation": "select", "dependencies": [], "argument": f"{other} ({b})"}]
    for attr in attrs:
        steps.append({"operation": "filter color", "dependencies": [len(steps) - 1], "argument": attr})
    steps.append({"operation": "relate", "dependencies": [len(steps) - 1], "argument": f"{name},{rel},s ({a})"})
    steps.append({"operation": "query", "dependencies": [len(steps) - 1], "argument": "name"})
    return steps


def _semantic_str(program: Sequence[dict[str, Any]]) -> str:
    """GQA's one-line program: "select: table (12)->relate: cup,on,s (14) [0]->query: name [1]"."""
    steps = []
    for step in program:
        deps = f" [{', '.join(map(str, step['dependencies']))}]" if step["dependencies"] else ""
        steps.append(f"{step['operation']}: {step['argument']}{deps}")
    return "->".join(steps)


def _gqa_question(qid: int, image: str, d: _GqaDraws, i: int, vocab: Vocab, answers: list[str]) -> dict[str, Any]:
    """One GQA balanced-question record (the official field set)."""
    structural = _STRUCTURAL[int(d.structural[i])]
    name, other = (vocab.names[int(k)] for k in d.names[i])
    attr, attr2 = (vocab.attributes[int(k)] for k in d.attributes[i])
    rel = vocab.relations[int(d.relations[i])]
    question, full = _gqa_text(structural, name, other, attr, attr2, rel)
    if structural in ("verify", "logical", "compare"):
        answer = "yes" if d.yes[i] else "no"
    else:
        answer = attr if structural == "choose" else answers[int(d.answers[i])]
    filters = [attr, attr2, vocab.attributes[int(d.attributes[i, 0]) // 2]][: int(d.filters[i])]
    program = _gqa_program(name, other, filters, rel, d.oids[i].tolist())
    detailed = _DETAILED[structural]
    a, b = (str(o) for o in d.oids[i].tolist())
    return {
        "semantic": program,
        "entailed": [f"{qid + k + 1:08d}" for k in range(int(d.entailed[i]))],
        "equivalent": [f"{qid:08d}"],
        "question": question,
        "imageId": image,
        "isBalanced": True,
        "groups": {"global": None if answer in ("yes", "no") else answer, "local": f"14-{other}_{rel},s"},
        "answer": answer,
        "semanticStr": _semantic_str(program),
        "annotations": {"answer": {"0": a}, "question": {"3": a, "8:10": b}, "fullAnswer": {"1": a, "6": b}},
        "types": {
            "detailed": detailed[int(d.detail[i]) % len(detailed)],
            "semantic": _SEMANTIC[int(d.semantic[i])],
            "structural": structural,
        },
        "fullAnswer": full.format(answer=answer.capitalize() if full.startswith("{") else answer),
    }


def gqa_questions(
    rng: np.random.Generator, count: int, images: Sequence[str], first_qid: int, vocab: Vocab
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(question id, record) pairs of one split: `count` questions spread over `images`, in random order."""
    answers = vocab.gqa_answers
    zipf = {
        "names": Zipf(len(vocab.names)),
        "attributes": Zipf(len(vocab.attributes)),
        "relations": Zipf(len(vocab.relations), 1.3),
        "answers": Zipf(len(answers)),
    }
    image_of = _per_image(rng, count, len(images))
    for start in range(0, count, 4096):
        d = _gqa_draws(rng, min(4096, count - start), zipf)
        for i in range(len(d.relations)):
            qid = first_qid + (start + i) * _QID_STRIDE  # room for the entailed ids that follow each question
            yield f"{qid:08d}", _gqa_question(qid, images[int(image_of[start + i])], d, i, vocab, answers)


def _gqa_objects(
    rng: np.random.Generator, first_oid: int, width: int, height: int, vocab: Vocab, zipf: dict[str, Zipf]
) -> dict[str, Any]:
    """The `objects` mapping of one scene graph (relations point at objects of the same image)."""
    n = 1 + int(rng.negative_binomial(4, 4 / (4 + OBJECTS_PER_IMAGE - 1)))
    oids = [str(first_oid + k) for k in range(n)]
    names = zipf["names"].draw(rng, n)
    attr_counts = np.minimum(rng.poisson(ATTRIBUTES_PER_OBJECT, n), 4)
    attrs = zipf["attributes"].draw(rng, int(attr_counts.sum()))
    rel_counts = rng.poisson(RELATIONS_PER_OBJECT, n) if n > 1 else np.zeros(n, dtype=np.int64)
    rels = zipf["relations"].draw(rng, int(rel_counts.sum()))
    # A target among the other objects: an offset in 1..n-1 from the source never lands on the source.
    offsets = rng.integers(1, max(n, 2), int(rel_counts.sum()))
    x, y = rng.integers(0, width - 8, n), rng.integers(0, height - 8, n)
    w = 4 + (rng.random(n) * (width - x - 4)).astype(int)
    h = 4 + (rng.random(n) * (height - y - 4)).astype(int)
    objects, a, r = {}, 0, 0
    for k in range(n):
        na, nr = int(attr_counts[k]), int(rel_counts[k])
        objects[oids[k]] = {
            "name": vocab.names[int(names[k])],
            "h": int(h[k]),
            "relations": [
                {"object": oids[(k + int(offsets[r + j])) % n], "name": vocab.relations[int(rels[r + j])]}
                for j in range(nr)
            ],
            "w": int(w[k]),
            "attributes": [vocab.attributes[int(v)] for v in attrs[a : a + na]],
            "y": int(y[k]),
            "x": int(x[k]),
        }
        a, r = a + na, r + nr
    return objects


def gqa_scene_graphs(
    rng: np.random.Generator, images: Sequence[str], first_oid: int, vocab: Vocab
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(image id, scene graph) pairs, in the official `{split}_sceneGraphs.json` record layout."""
    zipf = {
        "names": Zipf(len(vocab.names)),
        "attributes": Zipf(len(vocab.attributes)),
        "relations": Zipf(len(vocab.relations), 1.3),
    }
    oid = first_oid
    for image in images:
        width, height = int(rng.integers(320, 1025)), int(rng.integers(240, 1025))
        objects = _gqa_objects(rng, oid, width, height, vocab, zipf)
        oid += len(objects)
        yield image, {"width": width, "objects": objects, "height": height}


# -------------------------------------------------------------------------------------------------
# VQA v2


_VQA_INFO = {
    "description": "isubg bench_scale: synthetic data in the VQA v2 format",
    "url": "",
    "version": "2.0",
    "year": 2017,
    "contributor": "isubg benchmarks/scale_data.py",
    "date_created": "synthetic",
}
_VQA_LICENSE = {"url": "https://creativecommons.org/publicdomain/zero/1.0/", "name": "CC0 1.0 (synthetic data)"}
# (question_type, answer_type, question template); {n} a name, {a} an attribute.
_VQA_TEMPLATES = (
    ("is the", "yes/no", "Is the {n} {a} in color?"),
    ("are there", "yes/no", "Are there any {n}s here?"),
    ("how many", "number", "How many {n}s are there?"),
    ("what color is the", "other", "What color is the big {n}?"),
    ("what is the", "other", "What is the {n} sitting on?"),
    ("what is", "other", "What is the man holding?"),
    ("what kind of", "other", "What kind of {n} is this?"),
    ("where is the", "other", "Where is the {n} placed?"),
)
_VQA_TEMPLATE_P = (0.22, 0.16, 0.12, 0.1, 0.12, 0.1, 0.1, 0.08)


def vqa_records(
    rng: np.random.Generator, count: int, image_ids: Sequence[int], vocab: Vocab
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(question, annotation) pairs of one split; question id = image id * 1000 + k (VQA's convention)."""
    names, attrs = Zipf(len(vocab.names)), Zipf(len(vocab.attributes))
    words = vocab.vqa_answers
    answers = Zipf(len(words), VQA_ANSWER_ZIPF)
    image_of = np.sort(_per_image(rng, count, len(image_ids), base=3))
    next_k: dict[int, int] = {}
    for start in range(0, count, 4096):
        n = min(4096, count - start)
        kinds = rng.choice(len(_VQA_TEMPLATES), size=n, p=_VQA_TEMPLATE_P)
        name, attr, word = names.draw(rng, n), attrs.draw(rng, n), answers.draw(rng, (n, VQA_HUMANS))
        agree, yes, number = rng.random((n, VQA_HUMANS)) < 0.8, rng.random(n) < 0.5, rng.integers(0, 8, n)
        confidence = rng.choice(3, size=(n, VQA_HUMANS), p=(0.85, 0.1, 0.05))
        for i in range(n):
            image = int(image_ids[int(image_of[start + i])])
            k = next_k.get(image, 0)
            next_k[image] = k + 1
            qtype, atype, template = _VQA_TEMPLATES[int(kinds[i])]
            text = template.format(n=vocab.names[int(name[i])], a=vocab.attributes[int(attr[i])])
            if atype == "yes/no":
                truth, noise = ("yes" if yes[i] else "no"), ["no" if yes[i] else "yes"] * VQA_HUMANS
            elif atype == "number":
                truth, noise = str(int(number[i])), [str(int(v) % 10) for v in word[i]]
            else:
                truth, noise = words[int(word[i, 0])], [words[int(v)] for v in word[i]]
            humans = [
                {
                    "answer": truth if agree[i, j] or j == 0 else noise[j],
                    "answer_confidence": ("yes", "maybe", "no")[int(confidence[i, j])],
                    "answer_id": j + 1,
                }
                for j in range(VQA_HUMANS)
            ]
            qid = image * 1000 + k
            question = {"image_id": image, "question": text, "question_id": qid}
            annotation = {"question_type": qtype, "multiple_choice_answer": truth, "answers": humans,
                          "image_id": image, "answer_type": atype, "question_id": qid}  # fmt: skip
            yield question, annotation


# -------------------------------------------------------------------------------------------------
# Box features


def _box_counts(rng: np.random.Generator, images: int) -> np.ndarray:
    extra = rng.gamma(2.0, MEAN_EXTRA_BOXES / 2.0, images)
    return np.clip(MIN_BOXES + np.round(extra), MIN_BOXES, MAX_BOXES).astype(np.int64)


_DETECTED_OBJECTS, _DETECTED_ATTRIBUTES = Zipf(OBJECT_CLASSES, 0.8), Zipf(ATTRIBUTE_CLASSES, 0.8)


def _create_datasets(f: h5py.File, rows: int) -> dict[str, h5py.Dataset]:
    """The per-box datasets, chunked as `isubg data convert-features` writes them."""
    shapes = {
        "image_features": ((rows, FEATURE_DIM), "f2"),
        "image_bb": ((rows, 4), "f4"),
        "spatial_features": ((rows, 6), "f4"),
        "objects_id": ((rows,), "i8"),
        "objects_conf": ((rows,), "f4"),
        "attrs_id": ((rows,), "i8"),
        "attrs_conf": ((rows,), "f4"),
    }
    return {
        name: f.create_dataset(name, shape, dtype=dtype, chunks=(min(_CHUNK_ROWS, rows), *shape[1:]))
        for name, (shape, dtype) in shapes.items()
    }


def _box_block(rng: np.random.Generator, sizes: np.ndarray, pool: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-box array of a block of rows; `sizes` is (rows, 2) the (W, H) of each row's image."""
    rows = len(sizes)
    w, h = sizes[:, 0], sizes[:, 1]
    x1, y1 = rng.random(rows) * w * 0.8, rng.random(rows) * h * 0.8
    x2 = x1 + (0.05 + 0.95 * rng.random(rows)) * (w - x1)
    y2 = y1 + (0.05 + 0.95 * rng.random(rows)) * (h - y1)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    spatial = np.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w, (y2 - y1) / h], axis=1).astype(np.float32)
    return {
        "image_features": pool[rng.integers(0, len(pool), rows)],
        "image_bb": boxes,
        "spatial_features": spatial,
        "objects_id": _DETECTED_OBJECTS.draw(rng, rows).astype(np.int64),
        "objects_conf": rng.random(rows, dtype=np.float32),
        "attrs_id": _DETECTED_ATTRIBUTES.draw(rng, rows).astype(np.int64),
        "attrs_conf": rng.random(rows, dtype=np.float32),
    }


def write_features(path: Path, image_ids: Sequence[str], rng: np.random.Generator) -> dict[str, int]:
    """An adaptive HDF5 features file (+ `<stem>_imgid2idx.json`) for `image_ids`, streamed in blocks.

    Returns:
        {"images", "rows", "bytes"}.
    """
    counts = _box_counts(rng, len(image_ids))
    ends = np.cumsum(counts)
    rows = int(ends[-1])
    sizes = np.stack([rng.integers(320, 1025, len(image_ids)), rng.integers(240, 1025, len(image_ids))], axis=1)
    pool = (rng.random((_POOL_ROWS, FEATURE_DIM), dtype=np.float32) * 4).astype(np.float16)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            sets = _create_datasets(f, rows)
            row_sizes = np.repeat(sizes, counts, axis=0).astype(np.float64)
            for start in range(0, rows, _BLOCK_ROWS):
                end = min(rows, start + _BLOCK_ROWS)
                for name, values in _box_block(rng, row_sizes[start:end], pool).items():
                    sets[name][start:end] = values
            f.create_dataset("pos_boxes", data=np.stack([ends - counts, ends], axis=1).astype(np.int32))
            f.create_dataset("image_ids", data=np.asarray(image_ids, dtype=h5py.string_dtype()))
            f.create_dataset("image_size", data=sizes.astype(np.float32))
            f.attrs["layout"] = "adaptive"
            f.attrs["written_by"] = "isubg benchmarks/scale_data.py"
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    id_map = path.with_name(path.stem + "_imgid2idx.json")
    id_map.write_text(json.dumps({image: i for i, image in enumerate(image_ids)}), encoding="utf-8")
    return {"images": len(image_ids), "rows": rows, "bytes": path.stat().st_size + id_map.stat().st_size}


# -------------------------------------------------------------------------------------------------
# The whole dataset


@dataclass
class Generated:
    """What `generate` wrote (also `scale.json`)."""

    version: int
    scale: float
    seed: int
    plan: dict[str, Any]
    bytes: dict[str, int] = field(default_factory=dict)
    feature_rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False


def _gqa_ids(p: ScalePlan) -> dict[str, list[str]]:
    """Image ids: graph images per split (the asked ones first), testdev, and the rest of the feature file."""
    ids = {
        "train": [str(1_000_000 + i) for i in range(p.gqa_graph_images["train"])],
        "val": [str(2_000_000 + i) for i in range(p.gqa_graph_images["val"])],
        "testdev": [f"n{100_000 + i}" for i in range(p.gqa_images["testdev"])],
    }
    used = sum(len(v) for v in ids.values())
    ids["extra"] = [f"n{500_000 + i}" for i in range(p.gqa_feature_images - used)]
    return ids


def _write_gqa(raw: Path, p: ScalePlan, seed: int, vocab: Vocab, out: Generated, say: Callable[[str], None]) -> None:
    ids = _gqa_ids(p)
    first_qid, first_oid = 0, 1
    for index, split in enumerate(("train", "val", "testdev")):
        say(f"gqa {split}: {p.gqa_questions[split]} questions")
        rng = np.random.default_rng([seed, 1, index])
        asked = ids[split][: p.gqa_images[split]]
        records = gqa_questions(rng, p.gqa_questions[split], asked, first_qid, vocab)
        path = raw / "gqa" / "questions" / f"{split}_balanced_questions.json"
        out.bytes[f"gqa_questions_{split}"] = write_map(path, records)
        first_qid += p.gqa_questions[split] * _QID_STRIDE
        if split in p.gqa_graph_images:
            graphs = gqa_scene_graphs(np.random.default_rng([seed, 2, index]), ids[split], first_oid, vocab)
            path = raw / "gqa" / "sceneGraphs" / f"{split}_sceneGraphs.json"
            out.bytes[f"gqa_scene_graphs_{split}"] = write_map(path, graphs)
            first_oid += 100 * len(ids[split])  # generous: object ids stay unique across splits
    say(f"gqa features: {p.gqa_feature_images} images")
    every = [i for key in ("train", "val", "testdev", "extra") for i in ids[key]]
    written = write_features(raw.parent / "features" / "gqa.h5", every, np.random.default_rng([seed, 3]))
    out.bytes["gqa_features"], out.feature_rows["gqa"] = written["bytes"], written["rows"]


def _write_vqa(raw: Path, p: ScalePlan, seed: int, vocab: Vocab, out: Generated, say: Callable[[str], None]) -> None:
    firsts = {"train": 9, "val": 5_000_000}  # COCO-like integer ids, disjoint between the splits
    ids = {s: [firsts[s] + 3 * i for i in range(p.vqa_images[s])] for s in ("train", "val")}
    for index, split in enumerate(("train", "val")):
        say(f"vqa {split}: {p.vqa_questions[split]} questions")
        sub = VQA_SUBTYPES[split]

        def records(split: str = split, index: int = index) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
            # The same seed gives the same records: questions and annotations are two passes, never both in RAM.
            return vqa_records(np.random.default_rng([seed, 4, index]), p.vqa_questions[split], ids[split], vocab)

        head = {"info": _VQA_INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": _VQA_LICENSE,
                "data_subtype": sub}  # fmt: skip
        path = raw / "vqa" / f"v2_OpenEnded_mscoco_{sub}_questions.json"
        out.bytes[f"vqa_questions_{split}"] = write_listed(path, head, "questions", (q for q, _ in records()))
        head = {"info": _VQA_INFO, "license": _VQA_LICENSE, "data_subtype": sub}
        path = raw / "vqa" / f"v2_mscoco_{sub}_annotations.json"
        out.bytes[f"vqa_annotations_{split}"] = write_listed(path, head, "annotations", (a for _, a in records()))
    every = [str(i) for split in ("train", "val") for i in ids[split]]
    extra = p.vqa_feature_images - len(every)
    every += [str(9_000_000 + i) for i in range(extra)]
    say(f"vqa features: {p.vqa_feature_images} images")
    written = write_features(raw.parent / "features" / "vqa.h5", every, np.random.default_rng([seed, 5]))
    out.bytes["vqa_features"], out.feature_rows["vqa"] = written["bytes"], written["rows"]


def read_generated(folder: Path) -> Generated | None:
    """The `scale.json` of a complete generation in `folder`, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((folder / "scale.json").read_text(encoding="utf-8"))
        return Generated(**data)
    except (OSError, ValueError, TypeError):
        return None


def generate(folder: Path, scale: float, seed: int = 0, say: Callable[[str], None] = lambda _: None) -> Generated:
    """Write the synthetic dataset of `scale` under `folder`, or reuse it when `scale.json` matches.

    Raises:
        ValueError: a scale outside (0, 1].
    """
    p = plan(scale)
    old = read_generated(folder)
    if old is not None and (old.version, old.scale, old.seed) == (GENERATOR_VERSION, scale, seed):
        old.reused = True
        return old
    (folder / "scale.json").unlink(missing_ok=True)
    start = time.perf_counter()
    out = Generated(version=GENERATOR_VERSION, scale=scale, seed=seed, plan=asdict(p))
    vocab = Vocab.build()
    raw = folder / "raw"
    features = folder / "features"
    features.mkdir(parents=True, exist_ok=True)
    (features / "objects_vocab.txt").write_text("\n".join(vocab.object_vocab_lines()) + "\n", encoding="utf-8")
    (features / "attributes_vocab.txt").write_text("\n".join(vocab.attribute_vocab_lines()) + "\n", encoding="utf-8")
    _write_gqa(raw, p, seed, vocab, out, say)
    _write_vqa(raw, p, seed, vocab, out, say)
    out.seconds = round(time.perf_counter() - start, 2)
    (folder / "scale.json").write_text(json.dumps(asdict(out), indent=2), encoding="utf-8")
    return out
