"""Answers for GQA and VQA v2: normalisation, the VQA soft score, answer vocabularies and training targets.

VQA v2 follows the official evaluation conventions, with two deliberate corrections:
- Human answers are normalised before they are matched. The official evaluator normalises them only
  when the ten humans disagree, and the common training-target code counts raw strings, so "Two" and
  "2" were different answers there.
- An answer outside the vocabulary never becomes a label. Reference code mapped unknown answers to
  label 0, which silently taught the model that such questions had the answer of label 0. Here a
  target only ever holds in-vocabulary answers, and `count_out_of_vocab` reports how many questions
  ended up with no usable answer at all.

GQA answers are single short strings; they are only lower-cased and stripped.

This module is plain Python and numpy (no torch), so vocabularies can be built and inspected cheaply.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from isubg.metrics import process_punctuation

__all__ = [
    "GQA_MIN_COUNT",
    "VQA_MIN_COUNT",
    "AnswerVocab",
    "Target",
    "build_answer_vocab",
    "build_gqa_vocab",
    "build_vqa_vocab",
    "count_out_of_vocab",
    "gqa_normalize",
    "gqa_target",
    "normalize_answer",
    "vqa_soft_score",
    "vqa_soft_scores",
    "vqa_target",
]

# Default vocabulary thresholds: VQA v2 keeps answers given as the consensus answer of at least 9
# training questions (about 3,100 answers); GQA's answer set is small and closed, so keep them all.
VQA_MIN_COUNT = 9
GQA_MIN_COUNT = 1

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Contractions typed without the apostrophe, mapped to their spelled form so "dont" matches "don't".
# Apostrophe-less forms that are also ordinary English words ("well", "were", "ill", "hell", "shell",
# "wed", "id", "shed") are left out on purpose: mapping them would corrupt real answers. "its" and
# "cant" are kept because annotators far more often mean "it's" and "can't" in these answers.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldntve": "couldn't've",
    "couldnt've": "couldn't've",
    "couldn'tve": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadntve": "hadn't've",
    "hadnt've": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hes": "he's",
    "hows": "how's",
    "howd": "how'd",
    "howll": "how'll",
    "im": "i'm",
    "ive": "i've",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "its": "it's",
    "lets": "let's",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "oclock": "o'clock",
    "shant": "shan't",
    "shes": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldntve": "shouldn't've",
    "shouldnt've": "shouldn't've",
    "thats": "that's",
    "thered": "there'd",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldntve": "wouldn't've",
    "wouldnt've": "wouldn't've",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

# A prediction scores full marks once this many humans agree with it (the "min(1, n/3)" rule).
_FULL_AGREEMENT = 3


def _strip_punctuation(text: str) -> str:
    """Apply the official punctuation rule (isubg.metrics), then drop every period that is not a decimal point."""
    # Every decision looks at the text as it came in, not at the partly processed result, as the official
    # evaluator does: in "ab(-cd-ef" the "(" becomes a space, and judging "-" on that result would delete every
    # "-" ("ab cdef") instead of spacing them ("ab cd ef"). Unlike the evaluator, no 32-period cap.
    return process_punctuation(text, max_periods=0)


def _map_words(text: str) -> str:
    """Lower-case, turn number words into digits, drop articles, restore apostrophes, single-space."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Normalise a VQA v2 answer the way the official evaluation does.

    Steps: newlines and tabs become spaces and the ends are stripped; punctuation is deleted or turned
    into a space by the official rule (deleted when it touches a space or when the answer contains a
    comma between digits, replaced by a space otherwise); periods not followed by a digit are removed;
    the text is lower-cased, number words "none"/"zero".."ten" become digits, the articles a/an/the
    are dropped, apostrophe-less contractions regain their apostrophe, and words are joined by single
    spaces.

    Args:
        text: a raw answer, human or predicted.

    Returns:
        The normalised answer; it may be "" (for example for "the" or "?").
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _map_words(_strip_punctuation(text))


def vqa_soft_score(matches: int, num_humans: int = 10) -> float:
    """The official VQA accuracy of an answer that `matches` of `num_humans` humans gave.

    The accuracy is the mean, over the `num_humans` subsets that leave one human out, of
    min(1, matching humans in the subset / 3). Leaving out one of the `matches` agreeing humans leaves
    `matches - 1` matches; leaving out any other human leaves `matches`. The sum is computed with
    fractions, so with ten humans the values are exactly 0, 0.3, 0.6, 0.9 and 1.0 for 0, 1, 2, 3 and
    4 or more matches (no 0.30000000000000004).

    Args:
        matches: how many humans gave the answer (after normalisation), 0 <= matches <= num_humans.
        num_humans: how many human answers the question has, at least 1.

    Returns:
        The score in [0, 1].

    Raises:
        ValueError: num_humans < 1 or matches outside [0, num_humans].
    """
    if num_humans < 1:
        raise ValueError(f"num_humans must be at least 1, got {num_humans}")
    if not 0 <= matches <= num_humans:
        raise ValueError(f"matches must lie in [0, {num_humans}], got {matches}")
    if matches == 0:
        return 0.0
    left_out_agreeing = matches * Fraction(min(_FULL_AGREEMENT, matches - 1), _FULL_AGREEMENT)
    left_out_other = (num_humans - matches) * Fraction(min(_FULL_AGREEMENT, matches), _FULL_AGREEMENT)
    return float((left_out_agreeing + left_out_other) / num_humans)


def vqa_soft_scores(human_answers: Sequence[str]) -> dict[str, float]:
    """Score every distinct answer the humans gave, as if it were the prediction.

    Args:
        human_answers: the raw human answers of one question (usually ten); they are normalised here.

    Returns:
        Normalised answer -> `vqa_soft_score(count, len(human_answers))`, in order of first
        appearance. An empty input gives an empty dict. Every answer is a key, including "" when an
        answer normalises to nothing; callers building targets drop such answers via the vocabulary.
    """
    counts = Counter(normalize_answer(answer) for answer in human_answers)
    return {answer: vqa_soft_score(count, len(human_answers)) for answer, count in counts.items()}


def gqa_normalize(text: str) -> str:
    """Normalise a GQA answer: lower-case and strip the ends; GQA answers need nothing more."""
    return text.strip().lower()


@dataclass(frozen=True)
class AnswerVocab:
    """The answers a model can predict; label i is `answers[i]`.

    Lookups are exact: pass answers normalised the same way as when the vocabulary was built
    (`normalize_answer` for VQA v2, `gqa_normalize` for GQA).

    Attributes:
        answers: the distinct, non-empty answers in label order.
        counts: optionally, how often each answer occurred in the data it was built from.
    """

    answers: tuple[str, ...]
    counts: tuple[int, ...] | None = None
    # Answer -> label, built once; not part of equality or the repr.
    _labels: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Accept any sequence so lists read from JSON work, but store tuples to keep the object immutable.
        object.__setattr__(self, "answers", tuple(self.answers))
        if self.counts is not None:
            object.__setattr__(self, "counts", tuple(self.counts))
        for answer in self.answers:
            if not isinstance(answer, str) or not answer:
                raise ValueError(f"every answer must be a non-empty string, got {answer!r}")
        labels = {answer: label for label, answer in enumerate(self.answers)}
        if len(labels) != len(self.answers):
            repeated = sorted(answer for answer, count in Counter(self.answers).items() if count > 1)
            raise ValueError(f"answers must be distinct; repeated: {repeated[:5]}")
        if self.counts is not None:
            if len(self.counts) != len(self.answers):
                raise ValueError(f"{len(self.counts)} counts for {len(self.answers)} answers")
            if any(not isinstance(count, int) or isinstance(count, bool) or count < 1 for count in self.counts):
                raise ValueError("counts must be positive integers")
        object.__setattr__(self, "_labels", labels)

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: object) -> bool:
        return answer in self._labels

    def index(self, answer: str) -> int | None:
        """The label of an (already normalised) answer, or None when it is not in the vocabulary."""
        return self._labels.get(answer)

    @property
    def label2ans(self) -> tuple[str, ...]:
        """Label -> answer (the answers tuple itself)."""
        return self.answers

    @property
    def ans2label(self) -> dict[str, int]:
        """Answer -> label, as a fresh dict the caller may modify."""
        return dict(self._labels)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: {"answers": [...]} plus "counts" when they are known."""
        data: dict[str, Any] = {"answers": list(self.answers)}
        if self.counts is not None:
            data["counts"] = list(self.counts)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AnswerVocab:
        """Rebuild a vocabulary from `to_json` output.

        Raises:
            ValueError: "answers" is missing or not a list, "counts" is present but not a list, or the
                content breaks the class invariants (distinct non-empty answers, one positive count each).
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("answers"), list):
            raise ValueError('an answer vocabulary must be a mapping with an "answers" list')
        counts = data.get("counts")
        if counts is not None and not isinstance(counts, list):
            raise ValueError('"counts" must be a list of integers')
        return cls(tuple(data["answers"]), None if counts is None else tuple(counts))


def build_answer_vocab(answers: Iterable[str], min_count: int) -> AnswerVocab:
    """Count answers and keep the frequent ones, most frequent first.

    Args:
        answers: one (already normalised) answer per training question; repeats are what is counted.
            Empty strings are skipped: an answer that normalises to nothing cannot be a class.
        min_count: keep answers occurring at least this often (>= 1).

    Returns:
        The vocabulary ordered by descending count, ties broken alphabetically, so the same data always
        gives the same labels; its counts are recorded.

    Raises:
        ValueError: min_count < 1.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    counts = Counter(answer for answer in answers if answer)
    kept = sorted((item for item in counts.items() if item[1] >= min_count), key=lambda item: (-item[1], item[0]))
    return AnswerVocab(tuple(answer for answer, _ in kept), tuple(count for _, count in kept))


def build_vqa_vocab(multiple_choice_answers: Iterable[str], min_count: int = VQA_MIN_COUNT) -> AnswerVocab:
    """The VQA v2 vocabulary: normalise each training question's `multiple_choice_answer`, then count."""
    return build_answer_vocab((normalize_answer(answer) for answer in multiple_choice_answers), min_count)


def build_gqa_vocab(answers: Iterable[str], min_count: int = GQA_MIN_COUNT) -> AnswerVocab:
    """The GQA vocabulary: every training answer (lower-cased and stripped), counted."""
    return build_answer_vocab((gqa_normalize(answer) for answer in answers), min_count)


@dataclass(frozen=True)
class Target:
    """The training target of one question: soft scores for some vocabulary labels.

    Attributes:
        labels: distinct labels in increasing order; only in-vocabulary answers, never a stand-in label.
        scores: the score of each label, each in (0, 1].
    """

    labels: tuple[int, ...]
    scores: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "scores", tuple(float(score) for score in self.scores))
        if len(self.labels) != len(self.scores):
            raise ValueError(f"{len(self.labels)} labels but {len(self.scores)} scores")
        if any(label < 0 for label in self.labels) or list(self.labels) != sorted(set(self.labels)):
            raise ValueError(f"labels must be distinct, non-negative and increasing, got {self.labels}")
        if any(not 0.0 < score <= 1.0 for score in self.scores):
            raise ValueError(f"scores must lie in (0, 1], got {self.scores}")

    @property
    def is_empty(self) -> bool:
        """True when none of the question's answers is in the vocabulary."""
        return not self.labels

    def to_dense(self, num_labels: int) -> np.ndarray:
        """A float32 vector of length num_labels holding each label's score and 0 elsewhere.

        Raises:
            ValueError: a label is >= num_labels (the target belongs to a larger vocabulary).
        """
        if self.labels and self.labels[-1] >= num_labels:
            raise ValueError(f"label {self.labels[-1]} does not fit a vocabulary of {num_labels} answers")
        dense = np.zeros(num_labels, dtype=np.float32)
        dense[list(self.labels)] = self.scores
        return dense


def vqa_target(human_answers: Sequence[str], vocab: AnswerVocab) -> Target:
    """The VQA v2 soft target of one question.

    Args:
        human_answers: the raw human answers (usually ten); normalised here, so "Two" counts as "2".
        vocab: a vocabulary of normalised answers.

    Returns:
        One entry per distinct in-vocabulary answer with a positive score, labels increasing. Human
        answers outside the vocabulary are left out but still count in the number of humans, so scores
        stay the official ones. Empty when no human answer is in the vocabulary.
    """
    entries = []
    for answer, score in vqa_soft_scores(human_answers).items():
        label = vocab.index(answer)
        if label is not None and score > 0.0:
            entries.append((label, score))
    entries.sort()
    return Target(tuple(label for label, _ in entries), tuple(score for _, score in entries))


def gqa_target(answer: str, vocab: AnswerVocab) -> Target:
    """The GQA target of one question: its answer's label with score 1.0, or empty if out of vocabulary."""
    label = vocab.index(gqa_normalize(answer))
    return Target((), ()) if label is None else Target((label,), (1.0,))


def count_out_of_vocab(targets: Iterable[Target]) -> int:
    """How many questions have an empty target, i.e. no answer in the vocabulary at all."""
    return sum(1 for target in targets if target.is_empty)
