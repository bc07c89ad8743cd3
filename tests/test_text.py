"""Tokenizer, Dictionary, GloVe reading and co-occurrence tf-idf (isubg.data.text), on hand-sized inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from isubg.data import text
from isubg.data.text import (
    PAD_ID,
    UNK_ID,
    Dictionary,
    DictionaryError,
    GloveError,
    SparseMatrix,
    load_glove,
    tfidf_embedding,
    tfidf_matrix,
    tokenize,
)

# ------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    ("question", "tokens"),
    [
        ("What color is the man's shirt?", ["what", "color", "is", "the", "man", "'s", "shirt"]),
        ("Is it red, or BLUE?", ["is", "it", "red", "or", "blue"]),
        ("red,blue?", ["redblue"]),  # ',' and '?' are deleted, not spaced (BAN convention)
        ('Is the sign "STOP"; really!', ["is", "the", "sign", "stop", "really"]),
        ("yes;no:maybe", ["yes", "no", "maybe"]),  # other punctuation becomes a space
        ("It's 3.5 feet. Right...", ["it", "'s", "3.5", "feet", "right"]),
        ("The U.S. flag .", ["the", "u.s", "flag"]),
        ("the dog\u2019s t-shirt, don't", ["the", "dog", "'s", "t-shirt", "don't"]),
        ("  \tfoo \n bar  ", ["foo", "bar"]),
        ("", []),
        (" ?? ... ", []),
    ],
)
def test_tokenize(question: str, tokens: list[str]) -> None:
    assert tokenize(question) == tokens


# ------------------------------------------------------------------------------------------ dictionary


def test_new_dictionary_holds_only_the_specials_at_fixed_ids() -> None:
    dictionary = Dictionary()
    assert len(dictionary) == 2
    assert dictionary.words == ("<pad>", "<unk>")
    assert (PAD_ID, UNK_ID) == (0, 1)
    assert dictionary.word_to_id("<pad>") == 0
    assert dictionary.word_to_id("<unk>") == 1
    assert dictionary.word_to_id("never-added") == 1


def test_add_word_and_add_sentence_assign_consecutive_ids_once() -> None:
    dictionary = Dictionary()
    assert dictionary.add_word("cat") == 2
    assert dictionary.add_word("cat") == 2
    assert dictionary.add_sentence("The cat's hat?") == [3, 2, 4, 5]
    assert dictionary.words == ("<pad>", "<unk>", "cat", "the", "'s", "hat")
    assert "hat" in dictionary and "dog" not in dictionary
    assert dictionary.id_to_word(5) == "hat"
    with pytest.raises(IndexError):
        dictionary.id_to_word(6)


@pytest.mark.parametrize("word", ["", "two words", "tab\there"])
def test_add_word_rejects_words_the_tokenizer_cannot_produce(word: str) -> None:
    with pytest.raises(ValueError, match="non-empty without whitespace"):
        Dictionary().add_word(word)


def test_build_orders_by_descending_count_then_alphabetically() -> None:
    sentences = ["the dog", "a cat the", "the cat", "zebra <unk>"]
    # counts: the 3, cat 2, a 1, dog 1, zebra 1; "<unk>" is a special, never a word
    dictionary = Dictionary.build(sentences)
    assert dictionary.words == ("<pad>", "<unk>", "the", "cat", "a", "dog", "zebra")
    assert Dictionary.build(reversed(sentences)).words == dictionary.words  # input order does not matter
    assert Dictionary.build(sentences, min_count=2).words == ("<pad>", "<unk>", "the", "cat")
    with pytest.raises(ValueError, match="min_count"):
        Dictionary.build(sentences, min_count=0)


def test_encode_pads_truncates_and_maps_unknown_words() -> None:
    dictionary = Dictionary.build(["the cat", "the dog", "the"])  # the=2, cat=3, dog=4
    assert dictionary.encode("The bird, cat?", 5) == ([2, 1, 3, 0, 0], 3)
    assert dictionary.encode("the cat the dog the cat", 4) == ([2, 3, 2, 4], 4)
    assert dictionary.encode("the cat", 2) == ([2, 3], 2)
    assert dictionary.encode("", 3) == ([0, 0, 0], 0)
    # a literal "<pad>" in a question must not look like padding in the middle of the ids
    assert dictionary.encode("the <pad> cat", 4) == ([2, 1, 3, 0], 3)
    assert dictionary.ids("dog bird") == [4, 1]
    with pytest.raises(ValueError, match="max_len"):
        dictionary.encode("the cat", 0)


def test_dictionary_json_round_trip(tmp_path: Path) -> None:
    dictionary = Dictionary.build(["the café is open", "the café"])
    path = tmp_path / "dictionary.json"
    dictionary.save(path)
    payload = json.loads(path.read_text(encoding="utf-8"))  # plain JSON, readable by anything
    assert payload["words"] == ["<pad>", "<unk>", "café", "the", "is", "open"]
    loaded = Dictionary.load(path)
    assert loaded.words == dictionary.words
    assert loaded.encode("The café is shut", 6) == dictionary.encode("The café is shut", 6) == ([3, 2, 4, 1, 0, 0], 4)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot read it as JSON"),
        ('{"words": ["<pad>", "<unk>"]}', "not an isubg dictionary"),
        ('{"format": "isubg.dictionary", "version": 99, "words": ["<pad>", "<unk>"]}', "version 99"),
        ('{"format": "isubg.dictionary", "version": 1, "words": ["<unk>", "<pad>"]}', "starting with"),
        ('{"format": "isubg.dictionary", "version": 1, "words": ["<pad>", "<unk>", "a", "a"]}', "entry 3"),
        ('{"format": "isubg.dictionary", "version": 1, "words": ["<pad>", "<unk>", "a b"]}', "entry 2"),
    ],
)
def test_dictionary_load_rejects_invalid_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DictionaryError, match=message) as info:
        Dictionary.load(path)
    assert "bad.json" in str(info.value)


def test_dictionary_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DictionaryError, match="no such dictionary file"):
        Dictionary.load(tmp_path / "absent.json")


# ----------------------------------------------------------------------------------------------- GloVe

# The exact glove.6B.*d.txt layout (word, one space, floats separated by single spaces, "\n"), 3-d.
# Line 4 is an 840B-style word containing a space; line 7 repeats "the" (the first vector wins).
GLOVE_LINES = [
    "the 0.418 0.24968 -0.41242",
    ", 0.013441 0.23682 -0.16899",
    "<unk> 9.0 9.0 9.0",
    "at home 7.0 7.0 7.0",
    "at 0.1 -0.2 0.3",
    "cat 0.45281 -0.50108 -0.53714",
    "the 5.0 5.0 5.0",
]


def _glove_file(tmp_path: Path, lines: list[str], name: str = "glove.test.3d.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return path


def _glove_dictionary() -> Dictionary:
    dictionary = Dictionary()
    for word in ("the", "cat", "at", "dog"):  # ids 2..5; "dog" is not in the file
        dictionary.add_word(word)
    return dictionary


@pytest.mark.parametrize("dim", [None, 3])
def test_load_glove_reads_dictionary_words(tmp_path: Path, dim: int | None) -> None:
    matrix, found = load_glove(_glove_file(tmp_path, GLOVE_LINES), _glove_dictionary(), dim=dim)
    expected = np.array(
        [
            [0.0, 0.0, 0.0],  # <pad> is always zero
            [0.0, 0.0, 0.0],  # <unk> stays zero although the file has a "<unk>" line
            [0.418, 0.24968, -0.41242],  # the (first occurrence, not the later 5 5 5)
            [0.45281, -0.50108, -0.53714],  # cat
            [0.1, -0.2, 0.3],  # at: the "at home" line must not be read as "at"
            [0.0, 0.0, 0.0],  # dog is missing from the file
        ],
        dtype=np.float32,
    )
    assert matrix.dtype == np.float32
    assert matrix.shape == (6, 3)
    np.testing.assert_array_equal(matrix, expected)
    assert found == 3


def test_load_glove_tolerates_crlf_bom_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "windows.txt"
    path.write_bytes("\ufeffthe 1 2 3\r\n\r\ncat 4 5 6 \r\n\n".encode())
    matrix, found = load_glove(path, _glove_dictionary())
    np.testing.assert_array_equal(matrix[2:4], [[1, 2, 3], [4, 5, 6]])
    assert found == 2


def test_load_glove_does_not_parse_numbers_of_words_outside_the_dictionary(tmp_path: Path) -> None:
    # documented trade-off: only dictionary words are parsed (speed); field counts are still checked
    matrix, found = load_glove(_glove_file(tmp_path, ["the 1 2 3", "zebra 1 x 3", "cat 4 5 6"]), _glove_dictionary())
    assert found == 2
    np.testing.assert_array_equal(matrix[3], [4, 5, 6])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["the 0.1 0.2 0.3", "cat 0.1 abc 0.3"], r"glove\.test\.3d\.txt:2: 'abc' is not a number"),
        (["the 0.1 0.2 0.3", "", "cat 0.1 0.2 1e99"], r"glove\.test\.3d\.txt:3: .*non-finite"),
        (["the 0.1 0.2 0.3", "cat 0.1 0.2"], r"glove\.test\.3d\.txt:2: inconsistent dimension: 2 fields"),
        (["the 0.1 0.2 0.3", "zebra 1 2 3 4 5 6"], r"glove\.test\.3d\.txt:2: inconsistent dimension: 6 fields"),
        (["the", "cat 1 2 3"], r"glove\.test\.3d\.txt:1: the first line holds a word but no numbers"),
        (["400000 3", "the 1 2 3"], r"glove\.test\.3d\.txt:1: looks like a word2vec header"),
    ],
)
def test_load_glove_malformed_lines_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(GloveError, match=message):
        load_glove(_glove_file(tmp_path, lines), _glove_dictionary())


def test_load_glove_dimension_differs_from_requested(tmp_path: Path) -> None:
    with pytest.raises(GloveError, match=r"glove\.test\.3d\.txt:1: the vectors have 3 numbers, expected dim=4"):
        load_glove(_glove_file(tmp_path, GLOVE_LINES), _glove_dictionary(), dim=4)
    with pytest.raises(ValueError, match="dim must be at least 1"):
        load_glove(_glove_file(tmp_path, GLOVE_LINES), _glove_dictionary(), dim=0)


def test_load_glove_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"the 1 2 3\ncaf\xe9 4 5 6\n")
    with pytest.raises(GloveError, match=r"latin1\.txt:2: not valid UTF-8"):
        load_glove(path, _glove_dictionary())


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_load_glove_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(GloveError, match=r"empty\.txt: the GloVe file is empty"):
        load_glove(path, _glove_dictionary())


def test_load_glove_missing_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"absent\.txt: no such GloVe file") as info:
        load_glove(tmp_path / "absent.txt", _glove_dictionary())
    assert isinstance(info.value, GloveError)


# ---------------------------------------------------------------------------------------------- tf-idf

# Word ids: 0 = <pad>, 1 = <unk>, then a..e. Four documents (N = 4); d2 repeats b and is padded.
A, B, C, D, E = 2, 3, 4, 5, 6
VOCAB = 7
DOCUMENTS = [
    [A, B, C],  # d1
    [A, B, B, D, PAD_ID, PAD_ID],  # d2
    [A, C, E],  # d3
    [A, D],  # d4
]
# df: a 4, b 2, c 2, d 2, e 1, so idf(a) = log(4/4) = 0, idf(b) = idf(c) = idf(d) = log 2, idf(e) = log 4.
IDF = {A: math.log(4 / 4), B: math.log(4 / 2), C: math.log(4 / 2), D: math.log(4 / 2), E: math.log(4 / 1)}


def _expected_row(counts: dict[int, int]) -> dict[int, float]:
    """The module-docstring formula written out by hand: tf from counts, times idf(j), renormalised."""
    total = sum(counts.values())
    v = {j: (count / total) * IDF[j] for j, count in counts.items()}
    norm = sum(v.values())
    return {j: value / norm for j, value in v.items() if value > 0}


# c(i, j): over the documents containing i, each once, count the occurrences of j != i.
#   a is in d1..d4: b 1+2, c 1+1, d 1+1, e 1            -> b 3, c 2, d 2, e 1
#   b is in d1, d2 (twice in d2, still one document): a 1+1, c 1, d 1
#   c is in d1, d3: a 1+1, b 1, e 1
#   d is in d2, d4: a 1+1, b 2
#   e is in d3: a 1, c 1
COUNTS = {
    A: {B: 3, C: 2, D: 2, E: 1},
    B: {A: 2, C: 1, D: 1},
    C: {A: 2, B: 1, E: 1},
    D: {A: 2, B: 2},
    E: {A: 1, C: 1},
}
# The same rows simplified by hand (log 2 cancels; log 4 = 2 log 2):
#   a: v = (3/8 L, 2/8 L, 2/8 L, 1/8 * 2L), sum 9/8 L -> b 1/3, c 2/9, d 2/9, e 2/9
#   b: v = (0, 1/4 L, 1/4 L)                          -> c 1/2, d 1/2
#   c: v = (0, 1/4 L, 1/4 * 2L)                       -> b 1/3, e 2/3
#   d: v = (0, 2/4 L)                                 -> b 1
#   e: v = (0, 1/2 L)                                 -> c 1
W_BY_HAND = {
    A: {B: 1 / 3, C: 2 / 9, D: 2 / 9, E: 2 / 9},
    B: {C: 1 / 2, D: 1 / 2},
    C: {B: 1 / 3, E: 2 / 3},
    D: {B: 1.0},
    E: {C: 1.0},
}


def _dense(rows: dict[int, dict[int, float]]) -> np.ndarray:
    dense = np.zeros((VOCAB, VOCAB))
    for i, row in rows.items():
        for j, value in row.items():
            dense[i, j] = value
    return dense


def test_hand_formula_and_simplified_values_agree() -> None:
    # guards the test's own arithmetic: the formula route and the fractions route must match
    for i, counts in COUNTS.items():
        assert _expected_row(counts) == pytest.approx(W_BY_HAND[i])


def test_tfidf_matrix_matches_hand_computed_values() -> None:
    matrix = tfidf_matrix(DOCUMENTS, VOCAB)
    assert matrix.shape == (VOCAB, VOCAB)
    assert matrix.rows.dtype == np.int64 and matrix.cols.dtype == np.int64 and matrix.values.dtype == np.float32
    np.testing.assert_allclose(matrix.to_dense(), _dense(W_BY_HAND), rtol=1e-6, atol=1e-7)
    # exactly the non-zero entries, each once, sorted by row then column
    expected_entries = [(i, j) for i in sorted(W_BY_HAND) for j in sorted(W_BY_HAND[i])]
    assert list(zip(matrix.rows.tolist(), matrix.cols.tolist(), strict=True)) == expected_entries
    assert matrix.nnz == 10


def test_word_in_every_document_gets_idf_zero_weight() -> None:
    matrix = tfidf_matrix(DOCUMENTS, VOCAB)
    assert A not in matrix.cols.tolist()  # a co-occurs with everything but carries no weight
    assert A in matrix.rows.tolist()  # its own row is still defined by its context words
    # x is in every document, so y's only context word weighs 0 and y's row stays empty, while
    # x's row is all y: W = {(x, y): 1}
    x, y = 2, 3
    only_common = tfidf_matrix([[x, y], [x], [x]], 4)
    assert only_common.rows.tolist() == [x]
    assert only_common.cols.tolist() == [y]
    assert only_common.values.tolist() == [1.0]


def test_tfidf_weights_use_the_idf_of_the_context_word() -> None:
    # Row c has c(c, b) = c(c, e) = 1 but idf(e) = 2 idf(b), so W(c, e) = 2 W(c, b). The reference bug
    # (values divided by the idf of the wrong index) would give a ratio of 1 (idf of the row, which
    # cancels) or 1/2 (dividing by idf(j)), and a division by zero for idf(a) = 0.
    dense = tfidf_matrix(DOCUMENTS, VOCAB).to_dense()
    assert dense[C, E] / dense[C, B] == pytest.approx(2.0)
    assert dense[C, A] == 0.0
    assert np.isfinite(dense).all()


def test_tfidf_rows_sum_to_one_and_pad_unk_rows_are_empty() -> None:
    dense = tfidf_matrix(DOCUMENTS, VOCAB).to_dense()
    np.testing.assert_allclose(dense[[A, B, C, D, E]].sum(axis=1), 1.0, rtol=1e-6)
    assert not dense[PAD_ID].any() and not dense[UNK_ID].any() and not dense[:, PAD_ID].any()


def test_tfidf_ignores_padding_and_accepts_a_padded_array() -> None:
    padded = np.zeros((4, 6), dtype=np.int64)
    for row, document in enumerate(DOCUMENTS):
        padded[row, : len(document)] = document
    np.testing.assert_allclose(tfidf_matrix(padded, VOCAB).to_dense(), _dense(W_BY_HAND), rtol=1e-6, atol=1e-7)


def test_tfidf_chunking_gives_the_same_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = tfidf_matrix(DOCUMENTS, VOCAB)
    monkeypatch.setattr(text, "_CHUNK_DOCUMENTS", 1)  # one document per chunk: every merge path runs
    chunked = tfidf_matrix(DOCUMENTS, VOCAB)
    np.testing.assert_array_equal(chunked.rows, whole.rows)
    np.testing.assert_array_equal(chunked.cols, whole.cols)
    np.testing.assert_allclose(chunked.values, whole.values, rtol=1e-6)


def test_tfidf_rejects_ids_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match=r"document 1 holds word id 7, outside \[0, 7\)"):
        tfidf_matrix([[A, B], [C, 7]], VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        tfidf_matrix([], 0)


def test_tfidf_of_no_documents_is_empty() -> None:
    matrix = tfidf_matrix([], VOCAB)
    assert matrix.nnz == 0 and matrix.shape == (VOCAB, VOCAB)


GLOVE = np.array(
    [[0, 0], [0, 0], [9, 9], [1, 0], [0, 1], [2, 2], [3, -3]],  # <pad>, <unk>, a, b, c, d, e
    dtype=np.float32,
)
# W @ GLOVE from W_BY_HAND, row by row:
#   a: 1/3 (1,0) + 2/9 (0,1) + 2/9 (2,2) + 2/9 (3,-3) = (1/3 + 4/9 + 6/9, 2/9 + 4/9 - 6/9) = (13/9, 0)
#   b: 1/2 (0,1) + 1/2 (2,2) = (1, 3/2);   c: 1/3 (1,0) + 2/3 (3,-3) = (7/3, -2)
#   d: (1, 0);   e: (0, 1);   <pad>, <unk>: (0, 0)
EMBEDDING_BY_HAND = np.array([[0, 0], [0, 0], [13 / 9, 0], [1, 3 / 2], [7 / 3, -2], [1, 0], [0, 1]])


def test_tfidf_embedding_matches_hand_product(monkeypatch: pytest.MonkeyPatch) -> None:
    matrix = tfidf_matrix(DOCUMENTS, VOCAB)
    embedding = tfidf_embedding(matrix, GLOVE)
    assert embedding.dtype == np.float32 and embedding.shape == (VOCAB, 2)
    np.testing.assert_allclose(embedding, EMBEDDING_BY_HAND, rtol=1e-6, atol=1e-6)
    # blocks that split rows, and entries in no particular order, give the same product
    monkeypatch.setattr(text, "_EMBEDDING_BLOCK", 2)
    order = np.array([9, 3, 0, 7, 5, 1, 2, 8, 4, 6])
    shuffled = SparseMatrix(matrix.rows[order], matrix.cols[order], matrix.values[order], matrix.shape)
    np.testing.assert_allclose(tfidf_embedding(shuffled, GLOVE), EMBEDDING_BY_HAND, rtol=1e-6, atol=1e-6)


def test_tfidf_embedding_checks_shapes() -> None:
    matrix = tfidf_matrix(DOCUMENTS, VOCAB)
    with pytest.raises(ValueError, match=r"glove must have shape \(7, dim\)"):
        tfidf_embedding(matrix, GLOVE[:5])
    with pytest.raises(ValueError, match="differ in length"):
        tfidf_embedding(SparseMatrix(matrix.rows, matrix.cols[:3], matrix.values, matrix.shape), GLOVE)
