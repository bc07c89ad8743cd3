"""Stream the records of a large JSON file one at a time, so memory is bounded by one record, not the file.

The official GQA and VQA v2 files are one JSON document each: GQA's train questions are a 1.3 GB object of
943k questions, and `json.load` of it takes several times that in Python objects. These readers walk the
top-level structure themselves and hand each record to the standard library's C decoder
(`json.JSONDecoder.raw_decode`), so a record is parsed exactly as `json.load` would parse it:

- `iter_object` yields the (key, value) pairs of a top-level object (GQA questions, GQA scene graphs);
- `iter_field_array` yields the items of the array under one key of a top-level object (VQA's
  `{"info": ..., "questions": [...]}`); the other top-level values are parsed and dropped.

The file is read in binary chunks of `CHUNK_BYTES` through an incremental UTF-8 decoder (UTF-8 only, as the
official files are; a leading BOM is dropped); text already parsed is trimmed from the buffer whenever a
chunk is added. A record longer than the buffer is retried on a buffer grown geometrically, so even a single
huge record costs linear time.

Both readers are generators: the file is opened, and errors are raised, as the caller iterates. Invalid JSON
(including anything after the top-level value) raises `DataError` with the file, line and column, in the
format `isubg.data.files.read_json` uses. Duplicate keys are not detected here; callers that care check them.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from isubg.errors import DataError

__all__ = ["CHUNK_BYTES", "ProgressFn", "iter_field_array", "iter_object"]

# Bytes read per chunk: large enough that Python-level work per chunk is negligible, small enough that the
# buffer (at most about two chunks of text beside the record being parsed) stays a few MiB.
CHUNK_BYTES = 4 * 1024 * 1024

ProgressFn = Callable[[int, int], None]
"""on_progress(done_bytes, total_bytes): called after every chunk read, and with done == total at the end."""

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_COMMA = re.compile(r"[ \t\n\r]*,")
# A key without escapes or control characters (those json rejects), then its colon.
_PLAIN_KEY = re.compile(r'[ \t\n\r]*"([^"\\\x00-\x1f]*)"[ \t\n\r]*:')
_DECODER = json.JSONDecoder()

# A value parsed, or a JSON error found, this close to the end of a buffer that is not the whole file may
# only mean the buffer cut a token short ("1." parses as 1; "-Infinit", "1.5e", "\\u12" are errors): such a
# cut token is at most 9 characters. Only an unterminated string can be cut short further back, and its
# message says so.
_CUT_TOKEN_MARGIN = 16
_UNTERMINATED = "Unterminated string"


def _json_type(value: Any) -> str:
    """How a user reading the file would name a parsed value's type."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    names = {dict: "an object", list: "an array", str: "a string"}
    return names.get(type(value), "a number")


class _Stream:
    """A window of decoded text over an open file, with the parsing steps the readers need.

    `buf[pos:]` is the text not parsed yet; `buf[0]` is character `offset` of the file, and `lines` newlines
    (the last at character `last_newline`, -1 for none) lie before it, which locates errors.
    """

    def __init__(self, path: Path, handle: Any, chunk_bytes: int, on_progress: ProgressFn | None) -> None:
        self.path, self.handle, self.chunk_bytes, self.on_progress = path, handle, chunk_bytes, on_progress
        self.total = os.fstat(handle.fileno()).st_size
        self.done = 0
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.offset = "", 0, 0
        self.lines, self.last_newline = 0, -1
        self.eof = False

    # --- reading --------------------------------------------------------------------------------------

    def _trim(self) -> None:
        """Drop the parsed text `buf[:pos]`, keeping count of its newlines for error positions."""
        consumed = self.pos
        self.lines += self.buf.count("\n", 0, consumed)
        newline = self.buf.rfind("\n", 0, consumed)
        if newline >= 0:
            self.last_newline = self.offset + newline
        self.buf, self.pos, self.offset = self.buf[consumed:], 0, self.offset + consumed

    def _read(self, size: int) -> bool:
        """Drop the parsed text, then append at least one character read from `size`-byte chunks.

        Returns False (and sets `eof`) when the file has no more text.
        """
        self._trim()
        text = ""
        while not text and not self.eof:
            data = self.handle.read(size)
            try:
                text = self.decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                raise DataError(f"{self.path}: cannot read it (not UTF-8 near byte {self.done + exc.start})") from None
            self.done += len(data)
            if not data:
                self.eof = True
                # The file may have changed size since it was opened; the last call must read done == total.
                self.total = self.done
            if self.on_progress is not None:
                self.on_progress(self.done, self.total)
        self.buf += text
        return bool(text)

    # --- errors ---------------------------------------------------------------------------------------

    def error(self, message: str, pos: int | None = None) -> DataError:
        """A DataError naming the file, line and column of buffer index `pos` (default: the current one)."""
        pos = self.pos if pos is None else pos
        line = self.lines + self.buf.count("\n", 0, pos) + 1
        newline = self.buf.rfind("\n", 0, pos)
        column = pos - newline if newline >= 0 else self.offset + pos - self.last_newline
        return DataError(f"{self.path}:{line}:{column}: not valid JSON: {message}")

    # --- tokens ---------------------------------------------------------------------------------------

    def peek(self) -> str:
        """Skip whitespace and return the next character, reading as needed; "" at the end of the file."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._read(self.chunk_bytes):
                return ""

    def value(self) -> Any:
        """Parse the JSON value at the current position (after whitespace) and move past it."""
        if self.pos >= len(self.buf) or self.buf[self.pos] in " \t\n\r":
            self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                cut_short = exc.msg.startswith(_UNTERMINATED) or exc.pos >= len(self.buf) - _CUT_TOKEN_MARGIN
                if self.eof or not cut_short:
                    raise self.error(exc.msg, exc.pos) from None
            else:
                # A value ending near the buffer's end may be a number cut short ("1." parses as 1).
                if self.eof or end < len(self.buf) - _CUT_TOKEN_MARGIN:
                    self.pos = end
                    return value
            # Grow by at least the text held, so a record spanning many chunks is re-parsed O(1) times.
            self._read(max(self.chunk_bytes, len(self.buf) - self.pos))

    def expect(self, char: str, message: str) -> None:
        """Move past `char` (after whitespace), or raise `message` at the character found instead."""
        if self.peek() != char:
            raise self.error(message)
        self.pos += 1

    def describe(self) -> str:
        """The type of the value at the current position, parsed unless it is an array or an object."""
        char = self.peek()
        if char and char in "[{":
            # Not parsed: a wrong top-level array may be the size of the whole file.
            return "an array" if char == "[" else "an object"
        return _json_type(self.value())

    def members(self) -> Iterator[str]:
        """Yield the keys of the object whose "{" was just read, each before its value.

        The caller must parse (or skip) each key's value before asking for the next key.
        """
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            # Fast path, one regex for a plain key and its colon; anything else (escapes, a key cut by the
            # buffer's end, an error) takes the general path.
            match = _PLAIN_KEY.match(self.buf, self.pos)
            if match is not None:
                key, self.pos = match.group(1), match.end()
            else:
                if self.peek() != '"':
                    raise self.error("Expecting property name enclosed in double quotes")
                key = self.value()
                self.expect(":", "Expecting ':' delimiter")
            yield key
            if not self._comma("}"):
                return

    def items(self) -> Iterator[Any]:
        """Yield the values of the array whose "[" was just read."""
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            if not self._comma("]"):
                return

    def _comma(self, close: str) -> bool:
        """Move past the "," after a member (True) or the `close` that ends the container (False)."""
        match = _COMMA.match(self.buf, self.pos)
        if match is not None:
            self.pos = match.end()
            return True
        if self.peek() == close:
            self.pos += 1
            return False
        self.expect(",", "Expecting ',' delimiter")
        return True

    def top_object(self, expected: str) -> None:
        """Move past the "{" that opens the document, or raise `expected` naming what was found."""
        if self.peek() == "{":
            self.pos += 1
            return
        raise DataError(f"{self.path}: expected {expected}, found {self.describe()}")

    def end(self) -> None:
        """Check that nothing but whitespace follows the top-level value."""
        if self.peek():
            raise self.error("Extra data")


@contextmanager
def _open(path: Path | str, chunk_bytes: int, on_progress: ProgressFn | None) -> Iterator[_Stream]:
    """A `_Stream` over `path`, closed on exit; a missing or unreadable file is a DataError."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    with handle:
        yield _Stream(path, handle, chunk_bytes, on_progress)


def iter_object(
    path: Path | str,
    *,
    on_progress: ProgressFn | None = None,
    expected: str = "a JSON object",
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[tuple[str, Any]]:
    """Yield the (key, value) pairs of a file whose top-level value is an object, in file order.

    Each value is parsed only when it is reached, so at most one value (plus a few MiB of text) is held.

    Args:
        path: the JSON file (UTF-8, with or without a BOM).
        on_progress: called as `on_progress(done_bytes, total_bytes)` after each chunk read, and with
            done_bytes == total_bytes once the whole file has been read.
        expected: what the top level should be, for the error raised when it is not an object.
        chunk_bytes: bytes read at a time.

    Yields:
        (key, value) pairs exactly as `json.load` would parse them; a repeated key is yielded again.

    Raises:
        DataError: missing or unreadable file, invalid UTF-8, invalid JSON (file:line:column), anything
            after the object, or a top level that is not an object ("{path}: expected {expected}, found
            an array"). Raised while iterating, when the fault is reached.
        ValueError: chunk_bytes < 1.
    """
    with _open(path, chunk_bytes, on_progress) as stream:
        stream.top_object(expected)
        for key in stream.members():
            yield key, stream.value()
        stream.end()


def iter_field_array(
    path: Path | str,
    field: str,
    *,
    on_progress: ProgressFn | None = None,
    expected: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[Any]:
    """Yield the items of the array under key `field` of a file whose top-level value is an object.

    The object's other values are parsed and dropped (they should be small); the array's items are parsed
    one at a time, when reached.

    Args:
        path: the JSON file (UTF-8, with or without a BOM).
        field: the top-level key holding the array, e.g. "questions".
        on_progress: as for `iter_object`.
        expected: what the file should be, for layout errors; default "an object with a '{field}' array".
        chunk_bytes: bytes read at a time.

    Yields:
        The array's items in file order, exactly as `json.load` would parse them.

    Raises:
        DataError: everything `iter_object` raises, and a layout error "{path}: expected {expected}, found
            ..." when the top level is not an object, `field` is absent, holds something other than an
            array, or appears twice. An absent field is only known once the whole file has been read.
        ValueError: chunk_bytes < 1.
    """
    expected = expected or f"an object with a '{field}' array"
    with _open(path, chunk_bytes, on_progress) as stream:
        stream.top_object(expected)
        found = False
        for key in stream.members():
            if key != field:
                stream.value()
                continue
            if found:
                raise DataError(f"{stream.path}: expected {expected}, found '{field}' twice")
            found = True
            if stream.peek() != "[":
                raise DataError(f"{stream.path}: expected {expected}, found '{field}' holding {stream.describe()}")
            stream.pos += 1
            yield from stream.items()
        if not found:
            raise DataError(f"{stream.path}: expected {expected}, found no '{field}' field")
        stream.end()
