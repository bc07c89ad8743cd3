"""Compact, memory-mapped tables of a processed folder: the questions of a split and the scene graphs of its images.

Why not JSON: a GQA training split holds 943k questions. As a JSON list of dicts it costs about a kilobyte of
Python objects per question in every process that reads it, and DataLoader workers forked from the trainer
slowly copy those pages (reference counts write to them). Here every table is a folder of `.npy` arrays
opened with `numpy.load(mmap_mode="r")`: a process maps the files, reads the rows it needs, and all
processes share one copy in the page cache.

A folder holds `table.json` ({"kind", "rows", ...}) and one `.npy` file per array. Variable-length fields are
"ragged": `<name>.npy` holds every row's values back to back and `<name>_offsets.npy` (int64, rows + 1) where
each row starts, so row i is `values[offsets[i]:offsets[i + 1]]`. Text is ragged UTF-8 bytes.

Questions (`questions_<split>/`, one row per question; the record keys of `QuestionTable.record`):
    question_id, image_id, question, answer, qtype, detail   text
    answered     uint8   1 when the question has an answer (then `labels`/`scores` are its targets, maybe none)
    tokens       ragged int32 word ids; `entity` (uint8) shares `tokens_offsets`
    labels       ragged int32 answer ids; `scores` (float32) shares `labels_offsets`
    answers      ragged text: the raw human answers (VQA: ten; GQA: the one answer), `answers_count` per question
    gt_row, detected_row   int32 the image's row in graphs_gt / graphs_detected (-1: no such graph)

Scene graphs (`graphs_gt/`, `graphs_detected/`, one row per image; ids are `GraphVocab` ids):
    image_id     text
    nodes        ragged over nodes: `names` int32, `boxes` float32 (4), `attributes` ragged int32 per node,
                 `object_ids` text per node (only where the graph has real object ids)
    edges        ragged over edges: `edges` int32 (2) local node indices, `relations` int32
    stat         ragged int32: the image's stat-word ids (question dictionary), ranked
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from isubg.data.scene_graphs import GraphVocab, SceneGraph, encoded_to_pyg
from isubg.errors import DataError

if TYPE_CHECKING:
    from torch_geometric.data import Data

__all__ = ["GraphTable", "GraphWriter", "QuestionTable", "QuestionWriter", "Ragged", "TextColumn"]

_META = "table.json"
# Offsets indexed by something other than the table's rows (nodes, answers): not checked against the row count.
_ELEMENT_OFFSETS = ("attributes_offsets", "answer_bytes_offsets", "object_id_bytes_offsets")


class Ragged:
    """Rows of variable length built by appending, stored as values + offsets.

    Args:
        typecode: the `array` typecode of the values ("i" int32, "f" float32, "B" uint8, ...).
        width: values per element (4 for a box); rows count elements, not values.
    """

    def __init__(self, typecode: str, width: int = 1) -> None:
        self.values = array(typecode)
        self.offsets = array("q", [0])
        self.width = width

    def append(self, row: Iterable[Any]) -> None:
        """Add one row (for width > 1, its values flattened element by element)."""
        self.values.extend(row)
        self.offsets.append(len(self.values) // self.width)

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """{name: values, name_offsets: offsets} as numpy arrays."""
        values = np.array(self.values, dtype=np.dtype(self.values.typecode))  # one buffer copy, empty or not
        if self.width > 1:
            values = values.reshape(-1, self.width)
        return {name: values, f"{name}_offsets": np.array(self.offsets, dtype=np.int64)}


class TextColumn(Ragged):
    """Ragged UTF-8 text, one string per row."""

    def __init__(self) -> None:
        super().__init__("B")

    def add(self, text: str) -> None:
        """Add one string."""
        self.append(text.encode("utf-8"))


def _text(values: np.ndarray, offsets: np.ndarray, i: int) -> str:
    return bytes(values[offsets[i] : offsets[i + 1]]).decode("utf-8")


def _texts(values: np.ndarray, offsets: np.ndarray, rows: Iterable[int]) -> list[str]:
    """The text of each of `rows`, from one bytes copy of the column (for whole-column reads)."""
    data = bytes(values)
    return [data[offsets[r] : offsets[r + 1]].decode("utf-8") for r in rows]


def _write(folder: Path, kind: str, rows: int, arrays: Mapping[str, np.ndarray], **meta: Any) -> None:
    folder.mkdir(parents=True)
    for name, values in arrays.items():
        np.save(folder / f"{name}.npy", values, allow_pickle=False)
    # Offsets with one entry per row (+1) are checked on opening: a truncated or mixed-up folder fails early.
    row_offsets = [n for n in arrays if n.endswith("_offsets") and n not in _ELEMENT_OFFSETS]
    info = {"kind": kind, "rows": rows, "arrays": sorted(arrays), "row_offsets": sorted(row_offsets), **meta}
    (folder / _META).write_text(json.dumps(info, indent=1), encoding="utf-8")


def _open(folder: Path, kind: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, name -> memory-mapped array) of a table folder; DataError when missing or not `kind`."""
    meta_path = folder / _META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: not a table of a processed folder (no {_META}); run isubg data prepare") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{meta_path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise DataError(f"{meta_path}: not a {kind} table")
    arrays = {}
    for name in meta.get("arrays", []):
        path = folder / f"{name}.npy"
        try:
            # A plain ndarray view of the map: slicing a np.memmap costs several times more per row.
            arrays[name] = np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable or truncated ({exc}); prepare the folder again") from None
    rows = int(meta["rows"])
    bad = [n for n in meta.get("row_offsets", []) if n not in arrays or arrays[n].shape != (rows + 1,)]
    if bad:
        raise DataError(f"{folder}: {bad[0]}.npy does not hold {rows} + 1 offsets; prepare the folder again")
    return meta, arrays


# --------------------------------------------------------------------------------------------------
# Questions


class QuestionWriter:
    """Collects one split's questions row by row, then writes them as a `QuestionTable` folder."""

    TEXT = ("question_id", "image_id", "question", "answer", "qtype", "detail")

    def __init__(self) -> None:
        self.text = {name: TextColumn() for name in self.TEXT}
        self.tokens, self.entity = Ragged("i"), array("B")
        self.labels, self.scores = Ragged("i"), array("f")
        self.answers, self.answers_count = TextColumn(), array("i")
        self.answered, self.gt_row, self.detected_row = array("B"), array("i"), array("i")

    def add(self, record: Mapping[str, Any], gt_row: int, detected_row: int) -> None:
        """Add one question given as a `QuestionTable.record`-style dict (labels None: no answer)."""
        for name in self.TEXT:
            self.text[name].add(record[name] or "")
        self.tokens.append(record["tokens"])
        self.entity.extend(record["entity"])
        labels = record["labels"]
        self.answered.append(labels is not None)
        self.labels.append(labels or ())
        self.scores.extend(record["scores"] or ())
        for answer in record["answers"]:
            self.answers.add(answer)
        self.answers_count.append(len(record["answers"]))
        self.gt_row.append(gt_row)
        self.detected_row.append(detected_row)

    def __len__(self) -> int:
        return len(self.answered)

    def write(self, folder: Path) -> None:
        """Write the table folder (which must not exist yet)."""
        arrays: dict[str, np.ndarray] = {}
        for name, column in self.text.items():
            arrays.update(column.arrays(name))
        arrays.update(self.tokens.arrays("tokens"))
        arrays["entity"] = np.asarray(self.entity, dtype=np.uint8)
        arrays.update(self.labels.arrays("labels"))
        arrays["scores"] = np.asarray(self.scores, dtype=np.float32)
        answers = self.answers.arrays("answers")
        arrays["answers"], arrays["answer_bytes_offsets"] = answers["answers"], answers["answers_offsets"]
        arrays["answers_offsets"] = np.concatenate([[0], np.cumsum(np.asarray(self.answers_count, dtype=np.int64))])
        arrays["answered"] = np.array(self.answered, dtype=np.uint8)
        arrays["gt_row"] = np.array(self.gt_row, dtype=np.int32)
        arrays["detected_row"] = np.array(self.detected_row, dtype=np.int32)
        _write(folder, "questions", len(self), arrays)


class QuestionTable(Sequence[dict[str, Any]]):
    """The questions of one split, memory-mapped; a sequence of record dicts (see the module docstring).

    Indexing with a slice gives a view over those rows (`open_split`'s question limit). Hot paths use the
    column accessors (`tokens`, `entity`, `targets`, ...) rather than building a record dict.

    Raises:
        DataError: the folder is not a questions table or an array is missing or truncated.
    """

    def __init__(self, folder: Path, rows: np.ndarray | None = None) -> None:
        self.folder = Path(folder)
        self.meta, self.a = _open(self.folder, "questions")
        self._rows = rows
        self._len = int(self.meta["rows"]) if rows is None else len(rows)

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:
        # Pickling (a spawned worker) sends the folder, not the mapped arrays: a copy would cost gigabytes.
        return {"folder": self.folder, "rows": self._rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["rows"])  # type: ignore[misc]

    def row(self, i: int) -> int:
        """The stored row of item `i` (they differ in a view)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"question {i} out of range for {len(self)} questions")
        i %= len(self)
        return i if self._rows is None else int(self._rows[i])

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            rows = np.arange(len(self))[index] if self._rows is None else self._rows[index]
            return QuestionTable(self.folder, np.asarray(rows, dtype=np.int64))
        return self.record(index)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self.record(i) for i in range(len(self)))

    def text(self, name: str, i: int) -> str:
        """Text column `name` of item `i`."""
        return _text(self.a[name], self.a[f"{name}_offsets"], self.row(i))

    def column_text(self, name: str) -> list[str]:
        """Every item's text in column `name` (decoded in one pass)."""
        rows = range(int(self.meta["rows"])) if self._rows is None else self._rows
        return _texts(self.a[name], self.a[f"{name}_offsets"], rows)

    def _ragged(self, name: str, offsets: str, i: int) -> np.ndarray:
        r = self.row(i)
        start, end = self.a[offsets][r], self.a[offsets][r + 1]
        return np.asarray(self.a[name][start:end])

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(word ids int32, entity flags uint8) of item `i`, unpadded."""
        return self._ragged("tokens", "tokens_offsets", i), self._ragged("entity", "tokens_offsets", i)

    def answered(self, i: int) -> bool:
        """Whether item `i` has an answer (and so targets)."""
        return bool(self.a["answered"][self.row(i)])

    def targets(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(answer ids int32, soft scores float32) of item `i`; None when it has no answer."""
        if not self.answered(i):
            return None
        return self._ragged("labels", "labels_offsets", i), self._ragged("scores", "labels_offsets", i)

    def graph_rows(self, i: int) -> tuple[int, int]:
        """(row in graphs_gt or -1, row in graphs_detected or -1) of item `i`'s image."""
        r = self.row(i)
        return int(self.a["gt_row"][r]), int(self.a["detected_row"][r])

    def human_answers(self, i: int) -> list[str]:
        """The raw human answers of item `i` (VQA: ten; GQA: the answer; none without answers)."""
        r = self.row(i)
        first, last = self.a["answers_offsets"][r], self.a["answers_offsets"][r + 1]
        return [_text(self.a["answers"], self.a["answer_bytes_offsets"], j) for j in range(first, last)]

    def record(self, i: int) -> dict[str, Any]:
        """Item `i` as a dict: the text columns, tokens, entity, labels, scores (None without an answer), answers."""
        out: dict[str, Any] = {name: self.text(name, i) for name in QuestionWriter.TEXT}
        tokens, entity = self.tokens(i)
        targets = self.targets(i)
        out.update(
            tokens=tokens.tolist(),
            entity=entity.tolist(),
            labels=None if targets is None else targets[0].tolist(),
            scores=None if targets is None else targets[1].tolist(),
            answers=self.human_answers(i),
        )
        if targets is None:
            out["answer"] = None
        return out


# --------------------------------------------------------------------------------------------------
# Scene graphs


class GraphWriter:
    """Collects scene graphs (and their stat words) image by image, then writes them as a `GraphTable` folder.

    Args:
        vocab: encodes names, attributes and relations; every token of every added graph must be in it.
        object_ids: keep each node's object id (ground-truth graphs); False for detector graphs, whose ids are
            their node indices anyway.
    """

    def __init__(self, vocab: GraphVocab, *, object_ids: bool) -> None:
        self.vocab = vocab
        self.image_ids, self.object_ids = TextColumn(), TextColumn() if object_ids else None
        self.names, self.boxes, self.attributes = Ragged("i"), Ragged("f", 4), Ragged("i")
        self.edges, self.relations, self.stat = Ragged("i", 2), array("i"), Ragged("i")
        self.rows: dict[str, int] = {}

    def _ids(self, tokens: Iterable[str], where: str) -> list[int]:
        ids = [self.vocab.index(t) for t in tokens]
        if 1 in ids:
            missing = next(t for t, i in zip(tokens, ids, strict=False) if i == 1)
            raise DataError(f"{where}: token {missing!r} is not in the graph vocabulary")
        return ids

    def add(self, image_id: str, graph: SceneGraph, stat: Sequence[int]) -> int:
        """Add one image's graph and stat-word ids; returns its row."""
        where = f"scene graph of image {image_id}"
        self.rows[image_id] = len(self.rows)
        self.image_ids.add(image_id)
        self.names.append(self._ids(graph.names, where))
        self.boxes.append(graph.boxes.reshape(-1).tolist())
        for attrs in graph.attributes:
            self.attributes.append(self._ids(attrs, where))
        if self.object_ids is not None:
            for oid in graph.object_ids:
                self.object_ids.add(oid)
        self.edges.append(graph.edges.reshape(-1).tolist())
        self.relations.extend(self._ids(graph.relations, where))
        self.stat.append(stat)
        return self.rows[image_id]

    def write(self, folder: Path) -> None:
        """Write the table folder (which must not exist yet)."""
        arrays = {
            **self.image_ids.arrays("image_id"),
            **self.names.arrays("names"),
            **self.boxes.arrays("boxes"),
            **self.attributes.arrays("attributes"),
            **self.edges.arrays("edges"),
            **self.stat.arrays("stat"),
        }
        # Node-level arrays share the names' (per image) offsets; edge-level ones the edges'.
        del arrays["boxes_offsets"]
        arrays["relations"] = np.asarray(self.relations, dtype=np.int32)
        if self.object_ids is not None:
            ids = self.object_ids.arrays("object_ids")
            arrays["object_ids"], arrays["object_id_bytes_offsets"] = ids["object_ids"], ids["object_ids_offsets"]
        _write(folder, "graphs", len(self.rows), arrays, object_ids=self.object_ids is not None)


class GraphTable:
    """The scene graphs (and stat words) of a processed folder's images, memory-mapped (module docstring).

    Args:
        folder: a `graphs_gt` or `graphs_detected` table folder.
        vocab: the folder's graph vocabulary, to turn ids back into tokens.

    Raises:
        DataError: the folder is not a graphs table or an array is missing or truncated.
    """

    def __init__(self, folder: Path, vocab: GraphVocab) -> None:
        self.folder, self.vocab = Path(folder), vocab
        self.meta, self.a = _open(self.folder, "graphs")
        self._rows: dict[str, int] | None = None

    def __len__(self) -> int:
        return int(self.meta["rows"])

    def __getstate__(self) -> dict[str, Any]:
        # As QuestionTable: the folder travels, the mapped arrays are mapped again.
        return {"folder": self.folder, "vocab": self.vocab}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["vocab"])  # type: ignore[misc]

    @property
    def rows(self) -> dict[str, int]:
        """image id -> row, built on first use (explanations and checks look graphs up by id)."""
        if self._rows is None:
            ids = _texts(self.a["image_id"], self.a["image_id_offsets"], range(len(self)))
            self._rows = {image_id: r for r, image_id in enumerate(ids)}
        return self._rows

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.rows

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(nodes per image, relation edges per image), int64 arrays of length len(self)."""
        return np.diff(self.a["names_offsets"]), np.diff(self.a["edges_offsets"])

    def stat(self, row: int) -> np.ndarray:
        """The stat-word ids of `row`'s image (int32, ranked)."""
        offsets = self.a["stat_offsets"]
        return np.asarray(self.a["stat"][offsets[row] : offsets[row + 1]])

    def _encoded(self, row: int) -> tuple[list[int], list[list[int]], np.ndarray, list[list[int]], list[int]]:
        """`row`'s graph as stored: (name ids, attribute ids per node, boxes (N, 4), edges [[s, t]], relation ids)."""
        first, last = int(self.a["names_offsets"][row]), int(self.a["names_offsets"][row + 1])
        bounds = self.a["attributes_offsets"][first : last + 1].tolist()
        attr_ids = self.a["attributes"][bounds[0] : bounds[-1]].tolist()
        attributes = [attr_ids[s - bounds[0] : e - bounds[0]] for s, e in pairwise(bounds)]
        e0, e1 = int(self.a["edges_offsets"][row]), int(self.a["edges_offsets"][row + 1])
        names, boxes = self.a["names"][first:last].tolist(), self.a["boxes"][first:last]
        return names, attributes, boxes, self.a["edges"][e0:e1].tolist(), self.a["relations"][e0:e1].tolist()

    def graph(self, row: int) -> SceneGraph:
        """The scene graph of `row`'s image, decoded."""
        names, attributes, boxes, edges, relations = self._encoded(row)
        tokens = self.vocab.tokens_by_id
        object_ids: list[str] = []
        if self.meta.get("object_ids"):
            first = int(self.a["names_offsets"][row])
            values, offsets = self.a["object_ids"], self.a["object_id_bytes_offsets"]
            object_ids = [_text(values, offsets, j) for j in range(first, first + len(names))]
        return SceneGraph(
            names=[tokens[t] for t in names],
            attributes=[[tokens[t] for t in attrs] for attrs in attributes],
            boxes=np.array(boxes),
            edges=np.array(edges, dtype=np.int64).reshape(-1, 2),
            relations=[tokens[t] for t in relations],
            object_ids=object_ids,
        )

    def pyg(self, row: int, max_attributes: int) -> Data:
        """`to_pyg(self.graph(row), vocab, max_attributes)`, built from the stored ids without decoding them."""
        names, attributes, boxes, edges, relations = self._encoded(row)
        # Stored ids are all known tokens, so removing repeated ids is to_pyg's removal of repeated tokens.
        unique = [list(dict.fromkeys(attrs)) for attrs in attributes]
        return encoded_to_pyg(names, unique, boxes, edges, relations, max_attributes)

    def graph_of(self, image_id: str) -> SceneGraph:
        """The scene graph of an image by id (DataError when the table has none)."""
        row = self.rows.get(image_id)
        if row is None:
            raise DataError(f"{self.folder}: no scene graph for image {image_id}")
        return self.graph(row)
