"""Streaming JSON readers against `json.load`: every chunk size, hand-written layouts, and their errors."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest

from isubg.data.jsonstream import CHUNK_BYTES, iter_field_array, iter_object
from isubg.errors import DataError

# Whitespace between every token, nesting, escapes, a surrogate pair, numbers in every form, multi-byte
# UTF-8 (2, 3 and 4 bytes) in keys and values: split at every chunk size, each of these is cut somewhere.
OBJECT_TEXT = (
    '\n\t{ "q1" :\r\n {"imageId":"n1","question":"Ist das Ölfass rot?","types":{"structural":"verify"}} ,\n'
    '  "ключ€😀" : [ 1 , -2.5e-3 , 1E+20 , 0 , true , false , null , "a\\"b\\\\c\\n\\u00e9\\ud83d\\ude00" ] ,'
    '"empty": {}, "none": [ ], "n": 12345678901234567890, "f": -0.0, "deep": [[[{"x": [{}]}]]],\n'
    '"last": "€"\n}\n  '
)
VQA_TEXT = (
    '{"info": {"year": 2017, "notes": ["a", {"b": null}]}, "task_type": "Open-Ended",\n'
    ' "questions" : [ {"image_id": 1, "question": "Où?", "question_id": 10},\n'
    '{"image_id": 2, "question": "What 😀?", "question_id": 20} , 3, "x", [] ],\n'
    '"license": {"url": "http://x"}}'
)


def _write(tmp_path: Path, text: str | bytes, name: str = "doc.json") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def _json_error(path: Path) -> str:
    """The message `json.load` gives for the file, in the reader's format."""
    with pytest.raises(json.JSONDecodeError) as info:
        json.loads(path.read_bytes())
    exc = info.value
    return f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}"


@pytest.mark.parametrize("chunk", [*range(1, 12), 64, CHUNK_BYTES])
def test_object_at_every_chunk_size(tmp_path: Path, chunk: int) -> None:
    path = _write(tmp_path, OBJECT_TEXT)
    expected = list(json.loads(OBJECT_TEXT).items())
    assert list(iter_object(path, chunk_bytes=chunk)) == expected
    assert [key for key, _ in expected][1] == "ключ€😀"


@pytest.mark.parametrize("chunk", [*range(1, 12), CHUNK_BYTES])
def test_field_array_at_every_chunk_size(tmp_path: Path, chunk: int) -> None:
    path = _write(tmp_path, VQA_TEXT)
    items = list(iter_field_array(path, "questions", chunk_bytes=chunk))
    assert items == json.loads(VQA_TEXT)["questions"]
    assert items[1]["question"] == "What 😀?"


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_multibyte_characters_straddle_chunks(tmp_path: Path, chunk: int) -> None:
    # Every character is 2 to 4 bytes, so chunks of 1 to 5 bytes end inside most of them.
    text = '{"😀é€": "ééé€€€😀😀😀", "€": ["😀"]}'
    path = _write(tmp_path, text)
    assert dict(iter_object(path, chunk_bytes=chunk)) == json.loads(text)


def test_bom_is_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path, b"\xef\xbb\xbf" + VQA_TEXT.encode())
    assert list(iter_field_array(path, "questions", chunk_bytes=2)) == json.loads(VQA_TEXT)["questions"]
    path = _write(tmp_path, b"\xef\xbb\xbf{}", name="bom_empty.json")
    assert list(iter_object(path, chunk_bytes=1)) == []


@pytest.mark.parametrize("text", ["{}", " {\n}\n", "\ufeff{ }"])
def test_empty_object(tmp_path: Path, text: str) -> None:
    assert list(iter_object(_write(tmp_path, text), chunk_bytes=1)) == []


@pytest.mark.parametrize("text", ['{"questions": []}', '{"a": 1, "questions" : [\n]\n, "b": [2]}'])
def test_empty_array(tmp_path: Path, text: str) -> None:
    assert list(iter_field_array(_write(tmp_path, text), "questions", chunk_bytes=3)) == []


def test_a_record_longer_than_many_chunks(tmp_path: Path) -> None:
    record = {"objects": {str(i): {"name": "é" * (i % 7), "x": i / 3} for i in range(5000)}}
    path = _write(tmp_path, json.dumps({"img": record, "next": 1}))
    calls: list[tuple[int, int]] = []
    pairs = list(iter_object(path, chunk_bytes=16, on_progress=lambda done, total: calls.append((done, total))))
    assert pairs == [("img", record), ("next", 1)]
    # The buffer grows geometrically: a few dozen reads of a ~240 KB record, not one per 16-byte chunk.
    assert path.stat().st_size > 200_000 and len(calls) < 40


def test_progress_is_reported_per_chunk_and_ends_at_total(tmp_path: Path) -> None:
    # Records much shorter than a chunk: every read is one 64-byte chunk.
    path = _write(tmp_path, json.dumps({f"q{i}": [i, "é"] for i in range(300)}))
    size = path.stat().st_size
    calls: list[tuple[int, int]] = []
    list(iter_object(path, chunk_bytes=64, on_progress=lambda done, total: calls.append((done, total))))
    done = [0] + [d for d, _ in calls]
    steps = [b - a for a, b in itertools.pairwise(done)]
    assert steps[:-2] == [64] * (len(steps) - 2) and 0 < steps[-2] <= 64 and steps[-1] == 0
    assert {total for _, total in calls} == {size} and calls[-1] == (size, size)


def test_progress_of_a_field_array(tmp_path: Path) -> None:
    path = _write(tmp_path, VQA_TEXT)
    calls: list[tuple[int, int]] = []
    list(iter_field_array(path, "questions", on_progress=lambda done, total: calls.append((done, total))))
    assert calls[-1] == (path.stat().st_size,) * 2


def _random_value(rng: random.Random, depth: int) -> Any:
    atoms = [0, -7, 2**70, 0.1, -1.5e-300, 1e308, True, False, None, "", "plain", "é€😀", '"\\\n\t\x01', "x" * 40]
    roll = rng.random()
    if depth >= 4 or roll < 0.5:
        return rng.choice(atoms)
    if roll < 0.75:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["k", "ключ", "😀", "", 'a"b']
    return {f"{rng.choice(keys)}{i}": _random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


@pytest.mark.parametrize("seed", range(4))
def test_random_documents_equal_json_load(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    for n in range(25):
        doc = {f"q{i}": _random_value(rng, 0) for i in range(rng.randint(0, 6))}
        indent = rng.choice([None, 0, 2, "\t"])
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=indent) + rng.choice(["", "\n", " \r\n"])
        path = _write(tmp_path, text, name=f"{n}.json")
        wrapped = _write(tmp_path, f'{{"info": {text}, "items": {json.dumps(list(doc.values()))}}}', name="w.json")
        for chunk in (1, 3, 7, 4096):
            assert list(iter_object(path, chunk_bytes=chunk)) == list(json.loads(text).items())
            assert list(iter_field_array(wrapped, "items", chunk_bytes=chunk)) == list(doc.values())


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 4096])
def test_truncated_anywhere_fails_where_json_load_does(tmp_path: Path, chunk: int) -> None:
    data = OBJECT_TEXT.rstrip().encode()
    for cut in range(len(data)):
        try:
            data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue  # a cut inside a character: the UTF-8 error is tested on its own
        path = _write(tmp_path, data[:cut])
        with pytest.raises(DataError) as info:
            list(iter_object(path, chunk_bytes=chunk))
        assert str(info.value) == _json_error(path), cut


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1} x', "1:10: not valid JSON: Extra data"),
        ('{"a": 1}\n\n  {}', "3:3: not valid JSON: Extra data"),
        ('{"a": 1,\n "b": tru}', "2:7: not valid JSON: Expecting value"),
        ('{"a": 1 "b": 2}', "1:9: not valid JSON: Expecting ',' delimiter"),
        ('{"a" 1}', "1:6: not valid JSON: Expecting ':' delimiter"),
        ("{a: 1}", "1:2: not valid JSON: Expecting property name enclosed in double quotes"),
        ('{"a": 1,}', "1:9: not valid JSON: Expecting property name enclosed in double quotes"),
        ('{"a": [1, 2,]}', "1:13: not valid JSON: Expecting value"),
        ('{"a": "x\ny"}', "1:9: not valid JSON: Invalid control character at"),
        ("", "1:1: not valid JSON: Expecting value"),
        ("  \n ", "2:2: not valid JSON: Expecting value"),
        ('{"a": 1}\x00', "1:9: not valid JSON: Extra data"),
    ],
)
def test_invalid_json_names_file_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    for chunk in (1, 5, CHUNK_BYTES):
        with pytest.raises(DataError) as info:
            list(iter_object(path, chunk_bytes=chunk))
        assert str(info.value) == f"{path}:{message}" == _json_error(path)


def test_stray_character_after_many_chunks_is_located(tmp_path: Path) -> None:
    lines = [f'"q{i}": {{"question": "Is it {i}?"}},' for i in range(300)]
    lines[250] = lines[250].replace("{", "{]", 1)
    path = _write(tmp_path, "{\n" + "\n".join(lines) + '\n"end": 0}')
    with pytest.raises(DataError, match=r"doc\.json:252:\d+: not valid JSON: Expecting property name") as info:
        list(iter_object(path, chunk_bytes=64))
    assert str(info.value) == _json_error(path)


@pytest.mark.parametrize(
    ("text", "found"),
    [("[1, 2]", "an array"), ('"text"', "a string"), ("3.5", "a number"), ("null", "null"), (" true", "true")],
)
def test_top_level_must_be_an_object(tmp_path: Path, text: str, found: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(DataError) as info:
        list(iter_object(path))
    assert str(info.value) == f"{path}: expected a JSON object, found {found}"
    with pytest.raises(DataError) as info:
        list(iter_object(path, expected="a mapping of questionId -> question"))
    assert str(info.value) == f"{path}: expected a mapping of questionId -> question, found {found}"


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ('{"info": {}, "annotations": []}', "no 'questions' field"),
        ('{"questions": {"1": 2}}', "'questions' holding an object"),
        ('{"questions": null}', "'questions' holding null"),
        ('{"questions": [], "questions": [1]}', "'questions' twice"),
        ("[[1], [2]]", "an array"),
    ],
)
def test_field_array_layout_errors(tmp_path: Path, text: str, found: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(DataError) as info:
        list(iter_field_array(path, "questions"))
    assert str(info.value) == f"{path}: expected an object with a 'questions' array, found {found}"
    with pytest.raises(DataError, match=r"expected a VQA file, found"):
        list(iter_field_array(path, "questions", expected="a VQA file"))


def test_field_array_errors_after_the_array(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"questions": [1, 2], "license": {"url": }}')
    items: list[Any] = []
    with pytest.raises(DataError) as info:
        items.extend(iter_field_array(path, "questions", chunk_bytes=3))
    assert items == [1, 2] and str(info.value) == _json_error(path)
    path = _write(tmp_path, '{"questions": [1 2]}')
    with pytest.raises(DataError, match=r"1:18: not valid JSON: Expecting ',' delimiter"):
        list(iter_field_array(path, "questions"))


def test_missing_file_and_bad_utf8(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        list(iter_object(tmp_path / "absent.json"))
    assert str(info.value) == f"{tmp_path / 'absent.json'}: no such file"
    path = _write(tmp_path, b'{"a": "\xff"}')
    with pytest.raises(DataError, match=r"doc\.json: cannot read it \(not UTF-8 near byte 7\)"):
        list(iter_object(path, chunk_bytes=3))
    path = _write(tmp_path, b'{"a": "\xc3')  # the file ends inside a character
    with pytest.raises(DataError, match=r"doc\.json: cannot read it \(not UTF-8"):
        list(iter_object(path))


def test_bad_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1"):
        list(iter_object("whatever.json", chunk_bytes=0))


def test_stopping_early_closes_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, OBJECT_TEXT)
    pairs = iter_object(path, chunk_bytes=8)
    assert next(pairs)[0] == "q1"
    frame = pairs.gi_frame
    assert frame is not None
    stream = frame.f_locals["stream"]
    pairs.close()
    assert stream.handle.closed
