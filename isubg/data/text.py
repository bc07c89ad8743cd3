"""The text side of the data layer: tokenizer, word dictionary, GloVe vectors and co-occurrence tf-idf.

Tokenizer
---------
`tokenize` follows the BAN/VQA convention and adds a little cleaning, in this order:

1. lower-case the text, and turn the typographic apostrophe (U+2019) into a plain one;
2. delete ',' and '?' outright ("red,blue?" -> "redblue", exactly as the BAN reference does);
3. replace the other punctuation in `OTHER_PUNCTUATION` (" ; ! : ( ) [ ] { }) by a space, so that
   "yes;no" becomes two words rather than one glued word;
4. rewrite "'s" as " 's", so "man's" gives the two tokens "man" and "'s";
5. split on whitespace;
6. strip trailing '.' from every token ("shirt." -> "shirt", "u.s." -> "u.s"; "3.5" is kept) and
   drop tokens that end up empty (a lone "." or "...").

Hyphens, slashes and inner apostrophes ("t-shirt", "50/50", "don't") are kept inside their word.

Dictionary
----------
`Dictionary` maps words to ids with two specials at fixed ids: `<pad>` = 0 and `<unk>` = 1; real
words start at 2. (The reference appended UNK as the last word and used pad = ntoken, which moves
both specials whenever the vocabulary changes; fixed ids keep checkpoints and embeddings aligned.)
It is saved as JSON, never pickled, so a dictionary file cannot run code when loaded.

GloVe
-----
`load_glove` streams a GloVe text file (`glove.6B.300d.txt` format: one word per line followed by
space-separated floats, UTF-8) and keeps vectors only for dictionary words.

Co-occurrence tf-idf
--------------------
Each tokenised question is a document, a list of word ids; pad ids (0) are dropped first and every
other id, `<unk>` included, is an ordinary word. With N = number of documents (`len(documents)`):

    df(j)    = number of documents that contain word j at least once
    idf(j)   = log(N / df(j))                  natural log; 0 for a word that is in every document
    c(i, j)  = sum over the documents d that contain i of (number of times j occurs in d),  j != i
    tf(i, j) = c(i, j) / sum_k c(i, k)
    v(i, j)  = tf(i, j) * idf(j)               idf of the context word j (the column), never of i
    W(i, j)  = v(i, j) / sum_k v(i, k)         row i stays empty when sum_k v(i, k) = 0

So word i's pseudo-document is the concatenation of every question that contains i (each such
question once, however often i occurs in it), with i's own occurrences removed; W(i, :) is the
tf-idf of that pseudo-document normalised to sum 1. The tf normalisation cancels in the last step
(W(i, j) = c(i, j) idf(j) / sum_k c(i, k) idf(k)); it is kept because it is what the formula says.
Zero weights (for example every j with idf(j) = 0) are not stored, and a row whose context words all
have idf 0 stays empty.

The reference implementation called its matrix tf-idf but built a row-normalised co-occurrence
matrix and then divided values by the idf of the wrong index; none of that is reproduced here.

`tfidf_matrix` returns W as a sparse COO `SparseMatrix` (rows, cols, values, shape) because a dense
(vocab, vocab) matrix is 1.6 GB for a 20k-word vocabulary; `tfidf_embedding` computes W @ glove
block by block without ever densifying W.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import numpy.typing as npt

from isubg.errors import DataError

__all__ = [
    "FIRST_WORD_ID",
    "OTHER_PUNCTUATION",
    "PAD",
    "PAD_ID",
    "UNK",
    "UNK_ID",
    "Dictionary",
    "DictionaryError",
    "GloveError",
    "SparseMatrix",
    "load_glove",
    "tfidf_embedding",
    "tfidf_matrix",
    "tokenize",
]

PAD = "<pad>"
UNK = "<unk>"
PAD_ID = 0
UNK_ID = 1
FIRST_WORD_ID = 2  # the first id a real word can get

# Punctuation replaced by a space (',' and '?' are deleted instead, see the module docstring).
OTHER_PUNCTUATION = '";!:()[]{}'
_SPACE_OUT = str.maketrans({char: " " for char in OTHER_PUNCTUATION} | {",": None, "?": None, "\u2019": "'"})

_DICTIONARY_FORMAT = "isubg.dictionary"
_DICTIONARY_VERSION = 1

# Documents handled per vectorised step of tfidf_matrix: a chunk creates about sum(unique words^2)
# pairs, so 50k questions of ~10 distinct words stay around 5M pairs (tens of MB), whatever N is.
_CHUNK_DOCUMENTS = 50_000
# The largest finite float32: a GloVe value beyond it would silently become inf.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Non-zero entries of W handled per step of tfidf_embedding: bounds the (block, dim) float64 buffer.
_EMBEDDING_BLOCK = 16_384


def tokenize(text: str) -> list[str]:
    """Split a question into tokens with the BAN/VQA rules described in the module docstring.

    Args:
        text: any string; an empty or punctuation-only string gives no tokens.

    Returns:
        The tokens in order, lower-case, never empty strings.
    """
    # Translate first: the typographic apostrophe must already be "'" when "'s" is split off.
    cleaned = text.lower().translate(_SPACE_OUT).replace("'s", " 's")
    tokens = (token.rstrip(".") for token in cleaned.split())
    return [token for token in tokens if token]


class DictionaryError(DataError):
    """A dictionary file could not be read or is not a valid isubg dictionary; the message names the file."""


class Dictionary:
    """Word <-> id mapping with `<pad>` fixed at id 0 and `<unk>` at id 1.

    Words get consecutive ids from 2 in the order they are added; `build` gives a deterministic
    order (descending frequency, then alphabetical).
    """

    def __init__(self) -> None:
        self._words: list[str] = [PAD, UNK]
        self._ids: dict[str, int] = {PAD: PAD_ID, UNK: UNK_ID}

    def __len__(self) -> int:
        return len(self._words)

    def __contains__(self, word: object) -> bool:
        return word in self._ids

    def __repr__(self) -> str:
        return f"Dictionary({len(self)} entries)"

    @property
    def words(self) -> tuple[str, ...]:
        """All entries in id order, specials first (a copy: the dictionary cannot be changed through it)."""
        return tuple(self._words)

    def add_word(self, word: str) -> int:
        """Add one word (if new) and return its id.

        Raises:
            ValueError: the word is empty or contains whitespace; `tokenize` never produces such a
                word, so it could never be looked up.
        """
        if not word or any(char.isspace() for char in word):
            raise ValueError(f"a dictionary word must be non-empty without whitespace, got {word!r}")
        index = self._ids.get(word)
        if index is None:
            index = len(self._words)
            self._words.append(word)
            self._ids[word] = index
        return index

    def add_sentence(self, text: str) -> list[int]:
        """Tokenize `text`, add every new token, and return the ids of all its tokens."""
        return [self.add_word(token) for token in tokenize(text)]

    def word_to_id(self, word: str) -> int:
        """The id of `word`, or `UNK_ID` when it is not in the dictionary."""
        return self._ids.get(word, UNK_ID)

    def id_to_word(self, index: int) -> str:
        """The word with id `index`.

        Raises:
            IndexError: no entry has that id.
        """
        if not 0 <= index < len(self._words):
            raise IndexError(f"no word with id {index} (the dictionary has {len(self._words)} entries)")
        return self._words[index]

    def ids(self, text: str) -> list[int]:
        """Tokenize `text` and map each token to its id without padding; unknown words give `UNK_ID`.

        A literal "<pad>" typed in the text also gives `UNK_ID`, so id 0 only ever means padding.
        """
        return [UNK_ID if token == PAD else self._ids.get(token, UNK_ID) for token in tokenize(text)]

    def encode(self, text: str, max_len: int) -> tuple[list[int], int]:
        """Encode a question as exactly `max_len` ids: truncate, then pad with `PAD_ID` at the end.

        Args:
            text: the question.
            max_len: the fixed length of the result, at least 1.

        Returns:
            (ids, length): `ids` has exactly `max_len` entries; `length` is the number of real tokens
            kept (min(number of tokens, max_len)), so `ids[length:]` is all padding.

        Raises:
            ValueError: `max_len` is below 1.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        ids = self.ids(text)[:max_len]
        length = len(ids)
        return ids + [PAD_ID] * (max_len - length), length

    @classmethod
    def build(cls, sentences: Iterable[str], min_count: int = 1) -> Dictionary:
        """Build a dictionary from raw sentences, keeping words seen at least `min_count` times.

        Ids follow descending frequency, ties broken alphabetically, so the same corpus always gives
        the same ids whatever the sentence order. The special tokens are never counted as words.

        Raises:
            ValueError: `min_count` is below 1.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        counts = Counter(token for sentence in sentences for token in tokenize(sentence))
        dictionary = cls()
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        for word, count in ranked:
            if count >= min_count and word not in (PAD, UNK):
                dictionary.add_word(word)
        return dictionary

    def save(self, path: Path) -> None:
        """Write the dictionary as UTF-8 JSON: {"format", "version", "words": [all entries in id order]}."""
        payload = {"format": _DICTIONARY_FORMAT, "version": _DICTIONARY_VERSION, "words": self._words}
        Path(path).write_text(json.dumps(payload, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Dictionary:
        """Read a dictionary written by `save`.

        Raises:
            DictionaryError: the file is missing, unreadable, not JSON, or not a valid dictionary
                (wrong format tag, specials not at ids 0 and 1, a repeated or invalid word).
        """
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DictionaryError(f"{path}: no such dictionary file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DictionaryError(f"{path}: cannot read it as JSON ({exc})") from None
        if not isinstance(payload, dict) or payload.get("format") != _DICTIONARY_FORMAT:
            raise DictionaryError(f'{path}: not an isubg dictionary (no "format": "{_DICTIONARY_FORMAT}")')
        if payload.get("version") != _DICTIONARY_VERSION:
            raise DictionaryError(f"{path}: unsupported dictionary version {payload.get('version')!r}")
        words = payload.get("words")
        if not isinstance(words, list) or words[:2] != [PAD, UNK]:
            raise DictionaryError(f'{path}: "words" must be a list starting with {PAD!r}, {UNK!r}')
        dictionary = cls()
        for position, word in enumerate(words[2:], start=FIRST_WORD_ID):
            if not isinstance(word, str) or word in dictionary:
                raise DictionaryError(f"{path}: entry {position} ({word!r}) is not a string or repeats a word")
            try:
                dictionary.add_word(word)
            except ValueError as exc:
                raise DictionaryError(f"{path}: entry {position}: {exc}") from None
        return dictionary


# ----------------------------------------------------------------------------------------------- GloVe


class GloveError(DataError):
    """A GloVe file is missing or malformed; the message names the file and, when known, the line."""


def load_glove(path: Path, dictionary: Dictionary, dim: int | None = None) -> tuple[npt.NDArray[np.float32], int]:
    """Read the GloVe vectors of the dictionary's words from a GloVe text file, streaming it.

    Each line is a word followed by space-separated floats (UTF-8; CRLF endings and blank lines are
    tolerated). A line with more than `dim` + 1 fields is a word containing spaces (the 840B release
    has some): its last `dim` fields are the vector, the rest joined by single spaces the word. The
    first vector line fixes the file's dimension and must be a one-field word (true of every Stanford
    release). Only lines of dictionary words have their numbers parsed, which keeps a 400k-line file
    fast; every line's field count is checked. When a word appears twice, the first vector wins.

    Args:
        path: the GloVe text file, e.g. `glove.6B.300d.txt`.
        dictionary: the words to look up; only their vectors are kept, so memory is bounded by
            len(dictionary) * dim whatever the file size.
        dim: the expected vector size; None infers it from the first vector line.

    Returns:
        (matrix, found): a float32 matrix of shape (len(dictionary), dim) whose row k is the vector of
        word k, or zeros for a word absent from the file; rows `PAD_ID` and `UNK_ID` are always zero
        (even if the file has a "<unk>" line). `found` counts the real words (ids >= 2) that got a vector.

    Raises:
        GloveError: the file is missing or unreadable, holds no vectors, is not UTF-8, has a number
            that does not parse (or is not finite), or has a line whose dimension differs from `dim`.
        ValueError: `dim` is given and below 1.
    """
    if dim is not None and dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    path = Path(path)
    try:
        handle = path.open("rb")  # bytes, so that only b"\n" ends a line and decode errors get a line number
    except FileNotFoundError:
        raise GloveError(f"{path}: no such GloVe file") from None
    except OSError as exc:
        raise GloveError(f"{path}: cannot open the GloVe file ({exc.strerror or exc})") from None
    with handle:
        return _read_glove(handle, path, dictionary, dim)


def _read_glove(
    handle: BinaryIO, path: Path, dictionary: Dictionary, dim: int | None
) -> tuple[npt.NDArray[np.float32], int]:
    """The line loop of `load_glove` (same contract); `handle` is the open file in binary mode."""
    matrix: npt.NDArray[np.float32] | None = None
    filled = np.zeros(len(dictionary), dtype=bool)
    found = 0
    for number, raw in enumerate(handle, start=1):
        fields = _decode(raw, path, number).rstrip("\r\n ").split(" ")
        if fields == [""]:
            continue  # a blank line, e.g. the end of a hand-edited file
        if matrix is None:
            dim = _first_line_dim(fields, dim, path, number)
            matrix = np.zeros((len(dictionary), dim), dtype=np.float32)
        word = _glove_word(fields, dim, path, number)
        index = dictionary.word_to_id(word)
        # Unknown words map to UNK_ID, so this also skips them; specials must stay zero.
        if index < FIRST_WORD_ID or filled[index]:
            continue
        matrix[index] = _parse_vector(fields[-dim:], path, number)
        filled[index] = True
        found += 1
    if matrix is None:
        raise GloveError(f"{path}: the GloVe file is empty (no vector lines)")
    return matrix, found


def _decode(raw: bytes, path: Path, number: int) -> str:
    """Decode one line as UTF-8 (a BOM on line 1 is dropped); raise GloveError naming the line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GloveError(f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return line.removeprefix("\ufeff") if number == 1 else line


def _first_line_dim(fields: list[str], dim: int | None, path: Path, number: int) -> int:
    """The file's dimension from its first vector line, checked against the requested `dim`."""
    if len(fields) == 2 and all(field.isdigit() for field in fields):
        raise GloveError(
            f"{path}:{number}: looks like a word2vec header ({' '.join(fields)!r}); "
            "GloVe text files start directly with a word and its vector"
        )
    file_dim = len(fields) - 1
    if file_dim < 1:
        raise GloveError(f"{path}:{number}: the first line holds a word but no numbers")
    if dim is not None and file_dim != dim:
        raise GloveError(f"{path}:{number}: the vectors have {file_dim} numbers, expected dim={dim}")
    return file_dim


def _glove_word(fields: list[str], dim: int, path: Path, number: int) -> str:
    """The word of a split line: one field normally, several for an 840B word containing spaces."""
    extra = len(fields) - 1 - dim
    # A line whose "word" would be at least as long as the vector is a line of a different dimension
    # (no real multi-word token has `dim` spaces); a short line can only be a different dimension.
    if extra < 0 or extra >= dim:
        raise GloveError(
            f"{path}:{number}: inconsistent dimension: {len(fields) - 1} fields after the word, expected {dim}"
        )
    return fields[0] if extra == 0 else " ".join(fields[: extra + 1])


def _parse_vector(fields: list[str], path: Path, number: int) -> npt.NDArray[np.float32]:
    """Parse `dim` number fields into a float32 vector; raise GloveError naming the line and value."""
    try:
        # float64 first: a value beyond float32's range is then an error here, not a silent inf.
        vector = np.array(fields, dtype=np.float64)
    except ValueError:
        bad = next(field for field in fields if not _is_float(field))
        raise GloveError(f"{path}:{number}: {bad!r} is not a number") from None
    if not (np.isfinite(vector).all() and np.abs(vector).max() <= _FLOAT32_MAX):
        raise GloveError(f"{path}:{number}: the vector holds a non-finite value (inf or nan, or it overflows float32)")
    return vector.astype(np.float32)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- tf-idf


class SparseMatrix(NamedTuple):
    """A sparse matrix in COO form: entry (rows[k], cols[k]) holds values[k]; absent entries are 0.

    Produced by `tfidf_matrix` with int64 `rows`/`cols`, float32 `values`, each (row, col) at most
    once, sorted by row then column. Unpacks as `rows, cols, values, shape = matrix`.
    """

    rows: npt.NDArray[np.int64]
    cols: npt.NDArray[np.int64]
    values: npt.NDArray[np.float32]
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        """The number of stored entries."""
        return len(self.values)

    def to_dense(self) -> npt.NDArray[np.float32]:
        """The dense float32 matrix; only for small shapes (tests, inspection)."""
        dense = np.zeros(self.shape, dtype=np.float32)
        np.add.at(dense, (self.rows, self.cols), self.values)
        return dense


def tfidf_matrix(documents: Sequence[Sequence[int]], vocab_size: int) -> SparseMatrix:
    """The co-occurrence tf-idf matrix W of the module docstring, in sparse COO form.

    Args:
        documents: one list of word ids per tokenised question; pad ids (0) are ignored, so padded
            rows (e.g. a 2-D array from `Dictionary.encode`) can be passed as they are.
        vocab_size: the number of word ids, usually `len(dictionary)`; W is (vocab_size, vocab_size).

    Returns:
        W as a `SparseMatrix`: entry (i, j) is the weight of word j in word i's tf-idf embedding;
        every non-empty row sums to 1; rows of words that occur in no document (and of `<pad>`) are
        empty, and zero weights are not stored.

    Raises:
        ValueError: `vocab_size` is below 1, or a document holds an id outside [0, vocab_size).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    df = np.zeros(vocab_size, dtype=np.int64)
    pair_keys = np.zeros(0, dtype=np.int64)
    pair_counts = np.zeros(0, dtype=np.float64)
    # Chunks bound the memory of the pair expansion; their (i, j) counts are merged as they come.
    for start in range(0, len(documents), _CHUNK_DOCUMENTS):
        tokens, doc_of = _flatten(documents[start : start + _CHUNK_DOCUMENTS], vocab_size, start)
        words, keys, counts = _cooccurrences(tokens, doc_of, vocab_size)
        df += np.bincount(words, minlength=vocab_size)
        pair_keys, pair_counts = _sum_by_key(np.concatenate([pair_keys, keys]), np.concatenate([pair_counts, counts]))
    return _weigh(pair_keys, pair_counts, df, len(documents), vocab_size)


def _flatten(
    documents: Sequence[Sequence[int]], vocab_size: int, offset: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """All non-pad tokens of `documents` with the chunk-local document index of each; ids checked."""
    lengths = np.fromiter((len(document) for document in documents), dtype=np.int64, count=len(documents))
    tokens = np.fromiter(itertools.chain.from_iterable(documents), dtype=np.int64, count=int(lengths.sum()))
    doc_of = np.repeat(np.arange(len(documents), dtype=np.int64), lengths)
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"document {offset + int(doc_of[first])} holds word id {int(tokens[first])}, "
            f"outside [0, {vocab_size}) (vocab_size={vocab_size})"
        )
    keep = tokens != PAD_ID
    return tokens[keep], doc_of[keep]


def _cooccurrences(
    tokens: npt.NDArray[np.int64], doc_of: npt.NDArray[np.int64], vocab_size: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """One chunk's distinct (document, word) words and its c(i, j) contributions keyed by i * V + j.

    Returns:
        (words, keys, counts): `words` lists each word once per document containing it (for df);
        `keys` are the distinct i * vocab_size + j with j != i, sorted, and `counts` their c(i, j).
    """
    entry_keys, entry_counts = np.unique(doc_of * vocab_size + tokens, return_counts=True)
    entry_word = entry_keys % vocab_size
    # Entries are sorted by document, so each document's distinct words form one contiguous group;
    # pairing every entry with every entry of its own group is a within-group Cartesian product.
    _, group_start, group_size = np.unique(entry_keys // vocab_size, return_index=True, return_counts=True)
    size_of_entry = np.repeat(group_size, group_size)
    left = np.repeat(np.arange(len(entry_keys)), size_of_entry)
    block_start = np.repeat(np.cumsum(size_of_entry) - size_of_entry, size_of_entry)
    right = np.repeat(np.repeat(group_start, group_size), size_of_entry) + (np.arange(len(left)) - block_start)
    i, j = entry_word[left], entry_word[right]
    off_diagonal = i != j
    # Weight by how often j occurs in the document: c(i, j) counts j's occurrences, i's only once.
    keys, counts = _sum_by_key(
        i[off_diagonal] * vocab_size + j[off_diagonal], entry_counts[right][off_diagonal].astype(np.float64)
    )
    return entry_word, keys, counts


def _sum_by_key(
    keys: npt.NDArray[np.int64], values: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Distinct sorted keys and the sum of the values of each (counts stay exact in float64 below 2**53)."""
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique.astype(np.int64), np.bincount(inverse.ravel(), weights=values, minlength=len(unique))


def _weigh(
    keys: npt.NDArray[np.int64], counts: npt.NDArray[np.float64], df: npt.NDArray[np.int64], n_docs: int, size: int
) -> SparseMatrix:
    """Turn the c(i, j) counts into W: tf, times idf of the column j, renormalised per row."""
    rows, cols = keys // size, keys % size
    idf = np.zeros(size, dtype=np.float64)
    present = df > 0
    idf[present] = np.log(n_docs / df[present])
    tf = counts / np.bincount(rows, weights=counts, minlength=size)[rows]
    weights = tf * idf[cols]
    # A word in every document has idf exactly log(1) = 0; dropping zeros keeps the COO minimal.
    stored = weights > 0
    rows, cols, weights = rows[stored], cols[stored], weights[stored]
    weights = weights / np.bincount(rows, weights=weights, minlength=size)[rows]
    return SparseMatrix(rows, cols, weights.astype(np.float32), (size, size))


def tfidf_embedding(matrix: SparseMatrix, glove: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Compute W @ glove for a sparse W without densifying it.

    Entries are processed sorted by row in blocks: each block's products are summed per row with
    `np.add.reduceat`, so memory stays at one (block, dim) buffer plus the (rows, dim) result.

    Args:
        matrix: W, e.g. from `tfidf_matrix` (any `rows, cols, values, shape` works; duplicates add up).
        glove: the (shape[1], dim) embedding matrix, e.g. from `load_glove`.

    Returns:
        The float32 (shape[0], dim) matrix W @ glove; an empty row of W gives a zero row.

    Raises:
        ValueError: glove is not 2-D with shape[1] rows, or the COO arrays disagree in length or
            hold indices outside the shape.
    """
    rows, cols, values, (n_rows, n_cols) = matrix
    rows, cols, values = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64), np.asarray(values)
    glove = np.asarray(glove)
    if glove.ndim != 2 or glove.shape[0] != n_cols:
        raise ValueError(f"glove must have shape ({n_cols}, dim) for a {n_rows}x{n_cols} matrix, got {glove.shape}")
    if not len(rows) == len(cols) == len(values):
        raise ValueError(f"rows, cols and values differ in length: {len(rows)}, {len(cols)}, {len(values)}")
    if len(rows) and (rows.min() < 0 or rows.max() >= n_rows or cols.min() < 0 or cols.max() >= n_cols):
        raise ValueError(f"an entry lies outside the {n_rows}x{n_cols} shape")
    if np.any(rows[1:] < rows[:-1]):
        order = np.argsort(rows, kind="stable")
        rows, cols, values = rows[order], cols[order], values[order]
    out = np.zeros((n_rows, glove.shape[1]), dtype=np.float64)
    for start in range(0, len(rows), _EMBEDDING_BLOCK):
        block = slice(start, start + _EMBEDDING_BLOCK)
        block_rows = rows[block]
        first = np.flatnonzero(np.r_[True, block_rows[1:] != block_rows[:-1]])
        products = values[block].astype(np.float64)[:, None] * glove[cols[block]]
        # block_rows[first] are distinct (rows are sorted), so this fancy += adds every sum once.
        out[block_rows[first]] += np.add.reduceat(products, first, axis=0)
    return out.astype(np.float32)
