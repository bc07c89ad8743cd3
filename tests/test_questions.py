"""GQA and VQA v2 question loaders on hand-written official-format files, and their errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from isubg.data.questions import load_gqa_questions, load_vqa_questions
from isubg.errors import DataError

GQA = {
    "20968379": {
        "imageId": "n288870",
        "question": "Is the sky dark?",
        "answer": "yes",
        "fullAnswer": "Yes, the sky is dark.",
        "isBalanced": True,
        "groups": {"global": None, "local": "13-sky_dark"},
        "entailed": [],
        "equivalent": ["20968379"],
        "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
        "annotations": {"answer": {}, "question": {"2": "1582395"}, "fullAnswer": {"2": "1582395"}},
        "semantic": [{"operation": "select", "dependencies": [], "argument": "sky (1582395)"}],
        "semanticStr": "select: sky (1582395)->verify color: dark [0]",
    },
    "07333408": {
        "imageId": "2354786",
        "question": "What is on the white wall?",
        "answer": "pipe",
        "types": {"structural": "query", "semantic": "rel", "detailed": "relS"},
    },
}


def _vqa_files(tmp_path: Path, questions: list[dict], annotations: list[dict] | None) -> tuple[Path, Path | None]:
    q = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    q.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
    if annotations is None:
        return q, None
    a = tmp_path / "v2_mscoco_val2014_annotations.json"
    a.write_text(json.dumps({"info": {}, "license": {}, "data_subtype": "val2014", "annotations": annotations}))
    return q, a


def _note(qid: int, image_id: int, answers: list[str]) -> dict:
    return {
        "question_type": "what color is the",
        "multiple_choice_answer": answers[0],
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
        "image_id": image_id,
        "answer_type": "other",
        "question_id": qid,
    }


def test_gqa_questions(tmp_path: Path) -> None:
    path = tmp_path / "val_balanced_questions.json"
    path.write_text(json.dumps(GQA))
    first, second = load_gqa_questions(path)
    assert (first.question_id, first.image_id, first.answer, first.qtype, first.detail) == (
        "20968379", "n288870", "yes", "verify", "attr",
    )  # fmt: skip
    assert second.human_answers == ("pipe",) and second.image_id == "2354786"


def test_gqa_test_split_without_answers(tmp_path: Path) -> None:
    path = tmp_path / "test.json"
    path.write_text(json.dumps({"1": {"imageId": "n1", "question": "Is it?"}}))
    (q,) = load_gqa_questions(path)
    assert q.answer is None and q.human_answers == ()


def test_vqa_questions_with_annotations(tmp_path: Path) -> None:
    answers = ["red", "Red", "red.", "red", "maroon", "red", "red", "red", "red", "dark red"]
    q, a = _vqa_files(
        tmp_path,
        [{"image_id": 42, "question": "What color is the bus?", "question_id": 420}],
        [_note(420, 42, answers)],
    )
    (question,) = load_vqa_questions(q, a)
    assert question.question_id == "420" and question.image_id == "42"
    assert question.human_answers == tuple(answers) and question.answer == "red"
    assert question.qtype == "other" and question.detail == "what color is the"


def test_vqa_test_split(tmp_path: Path) -> None:
    q, _ = _vqa_files(tmp_path, [{"image_id": 1, "question": "Why?", "question_id": 10}], None)
    (question,) = load_vqa_questions(q)
    assert question.answer is None and question.human_answers == ()


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken_questions.json"
    path.write_text('{"1": {"imageId": "n1",\n "question": }\n')
    with pytest.raises(DataError, match=r"broken_questions\.json:2:\d+: not valid JSON"):
        load_gqa_questions(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({}, "holds no questions"),
        ([1, 2], "expected a mapping of questionId"),
        ({"77": {"question": "Is it?"}}, r"question 77: missing field\(s\) imageId"),
    ],
)
def test_bad_gqa_files(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message):
        load_gqa_questions(path)


def test_vqa_question_without_annotation(tmp_path: Path) -> None:
    q, a = _vqa_files(
        tmp_path,
        [{"image_id": 1, "question": "A?", "question_id": 10}, {"image_id": 1, "question": "B?", "question_id": 11}],
        [_note(10, 1, ["yes"] * 10)],
    )
    with pytest.raises(DataError, match="no annotation for question 11"):
        load_vqa_questions(q, a)


def test_vqa_annotation_for_an_unknown_question(tmp_path: Path) -> None:
    q, a = _vqa_files(
        tmp_path,
        [{"image_id": 1, "question": "A?", "question_id": 10}],
        [_note(10, 1, ["yes"] * 10), _note(99, 1, ["no"] * 10)],
    )
    with pytest.raises(DataError, match="annotates question 99"):
        load_vqa_questions(q, a)


def test_vqa_annotation_with_another_image(tmp_path: Path) -> None:
    q, a = _vqa_files(tmp_path, [{"image_id": 1, "question": "A?", "question_id": 10}], [_note(10, 2, ["yes"])])
    with pytest.raises(DataError, match="question 10 is about image 2, not 1"):
        load_vqa_questions(q, a)


def test_vqa_duplicates_and_layout(tmp_path: Path) -> None:
    q, _ = _vqa_files(
        tmp_path,
        [{"image_id": 1, "question": "A?", "question_id": 10}, {"image_id": 1, "question": "B?", "question_id": 10}],
        None,
    )
    with pytest.raises(DataError, match="question 10 appears twice"):
        load_vqa_questions(q)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="'questions' list"):
        load_vqa_questions(bad)
    with pytest.raises(DataError, match="holds no questions"):
        load_vqa_questions(_vqa_files(tmp_path, [], None)[0])


def test_gqa_question_given_twice(tmp_path: Path) -> None:
    # json.load kept the last of two equal keys; reading streaming sees both, and says so.
    path = tmp_path / "dup.json"
    path.write_text('{"1": {"imageId": "n1", "question": "A?"}, "1": {"imageId": "n2", "question": "B?"}}')
    with pytest.raises(DataError, match=r"dup\.json: question 1 appears twice"):
        load_gqa_questions(path)


def test_vqa_layout_errors_keep_their_messages(tmp_path: Path) -> None:
    q, a = _vqa_files(tmp_path, [{"image_id": 1, "question": "A?", "question_id": 10}], [_note(10, 1, ["yes"])])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": {"10": {}}}))
    with pytest.raises(DataError) as info:
        load_vqa_questions(q, bad)
    assert str(info.value).startswith(
        f"{bad}: expected an object with an 'annotations' list (VQA v2 annotations format), found 'annotations'"
    )
    (tmp_path / "q.json").write_text("[]")
    with pytest.raises(DataError, match=r"q\.json: expected an object with a 'questions' list .* found an array"):
        load_vqa_questions(tmp_path / "q.json", a)


def test_progress_over_both_vqa_files(tmp_path: Path) -> None:
    q, a = _vqa_files(
        tmp_path,
        [{"image_id": 1, "question": f"Q{i}?", "question_id": i} for i in range(50)],
        [_note(i, 1, ["yes"] * 10) for i in range(50)],
    )
    assert a is not None
    total = q.stat().st_size + a.stat().st_size
    calls: list[tuple[int, int]] = []
    assert len(load_vqa_questions(q, a, on_progress=lambda done, size: calls.append((done, size)))) == 50
    done = [d for d, _ in calls]
    assert done == sorted(done) and {size for _, size in calls} == {total} and calls[-1] == (total, total)
    assert a.stat().st_size in done  # the annotations were read, then the questions
    calls.clear()
    load_gqa_questions(_gqa_file(tmp_path), on_progress=lambda done, size: calls.append((done, size)))
    assert calls[-1] == ((tmp_path / "gqa.json").stat().st_size,) * 2


def _gqa_file(tmp_path: Path) -> Path:
    path = tmp_path / "gqa.json"
    path.write_text(json.dumps(GQA))
    return path


def test_questions_are_slotted_and_share_repeated_strings(tmp_path: Path) -> None:
    answers = ["yes"] * 10
    q, a = _vqa_files(
        tmp_path,
        [{"image_id": 7, "question": "A?", "question_id": 1}, {"image_id": 7, "question": "B?", "question_id": 2}],
        [_note(1, 7, answers), _note(2, 7, answers)],
    )
    first, second = load_vqa_questions(q, a)
    assert not hasattr(first, "__dict__")
    assert first.human_answers is second.human_answers and first.image_id is second.image_id
    assert pickle.loads(pickle.dumps(first)) == first
    with pytest.raises(AttributeError):
        first.answer = "no"  # type: ignore[misc]
