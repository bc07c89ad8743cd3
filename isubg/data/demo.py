"""Generate the embedded demo dataset: a small, learnable synthetic world written in the real file formats.

The world. Each image (640 x 480 pixels) holds 3-6 real objects. An object has a name (6 everyday
nouns), a colour (5), a material (3) and a size (small/large); large objects get larger boxes. The world
is kept this small on purpose: each name-attribute lookup then has hundreds of training questions in the
`small` size, so the demo is learnable in a few CPU minutes (with 12 names, 8 colours and 3-8 objects it
had ~30 per lookup and the models learnt only question-type priors). Real
objects are placed at random with little overlap. Each one is related to its 2-3 nearest real objects
by the dominant axis between the box centres: "to the left of" / "to the right of" when the horizontal
offset is larger, else "above" / "below" (image y grows downward). An edge `{name: rel, object: target}`
on a source object reads "source rel target". One name per image repeats 2-4 times so that counting
questions have a spread of answers. Around the real objects come distractor boxes ("clutter"): random
boxes and partial boxes around real objects, so that an image has 10-100 boxes in all (nine images in
ten have 10-40).

The features. A box feature (width `FEATURE_DIM`) is `softplus(z)`, positive like the ReLU-pooled
features of a real detector. For a real object `z = onehot @ P + noise`, where `onehot` concatenates
the one-hots of [name, colour, material, size], `P` is a random projection fixed by the seed and the
noise is Gaussian (std `_NOISE_STD`), small enough that a nearest-class-mean decoder recovers colour
and name from the features. softplus is monotone, so no attribute information is lost. A clutter box
has `z = c + noise` with `c` a constant low level (`_CLUTTER_LEVEL`): a weak response with no structure but
the noise, as a detector's features respond to background. A partial box around an object mixes a weaker copy
of that object's signature with `c`. Object signatures have std 3 per dimension, so real objects stand out:
with signatures as weak as the clutter of generator version 2 (a random direction of unit variance) every
model, the reference BAN included, learned little beyond question priors in the demo's CPU budget (colour
questions stayed at chance; `benchmarks/bench_quality.py`). Detector labels are written
too, as 0-based line indices into the vocabulary files (the bottom-up release's convention):
objects_vocab.txt lists the names then "clutter", attributes_vocab.txt the colours, materials and sizes.
Real objects get their name's class (about 5% a wrong class, as a real detector errs), distractors the
"clutter" class; the attribute label is the colour (random, at low confidence, for distractors). Boxes
are stored in random order, as the RPN order of a real extractor is not grouped by object.

Ids. Image ids are the integers 1, 2, ... numbered through train, val and testdev in turn (GQA's
imageId is the same number as a string); question ids follow VQA's convention, image id * 1000 + k
(GQA's questionId is its string), so both are unique across splits; object ids are image id * 100 + k.

The questions. About ten per image from templates: exist, count, query colour / material / name,
relation, compare (same colour / material) and logical (or / and). Every answer is computed from the
world, objects are referred to only by descriptions that match exactly one object, and a per-split
balancer picks, among the answers a template can give for an image, the one used least so far, so
yes/no stay near 50/50 and counts 0-4 spread out.

Files, all under `out`. They are first written into a staging folder `out/.demo-staging-<pid>` and
moved into place (os.replace) only once every one is complete, `demo.json` last, so an interrupted
run leaves the previous dataset whole and never a half-written file:
    gqa/questions/{train,val,testdev}_balanced_questions.json   GQA questions format
    gqa/sceneGraphs/{train,val,testdev}_sceneGraphs.json        GQA scene-graph format
    vqa/v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015}_questions.json, vqa/v2_mscoco_*_annotations.json
    features/demo.tsv, features/demo.h5 (+ demo_imgid2idx.json), features/objects_vocab.txt, attributes_vocab.txt
    demo.json                                                    manifest
Real GQA hides the testdev scene graphs and real VQA hides the test-dev annotations; the demo writes both
so that every split can be evaluated locally. VQA gets ten noisy human answers per question: most give
the true answer, some a variant that the official normalisation maps to it ("Red", "red.", "two"), and
at most three a wrong answer, so the consensus is always the true answer.

Everything is deterministic per (size, seed): the same pair gives byte-identical files, in any process.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

from isubg.data.convert import convert_tsv
from isubg.errors import ConfigError

__all__ = [
    "COLORS",
    "FEATURE_DIM",
    "GENERATOR_VERSION",
    "MATERIALS",
    "NAMES",
    "RELATIONS",
    "SIZES",
    "SIZE_PRESETS",
    "SPLITS",
    "VQA_SUBTYPES",
    "DemoReport",
    "generate_demo",
]

# Bumped whenever the same (size, seed) would give different files, so that caches of an older world
# (isubg.data.embedded) are rebuilt instead of reused. 2: the smaller, denser world (6 names, 5 colours,
# 3 materials, 3-6 objects, more questions per image). 3: strong object signatures, weak unstructured clutter.
GENERATOR_VERSION = 3
FEATURE_DIM = 128
IMAGE_WIDTH, IMAGE_HEIGHT = 640, 480
NAMES = ("ball", "cup", "book", "chair", "lamp", "box")
COLORS = ("red", "blue", "green", "yellow", "white")
MATERIALS = ("metal", "wood", "plastic")
SIZES = ("small", "large")
RELATIONS = ("to the left of", "to the right of", "above", "below")
CLUTTER_CLASS = "clutter"
SPLITS = ("train", "val", "testdev")
# Images per split (train, val, testdev).
SIZE_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (40, 12, 12),
    "small": (600, 150, 150),
    "medium": (3000, 600, 600),
}
VQA_SUBTYPES = {"train": "train2014", "val": "val2014", "testdev": "test-dev2015"}

# Adjectives in the order they are written before a noun ("small red metal ball").
_ADJECTIVES = ("size", "color", "material")
_BOX_SIDES = {"small": (36, 80), "large": (100, 180)}  # inclusive pixel range of each box side
_PLACEMENT_TRIES = 40
_MAX_OVERLAP = 0.1  # IoU under which a real object's position is accepted at once
_PROJECTION_STD = 1.5  # four one-hot rows are summed: a signature has std 3 per dimension, the clutter 1
# Per-dimension noise: nearest-class-mean decoding of colour and name from one real box is exact, while
# partial boxes (a weaker signature mixed with the clutter) stay ambiguous.
_NOISE_STD = 0.45
# Pre-activation of a background box: softplus(-2 + noise) ~ 0.13, a weak, unstructured response.
_CLUTTER_LEVEL = -2.0
_WRONG_CLASS_RATE = 0.05
_PARTIAL_RATE = 0.3  # share of the distractor boxes that are partial boxes around a real object
_QUESTIONS_PER_IMAGE = (8, 12)  # inclusive
# Cumulative P(0, 1, 2, 3 of the ten humans answer wrongly) = 0.55, 0.3, 0.12, 0.03.
_WRONG_HUMANS_CUMULATIVE = np.cumsum([0.55, 0.3, 0.12, 0.03])[:-1]
_VARIANT_RATE = 0.25  # share of correct human answers typed as a variant ("Red", "red.", "two")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# detailed type -> (GQA structural, GQA semantic, VQA question_type, VQA answer_type)
_TYPES: dict[str, tuple[str, str, str, str]] = {
    "existColor": ("verify", "obj", "is there a", "yes/no"),
    "count": ("query", "obj", "how many", "number"),
    "queryColor": ("query", "attr", "what color is the", "other"),
    "queryMaterial": ("query", "attr", "what", "other"),
    "queryName": ("query", "cat", "what is the", "other"),
    "relQuery": ("query", "rel", "what is", "other"),
    "sameColor": ("compare", "attr", "are the", "yes/no"),
    "sameMaterial": ("compare", "attr", "are the", "yes/no"),
    "existOr": ("logical", "obj", "is there a", "yes/no"),
    "existAnd": ("logical", "obj", "are there", "yes/no"),
}


@dataclass
class DemoReport:
    """What `generate_demo` wrote.

    Attributes:
        out: the dataset folder.
        size: the size preset used.
        seed: the seed used.
        images: images per split.
        questions: questions per split.
        boxes: boxes in the feature files, all splits together.
        files: every file written, by role; per-split roles end in _train / _val / _testdev
            (`demo.json`'s "files" holds the same paths, relative, nested by split).
        seconds: wall-clock time of the whole generation.
    """

    out: Path
    size: str
    seed: int
    images: dict[str, int] = field(default_factory=dict)
    questions: dict[str, int] = field(default_factory=dict)
    boxes: int = 0
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


# -------------------------------------------------------------------------------------------------
# The world


@dataclass(frozen=True)
class _Object:
    """A real object of an image: identity, attributes and its box (top-left corner and size, pixels)."""

    oid: str
    name: str
    color: str
    material: str
    size: str
    x: int
    y: int
    w: int
    h: int

    def center(self) -> tuple[float, float]:
        """The box centre in pixels."""
        return self.x + self.w / 2, self.y + self.h / 2


@dataclass
class _Scene:
    """One image's objects and relations, with a cache of unambiguous descriptions."""

    image_id: int
    objects: list[_Object]
    relations: dict[str, list[tuple[str, str]]]  # source oid -> [(relation, target oid)]
    rng: np.random.Generator
    _descriptions: dict[tuple[str, str | None, bool], dict[str, str] | None] = field(
        default_factory=dict, init=False, repr=False
    )

    def describe(self, obj: _Object, exclude: str | None = None, with_name: bool = True) -> dict[str, str] | None:
        """Fewest adjectives (never `exclude`) that, with the name if `with_name`, match only `obj`.

        Returns:
            adjective key -> value (possibly empty: the name alone is unique), or None when no
            combination is unambiguous. Among equally short combinations one is drawn at random,
            once per (object, exclude, with_name), so a scene always describes an object the same way.
        """
        key = (obj.oid, exclude, with_name)
        if key not in self._descriptions:
            keys = [k for k in _ADJECTIVES if k != exclude]
            self._descriptions[key] = None
            for r in range(0 if with_name else 1, len(keys) + 1):
                unique = [
                    combo
                    for combo in combinations(keys, r)
                    if len(_matching(self.objects, obj.name if with_name else None, _attrs(obj, combo))) == 1
                ]
                if unique:
                    self._descriptions[key] = _attrs(obj, unique[int(self.rng.integers(len(unique)))])
                    break
        return self._descriptions[key]


def _attrs(obj: _Object, keys: Iterable[str]) -> dict[str, str]:
    return {k: getattr(obj, k) for k in keys}


def _matching(objects: Sequence[_Object], name: str | None, attrs: Mapping[str, str]) -> list[_Object]:
    """Objects with that name (any when None) and every listed attribute value."""
    return [
        o for o in objects if (name is None or o.name == name) and all(getattr(o, k) == v for k, v in attrs.items())
    ]


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _place_boxes(rng: np.random.Generator, sizes: Sequence[str]) -> list[tuple[int, int, int, int]]:
    """Random (x, y, w, h) boxes inside the image, one per size, each overlapping the others little.

    A position is accepted as soon as its largest IoU with the boxes placed before is under
    `_MAX_OVERLAP`; after `_PLACEMENT_TRIES` draws the least overlapping one is kept, so crowded
    images still finish ("non-overlapping-ish").
    """
    placed: list[tuple[int, int, int, int]] = []
    for size in sizes:
        lo, hi = _BOX_SIDES[size]
        best, best_overlap = (0, 0, lo, lo), float("inf")
        for _ in range(_PLACEMENT_TRIES):
            w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            box = (int(rng.integers(0, IMAGE_WIDTH - w + 1)), int(rng.integers(0, IMAGE_HEIGHT - h + 1)), w, h)
            overlap = max((_iou(box, other) for other in placed), default=0.0)
            if overlap < best_overlap:
                best, best_overlap = box, overlap
            if overlap < _MAX_OVERLAP:
                break
        placed.append(best)
    return placed


def _sample_objects(rng: np.random.Generator, image_id: int) -> list[_Object]:
    """3-6 objects; one name repeats 2-4 times and the others appear once, so counts spread over 0-4."""
    # The repeat count first, then enough objects around it: every count 2-4 is equally common.
    repeat = int(rng.integers(2, 5))
    n = int(rng.integers(max(3, repeat + 1), 7))
    first = int(rng.integers(len(NAMES)))
    others = [i for i in range(len(NAMES)) if i != first]
    names = [NAMES[first]] * repeat + [NAMES[i] for i in rng.choice(others, size=n - repeat, replace=False)]
    names = [names[i] for i in rng.permutation(n)]
    sizes = [SIZES[int(i)] for i in rng.integers(len(SIZES), size=n)]
    boxes = _place_boxes(rng, sizes)
    objects = []
    for k, (name, size, box) in enumerate(zip(names, sizes, boxes, strict=True)):
        color = COLORS[int(rng.integers(len(COLORS)))]
        material = MATERIALS[int(rng.integers(len(MATERIALS)))]
        objects.append(_Object(str(image_id * 100 + k), name, color, material, size, *box))
    return objects


def _relation_name(source: tuple[float, float], target: tuple[float, float]) -> str:
    """How `source` stands to `target`: the dominant axis of the offset between the centres decides."""
    dx, dy = source[0] - target[0], source[1] - target[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"  # image y grows downward


def _relate(rng: np.random.Generator, objects: Sequence[_Object]) -> dict[str, list[tuple[str, str]]]:
    """Each object's outgoing edges to its 2-3 nearest objects (by centre distance)."""
    centers = np.array([o.center() for o in objects])
    distances = np.linalg.norm(centers[:, None] - centers[None], axis=-1)
    relations: dict[str, list[tuple[str, str]]] = {}
    for i, obj in enumerate(objects):
        k = min(int(rng.integers(2, 4)), len(objects) - 1)
        nearest = [int(j) for j in np.argsort(distances[i], kind="stable") if j != i][:k]
        relations[obj.oid] = [(_relation_name(obj.center(), objects[j].center()), objects[j].oid) for j in nearest]
    return relations


# -------------------------------------------------------------------------------------------------
# Boxes, features and detector labels


@dataclass
class _Detections:
    """One image's TSV row content, boxes in stored order."""

    boxes: np.ndarray  # (n, 4) float32 pixel x1, y1, x2, y2
    features: np.ndarray  # (n, FEATURE_DIM) float32
    objects_id: np.ndarray  # (n,) int64 index into objects_vocab.txt
    objects_conf: np.ndarray  # (n,) float32
    attrs_id: np.ndarray  # (n,) int64 index into attributes_vocab.txt
    attrs_conf: np.ndarray  # (n,) float32


class _Encoder:
    """Object -> feature vector: a seeded random projection of the attribute one-hots, noise, softplus."""

    def __init__(self, rng: np.random.Generator) -> None:
        width = len(NAMES) + len(COLORS) + len(MATERIALS) + len(SIZES)
        self.projection = rng.normal(0.0, _PROJECTION_STD, size=(width, FEATURE_DIM))
        self.clutter = np.full(FEATURE_DIM, _CLUTTER_LEVEL)
        self.offsets = np.cumsum([0, len(NAMES), len(COLORS), len(MATERIALS)])

    def signature(self, obj: _Object) -> np.ndarray:
        """onehot([name, colour, material, size]) @ P, computed as a sum of the four active rows."""
        rows = [
            self.offsets[0] + NAMES.index(obj.name),
            self.offsets[1] + COLORS.index(obj.color),
            self.offsets[2] + MATERIALS.index(obj.material),
            self.offsets[3] + SIZES.index(obj.size),
        ]
        return self.projection[rows].sum(axis=0)

    def encode(self, rng: np.random.Generator, signatures: np.ndarray, strength: np.ndarray) -> np.ndarray:
        """softplus(strength * signature + (1 - strength) * clutter + noise) per box.

        Args:
            rng: noise source.
            signatures: (n, FEATURE_DIM) object signatures (any value where strength is 0).
            strength: (n,) 1 for a real object, 0 for pure clutter, in between for a partial box.
        """
        s = strength[:, None]
        z = s * signatures + (1.0 - s) * self.clutter + rng.normal(0.0, _NOISE_STD, size=signatures.shape)
        return np.logaddexp(0.0, z).astype(np.float32)  # softplus, stable for large |z|


def _box_total(rng: np.random.Generator) -> int:
    """Boxes in an image: 10-40 for nine images in ten, 41-100 for the rest (as the adaptive release)."""
    if rng.random() < 0.9:
        return int(rng.integers(10, 41))
    return int(rng.integers(41, 101))


def _partial_box(rng: np.random.Generator, obj: _Object) -> tuple[int, int, int, int]:
    """A box that covers part of an object or a little context around it, clipped to the image."""
    w = max(8, int(obj.w * rng.uniform(0.45, 1.3)))
    h = max(8, int(obj.h * rng.uniform(0.45, 1.3)))
    x = int(obj.x + obj.w / 2 - w / 2 + rng.uniform(-0.25, 0.25) * obj.w)
    y = int(obj.y + obj.h / 2 - h / 2 + rng.uniform(-0.25, 0.25) * obj.h)
    x, y = min(max(0, x), IMAGE_WIDTH - 8), min(max(0, y), IMAGE_HEIGHT - 8)
    return x, y, min(w, IMAGE_WIDTH - x), min(h, IMAGE_HEIGHT - y)


def _clutter_boxes(
    rng: np.random.Generator, objects: Sequence[_Object], count: int
) -> tuple[list[tuple[int, int, int, int]], list[int]]:
    """`count` distractor (x, y, w, h) boxes and, for each, the index of the object it covers (-1: none).

    No distractor has exactly a real object's box, so a real object is found by its coordinates.
    """
    real = {(o.x, o.y, o.w, o.h) for o in objects}
    boxes: list[tuple[int, int, int, int]] = []
    owners: list[int] = []
    while len(boxes) < count:
        if rng.random() < _PARTIAL_RATE:
            owner = int(rng.integers(len(objects)))
            box = _partial_box(rng, objects[owner])
        else:
            owner = -1
            w, h = int(rng.integers(16, 321)), int(rng.integers(16, 241))
            box = (int(rng.integers(0, IMAGE_WIDTH - w + 1)), int(rng.integers(0, IMAGE_HEIGHT - h + 1)), w, h)
        if box not in real:
            boxes.append(box)
            owners.append(owner)
    return boxes, owners


def _detector_labels(
    rng: np.random.Generator, objects: Sequence[_Object], clutter: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """objects_id, objects_conf, attrs_id, attrs_conf for the real objects followed by `clutter` boxes."""
    n = len(objects)
    names = np.array([NAMES.index(o.name) for o in objects], dtype=np.int64)
    wrong = rng.random(n) < _WRONG_CLASS_RATE
    # A wrong class is any other name: shift by 1..len-1 so it never equals the true one.
    names = np.where(wrong, (names + rng.integers(1, len(NAMES), size=n)) % len(NAMES), names)
    object_conf = np.where(wrong, rng.uniform(0.2, 0.5, size=n), rng.uniform(0.5, 0.99, size=n))
    objects_id = np.concatenate([names, np.full(clutter, len(NAMES), dtype=np.int64)])
    objects_conf = np.concatenate([object_conf, rng.uniform(0.05, 0.4, size=clutter)]).astype(np.float32)
    colors = np.array([COLORS.index(o.color) for o in objects], dtype=np.int64)
    attrs_id = np.concatenate([colors, rng.integers(len(COLORS), size=clutter)]).astype(np.int64)
    attrs_conf = np.concatenate([rng.uniform(0.4, 0.95, size=n), rng.uniform(0.02, 0.2, size=clutter)])
    return objects_id, objects_conf, attrs_id, attrs_conf.astype(np.float32)


def _detect(rng: np.random.Generator, encoder: _Encoder, objects: Sequence[_Object]) -> _Detections:
    """Every box of an image (real objects and distractors) with features and labels, in random order."""
    n = len(objects)
    clutter, owners = _clutter_boxes(rng, objects, _box_total(rng) - n)
    xywh = np.array([(o.x, o.y, o.w, o.h) for o in objects] + clutter, dtype=np.float32)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    signatures = np.stack([encoder.signature(o) for o in objects])
    sig = np.concatenate([signatures, np.stack([signatures[max(o, 0)] for o in owners])])
    partial = rng.uniform(0.3, 0.6, size=len(owners))  # a partial box keeps a weaker copy of the signature
    strength = np.concatenate([np.ones(n), np.where(np.array(owners) >= 0, partial, 0.0)])
    features = encoder.encode(rng, sig, strength)
    labels = _detector_labels(rng, objects, len(clutter))
    order = rng.permutation(len(strength))
    return _Detections(boxes[order], features[order], *(a[order] for a in labels))


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def _tsv_row(image_id: int, det: _Detections) -> str:
    """One bottom-up-attention TSV row (little-endian float32 / int64 base64 fields), newline included."""
    fields = [
        str(image_id),
        str(IMAGE_WIDTH),
        str(IMAGE_HEIGHT),
        str(len(det.boxes)),
        _b64(det.boxes, "<f4"),
        _b64(det.features, "<f4"),
        _b64(det.objects_id, "<i8"),
        _b64(det.objects_conf, "<f4"),
        _b64(det.attrs_id, "<i8"),
        _b64(det.attrs_conf, "<f4"),
    ]
    return "\t".join(fields) + "\n"


# -------------------------------------------------------------------------------------------------
# Questions


@dataclass
class _Question:
    """A template question about one scene, with everything both file formats need."""

    detailed: str  # template name, a key of _TYPES
    question: str
    answer: str
    full_answer: str
    program: list[dict[str, Any]]
    annotations: dict[str, str]  # question token index -> object id
    group: str | None  # GQA global group (the answer's kind), None for yes/no
    local: str  # GQA local group
    wrong: tuple[str, ...]  # plausible wrong answers for the noisy VQA humans


class _Program:
    """A GQA functional program built step by step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def add(self, operation: str, argument: str, dependencies: Sequence[int] = ()) -> int:
        """Append a step and return its index."""
        self.steps.append({"operation": operation, "argument": argument, "dependencies": list(dependencies)})
        return len(self.steps) - 1

    def select(self, objects: Sequence[_Object], name: str | None, attrs: Mapping[str, str]) -> int:
        """select the name (ids of the matches, "-" for none), then one filter per adjective."""
        pool = _matching(objects, name, {})
        index = self.add("select", f"{name or 'object'} ({','.join(o.oid for o in pool) or '-'})")
        for key in _ADJECTIVES:
            if key in attrs:
                index = self.add(f"filter {key}", attrs[key], [index])
        return index


def _semantic_str(steps: Sequence[Mapping[str, Any]]) -> str:
    """GQA's one-line program: "select: ball (12)->filter color: red [0]->exist: ? [1]"."""
    parts = []
    for step in steps:
        deps = f" [{', '.join(map(str, step['dependencies']))}]" if step["dependencies"] else ""
        parts.append(f"{step['operation']}: {step['argument']}{deps}")
    return "->".join(parts)


def _phrase(attrs: Mapping[str, str], noun: str) -> str:
    return " ".join([attrs[k] for k in _ADJECTIVES if k in attrs] + [noun])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(name: str) -> str:
    return name + ("es" if name.endswith(("x", "s")) else "s")


def _annotate(question: str, refs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """GQA question annotations: the index of each referring noun's token -> the object id."""
    tokens = question.rstrip("?").lower().split()
    out: dict[str, str] = {}
    for word, oid in refs:
        for i, token in enumerate(tokens):
            if token == word and str(i) not in out:
                out[str(i)] = oid
                break
    return out


def _question(detailed: str, question: str, answer: str, full: str, program: _Program, **extra: Any) -> _Question:
    """Assemble a `_Question`; `extra` holds refs, group, local and wrong (defaults: none, None, detailed, yes/no)."""
    refs = extra.get("refs", ())
    return _Question(
        detailed=detailed,
        question=question,
        answer=answer,
        full_answer=full,
        program=program.steps,
        annotations=_annotate(question, refs),
        group=extra.get("group"),
        local=extra.get("local", detailed),
        wrong=extra.get("wrong", ("no",) if answer == "yes" else ("yes",)),
    )


def _present_combos(scene: _Scene) -> list[tuple[str, str]]:
    """The (colour, name) pairs present in the scene, in object order, without repeats."""
    return list(dict.fromkeys((o.color, o.name) for o in scene.objects))


def _absent_combos(scene: _Scene, k: int) -> list[tuple[str, str]]:
    """Up to k (colour, name) pairs absent from the scene; two in three of a name that is present (harder)."""
    present = set(_present_combos(scene))
    names = list(dict.fromkeys(o.name for o in scene.objects))
    hard = [(c, n) for n in names for c in COLORS if (c, n) not in present]
    easy = [(c, n) for n in NAMES if n not in names for c in COLORS]
    take_hard = min(len(hard), (2 * k + 2) // 3)
    picks = [hard[int(i)] for i in scene.rng.choice(len(hard), size=take_hard, replace=False)]
    take_easy = min(len(easy), k - take_hard)
    return picks + [easy[int(i)] for i in scene.rng.choice(len(easy), size=take_easy, replace=False)]


def _exist_question(scene: _Scene, color: str, name: str) -> _Question:
    phrase = f"{color} {name}"
    matches = _matching(scene.objects, name, {"color": color})
    program = _Program()
    program.add("exist", "?", [program.select(scene.objects, name, {"color": color})])
    article = _article(phrase)
    if matches:
        full, answer = f"Yes, there is {article} {phrase}.", "yes"
    else:
        full, answer = f"No, there is no {phrase}.", "no"
    refs = [(name, matches[0].oid)] if matches else []
    question = f"Is there {article} {phrase}?"
    return _question("existColor", question, answer, full, program, refs=refs, local=f"existColor-{name}")


def _exist_candidates(scene: _Scene) -> list[_Question]:
    present = _present_combos(scene)
    combos = present + _absent_combos(scene, len(present))
    return [_exist_question(scene, color, name) for color, name in combos]


def _count_candidates(scene: _Scene) -> list[_Question]:
    counts = Counter(o.name for o in scene.objects)
    out = []
    for name in NAMES:
        k, plural = counts[name], _plural(name)
        full = {0: f"There are no {plural}.", 1: f"There is 1 {name}."}.get(k, f"There are {k} {plural}.")
        program = _Program()
        program.add("count", "?", [program.select(scene.objects, name, {})])
        first = _matching(scene.objects, name, {})[:1]
        out.append(
            _question(
                "count",
                f"How many {plural} are there?",
                str(k),
                full,
                program,
                refs=[(plural, o.oid) for o in first],
                group="count",
                local=f"count-{name}",
                wrong=tuple(str(v) for v in (k - 1, k + 1) if v >= 0),
            )
        )
    return out


def _query_attr_candidates(scene: _Scene, attr: Literal["color", "material"]) -> list[_Question]:
    """Questions like "What color is the large ball?", one per object describable without `attr`."""
    out = []
    for obj in scene.objects:
        attrs = scene.describe(obj, exclude=attr)
        if attrs is None:
            continue
        phrase, value = _phrase(attrs, obj.name), getattr(obj, attr)
        full = f"The {phrase} is {value}." if attr == "color" else f"The {phrase} is made of {value}."
        program = _Program()
        program.add("query", attr, [program.select(scene.objects, obj.name, attrs)])
        detailed = "queryColor" if attr == "color" else "queryMaterial"
        question = f"What {attr} is the {phrase}?"
        wrong = tuple(v for v in (COLORS if attr == "color" else MATERIALS) if v != value)
        extra = {"refs": [(obj.name, obj.oid)], "group": attr, "local": f"{detailed}-{obj.name}", "wrong": wrong}
        out.append(_question(detailed, question, value, full, program, **extra))
    return out


def _query_name_candidates(scene: _Scene) -> list[_Question]:
    """Questions like "What is the red metal object?", for objects that adjectives alone pick out."""
    out = []
    for obj in scene.objects:
        attrs = scene.describe(obj, with_name=False)
        if attrs is None:
            continue
        phrase = _phrase(attrs, "object")
        program = _Program()
        program.add("query", "name", [program.select(scene.objects, None, attrs)])
        full = f"The {phrase} is {_article(obj.name)} {obj.name}."
        wrong = tuple(n for n in NAMES if n != obj.name)
        extra = {"refs": [("object", obj.oid)], "group": "name", "local": "queryName", "wrong": wrong}
        out.append(_question("queryName", f"What is the {phrase}?", obj.name, full, program, **extra))
    return out


def _relation_candidates(scene: _Scene) -> list[_Question]:
    """Questions like "What is to the left of the cup?", where every source of that edge has one name."""
    out = []
    for target in scene.objects:
        attrs = scene.describe(target)
        if attrs is None:
            continue
        phrase = _phrase(attrs, target.name)
        for rel in RELATIONS:
            sources = [o for o in scene.objects if (rel, target.oid) in scene.relations[o.oid]]
            names = sorted({o.name for o in sources})
            if len(names) != 1:
                continue
            program = _Program()
            anchor = program.select(scene.objects, target.name, attrs)
            related = program.add("relate", f"_,{rel},s ({','.join(o.oid for o in sources)})", [anchor])
            program.add("query", "name", [related])
            full = f"The {names[0]} is {rel} the {phrase}."
            wrong = tuple(n for n in NAMES if n != names[0])
            extra = {"refs": [(target.name, target.oid)], "group": "name", "local": f"relQuery-{rel}", "wrong": wrong}
            out.append(_question("relQuery", f"What is {rel} the {phrase}?", names[0], full, program, **extra))
    return out


def _compare_candidates(scene: _Scene, attr: Literal["color", "material"]) -> list[_Question]:
    """Questions like "Are the ball and the cup the same color?", for pairs described without `attr`."""
    out = []
    detailed = "sameColor" if attr == "color" else "sameMaterial"
    for a, b in combinations(scene.objects, 2):
        da, db = scene.describe(a, exclude=attr), scene.describe(b, exclude=attr)
        if da is None or db is None:
            continue
        pa, pb, va, vb = _phrase(da, a.name), _phrase(db, b.name), getattr(a, attr), getattr(b, attr)
        program = _Program()
        first, second = program.select(scene.objects, a.name, da), program.select(scene.objects, b.name, db)
        program.add(f"same {attr}", "", [first, second])
        if va == vb:
            answer, full = "yes", f"Yes, the {pa} and the {pb} are both {va}."
        else:
            answer, full = "no", f"No, the {pa} is {va} and the {pb} is {vb}."
        question = f"Are the {pa} and the {pb} the same {attr}?"
        refs = [(a.name, a.oid), (b.name, b.oid)]
        out.append(_question(detailed, question, answer, full, program, refs=refs, local=f"{detailed}-{a.name}"))
    return out


def _logical_question(
    scene: _Scene, op: Literal["or", "and"], first: tuple[str, str], second: tuple[str, str]
) -> _Question:
    """Is there a red ball or a blue cup? / Are there both a red ball and a blue cup? (per `op`)."""
    program, exists, present, refs = _Program(), [], [], []
    for color, name in (first, second):
        exists.append(program.add("exist", "?", [program.select(scene.objects, name, {"color": color})]))
        matches = _matching(scene.objects, name, {"color": color})
        present.append(bool(matches))
        refs += [(name, o.oid) for o in matches[:1]]
    program.add(op, "", exists)
    p1, p2 = f"{first[0]} {first[1]}", f"{second[0]} {second[1]}"
    a1, a2 = _article(p1), _article(p2)
    if op == "or":
        yes = any(present)
        shown = p1 if present[0] else p2
        full = f"Yes, there is {_article(shown)} {shown}." if yes else f"No, there is neither {a1} {p1} nor {a2} {p2}."
        question, detailed = f"Is there {a1} {p1} or {a2} {p2}?", "existOr"
    else:
        yes = all(present)
        missing = p2 if present[0] else p1
        full = f"Yes, there are both {a1} {p1} and {a2} {p2}." if yes else f"No, there is no {missing}."
        question, detailed = f"Are there both {a1} {p1} and {a2} {p2}?", "existAnd"
    answer, local = ("yes" if yes else "no"), f"{detailed}-{first[1]}"
    return _question(detailed, question, answer, full, program, refs=refs, local=local)


def _logical_candidates(scene: _Scene, op: Literal["or", "and"]) -> list[_Question]:
    """Pairs of (colour, name) items: present/absent mixes that give both answers for either operator."""
    rng = scene.rng
    present = _present_combos(scene)
    absent = _absent_combos(scene, len(present) + 2)
    pairs = [(p, absent[int(rng.integers(len(absent)))]) for p in present]  # or: yes, and: no
    pairs += [(a, b) for a, b in zip(absent[::2], absent[1::2], strict=False)]  # both: no
    pairs += [(a, b) for a, b in zip(present[::2], present[1::2], strict=False)]  # or/and: yes
    # Random order of the two items, so the present one is not always named first.
    pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs if a != b]
    return [_logical_question(scene, op, a, b) for a, b in pairs]


# (template name, share of the questions, candidate builder)
_TEMPLATES: tuple[tuple[str, float, Callable[[_Scene], list[_Question]]], ...] = (
    ("existColor", 0.16, _exist_candidates),
    ("count", 0.14, _count_candidates),
    ("queryColor", 0.10, partial(_query_attr_candidates, attr="color")),
    ("queryMaterial", 0.08, partial(_query_attr_candidates, attr="material")),
    ("queryName", 0.10, _query_name_candidates),
    ("relQuery", 0.16, _relation_candidates),
    ("sameColor", 0.07, partial(_compare_candidates, attr="color")),
    ("sameMaterial", 0.05, partial(_compare_candidates, attr="material")),
    ("existOr", 0.07, partial(_logical_candidates, op="or")),
    ("existAnd", 0.07, partial(_logical_candidates, op="and")),
)
# Cumulative shares without the last (1.0): searchsorted on a uniform draw gives a template index.
_TEMPLATE_CUMULATIVE = np.cumsum([w for _, w, _ in _TEMPLATES])[:-1] / sum(w for _, w, _ in _TEMPLATES)


class _Balancer:
    """Keeps a split's answers spread out: of the answers on offer, the least used so far wins."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.counts: Counter[str] = Counter()

    def pick(self, offers: Sequence[_Question]) -> _Question:
        """The least-used answer among `offers` (ties at random), then one question giving it at random."""
        answers = list(dict.fromkeys(q.answer for q in offers))
        keys = self.rng.random(len(answers))
        answer = min(zip(answers, keys, strict=True), key=lambda pair: (self.counts[pair[0]], pair[1]))[0]
        chosen = [q for q in offers if q.answer == answer]
        question = chosen[int(self.rng.integers(len(chosen)))]
        self.counts[answer] += 1
        return question


def _ask(scene: _Scene, balancer: _Balancer) -> list[_Question]:
    """8-12 distinct questions about a scene, templates drawn by their shares."""
    rng = scene.rng
    wanted = int(rng.integers(_QUESTIONS_PER_IMAGE[0], _QUESTIONS_PER_IMAGE[1] + 1))
    built: dict[str, list[_Question]] = {}
    asked: list[_Question] = []
    seen: set[str] = set()
    for _ in range(wanted * 8):  # bounded: a template with nothing left is simply drawn again
        if len(asked) == wanted:
            break
        name, _, build = _TEMPLATES[int(np.searchsorted(_TEMPLATE_CUMULATIVE, rng.random(), side="right"))]
        if name not in built:
            built[name] = build(scene)
        offers = [q for q in built[name] if q.question not in seen]
        if offers:
            question = balancer.pick(offers)
            seen.add(question.question)
            asked.append(question)
    return asked


# -------------------------------------------------------------------------------------------------
# File records


def _gqa_question(image_id: int, qid: int, q: _Question) -> dict[str, Any]:
    structural, semantic, _, _ = _TYPES[q.detailed]
    return {
        "imageId": str(image_id),
        "question": q.question,
        "answer": q.answer,
        "fullAnswer": q.full_answer,
        "isBalanced": True,
        "groups": {"global": q.group, "local": q.local},
        "entailed": [],
        "equivalent": [str(qid)],
        "types": {"structural": structural, "semantic": semantic, "detailed": q.detailed},
        "annotations": {"question": q.annotations, "answer": {}, "fullAnswer": {}},
        "semantic": q.program,
        "semanticStr": _semantic_str(q.program),
    }


def _gqa_scene_graph(scene: _Scene) -> dict[str, Any]:
    objects = {
        o.oid: {
            "name": o.name,
            "x": o.x,
            "y": o.y,
            "w": o.w,
            "h": o.h,
            "attributes": [o.color, o.material, o.size],
            "relations": [{"name": rel, "object": target} for rel, target in scene.relations[o.oid]],
        }
        for o in scene.objects
    }
    return {"width": IMAGE_WIDTH, "height": IMAGE_HEIGHT, "objects": objects}


def _answer_variant(u: float, answer: str) -> str:
    """A way of typing `answer` that the official VQA normalisation maps back to it; `u` in [0, 1) picks it."""
    options = [answer.capitalize(), answer + ".", answer.upper(), f" {answer} "]
    if answer.isdigit() and int(answer) < len(_NUMBER_WORDS):
        options += [_NUMBER_WORDS[int(answer)], _NUMBER_WORDS[int(answer)].capitalize()]
    return options[int(u * len(options))]


def _human_answers(rng: np.random.Generator, q: _Question) -> list[dict[str, Any]]:
    """Ten noisy human answers: at most three wrong, the rest the answer or a normalising variant of it."""
    # One batch of uniforms per question: drawing them one by one made this the slowest step.
    draws = rng.random((11, 4))
    n_wrong = int(np.searchsorted(_WRONG_HUMANS_CUMULATIVE, draws[10, 0], side="right"))
    wrong = set(np.argsort(draws[:10, 3], kind="stable")[:n_wrong].tolist())
    answers = []
    for i in range(10):
        pick, variant, confidence = draws[i, :3]
        if i in wrong:
            text, said = q.wrong[int(pick * len(q.wrong))], ("maybe", "no", "yes")[int(confidence * 3)]
        else:
            text = _answer_variant(variant, q.answer) if pick < _VARIANT_RATE else q.answer
            said = "yes" if confidence < 0.85 else "maybe"
        answers.append({"answer": text, "answer_confidence": said, "answer_id": i + 1})
    return answers


def _vqa_files(
    split: str, asked: Sequence[tuple[int, int, _Question]], rng: np.random.Generator
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The VQA v2 questions and annotations documents of a split."""
    info = {
        "description": "isubg demo: a synthetic world in the VQA v2 format",
        "url": "",
        "version": "2.0",
        "year": 2017,  # the VQA v2 release year, as the real files carry; no generation date (determinism)
        "contributor": "isubg demo generator",
        "date_created": "deterministic (no timestamp)",
    }
    license_ = {"url": "https://creativecommons.org/publicdomain/zero/1.0/", "name": "CC0 1.0 (synthetic data)"}
    subtype = VQA_SUBTYPES[split]
    questions = [{"image_id": image_id, "question": q.question, "question_id": qid} for image_id, qid, q in asked]
    annotations = [
        {
            "question_type": _TYPES[q.detailed][2],
            "multiple_choice_answer": q.answer,
            "answers": _human_answers(rng, q),
            "image_id": image_id,
            "answer_type": _TYPES[q.detailed][3],
            "question_id": qid,
        }
        for image_id, qid, q in asked
    ]
    questions_doc = {
        "info": info,
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": license_,
        "data_subtype": subtype,
        "questions": questions,
    }
    annotations_doc = {"info": info, "license": license_, "data_subtype": subtype, "annotations": annotations}
    return questions_doc, annotations_doc


# -------------------------------------------------------------------------------------------------
# Writing


@contextmanager
def _atomic(path: Path) -> Iterator[TextIO]:
    """A text handle on a temporary file beside `path`, renamed onto it only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8", newline="\n") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: object) -> None:
    # json.dumps uses the C encoder; json.dump streams through the pure-Python one, several times slower.
    text = json.dumps(data)
    with _atomic(path) as handle:
        handle.write(text)


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    with _atomic(path) as handle:
        handle.writelines(f"{line}\n" for line in lines)


def _layout(out: Path) -> dict[str, Path]:
    """Every file of the dataset, by role."""
    files: dict[str, Path] = {}
    for split in SPLITS:
        sub = VQA_SUBTYPES[split]
        files[f"gqa_questions_{split}"] = out / "gqa" / "questions" / f"{split}_balanced_questions.json"
        files[f"gqa_scene_graphs_{split}"] = out / "gqa" / "sceneGraphs" / f"{split}_sceneGraphs.json"
        files[f"vqa_questions_{split}"] = out / "vqa" / f"v2_OpenEnded_mscoco_{sub}_questions.json"
        files[f"vqa_annotations_{split}"] = out / "vqa" / f"v2_mscoco_{sub}_annotations.json"
    features = out / "features"
    files.update(
        features_tsv=features / "demo.tsv",
        features_h5=features / "demo.h5",
        features_id_map=features / "demo_imgid2idx.json",
        objects_vocab=features / "objects_vocab.txt",
        attributes_vocab=features / "attributes_vocab.txt",
        manifest=out / "demo.json",
    )
    return files


def _generate_split(
    split: str, count: int, first_id: int, seed: int, encoder: _Encoder, tsv: TextIO
) -> tuple[list[_Scene], list[tuple[int, int, _Question]], int]:
    """Build a split's scenes, write their TSV rows and ask their questions.

    Returns:
        the scenes, (image id, question id, question) triples, and the number of boxes written.
    """
    index = SPLITS.index(split)
    # Independent streams per split and purpose: changing one never shifts the others.
    world_rng = np.random.default_rng([seed, index, 1])
    ask_rng = np.random.default_rng([seed, index, 2])
    balancer = _Balancer(ask_rng)
    scenes, asked, boxes = [], [], 0
    for image_id in range(first_id, first_id + count):
        objects = _sample_objects(world_rng, image_id)
        scene = _Scene(image_id, objects, _relate(world_rng, objects), ask_rng)
        detections = _detect(world_rng, encoder, objects)
        tsv.write(_tsv_row(image_id, detections))
        boxes += len(detections.boxes)
        # VQA convention: question id = image id * 1000 + k, unique across splits since image ids are.
        asked += [(image_id, image_id * 1000 + k, q) for k, q in enumerate(_ask(scene, balancer))]
        scenes.append(scene)
    return scenes, asked, boxes


def _write_split(
    files: Mapping[str, Path],
    split: str,
    scenes: Sequence[_Scene],
    asked: Sequence[tuple[int, int, _Question]],
    seed: int,
) -> None:
    """Write a split's GQA questions and scene graphs and its VQA questions and annotations."""
    _write_json(files[f"gqa_questions_{split}"], {str(qid): _gqa_question(i, qid, q) for i, qid, q in asked})
    _write_json(files[f"gqa_scene_graphs_{split}"], {str(s.image_id): _gqa_scene_graph(s) for s in scenes})
    questions, annotations = _vqa_files(split, asked, np.random.default_rng([seed, SPLITS.index(split), 3]))
    _write_json(files[f"vqa_questions_{split}"], questions)
    _write_json(files[f"vqa_annotations_{split}"], annotations)


def _manifest(out: Path, report: DemoReport) -> dict[str, Any]:
    """demo.json: what was generated and where, paths relative to `out`; per-split files nest by split."""
    files: dict[str, Any] = {}
    for role, path in report.files.items():
        kind, _, split = role.rpartition("_")
        if split in SPLITS:
            files.setdefault(kind, {})[split] = path.relative_to(out).as_posix()
        else:
            files[role] = path.relative_to(out).as_posix()
    return {
        "generator": "isubg demo",
        "version": GENERATOR_VERSION,
        "size": report.size,
        "seed": report.seed,
        "feature_dim": FEATURE_DIM,
        "splits": {s: {"images": report.images[s], "questions": report.questions[s]} for s in SPLITS},
        "files": files,
    }


def _generate_into(folder: Path, report: DemoReport, say: Callable[[str], None]) -> None:
    """Write the whole dataset except the manifest under `folder`, filling the report's counts."""
    files = _layout(folder)
    encoder = _Encoder(np.random.default_rng([report.seed, 0]))
    first_id = 1
    with _atomic(files["features_tsv"]) as tsv:
        for split, count in zip(SPLITS, SIZE_PRESETS[report.size], strict=True):
            say(f"demo {split}: {count} images")
            scenes, asked, boxes = _generate_split(split, count, first_id, report.seed, encoder, tsv)
            _write_split(files, split, scenes, asked, report.seed)
            first_id += count
            report.images[split], report.questions[split] = count, len(asked)
            report.boxes += boxes
    _write_lines(files["objects_vocab"], (*NAMES, CLUTTER_CLASS))
    _write_lines(files["attributes_vocab"], (*COLORS, *MATERIALS, *SIZES))
    say("demo features: converting TSV to HDF5")
    convert_tsv([files["features_tsv"]], files["features_h5"])


def _commit(staging: Path, out: Path, manifest: Mapping[str, Any]) -> None:
    """Move every staged file onto its place, the manifest last.

    The old manifest goes first, so while files are being swapped no demo.json claims a complete
    dataset; a reader that trusts demo.json (a cache check) never sees a mix of two generations.
    """
    (out / "demo.json").unlink(missing_ok=True)
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = out / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    _write_json(out / "demo.json", manifest)


def generate_demo(
    out: Path,
    size: Literal["tiny", "small", "medium"] = "small",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> DemoReport:
    """Generate the demo dataset under `out` (folders are created; existing demo files are replaced).

    Nothing in `out` changes until every file is complete (see the module docstring); `demo.json`
    is written last, so its presence with the wanted size and seed means the dataset is whole.

    Args:
        out: the dataset folder.
        size: "tiny" (40/12/12 images for train/val/testdev), "small" (600/150/150) or
            "medium" (3000/600/600); about ten questions per image.
        seed: the world, features and questions are a pure function of (size, seed).
        progress: called with a short message at each stage.

    Returns:
        A `DemoReport` with counts per split, the files written and the time taken.

    Raises:
        ConfigError: an unknown size.
    """
    if size not in SIZE_PRESETS:
        raise ConfigError(f"demo size must be one of {', '.join(SIZE_PRESETS)}; got {size!r}")
    start = time.perf_counter()
    say = progress or (lambda _message: None)
    out = Path(out)
    report = DemoReport(out=out, size=size, seed=seed, files=_layout(out))
    staging = out / f".demo-staging-{os.getpid()}"
    try:
        _generate_into(staging, report, say)
        say("demo: moving the files into place")
        _commit(staging, out, _manifest(out, report))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    say(f"demo written to {out} in {report.seconds:.1f} s")
    return report
