"""benchmarks/bench_scale.py: its generator writes files that isubg's own loaders read, at the planned sizes, its fits
recover known exponents, it refuses a scale the disk cannot hold, and its stages run end to end at a tiny scale."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import h5py
import numpy as np
import pytest

from isubg.data.features import FeatureStore
from isubg.data.questions import load_gqa_questions, load_vqa_questions
from isubg.data.scene_graphs import load_gqa_scene_graphs

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = 0.0005


@pytest.fixture(scope="module")
def modules() -> Iterator[tuple[ModuleType, ModuleType]]:
    """(scale_data, bench_scale), imported from benchmarks/ (not a package)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_scale
        import scale_data

        yield scale_data, bench_scale
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def tiny(modules: tuple[ModuleType, ModuleType], tmp_path_factory: pytest.TempPathFactory) -> Path:
    scale_data, _ = modules
    folder = tmp_path_factory.mktemp("scale")
    scale_data.generate(folder, TINY, seed=0)
    return folder


def test_plan_scales_the_real_sizes_with_a_floor(modules: tuple[ModuleType, ModuleType]) -> None:
    scale_data, _ = modules
    full = scale_data.plan(1.0)
    assert full.gqa_questions == scale_data.GQA_QUESTIONS and full.vqa_images == scale_data.VQA_IMAGES
    assert full.gqa_feature_images == scale_data.GQA_FEATURE_IMAGES
    tenth = scale_data.plan(0.1)
    assert tenth.gqa_questions["train"] == 94_300 and tenth.vqa_questions["val"] == 21_435
    small = scale_data.plan(TINY)
    assert min(small.gqa_images.values()) >= scale_data.MIN_PER_SPLIT  # testdev: 398 * 0.0005 rounds to 0
    assert all(small.gqa_questions[s] >= n for s, n in small.gqa_images.items())
    assert small.gqa_feature_images >= sum(small.gqa_graph_images.values()) + small.gqa_images["testdev"]
    with pytest.raises(ValueError, match="scale"):
        scale_data.plan(1.5)


def test_gqa_files_are_read_by_isubg(modules: tuple[ModuleType, ModuleType], tiny: Path) -> None:
    scale_data, _ = modules
    p = scale_data.plan(TINY)
    raw = tiny / "raw" / "gqa"
    graphs = {s: load_gqa_scene_graphs(raw / "sceneGraphs" / f"{s}_sceneGraphs.json") for s in ("train", "val")}
    for split, count in p.gqa_questions.items():
        questions = load_gqa_questions(raw / "questions" / f"{split}_balanced_questions.json")
        assert len(questions) == count
        assert len({q.image_id for q in questions}) == p.gqa_images[split]
        assert all(q.answer and q.qtype and q.detail for q in questions)
        if split in graphs:
            assert len(graphs[split]) == p.gqa_graph_images[split]
            assert {q.image_id for q in questions} <= graphs[split].keys()
    record = next(iter(json.loads((raw / "questions" / "train_balanced_questions.json").read_text()).values()))
    official = {"semantic", "entailed", "equivalent", "question", "imageId", "isBalanced", "groups", "answer",
                "semanticStr", "annotations", "types", "fullAnswer"}  # fmt: skip
    assert set(record) == official and set(record["types"]) == {"structural", "semantic", "detailed"}
    nodes = [g.num_nodes for g in graphs["train"].values()]
    edges = sum(g.num_edges for g in graphs["train"].values())
    assert 10 <= np.mean(nodes) <= 22 and 6 <= edges / sum(nodes) <= 14  # ~16 objects, ~10 relations each


def test_vqa_files_are_read_by_isubg(modules: tuple[ModuleType, ModuleType], tiny: Path) -> None:
    scale_data, _ = modules
    p = scale_data.plan(TINY)
    for split, sub in scale_data.VQA_SUBTYPES.items():
        questions = load_vqa_questions(
            tiny / "raw" / "vqa" / f"v2_OpenEnded_mscoco_{sub}_questions.json",
            tiny / "raw" / "vqa" / f"v2_mscoco_{sub}_annotations.json",
        )
        assert len(questions) == p.vqa_questions[split]
        assert len({q.image_id for q in questions}) == p.vqa_images[split]
        assert all(len(q.human_answers) == 10 and q.answer in q.human_answers for q in questions)
        assert 20 <= np.mean([len(q.text) for q in questions]) <= 40


@pytest.mark.parametrize("dataset", ["gqa", "vqa"])
def test_features_are_read_by_feature_store(modules: tuple[ModuleType, ModuleType], tiny: Path, dataset: str) -> None:
    scale_data, _ = modules
    p = scale_data.plan(TINY)
    store = FeatureStore(tiny / "features" / f"{dataset}.h5")
    assert len(store) == (p.gqa_feature_images if dataset == "gqa" else p.vqa_feature_images)
    assert store.layout == "adaptive" and store.feature_dim == 2048 and store.has_image_size
    assert set(store.optional) == {"objects_id", "objects_conf", "attrs_id", "attrs_conf"}
    counts = [store.num_boxes(i) for i in store.image_ids]
    assert min(counts) >= 10 and max(counts) <= 100 and 28 <= np.mean(counts) <= 42
    boxes = store.get(store.image_ids[-1])
    assert boxes.labels is not None and boxes.labels.max() < 1600 and boxes.attributes.max() < 400
    store.close()
    with h5py.File(store.path, "r") as f:
        assert f["image_features"].dtype == np.float16
    vocab = (tiny / "features" / "objects_vocab.txt").read_text().splitlines()
    assert len(vocab) == 1600 and len((tiny / "features" / "attributes_vocab.txt").read_text().splitlines()) == 400


def test_generation_is_reused_only_for_the_same_scale_and_seed(
    modules: tuple[ModuleType, ModuleType], tmp_path: Path
) -> None:
    scale_data, _ = modules
    first = scale_data.generate(tmp_path, TINY, seed=0)
    again = scale_data.generate(tmp_path, TINY, seed=0)
    other = scale_data.generate(tmp_path, TINY, seed=1)
    assert not first.reused and again.reused and not other.reused
    assert json.loads((tmp_path / "scale.json").read_text())["seed"] == 1


def test_fit_recovers_a_power_law_above_the_baseline(modules: tuple[ModuleType, ModuleType]) -> None:
    _, bench = modules
    scales = [0.02, 0.05, 0.1]
    fit = bench.fit_power(scales, [300 + 2000 * s**0.8 for s in scales], baseline=300)
    assert fit["exponent"] == pytest.approx(0.8, abs=1e-3) and fit["at_1"] == pytest.approx(2300, rel=1e-3)
    assert bench.fit_power([0.1], [5.0]) is None


def test_memory_extrapolation_takes_the_larger_of_power_law_and_line(modules: tuple[ModuleType, ModuleType]) -> None:
    _, bench = modules
    scales = [0.02, 0.05, 0.1]
    # 120 MB of fixed cost above the import baseline: the power law reads it as slow growth, the line does not.
    fit = bench.fit_metric(scales, [500 + 5000 * s for s in scales], "rss", baseline=380)
    assert fit["exponent"] < 0.8 and fit["power_at_1"] < 4000
    assert fit["at_1"] == pytest.approx(5500, rel=1e-6) == fit["linear"]["at_1"]
    # Faster than linear: the power law wins.
    fit = bench.fit_metric(scales, [380 + 4000 * s**1.5 for s in scales], "rss", baseline=380)
    assert fit["exponent"] == pytest.approx(1.5, abs=1e-3) and fit["at_1"] == pytest.approx(4380, rel=1e-3)
    assert "linear" not in bench.fit_metric(scales, [1.0, 2.5, 5.0], "time", baseline=0.0)


def test_limits_pass_and_fail_at_full_scale(modules: tuple[ModuleType, ModuleType]) -> None:
    _, bench = modules
    records = [
        {"stage": "prepare-gqa", "scale": s, "wall_s": 10 * s, "peak_rss_mb": 100 + 20_000 * s} for s in (0.1, 0.2)
    ]
    records += [
        {"stage": "loader", "workers": 2, "scale": s, "samples_per_s": 900, "main_rss_mb": 500, "loader_rss_mb": 600}
        for s in (0.1, 0.2)
    ]
    rows = {(r["stage"], r["metric"]): r for r in bench.fit_all(records, {"prepare": 100.0, "torch": 400.0})}
    assert rows["prepare-gqa", "peak_rss_mb"]["pass"] is False  # 100 + 20,000 MB > 16 GB
    assert rows["loader w=2", "loader_rss_mb"]["pass"] is True
    assert rows["prepare-gqa", "wall_s"]["limit"] is None


def test_a_scale_that_does_not_fit_on_disk_is_refused(
    modules: tuple[ModuleType, ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, bench = modules
    monkeypatch.setattr(bench.shutil, "disk_usage", lambda _path: SimpleNamespace(free=10**6))
    with pytest.raises(SystemExit, match=r"scale 1 needs about \d+\.\d GB"):
        bench.prepare_data(tmp_path, 1.0, 0)
    assert not any(tmp_path.iterdir())


def test_worker_pids_need_the_dataloader_workers_list(modules: tuple[ModuleType, ModuleType]) -> None:
    _, bench = modules
    assert bench._worker_pids(object(), 0) == []
    with pytest.raises(RuntimeError, match="_workers"):
        bench._worker_pids(object(), 2)
    assert bench._worker_pids(SimpleNamespace(_workers=[SimpleNamespace(pid=7)]), 1) == [7]


@pytest.mark.slow  # about 25 s: two prepares, three loader/bookkeeping children with torch imports
def test_stages_run_end_to_end(modules: tuple[ModuleType, ModuleType], tmp_path: Path) -> None:
    scale_data, bench = modules
    out = tmp_path / "result.json"
    args = ["--scale", str(TINY), "--work", str(tmp_path / "work"), "--workers", "0,2", "--loader-batches", "3",
            "--json", str(out), "--no-keep"]  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    p = scale_data.plan(TINY)
    by_stage = {(r["stage"], r.get("workers")): r for r in result["records"]}
    assert by_stage["prepare-gqa", None]["questions"] == p.gqa_questions
    assert by_stage["prepare-vqa", None]["questions"] == p.vqa_questions
    assert all(r["peak_rss_mb"] > result["meta"]["baseline_rss_mb"]["prepare"] / 2 for r in result["records"][:2])
    two = by_stage["loader", 2]
    assert len(two["worker_rss_mb"]) == 2 and all(v > 0 for v in two["worker_rss_mb"]) and two["samples_per_s"] > 0
    assert two["batches"] == 3 and two["loader_rss_mb"] == max(two["worker_rss_mb"])
    keeping = by_stage["bookkeeping", None]
    assert keeping["scored"] == keeping["questions"] == p.gqa_questions["train"]
    assert not (tmp_path / "work" / f"scale-{TINY:g}-seed0").exists()  # --no-keep
