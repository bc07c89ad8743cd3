"""The memory-mapped question and scene-graph tables of a processed folder, on hand-sized rows."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from isubg.data.scene_graphs import GraphVocab, SceneGraph
from isubg.data.tables import GraphTable, GraphWriter, QuestionTable, QuestionWriter
from isubg.errors import DataError

RECORDS: list[dict[str, Any]] = [
    {"question_id": "q1", "image_id": "7", "question": "Is the cat ü?", "answer": "yes", "qtype": "verify",
     "detail": "attr", "tokens": [4, 5, 6], "entity": [0, 1, 0], "labels": [2], "scores": [1.0], "answers": ["yes"]},
    {"question_id": "q2", "image_id": "8", "question": "", "answer": "two", "qtype": "", "detail": "",
     "tokens": [], "entity": [], "labels": [], "scores": [], "answers": ["two", "2", "", "dos"]},
    {"question_id": "q3", "image_id": "7", "question": "What?", "answer": None, "qtype": "query", "detail": "",
     "tokens": [9], "entity": [1], "labels": None, "scores": None, "answers": []},
]  # fmt: skip
ROWS = [(0, 1), (-1, 0), (0, 1)]


@pytest.fixture
def questions(tmp_path: Path) -> QuestionTable:
    writer = QuestionWriter()
    for record, rows in zip(RECORDS, ROWS, strict=True):
        writer.add(record, *rows)
    writer.write(tmp_path / "questions_train")
    return QuestionTable(tmp_path / "questions_train")


def test_questions_round_trip_every_field(questions: QuestionTable) -> None:
    assert len(questions) == 3
    assert list(questions) == RECORDS
    assert [questions.graph_rows(i) for i in range(3)] == ROWS
    tokens, entity = questions.tokens(0)
    assert tokens.dtype == np.int32 and tokens.tolist() == [4, 5, 6] and entity.tolist() == [0, 1, 0]
    assert questions.targets(1) is not None and questions.targets(1)[0].size == 0  # answered, out of vocabulary
    assert questions.targets(2) is None and not questions.answered(2)
    assert questions.human_answers(1) == ["two", "2", "", "dos"]
    assert questions.column_text("image_id") == ["7", "8", "7"]
    assert questions[-1]["question_id"] == "q3"
    with pytest.raises(IndexError):
        questions.record(3)


def test_a_slice_is_a_view_with_its_own_columns(questions: QuestionTable) -> None:
    view = questions[1:]
    assert len(view) == 2 and [r["question_id"] for r in view] == ["q2", "q3"]
    assert view.column_text("question_id") == ["q2", "q3"]
    assert [view.answered(i) for i in range(len(view))] == [True, False]
    assert view.graph_rows(0) == ROWS[1]
    assert [r["question_id"] for r in questions[::2][1:]] == ["q3"]


def test_tables_pickle_as_their_folder_not_their_arrays(questions: QuestionTable) -> None:
    view = questions[1:]
    blob = pickle.dumps(view)
    assert len(blob) < 1000  # the mapped arrays do not travel
    assert list(pickle.loads(blob)) == RECORDS[1:]


def test_arrays_are_memory_mapped(questions: QuestionTable) -> None:
    assert all(isinstance(a.base, np.memmap) and not a.flags.writeable for a in questions.a.values())


def _graphs() -> dict[str, SceneGraph]:
    return {
        "7": SceneGraph(
            names=["cat", "tennis racket"],
            attributes=[["white", "small"], []],
            boxes=np.array([[0, 0, 0.5, 0.5], [0.2, 0.2, 1, 1]]),
            edges=np.array([[0, 1], [1, 0], [0, 1]]),
            relations=["to the left of", "near", "near"],
            object_ids=["123", "9"],
        ),
        "8": SceneGraph(names=["<empty>"], attributes=[[]], boxes=np.array([[0, 0, 1, 1]]), object_ids=[""]),
    }


@pytest.mark.parametrize("object_ids", [True, False])
def test_graphs_round_trip_with_their_stat_words(tmp_path: Path, object_ids: bool) -> None:
    graphs = _graphs()
    vocab = GraphVocab.build(graphs.values())
    writer = GraphWriter(vocab, object_ids=object_ids)
    assert [writer.add(i, g, stat) for (i, g), stat in zip(graphs.items(), ([3, 1], []), strict=True)] == [0, 1]
    writer.write(tmp_path / "graphs")
    table = GraphTable(tmp_path / "graphs", vocab)
    assert len(table) == 2 and table.rows == {"7": 0, "8": 1} and "7" in table and "9" not in table
    for image_id, graph in graphs.items():
        read = table.graph_of(image_id)
        expected = graph if object_ids else SceneGraph(graph.names, graph.attributes, graph.boxes, graph.edges,
                                                       graph.relations)  # fmt: skip
        assert read == expected
    assert table.stat(0).tolist() == [3, 1] and table.stat(1).tolist() == []
    nodes, edges = table.sizes()
    assert nodes.tolist() == [2, 1] and edges.tolist() == [3, 0]
    with pytest.raises(DataError, match="no scene graph for image 9"):
        table.graph_of("9")


def test_a_token_outside_the_vocabulary_is_refused(tmp_path: Path) -> None:
    graphs = _graphs()
    writer = GraphWriter(GraphVocab.build([graphs["8"]]), object_ids=True)
    with pytest.raises(DataError, match="image 7: token 'cat' is not in the graph vocabulary"):
        writer.add("7", graphs["7"], [])


def test_broken_tables_are_clear_errors(questions: QuestionTable, tmp_path: Path) -> None:
    folder = questions.folder
    with pytest.raises(DataError, match="not a graphs table"):
        GraphTable(folder, GraphVocab.build([]))
    with pytest.raises(DataError, match=r"no table\.json"):
        QuestionTable(tmp_path / "nowhere")
    np.save(folder / "question_id_offsets.npy", np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError, match=r"question_id_offsets\.npy does not hold 3 \+ 1 offsets"):
        QuestionTable(folder)
    (folder / "tokens.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"tokens\.npy: unreadable or truncated"):
        QuestionTable(folder)
    meta = json.loads((folder / "table.json").read_text())
    (folder / "table.json").write_text("{")
    with pytest.raises(DataError, match=r"table\.json: unreadable"):
        QuestionTable(folder)
    assert meta["kind"] == "questions"


def test_pyg_from_stored_ids_equals_to_pyg_of_the_decoded_graph(tmp_path: Path) -> None:
    from isubg.data.scene_graphs import to_pyg

    graphs = _graphs()
    graphs["7"].attributes[0] = ["white", "small", "white", "old", "wet"]  # a repeat, and more than 3
    vocab = GraphVocab.build(graphs.values())
    writer = GraphWriter(vocab, object_ids=True)
    for image_id, graph in graphs.items():
        writer.add(image_id, graph, [])
    writer.write(tmp_path / "graphs")
    table = GraphTable(tmp_path / "graphs", vocab)
    for row, graph in enumerate(graphs.values()):
        for slots in (0, 3):
            fast, slow = table.pyg(row, slots), to_pyg(graph, vocab, slots)
            assert fast.num_nodes == slow.num_nodes
            for key in ("x", "edge_index", "edge_attr", "edge_reverse", "box"):
                assert torch.equal(fast[key], slow[key]), key
    assert table.pyg(0, 3).x[0].tolist() == [vocab.index(t) for t in ("cat", "white", "small", "old")]
