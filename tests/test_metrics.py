"""The official metrics: our VQA v2 and GQA accuracies equal an independent re-implementation of the official
evaluation scripts on hundreds of tricky answers, hand-computed cases hold, and the accumulator merges exactly."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from isubg.metrics import (
    AccuracyTable,
    VocabScorer,
    gqa_accuracy,
    process_prediction,
    vqa_accuracies,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------------------------------------
# An independent re-implementation of the official vqaEval.py accuracy loop, written from how the script works:
# the same tables as data (the contraction table in full, capitalised and identity keys included), the same
# order of operations, the human answers as dicts mutated in place, and the float arithmetic of the script.

OFFICIAL_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
OFFICIAL_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
OFFICIAL_PUNCT = [
    ";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
]  # fmt: skip
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, verbatim in meaning
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def official_punctuation(in_text: str) -> str:
    out_text = in_text
    for p in OFFICIAL_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return PERIOD_STRIP.sub("", out_text, re.UNICODE)  # the script passes re.UNICODE as the count


def official_digit_article(in_text: str) -> str:
    out_text = []
    for word in in_text.lower().split():
        word = OFFICIAL_NUMBERS.setdefault(word, word)
        if word not in ["a", "an", "the"]:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in OFFICIAL_CONTRACTIONS:
            out_text[word_id] = OFFICIAL_CONTRACTIONS[word]
    return " ".join(out_text)


def official_vqa(prediction: str, humans: list[str]) -> float:
    res_ans = prediction.replace("\n", " ").replace("\t", " ").strip()
    res_ans = official_digit_article(official_punctuation(res_ans))
    answers = [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"} for i, a in enumerate(humans)]
    if len({a["answer"] for a in answers}) > 1:
        for ans_dic in answers:
            ans_dic["answer"] = official_punctuation(ans_dic["answer"])
    gt_acc = []
    for gt_datum in answers:
        others = [item for item in answers if item != gt_datum]
        matching = [item for item in others if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


def official_gqa(predicted: str, gold: str) -> float:
    return float(1 if predicted == gold else 0)


# ---------------------------------------------------------------------------------------------------------
# Tricky answers: articles, number words, punctuation (glued, spaced, decimal, thousands), case, contractions.

TRICKY = [
    "yes", "Yes", "Yes.", "yes!", "yes !", " yes ", "\tyes\n", "YES", "no", "No.", "no,", "(no)",
    "2", "two", "Two", "2.", "two dogs", "2 dogs", "the two", "none", "0", "zero", "ten", "10", "10.5", ".5",
    "1.5", "1,5", "3,000", "3000", "3,000 people", "a.m.", "am", "10:30", "10:30 a.m.", "the cat", "a cat",
    "an apple", "apple", "cat", "Cat", "the", "a", "t-shirt", "t shirt", "tshirt", "t - shirt", "black/white",
    "black and white", "black white", "dont", "don't", "Dont", "its", "it's", "Im", "im", "I'm", "somebody'd",
    "ow's'at", "yall'll", "twas", "hed", "he'd", "ha-ha!", "left.", "left", "left side", "on left", "?", "!!",
    "...", "e.g. cat", "u.s.a.", "usa", "mr. t", "$5", "5 dollars", "50%", "@home", "a_b", "\"quoted\"",
    "one two three", "1 2 3", "", "   ", "Tennis", "tennis racket", "tennis-racket",
]  # fmt: skip


def _human_sets(rng: random.Random, count: int) -> list[list[str]]:
    sets = []
    for i in range(count):
        if i % 5 == 0:
            # Unanimous raw answers are never processed by the official script.
            sets.append([rng.choice(TRICKY)] * 10)
        else:
            pool = rng.sample(TRICKY, rng.randint(1, 4))
            sets.append([rng.choice(pool) for _ in range(10)])
    return sets


def test_vqa_accuracy_equals_the_official_evaluation() -> None:
    rng = random.Random(0)
    cases = 0
    nonzero = set()
    for humans in _human_sets(rng, 80):
        # Predictions: every distinct human answer plus random tricky strings, so matches are frequent.
        for prediction in [*dict.fromkeys(humans), *rng.sample(TRICKY, 4)]:
            ours, theirs = vqa_accuracy(prediction, humans), official_vqa(prediction, humans)
            assert ours == theirs, (prediction, humans, ours, theirs)
            nonzero.add(round(theirs, 6))
            cases += 1
    assert cases >= 300
    assert {0.0, 0.3, 0.6, 0.9, 1.0} <= nonzero  # the generated cases reach every score level


def test_vqa_accuracy_with_fewer_or_more_than_ten_humans() -> None:
    rng = random.Random(1)
    for size in (1, 3, 7, 12):
        for _ in range(20):
            humans = [rng.choice(TRICKY[:20]) for _ in range(size)]
            prediction = rng.choice(humans)
            assert vqa_accuracy(prediction, humans) == official_vqa(prediction, humans)


def test_vocab_scorer_equals_the_official_score_of_every_label_and_its_bound() -> None:
    rng = random.Random(2)
    vocab = [a for a in dict.fromkeys(TRICKY) if a.strip()][:60]
    scorer = VocabScorer("vqa", vocab)
    for humans in _human_sets(rng, 60):
        scores = scorer.question(humans)
        assert scores is not None
        official = [official_vqa(answer, humans) for answer in vocab]
        assert [scores.of(label) for label in range(len(vocab))] == official
        assert scores.bound == max(official)


def test_gqa_accuracy_equals_the_official_evaluation() -> None:
    answers = ["yes", "no", "left", "table", "traffic light", "2"]
    predictions = ["yes", "Yes", " yes", "yes.", "no", "left", "Left", "table", "the table", "traffic light", "two"]
    for answer, prediction in itertools.product(answers, predictions):
        assert gqa_accuracy(prediction, answer) == official_gqa(prediction, answer)
    scorer = VocabScorer("GQA", ["yes", "no", "table"])
    scores = scorer.question(["table"])
    assert scores is not None and [scores.of(i) for i in range(3)] == [0.0, 0.0, 1.0] and scores.bound == 1.0
    outside = scorer.question(["Table"])  # exact match: the vocabulary cannot produce it
    assert outside is not None and outside.bound == 0.0
    assert scorer.question([]) is None


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_by_number_of_matching_humans(matches: int, expected: float) -> None:
    humans = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", humans) == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy("2", humans) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "humans", "expected"),
    [
        ("The cat.", ["cat"] * 4 + ["dog"] * 6, 1.0),  # article and period dropped from the prediction
        ("an apple", ["apple"] * 2 + ["pear"] * 8, 0.6),
        ("Yes.", ["yes"] * 10, 1.0),
        ("yes", ["Yes"] * 10, 0.0),  # unanimous humans are compared raw: "Yes" never equals a processed prediction
        ("yes", ["Yes", "yes", "yes", "no", "no", "no", "no", "no", "no", "no"], 0.6),  # humans are not lower-cased
        ("t-shirt", ["t-shirt"] * 3 + ["shirt"] * 7, 0.9),  # glued hyphen -> space on both sides
        ("3,000", ["3,000"] * 5 + ["many"] * 5, 1.0),  # thousands comma deleted on both sides
        ("1.5", ["1.5"] * 3 + ["2"] * 7, 0.9),  # a decimal point survives
        ("dont", ["don't"] * 4 + ["no"] * 6, 1.0),  # contraction restored in the prediction
        ("Im", ["im"] * 4 + ["me"] * 6, 1.0),  # the official "Im" key never fires on lower-cased words
        ("ten", ["10"] * 3 + ["9"] * 7, 0.9),
        ("none", ["0"] * 4 + ["1"] * 6, 1.0),
        ("two dogs", ["2 dogs"] * 1 + ["dogs"] * 9, 0.3),
    ],
)
def test_hand_computed_cases(prediction: str, humans: list[str], expected: float) -> None:
    assert vqa_accuracy(prediction, humans) == pytest.approx(expected, abs=1e-12)


def test_prediction_processing() -> None:
    assert process_prediction("  The Two Dogs!\n") == "2 dogs"
    assert process_prediction("a.m.") == "am"
    assert process_prediction("10:30") == "10:30"
    assert process_prediction("black/white") == "black white"
    assert process_prediction("yes !") == "yes"


def test_vqa_needs_human_answers() -> None:
    with pytest.raises(ValueError, match="human answers"):
        vqa_accuracy("yes", [])
    # Humans keep their articles; each of two answers is matched by the other annotator only half the time.
    assert vqa_accuracies(["a cat", "cat"]) == pytest.approx({"a cat": 1 / 6, "cat": 1 / 6})


# ---------------------------------------------------------------------------------------------------------
# The accumulator.

NAMES = ["cfrf", "fused", "bound"]


def _rows(seed: int, count: int) -> list[tuple[dict[str, float], list[str]]]:
    rng = random.Random(seed)
    types = ["structural/verify", "structural/query", "semantic/rel", "semantic/attr"]
    return [
        ({n: rng.choice([0.0, 0.3, 0.6, 0.9, 1.0]) for n in NAMES}, rng.sample(types, rng.randint(0, 2)))
        for _ in range(count)
    ]


def test_table_means_overall_and_per_type() -> None:
    table = AccuracyTable(NAMES)
    assert table.accuracy() is None and table.per_type() == {}
    table.add({"cfrf": 1.0, "fused": 0.0, "bound": 1.0}, ["yes/no"])
    table.add({"cfrf": 0.3, "fused": 0.6, "bound": 1.0}, ["number", "number"])
    table.add({"cfrf": 0.0, "fused": 0.9, "bound": 0.9}, ["number"])
    assert table.accuracy() == pytest.approx({"cfrf": 1.3 / 3, "fused": 1.5 / 3, "bound": 2.9 / 3})
    per_type = table.per_type()
    assert list(per_type) == ["number", "yes/no"]
    assert per_type["number"] == pytest.approx({"cfrf": 0.15, "fused": 0.75, "bound": 0.95})
    assert table.type_counts == {"yes/no": 1, "number": 2}


def test_table_merge_equals_a_single_pass() -> None:
    rows = _rows(0, 90)
    single = AccuracyTable(NAMES)
    parts = [AccuracyTable(NAMES) for _ in range(3)]
    for i, (scores, types) in enumerate(rows):
        single.add(scores, types)
        parts[i % 3].add(scores, types)
    # Through plain states, as a caller gathering them across processes would.
    merged = AccuracyTable.from_state(parts[0].state())
    for part in parts[1:]:
        merged.merge(AccuracyTable.from_state(part.state()))
    assert merged.count == single.count == 90
    assert merged.accuracy() == pytest.approx(single.accuracy(), rel=1e-12)
    assert merged.type_counts == single.type_counts
    for key, values in single.per_type().items():
        assert merged.per_type()[key] == pytest.approx(values, rel=1e-12)


def test_table_rejects_bad_input() -> None:
    table = AccuracyTable(NAMES)
    with pytest.raises(ValueError, match="no score for 'bound'"):
        table.add({"cfrf": 1.0, "fused": 1.0})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        table.add({"cfrf": 1.5, "fused": 1.0, "bound": 1.0})
    with pytest.raises(ValueError, match="merge"):
        table.merge(AccuracyTable(["cfrf"]))
    with pytest.raises(ValueError, match="AccuracyTable state"):
        AccuracyTable.from_state({"names": NAMES})
    with pytest.raises(ValueError, match="distinct"):
        AccuracyTable(["a", "a"])
    with pytest.raises(ValueError, match="unknown dataset"):
        VocabScorer("coco", ["yes"])
