"""The TSV -> HDF5 converter on hand-written bottom-up-attention rows, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datafiles import b64, tsv_line

from isubg.data.convert import convert_tsv
from isubg.data.features import FeatureStore
from isubg.errors import DataError


def _write_tsv(path: Path, ids_counts: list[tuple[int, int]], dim: int = 16, labels: bool = False) -> dict:
    rng = np.random.default_rng(3)
    arrays, lines = {}, []
    for image_id, n in ids_counts:
        line, arrays[image_id] = tsv_line(image_id, n, dim, rng, labels=labels)
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return arrays


def test_converts_rows_across_files_and_reads_back(tmp_path: Path) -> None:
    a = _write_tsv(tmp_path / "a.tsv", [(1, 10), (2, 37)])
    b = _write_tsv(tmp_path / "b.tsv.0", [(3, 100)])
    out = tmp_path / "feats" / "train.h5"
    seen = []
    report = convert_tsv([tmp_path / "a.tsv", tmp_path / "b.tsv.0"], out, progress=seen.append)
    assert (report.images, report.boxes, report.feature_dim, report.skipped) == (3, 147, 16, [])
    assert sum(seen) == (tmp_path / "a.tsv").stat().st_size + (tmp_path / "b.tsv.0").stat().st_size
    store = FeatureStore(out)
    for image_id, arrays in {**a, **b}.items():
        got = store.get(image_id)
        np.testing.assert_array_equal(got.features, arrays["features"])
        np.testing.assert_array_equal(got.boxes, arrays["boxes"])
        x1, y1, _, y2 = arrays["boxes"].T
        np.testing.assert_allclose(got.spatials[:, 0], x1 / 800, rtol=1e-6)
        np.testing.assert_allclose(got.spatials[:, 5], (y2 - y1) / 600, rtol=1e-6)
    assert store.image_size(2) == (800.0, 600.0)
    assert json.loads((tmp_path / "feats" / "train_imgid2idx.json").read_text()) == {"1": 0, "2": 1, "3": 2}


def test_label_fields_are_kept(tmp_path: Path) -> None:
    arrays = _write_tsv(tmp_path / "l.tsv", [(5, 8), (6, 9)], labels=True)
    out = tmp_path / "l.h5"
    convert_tsv([tmp_path / "l.tsv"], out)
    store = FeatureStore(out)
    assert set(store.optional) == {"objects_id", "objects_conf", "attrs_id", "attrs_conf"}
    np.testing.assert_array_equal(store.get(6).labels, arrays[6]["objects_id"])
    np.testing.assert_array_equal(store.get(6).attributes, arrays[6]["attrs_id"])


def test_float16_output(tmp_path: Path) -> None:
    arrays = _write_tsv(tmp_path / "h.tsv", [(1, 4)])
    out = tmp_path / "h.h5"
    convert_tsv([tmp_path / "h.tsv"], out, dtype="float16")
    np.testing.assert_allclose(FeatureStore(out).get(1).features, arrays[1]["features"], atol=5e-3)


def _corrupt_second_row(path: Path) -> None:
    lines = path.read_text().splitlines()
    fields = lines[1].split("\t")
    fields[5] = b64(np.zeros(7, dtype=np.float32))  # 7 floats for 37 boxes x 16: wrong length
    lines[1] = "\t".join(fields)
    path.write_text("\n".join(lines) + "\n")


def test_wrong_base64_length_names_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "bad.tsv"
    _write_tsv(src, [(1, 10), (2, 37), (3, 5)])
    _corrupt_second_row(src)
    out = tmp_path / "out.h5"
    with pytest.raises(DataError, match=r"bad\.tsv:2: field 'features' decodes to 28 bytes"):
        convert_tsv([src], out)
    assert not out.exists() and not list(tmp_path.glob(".out.h5*"))


def test_skip_bad_skips_and_reports(tmp_path: Path) -> None:
    src = tmp_path / "bad.tsv"
    _write_tsv(src, [(1, 10), (2, 37), (3, 5)])
    _corrupt_second_row(src)
    with src.open("a") as f:
        f.write("4\t800\t600\tnot-a-number\tAAAA\tAAAA\n")
    report = convert_tsv([src], tmp_path / "out.h5", skip_bad=True)
    assert report.images == 2 and len(report.skipped) == 2
    assert report.skipped[0].startswith(f"{src}:2:") and report.skipped[1].startswith(f"{src}:4:")
    assert "2" not in FeatureStore(tmp_path / "out.h5")


def test_a_failed_conversion_leaves_the_previous_output(tmp_path: Path) -> None:
    good = tmp_path / "good.tsv"
    _write_tsv(good, [(1, 10)])
    out = tmp_path / "out.h5"
    convert_tsv([good], out)
    before = out.read_bytes()
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t800\t600\t3\t!!!\tAAAA\n")
    with pytest.raises(DataError, match="not valid base64"):
        convert_tsv([bad], out)
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1\t800\t600", "expected 6 or 10 tab-separated fields, found 3"),
        ("1\t800\t600\t0\t\t", "at least one box"),
        ("1\twide\t600\t2\tAAAA\tAAAA", "must be numbers"),
    ],
)
def test_malformed_rows(tmp_path: Path, line: str, message: str) -> None:
    src = tmp_path / "m.tsv"
    src.write_text(line + "\n")
    with pytest.raises(DataError, match=message):
        convert_tsv([src], tmp_path / "o.h5")


def test_duplicate_image_ids(tmp_path: Path) -> None:
    _write_tsv(tmp_path / "a.tsv", [(1, 3)])
    _write_tsv(tmp_path / "b.tsv", [(1, 4)])
    with pytest.raises(DataError, match=r"b\.tsv:1: image 1 appears twice"):
        convert_tsv([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "o.h5")


def test_empty_input(tmp_path: Path) -> None:
    (tmp_path / "e.tsv").write_text("")
    with pytest.raises(DataError, match="no usable rows"):
        convert_tsv([tmp_path / "e.tsv"], tmp_path / "o.h5")


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"none\.tsv: cannot open"):
        convert_tsv([tmp_path / "none.tsv"], tmp_path / "o.h5")


def test_the_converter_writes_without_an_hdf5_file_lock(tmp_path: Path, h5py_opens: list[dict[str, object]]) -> None:
    _write_tsv(tmp_path / "a.tsv", [(1, 10)])
    convert_tsv([tmp_path / "a.tsv"], tmp_path / "out.h5")
    assert h5py_opens and all(kwargs.get("locking") is False for kwargs in h5py_opens)
