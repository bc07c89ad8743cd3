"""Scene graphs: GQA loading, spatial graphs, the graph vocabulary, PyG conversion, stat words."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from isubg.data.scene_graphs import (
    EMPTY,
    SPATIAL_RELATIONS,
    GraphVocab,
    SceneGraph,
    detector_stat_words,
    load_gqa_scene_graphs,
    spatial_scene_graph,
    stat_words,
    to_pyg,
)
from isubg.errors import DataError

# --- a hand-written official-format file ------------------------------------------------------------

# Object ids "20", "3", "7" sort as strings to nodes table (0), cup (1), plate (2): "20" < "3".
OFFICIAL: dict[str, Any] = {
    "img1": {
        "width": 200,
        "height": 100,
        "location": "kitchen",
        "objects": {
            "3": {
                "name": "cup",
                "x": 50,
                "y": 40,
                "w": 20,
                "h": 20,
                "attributes": ["white"],
                # The download page's dict-style relations: its values are the relations.
                "relations": {"a": {"name": "on", "object": "20"}, "b": {"name": "to the left of", "object": "7"}},
            },
            "20": {
                "name": "table",
                "x": 0,
                "y": 50,
                "w": 100,
                "h": 50,
                "attributes": ["wooden", "brown", "wooden", "large", "old"],
                "relations": [{"name": "under", "object": "3"}],
            },
            # Its right edge (150 + 80 = 230) lies outside the 200-pixel image and is clipped.
            "7": {"name": "plate", "x": 150, "y": 60, "w": 80, "h": 30, "attributes": [], "relations": []},
        },
    },
    "img2": {"width": 640, "height": 480, "objects": {}},
}


def _write(tmp_path: Path, data: Any, name: str = "val_sceneGraphs.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def official(tmp_path: Path) -> dict[str, SceneGraph]:
    return load_gqa_scene_graphs(_write(tmp_path, OFFICIAL))


def test_gqa_nodes_boxes_and_edges(official: dict[str, SceneGraph]) -> None:
    assert list(official) == ["img1", "img2"]
    graph = official["img1"]
    assert graph.object_ids == ["20", "3", "7"]
    assert graph.names == ["table", "cup", "plate"]
    assert graph.attributes == [["wooden", "brown", "wooden", "large", "old"], ["white"], []]
    # x1 = x / W, y1 = y / H, x2 = (x + w) / W, y2 = (y + h) / H, clipped to [0, 1].
    expected = np.array([[0.0, 0.5, 0.5, 1.0], [0.25, 0.4, 0.35, 0.6], [0.75, 0.6, 1.0, 0.9]], dtype=np.float32)
    assert graph.boxes.dtype == np.float32
    np.testing.assert_allclose(graph.boxes, expected, rtol=0, atol=1e-7)
    assert graph.edges.dtype == np.int64
    assert graph.edges.tolist() == [[0, 1], [1, 0], [1, 2]]
    assert graph.relations == ["under", "on", "to the left of"]


def test_gqa_image_without_objects_gets_a_whole_image_placeholder(tmp_path: Path) -> None:
    data = {**OFFICIAL, "img3": {"width": 10, "height": 10}}  # no "objects" field at all
    graphs = load_gqa_scene_graphs(_write(tmp_path, data))
    for image_id in ("img2", "img3"):
        graph = graphs[image_id]
        assert graph.names == [EMPTY]
        assert graph.attributes == [[]]
        assert graph.object_ids == [""]
        assert graph.boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]]
        assert graph.edges.shape == (0, 2)
        assert graph.relations == []


def test_scene_graph_json_round_trip(official: dict[str, SceneGraph]) -> None:
    for graph in official.values():
        again = SceneGraph.from_json(json.loads(json.dumps(graph.to_json())))
        assert again == graph
        assert again.boxes.dtype == np.float32 and again.edges.dtype == np.int64
    assert official["img1"] != official["img2"]


def test_scene_graph_from_json_errors_name_the_record(official: dict[str, SceneGraph]) -> None:
    data = official["img1"].to_json()
    del data["relations"]
    with pytest.raises(DataError, match=r"cache\.json: image img1: .*'relations'"):
        SceneGraph.from_json(data, where="cache.json: image img1")
    data = official["img1"].to_json()
    data["edges"] = [[0, 9]]  # out of range, and one edge for three relation names
    with pytest.raises(DataError, match=r"cache\.json: image img1: .*malformed"):
        SceneGraph.from_json(data, where="cache.json: image img1")


def test_scene_graph_rejects_inconsistent_parts() -> None:
    with pytest.raises(ValueError, match="all must be equal"):
        SceneGraph(names=["a", "b"], attributes=[[]], boxes=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="relation names"):
        SceneGraph(names=["a", "b"], attributes=[[], []], boxes=np.zeros((2, 4)), edges=np.array([[0, 1]]))
    with pytest.raises(ValueError, match="out of range"):
        SceneGraph(names=["a"], attributes=[[]], boxes=np.zeros((1, 4)), edges=np.array([[0, 1]]), relations=["on"])


# --- GQA errors -----------------------------------------------------------------------------------


def _image(objects: dict[str, Any], width: Any = 100, height: Any = 100) -> dict[str, Any]:
    return {"img9": {"width": width, "height": height, "objects": objects}}


def _obj(**fields: Any) -> dict[str, Any]:
    return {"name": "dog", "x": 1, "y": 2, "w": 3, "h": 4, "attributes": [], "relations": [], **fields}


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "img9": {\n    "width": 10,,\n  }\n}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json:3:17: not valid JSON") as info:
        load_gqa_scene_graphs(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(DataError, match=r"absent\.json: no such file"):
        load_gqa_scene_graphs(path)


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"list\.json: expected a JSON object"):
        load_gqa_scene_graphs(_write(tmp_path, [1, 2], name="list.json"))


@pytest.mark.parametrize(("width", "height"), [(0, 10), (10, -5), (None, 10), ("640", 480), (True, 10)])
def test_non_positive_or_missing_size(tmp_path: Path, width: Any, height: Any) -> None:
    path = _write(tmp_path, _image({"5": _obj()}, width=width, height=height))
    with pytest.raises(DataError, match="'width' and 'height' must be positive") as info:
        load_gqa_scene_graphs(path)
    assert str(info.value).startswith(f"{path}: image img9:")


@pytest.mark.parametrize("key", ["name", "x", "y", "w", "h"])
def test_missing_object_field(tmp_path: Path, key: str) -> None:
    record = _obj()
    del record[key]
    path = _write(tmp_path, _image({"4": _obj(), "5": record}))
    with pytest.raises(DataError) as info:
        load_gqa_scene_graphs(path)
    assert str(info.value) == f"{path}: image img9: object 5: missing '{key}'"


def test_relation_to_an_unknown_object(tmp_path: Path) -> None:
    objects = {"4": _obj(), "5": _obj(relations=[{"name": "near", "object": "4"}, {"name": "on", "object": "99"}])}
    path = _write(tmp_path, _image(objects))
    with pytest.raises(DataError) as info:
        load_gqa_scene_graphs(path)
    assert str(info.value) == f"{path}: image img9: object 5: relation 'on' points to object 99, not in the image"


def test_relation_to_an_object_of_another_image(tmp_path: Path) -> None:
    data = {**OFFICIAL, **_image({"5": _obj(relations=[{"name": "near", "object": "20"}])})}
    with pytest.raises(DataError, match=r"image img9: object 5: relation 'near' points to object 20"):
        load_gqa_scene_graphs(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"x": "1"}, "must be numbers"),
        ({"w": -1}, "must not be negative"),
        ({"attributes": "red"}, "'attributes' must be a list"),
        ({"relations": [{"object": "5"}]}, "a relation has no 'name'"),
        ({"relations": "on"}, "'relations' must be a list"),
    ],
)
def test_other_malformed_objects(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    path = _write(tmp_path, _image({"5": _obj(**fields)}))
    with pytest.raises(DataError, match=message) as info:
        load_gqa_scene_graphs(path)
    assert str(info.value).startswith(f"{path}: image img9: object 5:")


# --- spatial graphs -------------------------------------------------------------------------------

# Centres: 0 (20, 20), 1 (60, 20), 2 (20, 70), 3 (20, 20). Box 3 lies wholly inside box 0, and
# node 1 (and node 2) is equally far from nodes 0 and 3, so ties are broken by index.
BOXES = np.array([[10, 10, 30, 30], [50, 10, 70, 30], [10, 60, 30, 80], [12, 12, 28, 28]], dtype=np.float32)


def test_spatial_rule_with_every_node_connected() -> None:
    graph = spatial_scene_graph(BOXES, 100, 100, k=3)
    got = [(s, t, r) for (s, t), r in zip(graph.edges.tolist(), graph.relations, strict=True)]
    assert got == [
        (0, 3, "contains"),
        (0, 1, "to the left of"),
        (0, 2, "above"),
        (1, 0, "to the right of"),
        (1, 3, "to the right of"),
        (1, 2, "above"),  # |dy| = 50 > |dx| = 40
        (2, 0, "below"),
        (2, 3, "below"),
        (2, 1, "below"),
        (3, 0, "inside"),
        (3, 1, "to the left of"),
        (3, 2, "above"),
    ]
    assert set(graph.relations) <= set(SPATIAL_RELATIONS)


def test_spatial_k_limits_edges_and_ties_go_to_the_lower_index() -> None:
    graph = spatial_scene_graph(BOXES, 100, 100, k=1)
    assert graph.edges.tolist() == [[0, 3], [1, 0], [2, 0], [3, 0]]
    assert graph.relations == ["contains", "to the right of", "below", "inside"]
    assert spatial_scene_graph(BOXES, 100, 100, k=0).edges.shape == (0, 2)
    # k larger than N - 1 gives every other node, no more.
    assert len(spatial_scene_graph(BOXES, 100, 100, k=10).relations) == 4 * 3


def test_spatial_nodes_boxes_and_labels() -> None:
    boxes = np.array([[0, 0, 50, 25], [150, 50, 250, 120]], dtype=np.float32)  # box 1 spills out of 200 x 100
    graph = spatial_scene_graph(boxes, 200, 100, labels=["cat", "mat"], attributes=[["black"], []])
    assert graph.names == ["cat", "mat"]
    assert graph.attributes == [["black"], []]
    assert graph.object_ids == ["0", "1"]
    assert graph.boxes.dtype == np.float32
    np.testing.assert_allclose(graph.boxes, [[0, 0, 0.25, 0.25], [0.75, 0.5, 1.0, 1.0]], rtol=0, atol=1e-7)
    assert spatial_scene_graph(boxes, 200, 100).names == ["object", "object"]


@pytest.mark.parametrize(
    ("source", "target", "forward", "backward"),
    [
        # 90% of the source's area inside the target is enough for "inside" (both boxes here).
        ([0, 0, 10, 10], [0, 1, 10, 10], "inside", "inside"),
        # Just under 90%: the small box is still inside, the large one contains it.
        ([0, 0, 10, 10], [0, 0, 10, 8.99], "contains", "inside"),
        # |dx| == |dy| counts as horizontal.
        ([0, 0, 10, 10], [10, 10, 20, 20], "to the left of", "to the right of"),
        # Same centre without coverage (a cross): neither dx nor dy is positive, so "below".
        ([0, 40, 100, 60], [40, 0, 60, 100], "below", "below"),
        # A zero-area box is never inside anything.
        ([5, 5, 5, 5], [0, 0, 10, 20], "above", "below"),
    ],
)
def test_spatial_rule_edge_cases(source: list[float], target: list[float], forward: str, backward: str) -> None:
    graph = spatial_scene_graph(np.array([source, target]), 100, 100, k=1)
    assert graph.edges.tolist() == [[0, 1], [1, 0]]
    assert graph.relations == [forward, backward]


def test_spatial_without_boxes_and_bad_arguments() -> None:
    graph = spatial_scene_graph(np.zeros((0, 4)), 640, 480)
    assert graph.names == [EMPTY] and graph.boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="shape"):
        spatial_scene_graph(np.zeros((2, 3)), 10, 10)
    with pytest.raises(ValueError, match="positive"):
        spatial_scene_graph(BOXES, 0, 10)
    with pytest.raises(ValueError, match="labels"):
        spatial_scene_graph(BOXES, 100, 100, labels=["a"])
    with pytest.raises(ValueError, match="k must be"):
        spatial_scene_graph(BOXES, 100, 100, k=-1)


# --- vocabulary -----------------------------------------------------------------------------------


def _graph(names: list[str], attributes: list[list[str]], edges: list[list[int]], relations: list[str]) -> SceneGraph:
    return SceneGraph(
        names=names,
        attributes=attributes,
        boxes=np.tile(np.array([[0.1, 0.2, 0.3, 0.4]]), (len(names), 1)),
        edges=np.array(edges, dtype=np.int64).reshape(-1, 2),
        relations=relations,
    )


def test_vocab_order_specials_unknown_and_min_count() -> None:
    a = _graph(["cup", "table"], [["white"], ["wooden", "white"]], [[0, 1]], ["on"])
    b = _graph(["cup", "apple"], [["red"], []], [[1, 0], [0, 1]], ["near", "on"])
    vocab = GraphVocab.build([a, b, spatial_scene_graph(np.zeros((0, 4)), 1, 1)])
    # Counts: cup 2, on 2, white 2, then 1 each (alphabetical); "<empty>" is a special, not counted twice.
    assert vocab.tokens == [
        "<pad>",
        "<unk>",
        "<empty>",
        "cup",
        "on",
        "white",
        "apple",
        "near",
        "red",
        "table",
        "wooden",
    ]
    assert len(vocab) == 11
    assert vocab.index("<pad>") == 0 and vocab.index("<unk>") == 1 and vocab.index(EMPTY) == 2
    assert vocab.index("to the left of") == 1  # unknown -> <unk>, never <pad>
    assert vocab.index("table") == 9 and vocab.token(9) == "table"
    assert "cup" in vocab and "dog" not in vocab
    assert GraphVocab.build([a, b], min_count=2).tokens == ["<pad>", "<unk>", "<empty>", "cup", "on", "white"]
    assert GraphVocab.build([]).tokens == ["<pad>", "<unk>", "<empty>"]


def test_vocab_keeps_phrases_whole(official: dict[str, SceneGraph]) -> None:
    vocab = GraphVocab.build(official.values())
    assert "to the left of" in vocab and "left" not in vocab


def test_vocab_json_save_and_load(tmp_path: Path) -> None:
    vocab = GraphVocab.build([_graph(["cup"], [["white"]], [], [])])
    assert GraphVocab.from_json(json.loads(json.dumps(vocab.to_json()))) == vocab
    path = tmp_path / "graph_vocab.json"
    vocab.save(path)
    assert GraphVocab.load(path) == vocab
    assert [p.name for p in tmp_path.iterdir()] == ["graph_vocab.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"tokens": [', r":1:\d+: not valid JSON"),
        ('["<pad>"]', "expected a graph vocabulary"),
        ('{"tokens": ["<unk>", "<pad>", "<empty>"]}', "must start with"),
        ('{"tokens": ["<pad>", "<unk>", "<empty>", "a", "a"]}', "repeats tokens"),
        ('{"tokens": ["<pad>", "<unk>", "<empty>", 3]}', "must all be strings"),
    ],
)
def test_vocab_load_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        GraphVocab.load(path)
    assert str(info.value).startswith(f"{path}:")


# --- PyG conversion -------------------------------------------------------------------------------


def test_to_pyg_features_dtypes_and_reverse_edges(official: dict[str, SceneGraph]) -> None:
    vocab = GraphVocab.build(official.values())
    data = to_pyg(official["img1"], vocab, max_attributes=3)
    assert data.num_nodes == 3
    assert data.x.dtype == torch.long and data.x.shape == (3, 4)
    ids = vocab.index
    # Attributes keep their listed order, deduplicated ("wooden" twice), first three kept ("old" dropped).
    assert data.x.tolist() == [
        [ids("table"), ids("wooden"), ids("brown"), ids("large")],
        [ids("cup"), ids("white"), 0, 0],
        [ids("plate"), 0, 0, 0],
    ]
    # (0, 1) and (1, 0) are each other's reverse; only (1, 2) needs an added reverse edge.
    assert data.edge_index.dtype == torch.long
    assert data.edge_index.t().tolist() == [[0, 1], [1, 0], [1, 2], [2, 1]]
    assert data.edge_attr.dtype == torch.long
    assert data.edge_attr.tolist() == [ids("under"), ids("on"), ids("to the left of"), ids("to the left of")]
    assert data.edge_reverse.dtype == torch.bool
    assert data.edge_reverse.tolist() == [False, False, False, True]
    assert data.box.dtype == torch.float32
    assert torch.equal(data.box, torch.from_numpy(official["img1"].boxes))
    # No self-loops: the models add them.
    assert not bool((data.edge_index[0] == data.edge_index[1]).any())


def test_to_pyg_unknown_tokens_slots_and_placeholder(official: dict[str, SceneGraph]) -> None:
    vocab = GraphVocab(["<pad>", "<unk>", "<empty>", "cup"])
    data = to_pyg(official["img1"], vocab, max_attributes=2)
    assert data.x.tolist() == [[1, 1, 1], [3, 1, 0], [1, 0, 0]]  # unknown -> 1, padding -> 0
    assert data.edge_attr.tolist() == [1, 1, 1, 1]
    assert to_pyg(official["img1"], vocab, max_attributes=0).x.shape == (3, 1)
    empty = to_pyg(official["img2"], vocab)
    assert empty.x.tolist() == [[2, 0, 0, 0]] and empty.num_nodes == 1
    assert empty.edge_index.shape == (2, 0) and empty.edge_index.dtype == torch.long
    assert empty.edge_attr.shape == (0,) and empty.edge_reverse.shape == (0,)
    with pytest.raises(ValueError, match="max_attributes"):
        to_pyg(official["img1"], vocab, max_attributes=-1)


def test_to_pyg_adds_one_reverse_per_missing_direction() -> None:
    # (0, 1) listed twice needs one reverse edge, not two; a self-relation is its own reverse.
    graph = _graph(["a", "b"], [[], []], [[0, 1], [0, 1], [1, 1]], ["on", "near", "at"])
    vocab = GraphVocab.build([graph])
    data = to_pyg(graph, vocab)
    assert data.edge_index.t().tolist() == [[0, 1], [0, 1], [1, 1], [1, 0]]
    assert data.edge_attr.tolist() == [vocab.index("on"), vocab.index("near"), vocab.index("at"), vocab.index("on")]
    assert data.edge_reverse.tolist() == [False, False, False, True]


def test_reverse_flags_survive_batching(official: dict[str, SceneGraph]) -> None:
    first = official["img1"]  # 3 nodes, reverse edge (2, 1) at position 3
    second = _graph(["a", "b"], [[], []], [[0, 1]], ["on"])  # 2 nodes, reverse edge (1, 0) at position 1
    third = _graph(["a", "b", "c"], [[], [], []], [[0, 1], [1, 0], [2, 0]], ["on", "under", "near"])
    vocab = GraphVocab.build([first, second, third])
    batch = Batch.from_data_list([to_pyg(g, vocab) for g in (first, second, third)])
    assert batch.edge_reverse.dtype == torch.bool
    assert batch.edge_reverse.tolist() == [False, False, False, True, False, True, False, False, False, True]
    # Node offsets are 0, 3 and 5: the flagged edges are exactly the added reverse edges of each graph.
    assert batch.edge_index[:, batch.edge_reverse].t().tolist() == [[2, 1], [4, 3], [5, 7]]
    assert batch.edge_index[:, ~batch.edge_reverse].t().tolist() == [
        [0, 1],
        [1, 0],
        [1, 2],
        [3, 4],
        [5, 6],
        [6, 5],
        [7, 5],
    ]
    expected = [vocab.index("to the left of"), vocab.index("on"), vocab.index("near")]
    assert batch.edge_attr[batch.edge_reverse].tolist() == expected


def test_module_import_does_not_import_torch() -> None:
    code = "import sys, isubg.data.scene_graphs; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- stat words -----------------------------------------------------------------------------------


def test_stat_words_rank_by_count_then_first_appearance() -> None:
    graph = _graph(["cup", "plate", "cup", EMPTY], [["red", "small"], ["white"], ["white", "round"], []], [], [])
    # Counts: cup 2, white 2, then red, small, plate, round once each, in order of first appearance.
    assert stat_words(graph, 4) == ["cup", "white", "red", "small"]
    assert stat_words(graph, 100) == ["cup", "white", "red", "small", "plate", "round"]
    assert stat_words(graph, 0) == []
    with pytest.raises(ValueError, match="num"):
        stat_words(graph, -1)


def test_stat_words_of_a_placeholder_graph_are_empty(official: dict[str, SceneGraph]) -> None:
    assert stat_words(official["img2"], 5) == []
    assert stat_words(official["img1"], 3) == ["wooden", "table", "brown"]


def test_detector_stat_words_rank_by_summed_confidence_then_first_appearance() -> None:
    names, attrs = ["dog", "tree", "dog", "cat"], ["brown", "green", "small", ""]
    conf, attr_conf = [0.3, 0.9, 0.4, 0.5], [0.5, 0.1, 0.5, 0.99]
    # tree 0.9, then dog 0.3 + 0.4 = 0.7; brown, small and cat tie at 0.5 and keep their order of first
    # appearance (box by box, name before attribute); green 0.1 last; "" is no word.
    ranked = detector_stat_words(names, attrs, 10, name_conf=conf, attribute_conf=attr_conf)
    assert ranked == ["tree", "dog", "brown", "small", "cat", "green"]
    assert detector_stat_words(names, attrs, 2, name_conf=conf, attribute_conf=attr_conf) == ["tree", "dog"]
    # Without confidences the weight is a count: dog 2, then the rest once each in order of appearance.
    assert detector_stat_words(names, attrs, 10) == ["dog", "brown", "tree", "green", "small", "cat"]
    assert detector_stat_words(None, attrs, 10, name_conf=conf) == ["brown", "green", "small"]
    assert detector_stat_words(None, None, 10) == [] and detector_stat_words([EMPTY], None, 10) == []
    with pytest.raises(ValueError, match="one entry per box"):
        detector_stat_words(names, attrs[:2], 10)
    with pytest.raises(ValueError, match="num"):
        detector_stat_words(names, attrs, -1)


def test_image_given_twice(tmp_path: Path) -> None:
    # json.load kept the last of two equal keys; reading streaming sees both, and says so.
    path = tmp_path / "dup.json"
    path.write_text('{"img9": {"width": 1, "height": 1}, "img9": {"width": 2, "height": 2}}', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_gqa_scene_graphs(path)
    assert str(info.value) == f"{path}: image img9 appears twice"


def test_progress_reaches_the_file_size(tmp_path: Path) -> None:
    path = _write(tmp_path, OFFICIAL)
    calls: list[tuple[int, int]] = []
    graphs = load_gqa_scene_graphs(path, on_progress=lambda done, total: calls.append((done, total)))
    assert list(graphs) == list(OFFICIAL) and calls[-1] == (path.stat().st_size,) * 2
