"""Evaluation on the tiny demo data: official scores per branch and type, the vocabulary bound, prediction and
explanation export in the official formats, and the model's mode left as it was."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from processed import rewrite_questions
from torch import nn

from isubg.batch import Batch
from isubg.data.dataset import VQADataset
from isubg.data.embedded import build_demo
from isubg.data.loaders import make_batches
from isubg.errors import ConfigError, DataError
from isubg.evaluate import EvalResult, evaluate, write_explanations, write_predictions
from isubg.metrics import gqa_accuracy, vqa_accuracy
from isubg.models import build_model
from isubg.models.common import BranchOutput
from isubg.models.fusion import FusedOutput
from isubg.resolve import resolve_config

TINY = [
    "model.xvlm.hidden_size=32", "model.xvlm.num_heads=2", "model.xvlm.intermediate_size=64",
    "model.xvlm.num_text_layers=1", "model.xvlm.num_cross_layers=1", "num_hid=64", "general_hidden_dim=32",
    "AOA_layers=1", "mgat_layers=2",
]  # fmt: skip
QUESTIONS = 24  # questions kept per split: enough for every type, fast on a CPU
ALL_NAMES = ["cfrf", "isubg", "xvlm", "fused", "ens", "bound"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo"), size="tiny", seed=0).root


def _dataset(demo: Path, kind: str, split: str = "val") -> VQADataset:
    d = resolve_config("demo", sets=TINY).config.data
    data = VQADataset(
        demo / "processed" / kind,
        split,
        question_len=d.question_len,
        max_boxes=d.max_boxes,
        num_stat_word=d.num_stat_word,
    )
    data.records = data.records[:QUESTIONS]
    return data


def _loader(data: VQADataset) -> Any:
    """The split in order, 8 questions a batch, as `isubg eval` batches it."""
    cfg = resolve_config("demo", sets=[*TINY, "eval.batch_size=8", "data.num_workers=0"]).config
    return make_batches(data, cfg, epoch=0, train=False)


@pytest.fixture(scope="module", params=["gqa", "vqa"])
def evaluated(request: pytest.FixtureRequest, demo: Path) -> tuple[VQADataset, nn.Module, EvalResult]:
    """A tiny real three-branch model evaluated with explanations, from training mode."""
    data = _dataset(demo, request.param)
    torch.manual_seed(0)
    model = build_model(resolve_config("demo", sets=TINY).config, data.spec())
    model.train()
    return data, model, evaluate(model, _loader(data), data, device="cpu", explanations=True)


def test_real_model_scores_every_name_and_type(evaluated: tuple[VQADataset, nn.Module, EvalResult]) -> None:
    data, model, result = evaluated
    assert model.training, "evaluate must restore training mode"
    assert result.names == ALL_NAMES and result.primary == "fused"
    assert result.accuracy is not None and list(result.accuracy) == ALL_NAMES
    assert all(0.0 <= value <= 1.0 for value in result.accuracy.values())
    assert all(result.accuracy["bound"] >= result.accuracy[name] for name in ALL_NAMES)
    if result.dataset == "vqa":
        expected_types = {r["qtype"] for r in data.records}
        assert expected_types <= {"yes/no", "number", "other"}
    else:
        expected_types = {f"structural/{r['qtype']}" for r in data.records}
        expected_types |= {f"semantic/{r['detail']}" for r in data.records}
    assert set(result.per_type) == expected_types == set(result.type_counts)
    assert all(list(scores) == ALL_NAMES for scores in result.per_type.values())
    assert result.counts == {"questions": QUESTIONS, "scored": QUESTIONS}
    assert [qid for qid, _ in result.predictions] == [r["question_id"] for r in data.records]
    assert all(answer in data.answers for _, answer in result.predictions)
    assert json.loads(json.dumps(result.to_json()))["accuracy"] == result.accuracy


def test_explanations_are_subgraphs_of_the_scene_graph(evaluated: tuple[VQADataset, nn.Module, EvalResult]) -> None:
    data, _, result = evaluated
    sample_k = resolve_config("demo", sets=TINY).config.model.isubg.sample_k
    assert result.explanations is not None and len(result.explanations) == QUESTIONS
    for item, record in zip(result.explanations, data.records, strict=True):
        assert (item.question_id, item.image_id) == (record["question_id"], record["image_id"])
        graph = data.graph(item.image_id)
        index = {object_id: i for i, object_id in enumerate(graph.object_ids)}
        ids = [node["id"] for node in item.nodes]
        assert len(ids) == len(set(ids)) == min(sample_k, graph.num_nodes)
        for node in item.nodes:
            i = index[node["id"]]
            assert node["name"] == graph.names[i]
            assert node["box"] == pytest.approx(graph.boxes[i].tolist(), abs=1e-4)
        edges = {
            (graph.object_ids[s], r, graph.object_ids[t])
            for (s, t), r in zip(graph.edges.tolist(), graph.relations, strict=True)
        }
        expected = {e for e in edges if e[0] in ids and e[2] in ids}
        assert {(e["source"], e["relation"], e["target"]) for e in item.edges} == expected
        assert item.prediction in data.answers and item.isubg_prediction in data.answers


def test_write_explanations(evaluated: tuple[VQADataset, nn.Module, EvalResult], tmp_path: Path) -> None:
    _, _, result = evaluated
    path = tmp_path / "explanations.json"
    write_explanations(result, path)
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert len(rows) == QUESTIONS
    keys = {"question_id", "image_id", "question", "prediction", "isubg_prediction", "nodes", "edges"}
    assert all(set(row) == keys for row in rows)
    assert all(set(node) == {"id", "name", "box"} and len(node["box"]) == 4 for row in rows for node in row["nodes"])


class Oracle(nn.Module):
    """A fake FusedModel: every branch puts all mass on a given label per question (or raises if asked)."""

    def __init__(self, labels: dict[str, int], num_answers: int, branches: tuple[str, ...], fail: bool = False):
        super().__init__()
        self.branches = nn.ModuleDict({name: nn.Identity() for name in branches})
        self.labels, self.num_answers, self.fail = labels, num_answers, fail

    def forward(self, batch: Batch) -> FusedOutput:
        if self.fail:
            raise RuntimeError("boom")
        logits = torch.full((len(batch), self.num_answers), -20.0)
        for row, question_id in enumerate(batch.question_ids):
            logits[row, self.labels[question_id]] = 20.0
        return FusedOutput({name: BranchOutput(logits.clone()) for name in self.branches}, torch.sigmoid(logits))


def _best_labels(data: VQADataset, kind: str) -> dict[str, int]:
    """Per question, a vocabulary label with the highest official score, found by brute force."""
    labels = {}
    for r in data.records:
        if kind == "vqa":
            scores = [vqa_accuracy(answer, r["answers"]) for answer in data.answers.answers]
        else:
            scores = [gqa_accuracy(answer, r["answer"]) for answer in data.answers.answers]
        labels[r["question_id"]] = max(range(len(scores)), key=scores.__getitem__)
    return labels


def _spoil_some_answers(demo: Path, kind: str, tmp_path: Path) -> Path:
    """A copy of the demo whose val answers make bounds below 1: answers outside the vocabulary, split votes."""
    shutil.copytree(demo / "processed" / kind, tmp_path / "processed" / kind)
    rows = iter(range(10**9))

    def spoil(r: dict[str, Any]) -> dict[str, Any]:
        i = next(rows)
        if kind == "vqa" and i % 3 == 1:
            r["answers"] = ["yes"] * 2 + ["purple dragon"] * 8  # best: "yes" at 0.6
        elif kind == "vqa" and i % 3 == 2:
            r["answers"] = ["purple dragon"] * 10  # nothing in the vocabulary scores
        elif kind == "gqa" and i % 2:
            r["answer"] = r["answer"].upper() + "!"  # exact match: no vocabulary answer equals it
        return r

    rewrite_questions(tmp_path / "processed" / kind, "val", spoil)
    return tmp_path


@pytest.mark.parametrize("kind", ["gqa", "vqa"])
def test_a_perfect_model_reaches_the_bound(demo: Path, kind: str, tmp_path: Path) -> None:
    data = _dataset(_spoil_some_answers(demo, kind, tmp_path), kind)
    labels = _best_labels(data, kind)
    model = Oracle(labels, data.num_answers, ("cfrf", "isubg")).eval()
    result = evaluate(model, _loader(data), data, device="cpu")
    assert not model.training
    assert result.accuracy is not None
    expected = sum(
        vqa_accuracy(data.answers.answers[labels[r["question_id"]]], r["answers"])
        if kind == "vqa"
        else gqa_accuracy(data.answers.answers[labels[r["question_id"]]], r["answer"])
        for r in data.records
    ) / len(data.records)
    assert 0.0 < result.accuracy["bound"] < 1.0
    for name in ("cfrf", "isubg", "fused", "ens", "bound"):
        assert result.accuracy[name] == pytest.approx(expected, abs=1e-12), name


def test_a_single_branch_exports_its_own_answers(demo: Path) -> None:
    data = _dataset(demo, "gqa")
    labels = {r["question_id"]: i % data.num_answers for i, r in enumerate(data.records)}
    result = evaluate(Oracle(labels, data.num_answers, ("xvlm",)), _loader(data), data, device="cpu")
    assert result.primary == "xvlm" and result.names == ["xvlm", "fused", "ens", "bound"]
    assert result.predictions == [(q, data.answers.answers[label]) for q, label in labels.items()]


def test_questions_without_answers_are_predicted_not_scored(demo: Path, tmp_path: Path) -> None:
    shutil.copytree(demo / "processed" / "vqa", tmp_path / "processed" / "vqa")
    rewrite_questions(
        tmp_path / "processed" / "vqa", "val", lambda r: {**r, "answers": [], "answer": None, "labels": None}
    )
    data = _dataset(tmp_path, "vqa")
    model = Oracle(dict.fromkeys((r["question_id"] for r in data.records), 0), data.num_answers, ("cfrf", "xvlm"))
    result = evaluate(model, _loader(data), data, device="cpu")
    assert result.accuracy is None and result.per_type == {}
    assert result.counts == {"questions": QUESTIONS, "scored": 0}
    assert len(result.predictions) == QUESTIONS
    write_predictions(result, tmp_path / "test.json", "VQA")
    assert len(json.loads((tmp_path / "test.json").read_text())) == QUESTIONS


@pytest.mark.parametrize("kind", ["gqa", "vqa"])
def test_predictions_in_the_official_formats(demo: Path, tmp_path: Path, kind: str) -> None:
    data = _dataset(demo, kind)
    model = Oracle(_best_labels(data, kind), data.num_answers, ("cfrf", "isubg"))
    result = evaluate(model, _loader(data), data, device="cpu")
    path = tmp_path / "predictions.json"
    write_predictions(result, path, kind.upper())
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert len(rows) == QUESTIONS
    if kind == "vqa":
        assert all(set(row) == {"question_id", "answer"} for row in rows)
        assert all(type(row["question_id"]) is int and isinstance(row["answer"], str) for row in rows)
        assert [row["question_id"] for row in rows] == [int(r["question_id"]) for r in data.records]
    else:
        assert all(set(row) == {"questionId", "prediction"} for row in rows)
        assert all(isinstance(row["questionId"], str) and isinstance(row["prediction"], str) for row in rows)
        assert [row["questionId"] for row in rows] == [r["question_id"] for r in data.records]
    write_predictions(result, tmp_path / "default.json")  # the dataset name defaults to the result's
    assert json.loads((tmp_path / "default.json").read_text()) == rows


def test_write_predictions_rejects_bad_input(tmp_path: Path) -> None:
    result = EvalResult("vqa", ["cfrf"], "cfrf", None, {}, {}, {}, [("q7", "yes")])
    with pytest.raises(DataError, match="'q7'"):
        write_predictions(result, tmp_path / "p.json")
    with pytest.raises(ConfigError, match="COCO"):
        write_predictions(result, tmp_path / "p.json", "COCO")
    with pytest.raises(ConfigError, match="explanations=True"):
        write_explanations(result, tmp_path / "e.json")
    assert not list(tmp_path.iterdir())


def test_explanations_need_the_isubg_branch(demo: Path) -> None:
    data = _dataset(demo, "gqa")
    model = Oracle({}, data.num_answers, ("cfrf", "xvlm")).train()
    with pytest.raises(ConfigError, match="isubg branch"):
        evaluate(model, _loader(data), data, device="cpu", explanations=True)
    assert model.training


def test_mode_restored_on_error_and_hooks_called(demo: Path) -> None:
    data = _dataset(demo, "vqa")
    failing = Oracle({}, data.num_answers, ("cfrf",), fail=True).train()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(failing, _loader(data), data, device="cpu")
    assert failing.training

    calls: list[str] = []
    seen: list[int] = []

    @contextlib.contextmanager
    def autocast() -> Iterator[None]:
        calls.append("enter")
        yield

    model = Oracle(dict.fromkeys((r["question_id"] for r in data.records), 1), data.num_answers, ("cfrf",))
    evaluate(model, _loader(data), data, device="cpu", autocast=autocast, progress=seen.append)
    assert len(calls) == 3 and seen == [8, 8, 8]


def test_repeated_questions_are_scored_once_and_unknown_ones_rejected(demo: Path) -> None:
    data = _dataset(demo, "gqa")
    model = Oracle(_best_labels(data, "gqa"), data.num_answers, ("cfrf", "isubg"))
    batches = list(_loader(data))
    result = evaluate(model, [*batches, batches[0]], data, device="cpu")  # a padded last round, as under DDP
    assert result.counts == {"questions": QUESTIONS, "scored": QUESTIONS}
    assert result.accuracy is not None and result.accuracy["fused"] == 1.0
    data.records = data.records[:8]
    with pytest.raises(DataError, match="not among the dataset's records"):
        evaluate(model, batches, data, device="cpu")
