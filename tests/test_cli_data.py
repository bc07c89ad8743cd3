"""`isubg data convert-features` and `isubg data inspect` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
from datafiles import tsv_line, write_adaptive_h5, write_fixed_h5
from typer.testing import CliRunner

from isubg.cli import app


def _tsv(path: Path, rows: list[tuple[int, int]]) -> None:
    rng = np.random.default_rng(0)
    path.write_text("\n".join(tsv_line(i, n, 8, rng, labels=True)[0] for i, n in rows) + "\n")


def test_convert_then_inspect(runner: CliRunner, tmp_path: Path) -> None:
    _tsv(tmp_path / "a.tsv", [(1, 10), (2, 25), (3, 100)])
    out = tmp_path / "f.h5"
    result = runner.invoke(app, ["data", "convert-features", str(tmp_path / "a.tsv"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 images, 135 boxes, 8-d features" in result.output
    inspected = runner.invoke(app, ["data", "inspect", str(out), "--json"])
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.stdout)
    assert report["ok"] and report["summary"]["images"] == 3 and report["summary"]["boxes"] == 135
    assert report["box_histogram"] == {"1-10": 1, "21-30": 1, "91-100": 1}
    table = runner.invoke(app, ["data", "inspect", str(out)])
    assert table.exit_code == 0 and "No problems found" in table.output


def test_convert_refuses_to_overwrite(runner: CliRunner, tmp_path: Path) -> None:
    _tsv(tmp_path / "a.tsv", [(1, 10)])
    out = tmp_path / "f.h5"
    out.write_text("precious")
    result = runner.invoke(app, ["data", "convert-features", str(tmp_path / "a.tsv"), "-o", str(out)])
    assert result.exit_code == 2 and "--force" in result.output and out.read_text() == "precious"


def test_convert_reports_a_bad_row_and_skip_bad_goes_on(runner: CliRunner, tmp_path: Path) -> None:
    src = tmp_path / "a.tsv"
    _tsv(src, [(1, 10)])
    with src.open("a") as f:
        f.write("2\t800\t600\t3\tAAAA\tAAAA\n")
    out = tmp_path / "f.h5"
    result = runner.invoke(app, ["data", "convert-features", str(src), "-o", str(out)])
    assert result.exit_code == 2 and f"{src}:2:" in result.output and "Traceback" not in result.output
    assert not out.exists()
    skipped = runner.invoke(app, ["data", "convert-features", str(src), "-o", str(out), "--skip-bad"])
    assert skipped.exit_code == 0 and "Skipped 1 bad row" in skipped.output


def test_inspect_lists_problems_and_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    write_adaptive_h5(path, {1: 3, 2: 4})
    with h5py.File(path, "a") as f:
        f["image_features"][4, 2] = np.nan
    result = runner.invoke(app, ["data", "inspect", str(path)])
    assert result.exit_code == 1 and "NaN/inf" in result.output
    broken = tmp_path / "broken.h5"
    broken.write_text("not hdf5")
    result = runner.invoke(app, ["data", "inspect", str(broken), "--json"])
    assert result.exit_code == 1 and "not a readable HDF5 file" in json.loads(result.stdout)["problems"][0]


def test_inspect_missing_path_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "none.h5")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_prepare_through_the_cli(runner: CliRunner, tmp_path: Path) -> None:
    from test_prepare import _gqa_raw

    raw = _gqa_raw(tmp_path)
    out = tmp_path / "processed"
    args = ["data", "prepare", "gqa", str(raw), "--features", str(tmp_path / "feats.h5"), "-o", str(out)]
    result = runner.invoke(app, [*args, "--splits", "train,val"])
    assert result.exit_code == 0, result.output
    assert "train: 3 questions, 2 images" in result.output and "ground-truth and detector scene graphs" in result.output
    assert "detected stat words are empty" in result.output  # these features carry no detector labels
    again = runner.invoke(app, [*args, "--splits", "train,val"])
    assert again.exit_code == 2 and "--force" in again.output
    missing = runner.invoke(app, [*args, "--splits", "train,testdev", "--force"])
    assert missing.exit_code == 2 and "testdev_balanced_questions.json" in missing.output
    inspected = runner.invoke(app, ["data", "inspect", str(out)])
    assert inspected.exit_code == 0 and "No problems found" in inspected.output


def test_prepare_reads_features_given_as_several_files(runner: CliRunner, tmp_path: Path) -> None:
    from test_prepare import _gqa_raw

    from isubg.data.dataset import VQADataset
    from isubg.data.prepare import read_manifest

    raw = _gqa_raw(tmp_path)  # its feats.h5 is not used: images 101 and 102 in one shard, 103 in another
    adaptive, fixed = tmp_path / "train.h5", tmp_path / "val36.h5"
    feats = write_adaptive_h5(adaptive, {101: 12, 102: 30}, seed=3)
    feats[103] = write_fixed_h5(fixed, [103], seed=4)[0]
    out = tmp_path / "processed"
    args = ["data", "prepare", "gqa", str(raw), "--features", str(adaptive), "--features", str(fixed), "-o", str(out)]
    result = runner.invoke(app, [*args, "--splits", "train,val"])
    assert result.exit_code == 0, result.output
    entry = read_manifest(out)["features"]
    assert entry["paths"] == [str(adaptive.resolve()), str(fixed.resolve())] and "path" not in entry
    assert entry["bytes"] == adaptive.stat().st_size + fixed.stat().st_size
    assert entry["images"] == 3 and entry["layout"] == "adaptive+fixed" and entry["feature_dim"] == 8
    val = VQADataset(out, "val", question_len=6, max_boxes=50, num_stat_word=4)  # images 103 and 102
    assert [val.records[i]["image_id"] for i in range(2)] == ["103", "102"]
    np.testing.assert_array_equal(val[0].features, feats[103])
    np.testing.assert_array_equal(val[1].features, feats[102])
    inspected = runner.invoke(app, ["data", "inspect", str(out)])
    assert inspected.exit_code == 0 and "No problems found" in inspected.output, inspected.output
    again = [*args[:-2], "--features", str(tmp_path / "feats.h5"), "-o", str(tmp_path / "p2"), "--splits", "train"]
    clash = runner.invoke(app, again)  # feats.h5 holds 101-103 too
    assert clash.exit_code == 2 and "image 101 is in both" in " ".join(clash.output.split()), clash.output


def test_prepare_rejects_an_unknown_dataset(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "prepare", "coco", str(tmp_path), "--features", "f.h5", "-o", "out"])
    assert result.exit_code == 2 and "gqa or vqa" in result.output
