"""Load GQA and VQA v2 questions (and VQA annotations) from their official JSON files into one record type.

GQA `*_balanced_questions.json`: {questionId: {"imageId", "question", "answer", "types": {"structural",
"semantic", "detailed"}, ...}}; the answer is absent in the test split.
VQA v2 questions: {"questions": [{"image_id", "question", "question_id"}], ...}; annotations:
{"annotations": [{"question_id", "image_id", "multiple_choice_answer", "answers": [{"answer", ...} x 10],
"answer_type", "question_type"}], ...}; the test splits have no annotations file.

Ids are strings everywhere (GQA ids are strings, VQA ids ints), so lookups never miss on type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isubg.data.files import read_json
from isubg.errors import DataError

__all__ = ["Question", "load_gqa_questions", "load_vqa_questions"]


@dataclass(frozen=True)
class Question:
    """One question with whatever answers its split provides.

    Attributes:
        question_id: the id as a string.
        image_id: the image's id as a string.
        text: the question.
        answer: the canonical answer (GQA `answer`, VQA `multiple_choice_answer`); None without labels.
        human_answers: VQA's 10 raw human answers; GQA: the one answer; () without labels.
        qtype: GQA structural type / VQA answer type ("yes/no", "number", "other"); "" if unknown.
        detail: GQA semantic type / VQA question type ("what color is the"); "" if unknown.
    """

    question_id: str
    image_id: str
    text: str
    answer: str | None
    human_answers: tuple[str, ...]
    qtype: str
    detail: str


def _require(record: Any, keys: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an object, found {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    return record


def load_gqa_questions(path: Path) -> list[Question]:
    """Read a GQA questions file (balanced or all), in file order.

    Raises:
        DataError: invalid JSON, not a mapping of question ids, a record missing imageId/question, or
            no questions at all; messages name the file and the question id.
    """
    data = read_json(path)
    if not isinstance(data, Mapping):
        raise DataError(f"{path}: expected a mapping of questionId -> question, found {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the split holds no questions")
    out = []
    for qid, raw in data.items():
        record = _require(raw, ("imageId", "question"), f"{path}: question {qid}")
        types = record.get("types") or {}
        answer = record.get("answer")
        out.append(
            Question(
                question_id=str(qid),
                image_id=str(record["imageId"]),
                text=str(record["question"]),
                answer=None if answer is None else str(answer),
                human_answers=() if answer is None else (str(answer),),
                qtype=str(types.get("structural") or ""),
                detail=str(types.get("semantic") or ""),
            )
        )
    return out


def _annotations_by_id(path: Path) -> dict[str, Mapping[str, Any]]:
    data = read_json(path)
    items = data.get("annotations") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected an object with an 'annotations' list (VQA v2 annotations format)")
    by_id: dict[str, Mapping[str, Any]] = {}
    for i, raw in enumerate(items):
        record = _require(raw, ("question_id", "image_id", "answers"), f"{path}: annotation #{i}")
        qid = str(record["question_id"])
        if qid in by_id:
            raise DataError(f"{path}: question {qid} is annotated twice")
        if not isinstance(record["answers"], list) or not record["answers"]:
            raise DataError(f"{path}: question {qid}: 'answers' must be a non-empty list")
        by_id[qid] = record
    return by_id


def load_vqa_questions(questions_path: Path, annotations_path: Path | None = None) -> list[Question]:
    """Read a VQA v2 questions file and, for labelled splits, its annotations file.

    Raises:
        DataError: invalid JSON or layout, duplicate question ids, a question without an annotation
            (or an annotation whose image differs from its question's), annotations for unknown
            questions, or an empty split; messages name the file and the question id.
    """
    data = read_json(questions_path)
    items = data.get("questions") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise DataError(f"{questions_path}: expected an object with a 'questions' list (VQA v2 questions format)")
    if not items:
        raise DataError(f"{questions_path}: the split holds no questions")
    notes = _annotations_by_id(annotations_path) if annotations_path is not None else None
    out, seen = [], set()
    for i, raw in enumerate(items):
        record = _require(raw, ("question_id", "image_id", "question"), f"{questions_path}: question #{i}")
        qid, image_id = str(record["question_id"]), str(record["image_id"])
        if qid in seen:
            raise DataError(f"{questions_path}: question {qid} appears twice")
        seen.add(qid)
        note = None
        if notes is not None:
            note = notes.get(qid)
            if note is None:
                raise DataError(f"{annotations_path}: no annotation for question {qid} of {questions_path}")
            if str(note["image_id"]) != image_id:
                raise DataError(f"{annotations_path}: question {qid} is about image {note['image_id']}, not {image_id}")
        out.append(_vqa_question(qid, image_id, str(record["question"]), note))
    if notes is not None and len(notes) != len(seen):
        extra = next(q for q in notes if q not in seen)
        raise DataError(f"{annotations_path}: annotates question {extra}, which {questions_path} does not have")
    return out


def _vqa_question(qid: str, image_id: str, text: str, note: Mapping[str, Any] | None) -> Question:
    if note is None:
        return Question(qid, image_id, text, None, (), "", "")
    humans = tuple(str(a.get("answer", "")) if isinstance(a, Mapping) else str(a) for a in note["answers"])
    answer = note.get("multiple_choice_answer")
    return Question(
        question_id=qid,
        image_id=image_id,
        text=text,
        answer=None if answer is None else str(answer),
        human_answers=humans,
        qtype=str(note.get("answer_type") or ""),
        detail=str(note.get("question_type") or ""),
    )
