"""The official answer metrics of VQA v2 and GQA, a per-type accuracy accumulator, and vocabulary bounds.

VQA v2 follows the official `vqaEval.py` exactly, quirks included, so our numbers are the ones the
evaluation server would report:
- The prediction has newlines and tabs turned into spaces, is stripped, then goes through the
  punctuation rule and the digit/article rule (lower-case, number words "none".."ten" -> digits,
  articles a/an/the dropped, apostrophe-less contractions restored from the official table).
- The human answers get ONLY the punctuation rule, and only when the humans disagree (more than one
  distinct raw answer). They are never lower-cased, so "Yes" from a human never matches a prediction.
- For each of the n annotators, acc_i = min(1, (annotators other than i whose answer equals the
  prediction) / 3); the score is the mean of acc_i, summed in annotator order as the official script does.
  With ten humans that gives 0, 0.3, 0.6, 0.9 and 1.0 for 0, 1, 2, 3 and 4+ matches (up to rounding).

This differs on purpose from `isubg.data.answers.normalize_answer`, which builds training targets and
normalises human answers fully; it cannot be reused here (it trims the official contraction table and it
lives in a higher import layer).

GQA follows the official `eval.py`: the prediction string must equal the answer string exactly.

This module is plain Python and numpy (no torch), so results can be recomputed anywhere.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "AccuracyTable",
    "QuestionScores",
    "VocabScorer",
    "gqa_accuracy",
    "process_human_answers",
    "process_prediction",
    "process_punctuation",
    "vqa_accuracies",
    "vqa_accuracy",
]

# The official punctuation characters, in the official order (the order matters: each decision looks at
# the original text, but replacements accumulate).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# A comma between digits anywhere in the text makes every punctuation character be deleted, not spaced.
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# Official pattern `(?!<=\d)(\.)(?!\d)`: its "look-behind" is really a look-ahead that always succeeds at
# a ".", so it removes every period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (= 32) as `sub`'s positional *count*, so at most 32 periods go.
_PERIOD_COUNT = int(re.UNICODE)

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table, restricted to the entries that can fire: words are lower-cased before the
# lookup, so its capitalised keys ("Im", "Ive", "Id've", "I'dve") never match, and its identity entries
# ("let's", "she's") change nothing. "somebody'd" -> "somebodyd" is the official (backwards) entry.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
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

_FULL_AGREEMENT = 3  # humans needed (among the other annotators) for full marks


def process_punctuation(text: str, max_periods: int = _PERIOD_COUNT) -> str:
    """The official punctuation rule.

    Each punctuation character is deleted when it touches a space in the ORIGINAL text (or when the text
    holds a comma between digits), otherwise replaced by a space; then periods not followed by a digit are
    removed (at most `max_periods` of them: 32 in the official script; 0 removes them all, as the training
    targets' answer processing does). Case and surrounding spaces are kept.
    """
    number_comma = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for char in _PUNCT:
        if number_comma or f"{char} " in text or f" {char}" in text:
            out = out.replace(char, "")
        else:
            out = out.replace(char, " ")
    return _PERIOD.sub("", out, count=max_periods)


def _digits_and_articles(text: str) -> str:
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def process_prediction(text: str) -> str:
    """A predicted answer as the official evaluation compares it (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(process_punctuation(text))


def process_human_answers(human_answers: Sequence[str]) -> list[str]:
    """The human answers as the official evaluation compares them: punctuation-processed only if they differ."""
    if len(set(human_answers)) > 1:
        return [process_punctuation(answer) for answer in human_answers]
    return list(human_answers)


def vqa_accuracies(human_answers: Sequence[str]) -> dict[str, float]:
    """The official accuracy of every prediction that can score, keyed by its processed form.

    Args:
        human_answers: one question's raw human answers (ten in VQA v2).

    Returns:
        processed answer -> accuracy, one key per distinct processed human answer, in first-seen order.
        A prediction whose `process_prediction` form is not a key scores 0.

    Raises:
        ValueError: no human answers (a question without annotations cannot be scored).
    """
    if not human_answers:
        raise ValueError("a VQA question needs human answers to be scored")
    humans = process_human_answers(human_answers)
    counts = Counter(humans)
    table = {}
    for candidate, count in counts.items():
        # Leaving annotator i out removes one match exactly when annotator i gave the candidate.
        per_annotator = [min(1.0, (count - (human == candidate)) / _FULL_AGREEMENT) for human in humans]
        table[candidate] = sum(per_annotator) / len(humans)
    return table


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official VQA v2 accuracy of one prediction, in [0, 1] (see the module docstring).

    Raises:
        ValueError: no human answers.
    """
    return vqa_accuracies(human_answers).get(process_prediction(prediction), 0.0)


def gqa_accuracy(prediction: str, answer: str) -> float:
    """The official GQA accuracy: 1.0 when the prediction string equals the answer exactly, else 0.0."""
    return float(prediction == answer)


@dataclass(frozen=True)
class QuestionScores:
    """The official score of every vocabulary label for one question.

    Attributes:
        table: comparable form -> score (only forms that score above nothing are listed).
        forms: label -> its comparable form (shared with the scorer; do not modify).
        bound: the best score any vocabulary answer gets: what a perfect vocabulary-limited model scores.
    """

    table: Mapping[str, float]
    forms: Sequence[str]
    bound: float

    def of(self, label: int) -> float:
        """The official score of predicting vocabulary label `label`."""
        return self.table.get(self.forms[label], 0.0)


class VocabScorer:
    """Scores vocabulary labels with a dataset's official metric, processing each label only once.

    Args:
        dataset: "vqa" or "gqa" (any case).
        answers: the vocabulary, label i = answers[i].

    Raises:
        ValueError: an unknown dataset name.
    """

    def __init__(self, dataset: str, answers: Sequence[str]) -> None:
        self.dataset = dataset.lower()
        if self.dataset not in ("vqa", "gqa"):
            raise ValueError(f"unknown dataset {dataset!r}; expected 'gqa' or 'vqa'")
        self.answers = tuple(answers)
        # VQA compares processed predictions; GQA compares the strings as they are.
        self.forms = tuple(process_prediction(a) for a in self.answers) if self.dataset == "vqa" else self.answers
        self._known = frozenset(self.forms)

    def question(self, truth: Sequence[str]) -> QuestionScores | None:
        """Scores for one question given its ground truth, or None when it has none (test splits).

        Args:
            truth: VQA: the raw human answers; GQA: a one-element sequence holding the answer.
        """
        if not truth:
            return None
        table = vqa_accuracies(truth) if self.dataset == "vqa" else {truth[0]: 1.0}
        bound = max((score for form, score in table.items() if form in self._known), default=0.0)
        return QuestionScores(table, self.forms, bound)


class AccuracyTable:
    """Running sums of per-question scores, overall and per question type, for a fixed list of names.

    Mergeable: `state()` is a plain JSON-ready dict of sums and counts, `from_state` rebuilds a table, and
    `merge` adds another table, so per-rank tables can be gathered and summed (DDP) before reporting.

    Args:
        names: the prediction names scored for every question (e.g. cfrf, isubg, fused, ens, bound).

    Raises:
        ValueError: no names, or repeated names.
    """

    def __init__(self, names: Sequence[str]) -> None:
        if not names or len(set(names)) != len(names):
            raise ValueError(f"names must be non-empty and distinct, got {list(names)}")
        self.names = tuple(names)
        self.count = 0
        self.sums = np.zeros(len(self.names), dtype=np.float64)
        self.type_counts: dict[str, int] = {}
        self.type_sums: dict[str, np.ndarray] = {}

    def add(self, scores: Mapping[str, float], types: Iterable[str] = ()) -> None:
        """Record one question: its score per name and the type keys it counts under.

        Raises:
            ValueError: a name is missing from `scores` or a score lies outside [0, 1].
        """
        try:
            row = np.array([scores[name] for name in self.names], dtype=np.float64)
        except KeyError as exc:
            raise ValueError(f"no score for {exc.args[0]!r}; every question needs one for {self.names}") from None
        if not np.all((row >= 0.0) & (row <= 1.0)):
            raise ValueError(f"scores must lie in [0, 1], got {dict(zip(self.names, row.tolist(), strict=True))}")
        self.count += 1
        self.sums += row
        for key in dict.fromkeys(types):  # a key listed twice still counts the question once
            self.type_counts[key] = self.type_counts.get(key, 0) + 1
            self.type_sums.setdefault(key, np.zeros(len(self.names)))
            self.type_sums[key] += row

    def accuracy(self) -> dict[str, float] | None:
        """Name -> mean score over all recorded questions, or None when nothing was recorded."""
        if not self.count:
            return None
        return {name: float(total / self.count) for name, total in zip(self.names, self.sums, strict=True)}

    def per_type(self) -> dict[str, dict[str, float]]:
        """Type key -> name -> mean score over that type's questions, keys sorted."""
        return {
            key: {
                name: float(total / self.type_counts[key])
                for name, total in zip(self.names, self.type_sums[key], strict=True)
            }
            for key in sorted(self.type_sums)
        }

    def merge(self, other: AccuracyTable) -> AccuracyTable:
        """Add `other`'s questions to this table (in place) and return this table.

        Raises:
            ValueError: the tables score different names.
        """
        if other.names != self.names:
            raise ValueError(f"cannot merge tables over {other.names} into tables over {self.names}")
        self.count += other.count
        self.sums += other.sums
        for key, count in other.type_counts.items():
            self.type_counts[key] = self.type_counts.get(key, 0) + count
            self.type_sums.setdefault(key, np.zeros(len(self.names)))
            self.type_sums[key] += other.type_sums[key]
        return self

    def state(self) -> dict[str, Any]:
        """The sums and counts as plain lists and dicts: {names, count, sums, types: {key: {count, sums}}}."""
        return {
            "names": list(self.names),
            "count": self.count,
            "sums": self.sums.tolist(),
            "types": {k: {"count": self.type_counts[k], "sums": self.type_sums[k].tolist()} for k in self.type_sums},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> AccuracyTable:
        """Rebuild a table from `state()` output.

        Raises:
            ValueError: a malformed state (missing keys or sums of the wrong length).
        """
        try:
            table = cls(list(state["names"]))
            width = len(table.names)
            table.count = int(state["count"])
            table.sums = _sums(state["sums"], width)
            for key, part in state["types"].items():
                table.type_counts[key] = int(part["count"])
                table.type_sums[key] = _sums(part["sums"], width)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not an AccuracyTable state ({exc!r})") from None
        return table


def _sums(values: Sequence[float], width: int) -> np.ndarray:
    sums = np.asarray(values, dtype=np.float64)
    if sums.shape != (width,):
        raise ValueError(f"expected {width} sums, got shape {sums.shape}")
    return sums
