"""The embedded demo dataset end to end: generate, prepare as GQA and VQA, inspect, load, cache reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from isubg.cli import app
from isubg.data.dataset import VQADataset, collate
from isubg.data.demo import GENERATOR_VERSION
from isubg.data.embedded import demo_dir, ensure_demo
from isubg.data.inspect import inspect_processed
from isubg.data.prepare import FORMAT_VERSION


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "tiny"
    result = CliRunner().invoke(app, ["data", "demo", "--size", "tiny", "--seed", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("dataset", ["gqa", "vqa"])
def test_demo_prepares_and_inspects_clean(demo: Path, dataset: str) -> None:
    report = inspect_processed(demo / "processed" / dataset)
    assert report.problems == []
    # Both datasets get the detector vocabularies: named detector graphs and stat words from both label kinds.
    assert report.summary["detector stat words"] == "from the object names and attribute names"
    assert set(json.loads((demo / "processed" / dataset / "manifest.json").read_text())["splits"]) == {
        "train", "val", "testdev",
    }  # fmt: skip


@pytest.mark.parametrize("dataset", ["gqa", "vqa"])
def test_demo_batches(demo: Path, dataset: str) -> None:
    data = VQADataset(demo / "processed" / dataset, "train", question_len=12, max_boxes=36, num_stat_word=10)
    batch = collate([data[i] for i in range(8)], data.num_answers)
    assert batch.features.shape[0] == 8 and batch.features.shape[2] == 128
    assert batch.targets is not None and (batch.targets.max(1).values > 0).all()
    assert batch.graphs.num_graphs == 8 and batch.entity_mask.any()
    spec = data.spec()
    assert spec.num_answers == data.num_answers and spec.feature_dim == 128 and spec.glove is None
    assert spec.tfidf is not None and spec.tfidf[3] == (spec.num_words, spec.num_words)
    assert int(batch.q_tokens.max()) < spec.num_words and int(batch.graphs.x.max()) < spec.num_graph_tokens


def test_demo_inspect_cli(demo: Path) -> None:
    result = CliRunner().invoke(app, ["data", "inspect", str(demo / "processed" / "vqa"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"]


def test_ensure_demo_builds_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISUBG_CACHE_DIR", str(tmp_path / "cache"))
    assert demo_dir("tiny", 1) == tmp_path / "cache" / "demo" / "tiny-seed1"
    first = ensure_demo("tiny", 1)
    assert first.generated is not None and first.processed("gqa").exists()
    stamp = (first.processed("gqa") / "manifest.json").stat().st_mtime_ns
    again = ensure_demo("tiny", 1)
    assert again.generated is None  # reused, not rebuilt
    assert (again.processed("gqa") / "manifest.json").stat().st_mtime_ns == stamp


def test_ensure_demo_rebuilds_a_cache_of_an_older_generator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same (size, seed) gives another world after a generator change; an old cache must not be reused.
    monkeypatch.setenv("ISUBG_CACHE_DIR", str(tmp_path / "cache"))
    manifest = ensure_demo("tiny", 2).root / "demo.json"
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "version": GENERATOR_VERSION - 1}))
    again = ensure_demo("tiny", 2)
    assert again.generated is not None  # rebuilt
    assert json.loads(manifest.read_text())["version"] == GENERATOR_VERSION


def test_ensure_demo_rebuilds_processed_folders_of_an_older_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A demo prepared by an older isubg cannot be read (read_manifest refuses it); it must be rebuilt, not reused.
    monkeypatch.setenv("ISUBG_CACHE_DIR", str(tmp_path / "cache"))
    manifest = ensure_demo("tiny", 4).processed("gqa") / "manifest.json"
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "format_version": 1}))
    again = ensure_demo("tiny", 4)
    assert again.generated is not None  # rebuilt
    assert json.loads(manifest.read_text())["format_version"] == FORMAT_VERSION


def test_demo_rejects_an_unknown_size() -> None:
    result = CliRunner().invoke(app, ["data", "demo", "--size", "huge", "-o", "x"])
    assert result.exit_code == 2 and "tiny, small or medium" in result.output
