"""Scene graphs: read GQA's official files, build spatial graphs from detector boxes, and turn graphs into PyG tensors.

Data model
----------
`SceneGraph` is plain Python and numpy (no torch) so graphs can be loaded, cached as JSON and inspected
cheaply. Boxes are always NORMALISED x1, y1, x2, y2 in [0, 1] (pixel coordinates divided by the image
width/height, then clipped), so GQA graphs and VQA spatial graphs look the same to a model.

GQA (`*_sceneGraphs.json`)
--------------------------
`load_gqa_scene_graphs` reads the official format, where an object's box is `x`, `y` (top-left corner)
and `w`, `h` (size) in pixels; the file is read streaming, one image record at a time. The reference
code read keys `x1`..`y2`, which official files do not have, and so fed a constant (-1, -1, -1, -1) box
for every object; here the real box is used. Nodes are ordered by object id sorted as strings (the
reference's order, so node indices agree with it); edges follow the nodes' order and, within a node, the
order its relations are listed in. A `relations` field may be a list or, as on the GQA download page, a
dict whose values are the relations.

An image with no objects gets one placeholder node named `<empty>` whose box is the whole image and
whose object id is "" (it stands for no object): every model needs at least one node to attend over.

Detector graphs (VQA, and GQA images without a public scene graph)
------------------------------------------------------------------
`spatial_scene_graph` builds a graph from detector boxes; `isubg data prepare` builds one for every image
of both datasets, since GQA's testdev and test images have no public scene graphs. Each node gets directed
edges to its `k` nearest other nodes by box-centre distance in pixels (ties broken by the lower node index).
An edge (s, t) reads "s REL t", GQA style, and REL is the first that applies of:

1. "inside":          at least 90% of s's area lies inside t;
2. "contains":        at least 90% of t's area lies inside s;
3. with (dx, dy) = centre(t) - centre(s) in image coordinates (y grows downward):
   "to the left of"   when |dx| >= |dy| and dx > 0 (t is to the right, so s is to the left of t);
   "to the right of"  when |dx| >= |dy| and dx < 0;
   "above"            when dy > 0 (t is lower in the image, so s is above t);
   "below"            otherwise (also when both centres coincide).

A box of zero area covers nothing and is covered by nothing, so rules 1 and 2 never apply to it.

Stat words
----------
`stat_words` ranks a ground-truth graph's names and attributes by count; `detector_stat_words` ranks a
detector's box labels by summed confidence, the same words a model can have at test time.

PyG conversion
--------------
`to_pyg` encodes names, attributes and relations with one shared `GraphVocab` (`<pad>` = 0,
`<unk>` = 1: unknown tokens never become padding, unlike the reference). It adds, for every relation
whose reverse is missing, a reverse edge flagged in the per-edge boolean `edge_reverse`. A per-edge
flag is concatenated correctly by `Batch.from_data_list`; the reference kept a list of edge positions
that PyG does not offset, which was wrong for every graph but the first of a batch. Self-loops are
not added here: the models add them.

torch and torch_geometric are imported only inside `to_pyg`, so reading graphs and building the
vocabulary (`isubg data prepare`) never pays for importing torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from isubg.data.files import read_json, write_json_atomic
from isubg.data.jsonstream import ProgressFn, iter_object
from isubg.errors import DataError

if TYPE_CHECKING:
    from torch_geometric.data import Data

__all__ = [
    "EMPTY",
    "PAD",
    "SPATIAL_RELATIONS",
    "UNK",
    "GraphVocab",
    "SceneGraph",
    "detector_stat_words",
    "encoded_to_pyg",
    "load_gqa_scene_graphs",
    "spatial_scene_graph",
    "stat_words",
    "to_pyg",
]

PAD = "<pad>"
UNK = "<unk>"
EMPTY = "<empty>"
_SPECIALS = (PAD, UNK, EMPTY)

# Every relation name `spatial_scene_graph` can produce, in the order its rule tries them.
SPATIAL_RELATIONS = ("inside", "contains", "to the left of", "to the right of", "above", "below")

# Share of a box's area that must lie inside another box for "inside"/"contains".
_COVER_THRESHOLD = 0.9

_BOX_KEYS = ("x", "y", "w", "h")


@dataclass(eq=False)
class SceneGraph:
    """One image's graph: N nodes (objects) and E directed, named edges (relations).

    Attributes:
        names: (N) node names, e.g. "chair"; `<empty>` for the placeholder node of an object-less image.
        attributes: (N) each node's attributes in their listed order.
        boxes: (N, 4) float32 normalised x1, y1, x2, y2, each in [0, 1].
        edges: (E, 2) int64 (source, target) local node indices; edge e reads "source relations[e] target".
        relations: (E) relation names, whole phrases such as "to the left of".
        object_ids: (N) the object id each node came from, for explanations ("" for a placeholder node).

    `__post_init__` coerces `boxes` and `edges` to those dtypes/shapes (an empty `edges` may be given as
    any empty array), fills missing `object_ids` with "0".."N-1", and raises ValueError when the lengths
    disagree or an edge index is out of range. Graphs compare equal when every field is equal.
    """

    names: list[str]
    attributes: list[list[str]]
    boxes: np.ndarray
    edges: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    relations: list[str] = field(default_factory=list)
    object_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.names)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.edges = np.asarray(self.edges, dtype=np.int64).reshape(-1, 2)
        if not self.object_ids:
            # Plain index strings keep explanations printable when no ids were given.
            self.object_ids = [str(i) for i in range(n)]
        if not (len(self.attributes) == len(self.boxes) == len(self.object_ids) == n):
            raise ValueError(
                f"scene graph has {n} names, {len(self.attributes)} attribute lists, {len(self.boxes)} boxes and "
                f"{len(self.object_ids)} object ids; all must be equal"
            )
        if len(self.relations) != len(self.edges):
            raise ValueError(f"scene graph has {len(self.edges)} edges but {len(self.relations)} relation names")
        if self.edges.size and (self.edges.min() < 0 or self.edges.max() >= n):
            raise ValueError(f"scene graph edge index out of range for {n} nodes")

    def __eq__(self, other: object) -> bool:
        # The generated dataclass __eq__ would compare numpy arrays with `==` and fail on their truth value.
        if not isinstance(other, SceneGraph):
            return NotImplemented
        return (
            self.names == other.names
            and self.attributes == other.attributes
            and np.array_equal(self.boxes, other.boxes)
            and np.array_equal(self.edges, other.edges)
            and self.relations == other.relations
            and self.object_ids == other.object_ids
        )

    @property
    def num_nodes(self) -> int:
        """N, the number of nodes."""
        return len(self.names)

    @property
    def num_edges(self) -> int:
        """E, the number of relation edges (no reverse edges, no self-loops)."""
        return len(self.relations)

    def to_json(self) -> dict[str, Any]:
        """A plain JSON-able dict that `from_json` turns back into an equal graph (boxes are float32-exact)."""
        return {
            "names": list(self.names),
            "attributes": [list(a) for a in self.attributes],
            "boxes": self.boxes.tolist(),
            "edges": self.edges.tolist(),
            "relations": list(self.relations),
            "object_ids": list(self.object_ids),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "scene graph") -> SceneGraph:
        """Rebuild a graph written by `to_json`.

        Args:
            data: the dict from `to_json` (e.g. read back from a cache file).
            where: names the record in error messages, e.g. "cache.json: image 2354786".

        Raises:
            DataError: a key is missing or the parts are inconsistent.
        """
        try:
            return cls(
                names=list(data["names"]),
                attributes=[list(a) for a in data["attributes"]],
                boxes=np.asarray(data["boxes"], dtype=np.float32),
                edges=np.asarray(data["edges"], dtype=np.int64),
                relations=list(data["relations"]),
                object_ids=list(data["object_ids"]),
            )
        except KeyError as exc:
            raise DataError(f"{where}: cached scene graph lacks key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: cached scene graph is malformed ({exc})") from None


def _empty_graph() -> SceneGraph:
    # One placeholder node covering the whole image: models need at least one node.
    return SceneGraph(names=[EMPTY], attributes=[[]], boxes=np.array([[0.0, 0.0, 1.0, 1.0]]), object_ids=[""])


# --- GQA scene graphs -----------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    # JSON true/false load as bool, which is an int subclass; a box coordinate of `true` is an error.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _relation_list(raw: Any, where: str) -> list[Mapping[str, Any]]:
    # Released files hold a list; the GQA download page shows a dict, whose values are the relations.
    if raw is None:
        return []
    items = list(raw.values()) if isinstance(raw, Mapping) else raw
    if not isinstance(items, list) or not all(isinstance(r, Mapping) for r in items):
        raise DataError(f"{where}: 'relations' must be a list (or dict) of {{name, object}} records")
    return items


def _parse_object(obj: Any, where: str, width: float, height: float) -> tuple[str, list[str], list[float]]:
    """Return (name, attributes, normalised box) of one official GQA object record."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected an object record (a JSON object), got {type(obj).__name__}")
    for key in ("name", *_BOX_KEYS):
        if key not in obj:
            raise DataError(f"{where}: missing '{key}'")
    name = obj["name"]
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    x, y, w, h = (obj[key] for key in _BOX_KEYS)
    if not all(_is_number(v) for v in (x, y, w, h)):
        raise DataError(f"{where}: 'x', 'y', 'w', 'h' must be numbers, got {[x, y, w, h]}")
    if w < 0 or h < 0:
        raise DataError(f"{where}: box size must not be negative, got w={w}, h={h}")
    attributes = obj.get("attributes") or []
    if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
        raise DataError(f"{where}: 'attributes' must be a list of strings")
    box = [x / width, y / height, (x + w) / width, (y + h) / height]
    return name, attributes, box


def _parse_image(image_id: str, record: Any, path: Path) -> SceneGraph:
    """Turn one official image record into a SceneGraph (nodes by sorted object id)."""
    where = f"{path}: image {image_id}"
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a scene-graph record (a JSON object), got {type(record).__name__}")
    width, height = record.get("width"), record.get("height")
    if not (_is_number(width) and _is_number(height) and width > 0 and height > 0):
        raise DataError(f"{where}: 'width' and 'height' must be positive numbers, got {width!r} and {height!r}")
    objects = record.get("objects") or {}
    if not isinstance(objects, Mapping):
        raise DataError(f"{where}: 'objects' must map object id -> object record")
    if not objects:
        return _empty_graph()
    ids = sorted(str(k) for k in objects)
    node = {object_id: i for i, object_id in enumerate(ids)}
    raw = {str(k): v for k, v in objects.items()}
    names, attributes, boxes, edges, relations = [], [], [], [], []
    for object_id in ids:
        obj_where = f"{where}: object {object_id}"
        name, attrs, box = _parse_object(raw[object_id], obj_where, float(width), float(height))
        names.append(name)
        attributes.append(attrs)
        boxes.append(box)
        for relation in _relation_list(raw[object_id].get("relations"), obj_where):
            target, predicate = relation.get("object"), relation.get("name")
            if not isinstance(predicate, str) or not predicate:
                raise DataError(f"{obj_where}: a relation has no 'name' (got {dict(relation)})")
            if str(target) not in node:
                raise DataError(f"{obj_where}: relation '{predicate}' points to object {target}, not in the image")
            edges.append((node[object_id], node[str(target)]))
            relations.append(predicate)
    return SceneGraph(
        names=names,
        attributes=attributes,
        boxes=np.clip(np.asarray(boxes, dtype=np.float64), 0.0, 1.0),
        edges=np.asarray(edges, dtype=np.int64).reshape(-1, 2),
        relations=relations,
        object_ids=ids,
    )


def load_gqa_scene_graphs(path: Path, *, on_progress: ProgressFn | None = None) -> dict[str, SceneGraph]:
    """Read an official GQA `*_sceneGraphs.json` file, one image record at a time.

    Args:
        path: `{imageId: {"width", "height", "objects": {objectId: {"name", "x", "y", "w", "h",
            "attributes": [...], "relations": [{"name", "object"}]}}}}`, boxes in pixels (x, y top-left).
            Optional fields such as `location` and `weather` are ignored.
        on_progress: `on_progress(done_bytes, total_bytes)` as the file is read (see
            `isubg.data.jsonstream.iter_object`).

    Returns:
        Image id -> SceneGraph, in file order. Boxes are normalised and clipped to [0, 1]; an image with
        no objects (or no `objects` field) gets the one-node `<empty>` placeholder graph.

    Raises:
        DataError: unreadable file or malformed JSON (with line and column); an image id given twice; a
            non-positive width or height; an object missing `name`, `x`, `y`, `w` or `h`; a relation
            pointing to an object id that is not in the same image. The message names the file and the
            image (and object).
    """
    path = Path(path)
    graphs: dict[str, SceneGraph] = {}
    expected = "a JSON object mapping image id -> scene graph"
    for image_id, record in iter_object(path, on_progress=on_progress, expected=expected):
        if image_id in graphs:
            raise DataError(f"{path}: image {image_id} appears twice")
        graphs[image_id] = _parse_image(image_id, record, path)
    return graphs


# --- spatial graphs (VQA) -------------------------------------------------------------------------


def _coverage(inner: np.ndarray, outer: np.ndarray) -> float:
    """Share of `inner`'s area that lies inside `outer` (0 when `inner` has no area)."""
    area = (inner[2] - inner[0]) * (inner[3] - inner[1])
    if area <= 0:
        return 0.0
    iw = min(inner[2], outer[2]) - max(inner[0], outer[0])
    ih = min(inner[3], outer[3]) - max(inner[1], outer[1])
    return float(max(iw, 0.0) * max(ih, 0.0) / area)


def _spatial_relation(source: np.ndarray, target: np.ndarray) -> str:
    """The predicate of "source REL target" for two pixel boxes (see the module docstring)."""
    if _coverage(source, target) >= _COVER_THRESHOLD:
        return "inside"
    if _coverage(target, source) >= _COVER_THRESHOLD:
        return "contains"
    dx = (target[0] + target[2] - source[0] - source[2]) / 2.0
    dy = (target[1] + target[3] - source[1] - source[3]) / 2.0
    if abs(dx) >= abs(dy) and dx > 0:
        return "to the left of"
    if abs(dx) >= abs(dy) and dx < 0:
        return "to the right of"
    return "above" if dy > 0 else "below"


def _nearest_edges(pixel_boxes: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(source, target) pairs: each node to its k nearest others by centre distance, ties by index."""
    n = len(pixel_boxes)
    centres = np.stack(
        [(pixel_boxes[:, 0] + pixel_boxes[:, 2]) / 2.0, (pixel_boxes[:, 1] + pixel_boxes[:, 3]) / 2.0], axis=1
    )
    # Squared distances compare exactly like distances and avoid sqrt rounding creating or hiding ties.
    dist = ((centres[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    edges = []
    for source in range(n):
        others = np.array([j for j in range(n) if j != source], dtype=np.int64)
        # lexsort sorts by the last key first: distance, then index for ties.
        order = others[np.lexsort((others, dist[source, others]))] if len(others) else others
        edges.extend((source, int(target)) for target in order[:k])
    return edges


def spatial_scene_graph(
    boxes: np.ndarray,
    width: float,
    height: float,
    labels: list[str] | None = None,
    attributes: list[list[str]] | None = None,
    k: int = 4,
) -> SceneGraph:
    """Build a scene graph from detector boxes, for datasets without scene graphs (VQA v2).

    Args:
        boxes: (N, 4) pixel boxes x1, y1, x2, y2 (as in the features file's `image_bb`).
        width: image width in pixels.
        height: image height in pixels.
        labels: (N) node names; "object" for every node when None.
        attributes: (N) attribute lists; empty lists when None.
        k: out-edges per node (fewer when the image has fewer than k + 1 boxes).

    Returns:
        A SceneGraph whose nodes are the boxes in the given order (object ids "0".."N-1") and whose edges
        follow the spatial rule in the module docstring. Geometry is computed on the boxes clipped to the
        image, in pixels, so the aspect ratio does not skew distances; the stored boxes are normalised.
        With no boxes, the one-node `<empty>` placeholder graph.

    Raises:
        ValueError: boxes not (N, 4), a non-positive width/height, negative k, or labels/attributes
            whose length is not N.
    """
    pixel = np.asarray(boxes, dtype=np.float64)
    if pixel.ndim != 2 or pixel.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {pixel.shape}")
    if not (width > 0 and height > 0):
        raise ValueError(f"width and height must be positive, got {width} and {height}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n = len(pixel)
    names = list(labels) if labels is not None else ["object"] * n
    attrs = [list(a) for a in attributes] if attributes is not None else [[] for _ in range(n)]
    if len(names) != n or len(attrs) != n:
        raise ValueError(f"{n} boxes but {len(names)} labels and {len(attrs)} attribute lists")
    if n == 0:
        return _empty_graph()
    pixel = np.clip(pixel, 0.0, [width, height, width, height])
    edges = _nearest_edges(pixel, k)
    return SceneGraph(
        names=names,
        attributes=attrs,
        boxes=pixel / np.array([width, height, width, height]),
        edges=np.asarray(edges, dtype=np.int64).reshape(-1, 2),
        relations=[_spatial_relation(pixel[s], pixel[t]) for s, t in edges],
        object_ids=[str(i) for i in range(n)],
    )


# --- vocabulary -----------------------------------------------------------------------------------


class GraphVocab:
    """One vocabulary for node names, attributes and relation names; tokens are whole phrases.

    Ids: `<pad>` = 0, `<unk>` = 1, `<empty>` = 2, then the built tokens. `index` maps an unknown token to
    `<unk>` (1), never to `<pad>` (0): the reference mapped unknown tokens to padding, which made
    them invisible to the model.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        """Wrap a token list.

        Args:
            tokens: every token in id order; must start with `<pad>`, `<unk>`, `<empty>` and be unique.

        Raises:
            ValueError: the specials are not first or a token repeats.
        """
        tokens = list(tokens)
        if tuple(tokens[: len(_SPECIALS)]) != _SPECIALS:
            raise ValueError(f"a graph vocabulary must start with {list(_SPECIALS)}, got {tokens[:3]}")
        self._ids = {token: i for i, token in enumerate(tokens)}
        if len(self._ids) != len(tokens):
            duplicates = sorted(t for t, c in Counter(tokens).items() if c > 1)
            raise ValueError(f"graph vocabulary repeats tokens {duplicates[:5]}")
        self._tokens = tokens
        self._by_id = tuple(tokens)

    @classmethod
    def build(cls, graphs: Iterable[SceneGraph], min_count: int = 1) -> GraphVocab:
        """Count every name, attribute and relation occurrence and keep tokens seen >= `min_count` times.

        Order is deterministic: the specials, then descending count, then alphabetical.
        """
        counts: Counter[str] = Counter()
        for graph in graphs:
            counts.update(graph.names)
            for attrs in graph.attributes:
                counts.update(attrs)
            counts.update(graph.relations)
        kept = [t for t, c in counts.items() if c >= min_count and t not in _SPECIALS]
        kept.sort(key=lambda t: (-counts[t], t))
        return cls([*_SPECIALS, *kept])

    @property
    def tokens(self) -> list[str]:
        """Every token, in id order (a copy)."""
        return list(self._tokens)

    @property
    def tokens_by_id(self) -> tuple[str, ...]:
        """Every token in id order, without a copy (hot paths decode ids with it)."""
        return self._by_id

    def index(self, token: str) -> int:
        """The id of `token`; 1 (`<unk>`) when it is not in the vocabulary."""
        return self._ids.get(token, 1)

    def token(self, index: int) -> str:
        """The token with id `index` (IndexError when out of range)."""
        return self._tokens[index]

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def __eq__(self, other: object) -> bool:
        # Equal token lists mean equal ids; defining __eq__ also makes instances unhashable, as intended.
        return isinstance(other, GraphVocab) and self._tokens == other._tokens

    def to_json(self) -> dict[str, Any]:
        """A plain JSON-able dict: {"tokens": [...]} in id order."""
        return {"tokens": list(self._tokens)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GraphVocab:
        """Rebuild a vocabulary from `to_json` output (ValueError/KeyError when malformed)."""
        return cls(data["tokens"])

    def save(self, path: Path) -> None:
        """Write the vocabulary as JSON, atomically (a crash never leaves a half-written file)."""
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> GraphVocab:
        """Read a vocabulary written by `save`.

        Raises:
            DataError: unreadable file, malformed JSON, or not a graph vocabulary.
        """
        path = Path(path)
        data = read_json(path)
        if not isinstance(data, Mapping) or not isinstance(data.get("tokens"), list):
            raise DataError(f'{path}: expected a graph vocabulary {{"tokens": [...]}}')
        if not all(isinstance(t, str) for t in data["tokens"]):
            raise DataError(f"{path}: graph vocabulary tokens must all be strings")
        try:
            return cls(data["tokens"])
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None


# --- PyG conversion and stat words ---------------------------------------------------------------


def _node_rows(names: Sequence[int], attributes: Sequence[Sequence[int]], max_attributes: int) -> list[list[int]]:
    rows = []
    for name, attrs in zip(names, attributes, strict=True):
        ids = [name, *list(attrs)[:max_attributes]]
        rows.append(ids + [0] * (1 + max_attributes - len(ids)))
    return rows


def _with_reverse_edges(pairs: list[tuple[int, int]], relations: list[int]) -> tuple[list[int], list[bool]]:
    """Extend `pairs` in place with one reverse edge per relation whose reverse is not present yet.

    Returns the relation ids of every edge (a reverse edge reuses its relation's) and the reverse flags.
    """
    present = set(pairs)
    relations, reverse = list(relations), [False] * len(pairs)
    for (source, target), relation in zip(list(pairs), relations[: len(pairs)], strict=True):
        # Checking the edges added so far too gives each missing direction exactly one reverse edge,
        # even when a relation is listed twice; a self-relation is its own reverse and adds nothing.
        if (target, source) not in present:
            present.add((target, source))
            pairs.append((target, source))
            relations.append(relation)
            reverse.append(True)
    return relations, reverse


def encoded_to_pyg(
    names: Sequence[int],
    attributes: Sequence[Sequence[int]],
    boxes: np.ndarray,
    edges: Sequence[tuple[int, int]],
    relations: Sequence[int],
    max_attributes: int = 3,
) -> Data:
    """`to_pyg` for a graph whose names, attributes and relations are already `GraphVocab` ids.

    The memory-mapped graph tables store graphs this way (isubg.data.tables), so the dataset skips decoding
    ids to strings and back. Arguments are the `SceneGraph` fields as ids, each node's attributes already
    without repeats; the result is `to_pyg`'s.
    """
    import torch
    from torch_geometric.data import Data

    if max_attributes < 0:
        raise ValueError(f"max_attributes must be >= 0, got {max_attributes}")
    pairs = [(int(s), int(t)) for s, t in edges]
    edge_relations, reverse = _with_reverse_edges(pairs, [int(r) for r in relations])
    return Data(
        x=torch.tensor(_node_rows(names, attributes, max_attributes), dtype=torch.long).reshape(-1, 1 + max_attributes),
        edge_index=torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).t().contiguous(),
        edge_attr=torch.tensor(edge_relations, dtype=torch.long),
        edge_reverse=torch.tensor(reverse, dtype=torch.bool),
        box=torch.from_numpy(np.array(boxes, dtype=np.float32)).reshape(-1, 4),
        num_nodes=len(names),
    )


def to_pyg(graph: SceneGraph, vocab: GraphVocab, max_attributes: int = 3) -> Data:
    """Encode a graph as a `torch_geometric.data.Data` that batches correctly.

    Args:
        graph: the scene graph.
        vocab: maps names, attributes and relations to ids (unknown -> 1, padding 0).
        max_attributes: attribute slots per node.

    Returns:
        Data with
        - `x`: LongTensor (N, 1 + max_attributes): name id, then the ids of the node's first
          `max_attributes` distinct attributes in listed order, padded with 0;
        - `edge_index`: LongTensor (2, E'): the E relation edges in graph order, then an added reverse
          edge (target, source) for each relation whose reverse is not already present;
        - `edge_attr`: LongTensor (E',): relation id (a reverse edge reuses its relation's id);
        - `edge_reverse`: BoolTensor (E',): True exactly on the added reverse edges;
        - `box`: FloatTensor (N, 4) normalised boxes; `num_nodes` = N.
        No self-loops are added; the models add them.

    Raises:
        ValueError: negative `max_attributes`.
    """
    return encoded_to_pyg(
        [vocab.index(n) for n in graph.names],
        # dict.fromkeys deduplicates keeping first appearance (set(), the reference's, had arbitrary order); on the
        # tokens, so that two different unknown attributes keep two slots.
        [[vocab.index(a) for a in dict.fromkeys(attrs)] for attrs in graph.attributes],
        graph.boxes,
        graph.edges.tolist(),
        [vocab.index(r) for r in graph.relations],
        max_attributes,
    )


def stat_words(graph: SceneGraph, num: int) -> list[str]:
    """The image's "statistical words": its most frequent node names and attributes.

    Names and attributes are counted together (every occurrence). Words are ranked by descending count,
    ties by first appearance, reading nodes in order and each node's name before its attributes.
    `<empty>` is never a stat word.

    Args:
        graph: the scene graph.
        num: at most this many words are returned.

    Raises:
        ValueError: negative `num`.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    # Counter keeps insertion order, and sorted() is stable, so equal counts stay in first-appearance order.
    counts: Counter[str] = Counter()
    for name, attrs in zip(graph.names, graph.attributes, strict=True):
        counts.update(word for word in (name, *attrs) if word != EMPTY)
    return [word for word, _ in sorted(counts.items(), key=lambda item: -item[1])][:num]


def detector_stat_words(
    names: Sequence[str] | None,
    attributes: Sequence[str] | None,
    num: int,
    *,
    name_conf: Sequence[float] | None = None,
    attribute_conf: Sequence[float] | None = None,
) -> list[str]:
    """The image's "statistical words" from its detector labels instead of a ground-truth graph.

    Box i contributes its class name `names[i]` and its attribute `attributes[i]` (the bottom-up detector gives
    one of each per box). A word weighs the sum of the confidences of its occurrences (`name_conf[i]`,
    `attribute_conf[i]`); an occurrence without a confidence weighs 1, so without confidences the rank is a
    count. Words are ranked by descending weight, ties by first appearance, reading boxes in order and each
    box's name before its attribute. Empty words and `<empty>` are never stat words.

    Args:
        names: (N) class names, or None when the boxes have none that can be named.
        attributes: (N) attribute names, or None.
        num: at most this many words are returned.
        name_conf: (N) detector confidence of each name, or None.
        attribute_conf: (N) detector confidence of each attribute, or None.

    Raises:
        ValueError: negative `num`, or names, attributes and confidences of different lengths.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    columns = [(names, name_conf), (attributes, attribute_conf)]
    lengths = {len(c) for pair in columns for c in pair if c is not None}
    if len(lengths) > 1:
        raise ValueError(f"names, attributes and confidences must have one entry per box, got lengths {lengths}")
    # A dict keeps first-appearance order, and sorted() is stable, so equal weights keep it too.
    weights: dict[str, float] = {}
    for i in range(lengths.pop() if lengths else 0):
        for words, conf in columns:
            if words is not None and words[i] and words[i] != EMPTY:
                weights[words[i]] = weights.get(words[i], 0.0) + (1.0 if conf is None else float(conf[i]))
    return [word for word, _ in sorted(weights.items(), key=lambda item: -item[1])][:num]
