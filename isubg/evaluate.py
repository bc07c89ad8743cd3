"""Evaluate a model on a split: official accuracies per branch and per question type, predictions, explanations.

Used by `isubg eval` and by the trainer's per-epoch validation. Names scored for every question:
- one per branch (cfrf, isubg, xvlm): the argmax of that branch's logits;
- "fused": the argmax of the fused probabilities (with one branch it equals that branch);
- "ens": the argmax of the sum of all probabilities, every branch's plus the fused one (as MGHR);
- "bound": the best official score any vocabulary answer gets, i.e. what a perfect model limited to
  the answer vocabulary would score.

Every prediction is scored with the dataset's OFFICIAL metric (isubg.metrics) against the processed
record's own answers (VQA: the ten raw human answers; GQA: the answer string), never against the training
targets. Per-type keys: VQA answer type ("yes/no", "number", "other"); GQA "structural/<type>" and
"semantic/<type>". Questions without answers (test splits) get predictions but no score.

Export: `write_predictions` in the official result formats, `write_explanations` for the isubg branch's
selected subgraphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from isubg.batch import Batch, DataSpec
from isubg.data.dataset import VQADataset
from isubg.data.files import write_json_atomic
from isubg.data.scene_graphs import SceneGraph
from isubg.errors import ConfigError, DataError
from isubg.metrics import AccuracyTable, VocabScorer
from isubg.models.fusion import FusedModel, FusedOutput
from isubg.models.isubg import selected_nodes

__all__ = ["EvalResult", "Explanation", "evaluate", "load_trained", "write_explanations", "write_predictions"]

FUSED, ENSEMBLE, BOUND = "fused", "ens", "bound"
_BOX_DECIMALS = 4  # normalised coordinates; 1e-4 of the image is far below a pixel


@dataclass
class Explanation:
    """The isubg branch's selected subgraph for one question.

    Attributes:
        nodes: [{"id": object id, "name": str, "box": [x1, y1, x2, y2] normalised}] of the selected nodes.
        edges: [{"source": object id, "relation": str, "target": object id}] between selected nodes.
    """

    question_id: str
    image_id: str
    question: str
    prediction: str
    isubg_prediction: str
    nodes: list[dict[str, Any]]
    edges: list[dict[str, str]]

    def to_json(self) -> dict[str, Any]:
        return {
            "question_id": self.question_id,
            "image_id": self.image_id,
            "question": self.question,
            "prediction": self.prediction,
            "isubg_prediction": self.isubg_prediction,
            "nodes": self.nodes,
            "edges": self.edges,
        }


@dataclass
class EvalResult:
    """What `evaluate` measured.

    Attributes:
        dataset: "gqa" or "vqa".
        names: the scored names in order: branches, "fused", "ens", "bound".
        primary: the name whose answers are `predictions` ("fused", or the branch when there is one).
        accuracy: name -> official accuracy in [0, 1] over the scored questions; None when no question had
            answers (test splits).
        per_type: type key -> name -> accuracy.
        counts: "questions" (predicted) and "scored" (with answers).
        type_counts: type key -> scored questions of that type.
        predictions: (question_id, answer) of `primary`, in loader order.
        explanations: per question when asked for, else None.
        table: the raw sums (merge tables across processes, then read accuracies from the merged table).
    """

    dataset: str
    names: list[str]
    primary: str
    accuracy: dict[str, float] | None
    per_type: dict[str, dict[str, float]]
    counts: dict[str, int]
    type_counts: dict[str, int]
    predictions: list[tuple[str, str]]
    explanations: list[Explanation] | None = None
    table: AccuracyTable | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (accuracies, per-type accuracies, counts); predictions are written separately."""
        return {
            "dataset": self.dataset,
            "names": list(self.names),
            "primary": self.primary,
            "accuracy": self.accuracy,
            "per_type": self.per_type,
            "counts": dict(self.counts),
            "type_counts": dict(self.type_counts),
        }


class _Scoring:
    """Maps batch rows to records, scores every name, and collects predictions (and explanations)."""

    def __init__(self, dataset: VQADataset, names: list[str], primary: str) -> None:
        self.dataset_name = str(dataset.manifest.get("dataset", "")).lower()
        if self.dataset_name not in ("gqa", "vqa"):
            raise DataError(
                f"{dataset.folder}/manifest.json: 'dataset' must be gqa or vqa, found {self.dataset_name!r}"
            )
        # Question id -> item; a record dict is built only for the questions scored, never for the whole split.
        self.records = dataset.records
        self.index = {qid: i for i, qid in enumerate(dataset.records.column_text("question_id"))}
        self.labels = dataset.answers.label2ans
        self.scorer = VocabScorer(self.dataset_name, self.labels)
        self.names, self.primary = names, primary
        self.table = AccuracyTable(names)
        self.predictions: list[tuple[str, str]] = []
        self.seen: set[str] = set()

    def record(self, question_id: str) -> Mapping[str, Any]:
        try:
            return self.records.record(self.index[question_id])
        except KeyError:
            raise DataError(f"question {question_id} from the loader is not among the dataset's records") from None

    def truth(self, record: Mapping[str, Any]) -> list[str]:
        if self.dataset_name == "vqa":
            return [str(a) for a in record.get("answers") or []]
        answer = record.get("answer")
        return [] if answer is None else [str(answer)]

    def types(self, record: Mapping[str, Any]) -> list[str]:
        if self.dataset_name == "vqa":
            return [record["qtype"]] if record.get("qtype") else []
        pairs = (("structural", record.get("qtype")), ("semantic", record.get("detail")))
        return [f"{group}/{value}" for group, value in pairs if value]

    def add(self, question_id: str, choices: Mapping[str, int]) -> bool:
        """Score one question; False when it was already seen (padded duplicates under DDP)."""
        if question_id in self.seen:
            return False
        self.seen.add(question_id)
        record = self.record(question_id)
        self.predictions.append((question_id, self.labels[choices[self.primary]]))
        scores = self.scorer.question(self.truth(record))
        if scores is not None:
            row = {name: scores.of(label) for name, label in choices.items()}
            row[BOUND] = scores.bound
            self.table.add(row, self.types(record))
        return True


def _choices(output: FusedOutput) -> dict[str, list[int]]:
    """Name -> (B,) chosen labels for every branch, "fused" and "ens"."""
    picks = {name: branch.logits.argmax(dim=1) for name, branch in output.branches.items()}
    picks[FUSED] = output.fused.argmax(dim=1)
    probabilities = output.probabilities()
    picks[ENSEMBLE] = torch.stack([p.float() for p in probabilities.values()]).sum(0).argmax(dim=1)
    stacked = torch.stack(list(picks.values())).cpu().tolist()  # one device sync per batch
    return dict(zip(picks, stacked, strict=True))


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    dataset: VQADataset,
    *,
    device: torch.device | str,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
    explanations: bool = False,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Run `model` over `loader` and score it (see the module docstring).

    Args:
        model: a FusedModel (forward(batch) -> FusedOutput), already on `device`.
        loader: batches of `dataset`'s questions; a question met twice is scored once.
        dataset: the split's dataset: its records hold the answers and types, its vocabulary the labels.
        device: where batches are moved.
        autocast: a factory of the context to run the forward in (mixed precision), or None.
        explanations: also collect the isubg branch's selected subgraph per question.
        progress: called after each batch with the number of questions it held.

    Returns:
        The EvalResult. The model's training mode is restored afterwards, even on error.

    Raises:
        ConfigError: explanations asked for a model without the isubg branch.
        DataError: a question of the loader is not in `dataset.records`.
    """
    branch_names = list(model.branches)
    if explanations and "isubg" not in branch_names:
        raise ConfigError(
            "explanations need the isubg branch (its sampled scene-graph nodes are the explanation), but this "
            f"model has only {', '.join(branch_names)}; evaluate a model whose model.branches include isubg, or "
            "leave explanations off."
        )
    primary = FUSED if len(branch_names) > 1 else branch_names[0]
    scoring = _Scoring(dataset, [*branch_names, FUSED, ENSEMBLE, BOUND], primary)
    explained: list[Explanation] | None = [] if explanations else None
    graphs: dict[str, SceneGraph] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                batch = batch.to(device)
                with autocast() if autocast is not None else contextlib.nullcontext():
                    output = model(batch)
                choices = _choices(output)
                fresh = [
                    scoring.add(qid, {name: picks[row] for name, picks in choices.items()})
                    for row, qid in enumerate(batch.question_ids)
                ]
                if explained is not None:
                    explained += _explain(output, batch, choices, fresh, scoring, dataset, graphs)
                if progress is not None:
                    progress(len(batch))
    finally:
        model.train(was_training)
    return _result(scoring, explained)


def _result(scoring: _Scoring, explained: list[Explanation] | None) -> EvalResult:
    table = scoring.table
    return EvalResult(
        dataset=scoring.dataset_name,
        names=list(scoring.names),
        primary=scoring.primary,
        accuracy=table.accuracy(),
        per_type=table.per_type(),
        counts={"questions": len(scoring.predictions), "scored": table.count},
        type_counts=dict(sorted(table.type_counts.items())),
        predictions=scoring.predictions,
        explanations=explained,
        table=table,
    )


def _explain(
    output: FusedOutput,
    batch: Batch,
    choices: Mapping[str, Sequence[int]],
    fresh: Sequence[bool],
    scoring: _Scoring,
    dataset: VQADataset,
    graphs: dict[str, SceneGraph],
) -> list[Explanation]:
    """One Explanation per new question of the batch, from the isubg branch's node mask."""
    selected = selected_nodes(output.branches["isubg"], batch)
    sizes = batch.graphs.ptr.diff().cpu().tolist()
    out = []
    for row, question_id in enumerate(batch.question_ids):
        if not fresh[row]:
            continue
        image_id = batch.image_ids[row]
        if image_id not in graphs:
            graphs[image_id] = dataset.graph(image_id)
        graph = graphs[image_id]
        if graph.num_nodes != sizes[row]:
            raise DataError(
                f"image {image_id}: the batch holds {sizes[row]} graph nodes but the scene graph has {graph.num_nodes}"
            )
        out.append(
            Explanation(
                question_id=question_id,
                image_id=image_id,
                question=batch.questions[row],
                prediction=scoring.labels[choices[scoring.primary][row]],
                isubg_prediction=scoring.labels[choices["isubg"][row]],
                **_subgraph(graph, selected[row]),
            )
        )
    return out


def _subgraph(graph: SceneGraph, chosen: Sequence[int]) -> dict[str, list[Any]]:
    """The chosen nodes (by local index) and the relation edges whose two ends are both chosen."""
    keep = set(chosen)
    nodes = [
        {
            "id": graph.object_ids[i],
            "name": graph.names[i],
            "box": [round(float(v), _BOX_DECIMALS) for v in graph.boxes[i]],
        }
        for i in chosen
    ]
    edges = [
        {"source": graph.object_ids[s], "relation": relation, "target": graph.object_ids[t]}
        for (s, t), relation in zip(graph.edges.tolist(), graph.relations, strict=True)
        if s in keep and t in keep
    ]
    return {"nodes": nodes, "edges": edges}


def write_predictions(result: EvalResult, path: Path, dataset_name: str | None = None) -> None:
    """Write `result.predictions` in the official result format, atomically.

    VQA v2: [{"question_id": int, "answer": str}]; GQA: [{"questionId": str, "prediction": str}].

    Args:
        result: an evaluation result.
        path: the JSON file to write.
        dataset_name: "VQA" or "GQA" (any case); None uses `result.dataset`.

    Raises:
        ConfigError: an unknown dataset name.
        DataError: a VQA question id that is not an integer.
    """
    name = (dataset_name or result.dataset).lower()
    if name == "vqa":
        rows: list[dict[str, Any]] = []
        for question_id, answer in result.predictions:
            try:
                rows.append({"question_id": int(question_id), "answer": answer})
            except ValueError:
                raise DataError(f"VQA question ids are integers; {question_id!r} is not (writing {path})") from None
    elif name == "gqa":
        rows = [{"questionId": str(question_id), "prediction": answer} for question_id, answer in result.predictions]
    else:
        raise ConfigError(f"cannot write predictions for dataset {dataset_name!r}; expected GQA or VQA")
    write_json_atomic(Path(path), rows)


def write_explanations(result: EvalResult, path: Path) -> None:
    """Write the explanations as a JSON list of `Explanation.to_json()` objects, atomically.

    Raises:
        ConfigError: the result was computed without explanations.
    """
    if result.explanations is None:
        raise ConfigError(f"no explanations to write to {path}: evaluate with explanations=True (needs isubg)")
    write_json_atomic(Path(path), [e.to_json() for e in result.explanations])


def load_trained(
    state: dict[str, Any], spec: DataSpec, vocab: str, where: Path, device: torch.device | str = "cpu"
) -> FusedModel:
    """The trained model of a loaded checkpoint (isubg.checkpoint.load_checkpoint), in eval mode on `device`.

    Args:
        state: the checkpoint dict.
        spec: the data spec of the processed folder evaluated on (its tf-idf table is data, not weights).
        vocab: that folder's vocabulary checksum (isubg.checkpoint.vocab_checksum).
        where: the checkpoint file, for messages.

    Raises:
        DataError: the data has other vocabularies than the model was trained on.
    """
    from isubg.config import RunConfig
    from isubg.models import build_model

    if state.get("vocab_sha256") != vocab:
        raise DataError(
            f"{where} was trained on another dictionary/answer list than the data given; evaluate on the processed "
            "folder the run used (or one prepared with the same vocabularies)"
        )
    model = build_model(RunConfig.model_validate(state["config"]), spec)
    model.load_state_dict(state["model"])
    return model.to(device).eval()
