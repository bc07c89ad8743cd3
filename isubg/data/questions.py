"""Load GQA and VQA v2 questions (and VQA annotations) from their official JSON files into one record type.

GQA `*_balanced_questions.json`: {questionId: {"imageId", "question", "answer", "types": {"structural",
"semantic", "detailed"}, ...}}; the answer is absent in the test split.
VQA v2 questions: {"questions": [{"image_id", "question", "question_id"}], ...}; annotations:
{"annotations": [{"question_id", "image_id", "multiple_choice_answer", "answers": [{"answer", ...} x 10],
"answer_type", "question_type"}], ...}; the test splits have no annotations file.

Ids are strings everywhere (GQA ids are strings, VQA ids ints), so lookups never miss on type.

The files are read streaming (`isubg.data.jsonstream`): one record is parsed at a time, and only what a
`Question` needs of it is kept, with repeated strings (answers, types, image ids) interned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from sys import intern
from typing import Any, NamedTuple

from isubg.data.jsonstream import ProgressFn, iter_field_array, iter_object
from isubg.errors import DataError

__all__ = ["Question", "load_gqa_questions", "load_vqa_questions"]


@dataclass(frozen=True, slots=True)
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


def _size(path: Path) -> int:
    # Only for progress totals: a file that cannot be read is reported by the reader that opens it.
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def _progress_from(on_progress: ProgressFn | None, before: int, total: int) -> ProgressFn | None:
    """Report one file's progress as part of several read one after another (`before` bytes read already)."""
    if on_progress is None:
        return None
    return lambda done, _size: on_progress(before + done, total)


def load_gqa_questions(path: Path, *, on_progress: ProgressFn | None = None) -> list[Question]:
    """Read a GQA questions file (balanced or all), in file order, one question at a time.

    Args:
        path: the `*_questions.json` file.
        on_progress: `on_progress(done_bytes, total_bytes)` as the file is read (see `iter_object`).

    Raises:
        DataError: invalid JSON or layout (not a mapping of question ids), a record missing imageId/question,
            a question id given twice, or no questions at all; messages name the file and the question id.
    """
    singles: dict[str, tuple[str]] = {}  # answer -> (answer,), one tuple per distinct answer
    out: list[Question] = []
    seen: set[str] = set()
    for qid, raw in iter_object(path, on_progress=on_progress, expected="a mapping of questionId -> question"):
        record = _require(raw, ("imageId", "question"), f"{path}: question {qid}")
        if qid in seen:
            raise DataError(f"{path}: question {qid} appears twice")
        seen.add(qid)
        types = record.get("types") or {}
        answer = None if record.get("answer") is None else intern(str(record["answer"]))
        out.append(
            Question(
                question_id=qid,
                image_id=intern(str(record["imageId"])),
                text=str(record["question"]),
                answer=answer,
                human_answers=() if answer is None else singles.setdefault(answer, (answer,)),
                qtype=intern(str(types.get("structural") or "")),
                detail=intern(str(types.get("semantic") or "")),
            )
        )
    if not out:
        raise DataError(f"{path}: the split holds no questions")
    return out


class _Note(NamedTuple):
    """What a Question needs of one VQA annotation (the raw record holds 10 answer dicts besides)."""

    image_id: str
    answer: str | None
    human_answers: tuple[str, ...]
    qtype: str
    detail: str


def _note(record: Mapping[str, Any], answer_lists: dict[tuple[str, ...], tuple[str, ...]]) -> _Note:
    """The fields a Question needs; `answer_lists` shares equal human-answer tuples (10 x "yes" is common)."""
    # Parsed JSON objects are dicts: the exact type test is much faster than isinstance(a, Mapping).
    humans = tuple([intern(str(a.get("answer", ""))) if type(a) is dict else intern(str(a)) for a in record["answers"]])
    answer = record.get("multiple_choice_answer")
    return _Note(
        image_id=intern(str(record["image_id"])),
        answer=None if answer is None else intern(str(answer)),
        human_answers=answer_lists.setdefault(humans, humans),
        qtype=intern(str(record.get("answer_type") or "")),
        detail=intern(str(record.get("question_type") or "")),
    )


def _annotations_by_id(path: Path, *, on_progress: ProgressFn | None = None) -> dict[str, _Note]:
    """Question id -> its annotation's fields, in file order, read one annotation at a time."""
    expected = "an object with an 'annotations' list (VQA v2 annotations format)"
    by_id: dict[str, _Note] = {}
    answer_lists: dict[tuple[str, ...], tuple[str, ...]] = {}
    for i, raw in enumerate(iter_field_array(path, "annotations", on_progress=on_progress, expected=expected)):
        record = _require(raw, ("question_id", "image_id", "answers"), f"{path}: annotation #{i}")
        qid = str(record["question_id"])
        if qid in by_id:
            raise DataError(f"{path}: question {qid} is annotated twice")
        if not isinstance(record["answers"], list) or not record["answers"]:
            raise DataError(f"{path}: question {qid}: 'answers' must be a non-empty list")
        by_id[qid] = _note(record, answer_lists)
    return by_id


def load_vqa_questions(
    questions_path: Path, annotations_path: Path | None = None, *, on_progress: ProgressFn | None = None
) -> list[Question]:
    """Read a VQA v2 questions file and, for labelled splits, its annotations file, one record at a time.

    The annotations (only the fields a Question needs) are read first, then the questions.

    Args:
        questions_path: the `*_questions.json` file.
        annotations_path: the `*_annotations.json` file, or None for an unlabelled split.
        on_progress: `on_progress(done_bytes, total_bytes)` over both files together: done_bytes goes
            from 0 through the annotations file, then on through the questions file, to the sum of
            their sizes.

    Raises:
        DataError: invalid JSON or layout, duplicate question ids, a question without an annotation
            (or an annotation whose image differs from its question's), annotations for unknown
            questions, or an empty split; messages name the file and the question id.
    """
    notes = None
    if annotations_path is not None:
        notes_size = _size(annotations_path)
        total = notes_size + _size(questions_path)
        notes = _annotations_by_id(annotations_path, on_progress=_progress_from(on_progress, 0, total))
        on_progress = _progress_from(on_progress, notes_size, total)
    expected = "an object with a 'questions' list (VQA v2 questions format)"
    items = iter_field_array(questions_path, "questions", on_progress=on_progress, expected=expected)
    out: list[Question] = []
    seen: set[str] = set()
    for i, raw in enumerate(items):
        record = _require(raw, ("question_id", "image_id", "question"), f"{questions_path}: question #{i}")
        qid, image_id = str(record["question_id"]), intern(str(record["image_id"]))
        if qid in seen:
            raise DataError(f"{questions_path}: question {qid} appears twice")
        seen.add(qid)
        note = None
        if notes is not None:
            # Popped: what is left at the end annotates questions the file does not have.
            note = notes.pop(qid, None)
            if note is None:
                raise DataError(f"{annotations_path}: no annotation for question {qid} of {questions_path}")
            if note.image_id != image_id:
                raise DataError(f"{annotations_path}: question {qid} is about image {note.image_id}, not {image_id}")
        out.append(_vqa_question(qid, image_id, str(record["question"]), note))
    if not out:
        raise DataError(f"{questions_path}: the split holds no questions")
    if notes:
        raise DataError(
            f"{annotations_path}: annotates question {next(iter(notes))}, which {questions_path} does not have"
        )
    return out


def _vqa_question(qid: str, image_id: str, text: str, note: _Note | None) -> Question:
    if note is None:
        return Question(qid, image_id, text, None, (), "", "")
    return Question(qid, image_id, text, note.answer, note.human_answers, note.qtype, note.detail)
