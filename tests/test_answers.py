"""Answer normalisation, the VQA soft score, answer vocabularies and targets (isubg.data.answers)."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from isubg.data.answers import (
    GQA_MIN_COUNT,
    VQA_MIN_COUNT,
    AnswerVocab,
    Target,
    build_answer_vocab,
    build_gqa_vocab,
    build_vqa_vocab,
    count_out_of_vocab,
    gqa_normalize,
    gqa_target,
    normalize_answer,
    vqa_soft_score,
    vqa_soft_scores,
    vqa_target,
)

# --- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only none/zero..ten are number words
        ("the dog", "dog"),
        ("A Dog", "dog"),
        ("an apple", "apple"),
        ("the", ""),
        ("yes!", "yes"),
        ("Yes?", "yes"),
        ("dont know", "don't know"),
        ("Don't", "don't"),  # apostrophes are not punctuation
        ("its", "it's"),
        ("well", "well"),  # a real word, deliberately not read as "we'll"
        ("3,000", "3000"),
        ("1,000 (approx)", "1000 approx"),  # a comma inside a number deletes all punctuation
        ("t-shirt", "t shirt"),  # glued punctuation becomes a space
        ("t - shirt", "t shirt"),  # punctuation next to a space is deleted
        ("red, white", "red white"),
        ("ab(-cd-ef", "ab cd ef"),  # each character is judged on the incoming text
        ("a.m.", "am"),
        ("10 a.m.", "10 am"),
        ("end.", "end"),
        ("mr. smith", "mr smith"),
        ("1.5", "1.5"),  # decimal points stay
        ("10:30", "10:30"),
        ("  Yes\n", "yes"),
        ("yes\tno", "yes no"),
        ("big   brown \n dog", "big brown dog"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalize_answer_is_idempotent() -> None:
    for raw in ["Two Dogs!", "t-shirt", "dont know", "3,000", "10 a.m.", "the red, white (and) blue"]:
        once = normalize_answer(raw)
        assert normalize_answer(once) == once


@pytest.mark.parametrize(("raw", "expected"), [(" Yes ", "yes"), ("Red\n", "red"), ("T-Shirt", "t-shirt")])
def test_gqa_normalize_only_lowercases_and_strips(raw: str, expected: str) -> None:
    assert gqa_normalize(raw) == expected


# --- soft score ---------------------------------------------------------------------------------


def test_soft_score_ten_humans_exact_values() -> None:
    expected = [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # Exact equality on purpose: 0.30000000000000004 must not appear.
    assert [vqa_soft_score(n) for n in range(11)] == expected
    assert [vqa_soft_score(n, 10) for n in range(11)] == expected


def _leave_one_out(matches: int, num_humans: int) -> Fraction:
    """The definition, literally: for each human left out, score the remaining humans, then average."""
    agree = [True] * matches + [False] * (num_humans - matches)
    total = Fraction(0)
    for left_out in range(num_humans):
        in_subset = sum(a for i, a in enumerate(agree) if i != left_out)
        total += min(Fraction(1), Fraction(in_subset, 3))
    return total / num_humans


@pytest.mark.parametrize("num_humans", [1, 2, 3, 4, 5, 7, 10, 12])
def test_soft_score_matches_leave_one_out_definition(num_humans: int) -> None:
    for matches in range(num_humans + 1):
        assert vqa_soft_score(matches, num_humans) == float(_leave_one_out(matches, num_humans))


@pytest.mark.parametrize(("matches", "num_humans"), [(-1, 10), (11, 10), (0, 0), (1, -3)])
def test_soft_score_rejects_impossible_counts(matches: int, num_humans: int) -> None:
    with pytest.raises(ValueError):
        vqa_soft_score(matches, num_humans)


def test_soft_scores_normalise_human_answers_before_counting() -> None:
    humans = ["Two", "2", "two!", "2", "three", "3", "red", "Red", "red", "the red"]
    assert vqa_soft_scores(humans) == {"2": 1.0, "3": 0.6, "red": 1.0}
    assert vqa_soft_scores(["yes"] * 3 + ["no"] * 7) == {"yes": 0.9, "no": 1.0}
    assert vqa_soft_scores([]) == {}


# --- vocabularies -------------------------------------------------------------------------------


def test_build_vocab_orders_by_count_then_alphabetically() -> None:
    answers = ["b"] * 3 + ["a"] * 3 + ["c"] * 5 + ["d"] * 1 + ["", ""]
    vocab = build_answer_vocab(answers, min_count=1)
    assert vocab.answers == ("c", "a", "b", "d")  # "" is never a class
    assert vocab.counts == (5, 3, 3, 1)
    assert build_answer_vocab(reversed(answers), min_count=1) == vocab  # input order is irrelevant


def test_build_vocab_min_count() -> None:
    answers = ["x"] * 4 + ["y"] * 3 + ["z"] * 2
    assert build_answer_vocab(answers, min_count=3).answers == ("x", "y")
    assert build_answer_vocab(answers, min_count=5).answers == ()
    with pytest.raises(ValueError, match="min_count"):
        build_answer_vocab(answers, min_count=0)


def test_build_vqa_vocab_normalises_and_defaults_to_nine() -> None:
    assert VQA_MIN_COUNT == 9
    answers = ["Yes"] * 5 + ["yes!"] * 4 + ["no"] * 8 + ["Two"] * 9
    vocab = build_vqa_vocab(answers)
    assert vocab.answers == ("2", "yes")
    assert vocab.counts == (9, 9)
    assert build_vqa_vocab(answers, min_count=8).answers == ("2", "yes", "no")


def test_build_gqa_vocab_keeps_every_answer() -> None:
    assert GQA_MIN_COUNT == 1
    vocab = build_gqa_vocab(["Left", "left ", "right", "t-shirt"])
    assert vocab.answers == ("left", "right", "t-shirt")


def test_vocab_lookup() -> None:
    vocab = AnswerVocab(("yes", "no", "2"))
    assert len(vocab) == 3
    assert vocab.index("no") == 1
    assert vocab.index("maybe") is None
    assert vocab.index("No") is None  # lookups are exact; callers normalise
    assert "2" in vocab and "3" not in vocab
    assert vocab.label2ans == ("yes", "no", "2")
    mapping = vocab.ans2label
    assert mapping == {"yes": 0, "no": 1, "2": 2}
    mapping["maybe"] = 3
    assert vocab.index("maybe") is None  # the returned dict is a copy


@pytest.mark.parametrize(
    ("answers", "counts"),
    [(("a", "a"), None), (("a", ""), None), (("a", "b"), (3,)), (("a",), (0,)), (("a",), (True,))],
)
def test_vocab_rejects_broken_content(answers: tuple[str, ...], counts: tuple[int, ...] | None) -> None:
    with pytest.raises(ValueError):
        AnswerVocab(answers, counts)


@pytest.mark.parametrize("counts", [None, (4, 2, 2)])
def test_vocab_json_round_trip(counts: tuple[int, ...] | None) -> None:
    vocab = AnswerVocab(("yes", "don't know", "2"), counts)
    text = json.dumps(vocab.to_json())
    again = AnswerVocab.from_json(json.loads(text))
    assert again == vocab
    assert again.index("don't know") == 1
    assert again.counts == counts


@pytest.mark.parametrize("data", [{}, {"answers": "yes"}, {"answers": ["yes"], "counts": 3}, ["yes"]])
def test_vocab_from_json_rejects_malformed_input(data: object) -> None:
    with pytest.raises(ValueError):
        AnswerVocab.from_json(data)  # type: ignore[arg-type]


# --- targets ------------------------------------------------------------------------------------


def test_vqa_target_matches_through_normalisation() -> None:
    vocab = AnswerVocab(("yes", "2", "dog"))
    humans = ["Two", "two", "2!", "The dog", "dog", "cat", "cat", "cat", "cat", "bird"]
    target = vqa_target(humans, vocab)
    assert target.labels == (1, 2)  # "cat" and "bird" are out of vocabulary and simply absent
    assert target.scores == (0.9, 0.6)  # still out of ten humans, as officially scored


def test_vqa_target_out_of_vocab_is_empty_not_label_zero() -> None:
    vocab = AnswerVocab(("yes", "no"))
    target = vqa_target(["maybe"] * 10, vocab)
    assert target == Target((), ())
    assert target.is_empty
    assert 0 not in target.labels


def test_vqa_target_drops_zero_scores() -> None:
    # With a single human the leave-one-out subset is empty, so the score is 0 and nothing is kept.
    assert vqa_target(["yes"], AnswerVocab(("yes",))).is_empty


def test_gqa_target() -> None:
    vocab = AnswerVocab(("left", "right"))
    assert gqa_target(" Right", vocab) == Target((1,), (1.0,))
    assert gqa_target("up", vocab).is_empty


def test_count_out_of_vocab() -> None:
    vocab = AnswerVocab(("yes", "no"))
    targets = [
        vqa_target(["yes"] * 10, vocab),
        vqa_target(["maybe"] * 10, vocab),
        vqa_target(["no"] + ["maybe"] * 9, vocab),
        gqa_target("blue", vocab),
    ]
    assert count_out_of_vocab(targets) == 2


def test_target_to_dense() -> None:
    dense = Target((0, 3), (0.3, 1.0)).to_dense(5)
    assert dense.dtype == np.float32
    np.testing.assert_allclose(dense, [0.3, 0.0, 0.0, 1.0, 0.0])
    assert not Target((), ()).to_dense(2).any()
    with pytest.raises(ValueError, match="does not fit"):
        Target((5,), (1.0,)).to_dense(5)


@pytest.mark.parametrize(
    ("labels", "scores"),
    [((1,), ()), ((2, 1), (0.3, 0.6)), ((1, 1), (0.3, 0.6)), ((-1,), (1.0,)), ((0,), (0.0,)), ((0,), (1.5,))],
)
def test_target_rejects_broken_content(labels: tuple[int, ...], scores: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        Target(labels, scores)


def test_module_does_not_import_torch() -> None:
    code = "import sys, isubg.data.answers; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
