"""FeatureStore (and FeatureShards, several files read as one) on files written by hand in the reference layouts,
and their errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from datafiles import write_adaptive_h5, write_fixed_h5

from isubg.data.features import (
    FeatureShards,
    FeatureStore,
    ImageBoxes,
    open_features,
    read_id_map,
    recorded_paths,
)
from isubg.errors import DataError

COUNTS = {1001: 12, 1002: 60, 1003: 10}


@pytest.fixture
def adaptive(tmp_path: Path) -> tuple[Path, dict[int, np.ndarray]]:
    path = tmp_path / "train.hdf5"
    return path, write_adaptive_h5(path, COUNTS)


@pytest.mark.parametrize("in_memory", [False, True])
def test_reads_the_reference_adaptive_layout(adaptive: tuple[Path, dict], in_memory: bool) -> None:
    path, feats = adaptive
    store = FeatureStore(path, in_memory=in_memory)
    assert store.layout == "adaptive" and len(store) == 3 and store.feature_dim == 8
    assert 1002 in store and "1002" in store and 999 not in store
    boxes = store.get(1002)
    np.testing.assert_array_equal(boxes.features, feats[1002])
    assert boxes.boxes.shape == (60, 4) and boxes.spatials.shape == (60, 6) and boxes.total == 60
    assert boxes.labels is None and boxes.label_conf is None and boxes.attribute_conf is None
    assert store.image_ids == ["1001", "1002", "1003"]


def test_max_boxes_keeps_the_first_rows_without_confidences(adaptive: tuple[Path, dict]) -> None:
    path, feats = adaptive
    store = FeatureStore(path, max_boxes=50)
    boxes = store.get(1002)
    assert boxes.features.shape == (50, 8) and boxes.total == 60
    np.testing.assert_array_equal(boxes.features, feats[1002][:50])
    assert store.get(1001).features.shape == (12, 8)  # under the limit: untouched


def test_max_boxes_keeps_the_most_confident_when_the_file_has_confidences(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    feats = write_adaptive_h5(path, {7: 6})
    conf = np.array([0.1, 0.9, 0.5, 0.8, 0.2, 0.7], dtype=np.float32)
    with h5py.File(path, "a") as f:
        f.create_dataset("objects_conf", data=conf)
        f.create_dataset("objects_id", data=np.arange(6, dtype=np.int64))
    boxes = FeatureStore(path, max_boxes=3).get(7)
    np.testing.assert_array_equal(boxes.labels, [1, 3, 5])  # the top three, in stored order
    np.testing.assert_array_equal(boxes.label_conf, conf[[1, 3, 5]])  # their confidences, kept alongside
    assert boxes.attributes is None and boxes.attribute_conf is None
    np.testing.assert_array_equal(boxes.features, feats[7][[1, 3, 5]])


def test_float16_storage_is_read_as_float32(tmp_path: Path) -> None:
    path = tmp_path / "half.h5"
    feats = write_adaptive_h5(path, {5: 4}, dtype="f2")
    boxes = FeatureStore(path).get(5)
    assert boxes.features.dtype == np.float32
    np.testing.assert_allclose(boxes.features, feats[5], atol=1e-2)


def test_reads_the_fixed_36_layout(tmp_path: Path) -> None:
    path = tmp_path / "train36.hdf5"
    values = write_fixed_h5(path, [42, 43])
    store = FeatureStore(path, max_boxes=20)
    assert store.layout == "fixed"
    np.testing.assert_array_equal(store.get(43).features, values[1][:20])
    assert store.num_boxes("42") == 36


def test_json_id_map_and_string_ids(tmp_path: Path) -> None:
    path = tmp_path / "gqa.h5"
    write_adaptive_h5(path, {0: 3, 1: 4}, id_map="none")
    (tmp_path / "gqa_imgid2idx.json").write_text(json.dumps({"n161313": 1, "2354786": 0}))
    store = FeatureStore(path)
    assert store.get("n161313").features.shape == (4, 8)


def test_explicit_id_map_wins(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    write_adaptive_h5(path, {10: 3, 11: 4})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"a": 1}))
    store = FeatureStore(path, id_map=other)
    assert list(store.image_ids) == ["a"] and store.get("a").features.shape == (4, 8)


def test_the_store_pickles_without_its_handle(adaptive: tuple[Path, dict]) -> None:
    path, feats = adaptive
    store = FeatureStore(path)
    store.get(1001)  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(store))
    assert clone._handle is None
    np.testing.assert_array_equal(clone.get(1003).features, feats[1003])


def test_a_forked_worker_opens_its_own_handle(adaptive: tuple[Path, dict]) -> None:
    torch = pytest.importorskip("torch")
    path, feats = adaptive
    store = FeatureStore(path)
    store.get(1001)

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> np.ndarray:
            return store.get(list(COUNTS)[i]).features.sum()

    loader = torch.utils.data.DataLoader(Images(), num_workers=2, batch_size=None, multiprocessing_context="fork")
    sums = [float(x) for x in loader]
    assert sums == pytest.approx([float(feats[i].sum()) for i in COUNTS], rel=1e-5)


# -------------------------------------------------------------------------------------------------
# Bad files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.h5: no such features file"):
        FeatureStore(tmp_path / "nope.h5")


def test_not_an_hdf5_file(tmp_path: Path) -> None:
    path = tmp_path / "fake.h5"
    path.write_text("image_id\tfeatures\n")
    with pytest.raises(DataError, match=r"fake\.h5: not a readable HDF5 file"):
        FeatureStore(path)


def test_truncated_file(adaptive: tuple[Path, dict], tmp_path: Path) -> None:
    path, _ = adaptive
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(path.read_bytes()[:2048])
    with pytest.raises(DataError, match=r"cut\.hdf5"):
        FeatureStore(cut).get(1002)


def test_missing_dataset_key(tmp_path: Path) -> None:
    path = tmp_path / "m.h5"
    write_adaptive_h5(path, {1: 3})
    with h5py.File(path, "a") as f:
        del f["spatial_features"]
    with pytest.raises(DataError, match=r"missing dataset.*spatial_features"):
        FeatureStore(path)


def test_pos_boxes_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    write_adaptive_h5(path, {1: 3, 2: 4})
    with h5py.File(path, "a") as f:
        f["pos_boxes"][1] = [3, 99]
    with pytest.raises(DataError, match=r"pos_boxes\[1\] = \[3, 99\]"):
        FeatureStore(path)


def test_image_missing_from_the_features(adaptive: tuple[Path, dict]) -> None:
    with pytest.raises(DataError, match="image 4242 is not in the features file"):
        FeatureStore(adaptive[0]).get(4242)


def test_missing_id_map(tmp_path: Path) -> None:
    path = tmp_path / "noid.h5"
    write_adaptive_h5(path, {1: 3}, id_map="none")
    with pytest.raises(DataError, match="no image id map"):
        FeatureStore(path)


def test_id_map_pointing_past_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    write_adaptive_h5(path, {1: 3})
    (tmp_path / "x_imgid2idx.pkl").write_bytes(pickle.dumps({1: 0, 2: 5}))
    with pytest.raises(DataError, match="image 2 to index 5"):
        FeatureStore(path)


def test_a_pickle_that_is_not_plain_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil_imgid2idx.pkl"
    path.write_bytes(pickle.dumps({1: Path("x")}))
    with pytest.raises(DataError, match="cannot read the image id map"):
        read_id_map(path)


def test_no_handle_is_held_until_a_read_and_reads_take_no_file_lock(
    adaptive: tuple[Path, dict], h5py_opens: list[dict[str, object]]
) -> None:
    path, boxes = adaptive
    store = FeatureStore(path)
    assert store._handle is None, "a process that forks loader workers next must hold no HDF5 handle"
    store.get(next(iter(boxes)))
    assert store._handle is not None
    assert h5py_opens and all(kwargs.get("locking") is False for kwargs in h5py_opens)


def test_loader_workers_fork_from_a_process_without_open_files(tiny_demo: Path) -> None:
    from isubg.data.loaders import make_batches, open_split
    from isubg.resolve import resolve_config

    data = tiny_demo / "processed" / "gqa"
    cfg = resolve_config("demo", sets=["data.num_workers=2", "batch_size=8"]).config
    dataset = open_split(cfg, data, "val", 16)
    dataset[0]  # a read in this process (as validation without workers does) opens the features file
    assert dataset.features._handle is not None
    batches = list(make_batches(dataset, cfg, epoch=0, train=False))
    assert dataset.features._handle is None and sum(len(b) for b in batches) == 16


# -------------------------------------------------------------------------------------------------
# Several files: FeatureShards


@pytest.fixture
def shards(tmp_path: Path) -> tuple[list[Path], dict[str, np.ndarray]]:
    """Two shards in the two reference layouts: adaptive (1001-1003, objects_conf and objects_id) and fixed-36
    (42, 43, objects_id only); each image's stored features by id."""
    adaptive, fixed = tmp_path / "train.hdf5", tmp_path / "val36.hdf5"
    feats = {str(k): v for k, v in write_adaptive_h5(adaptive, COUNTS).items()}
    rows = sum(COUNTS.values())
    with h5py.File(adaptive, "a") as f:
        f.create_dataset("objects_conf", data=np.linspace(0, 1, rows, dtype=np.float32)[::-1].copy())
        f.create_dataset("objects_id", data=np.arange(rows, dtype=np.int64))
    values = write_fixed_h5(fixed, [42, 43], seed=1)
    with h5py.File(fixed, "a") as f:
        f.create_dataset("objects_id", data=np.arange(2 * 36, dtype=np.int64).reshape(2, 36))
    feats.update({"42": values[0], "43": values[1]})
    return [adaptive, fixed], feats


def _same(a: ImageBoxes, b: ImageBoxes) -> None:
    for name in ("features", "boxes", "spatials", "labels", "attributes", "label_conf", "attribute_conf"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.total == b.total


@pytest.mark.parametrize("in_memory", [False, True])
def test_shards_read_as_one_store_with_each_file_s_own_reads(shards: tuple[list[Path], dict], in_memory: bool) -> None:
    paths, feats = shards
    store = open_features(paths, max_boxes=50, in_memory=in_memory)
    assert isinstance(store, FeatureShards) and store.paths == tuple(paths)
    assert len(store) == 5 and store.num_images == 5 and store.feature_dim == 8
    assert store.layout == "adaptive+fixed" and store.layouts == ("adaptive", "fixed")
    assert store.image_ids == ["1001", "1002", "1003", "42", "43"]
    assert 1002 in store and "43" in store and 7 not in store
    assert store.optional == ("objects_id",)  # objects_conf is in one shard only
    assert not store.has_image_size and store.image_size(42) is None
    singles = [FeatureStore(p, max_boxes=50) for p in paths]
    for single in singles:
        # A single file read without the datasets the other shard lacks: what the shards must give.
        single.optional = ("objects_id",)
        for image_id in single.image_ids:
            _same(store.get(image_id), single.get(image_id))
            assert store.num_boxes(image_id) == single.num_boxes(image_id)
    # 1002 has 60 boxes: without confidences in every shard, the first 50 are kept, not the most confident.
    np.testing.assert_array_equal(store.get(1002).features, feats["1002"][:50])
    assert store.get(1002).label_conf is None
    np.testing.assert_array_equal(store.get("42").features, feats["42"][:36])
    store.close()


def test_shards_keep_the_optional_datasets_every_file_has(tmp_path: Path) -> None:
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_adaptive_h5(a, {1: 6})
    write_adaptive_h5(b, {2: 6}, seed=1)
    conf = np.array([0.1, 0.9, 0.5, 0.8, 0.2, 0.7], dtype=np.float32)
    for path in (a, b):
        with h5py.File(path, "a") as f:
            f.create_dataset("objects_conf", data=conf)
            f.create_dataset("image_size", data=np.array([[640, 480]], dtype=np.float32))
    store = open_features([a, b], max_boxes=3)
    assert store.optional == ("objects_conf",) and store.has_image_size and store.image_size(2) == (640.0, 480.0)
    np.testing.assert_array_equal(store.get(2).label_conf, conf[[1, 3, 5]])  # the confidence rule, in shard b


def test_one_path_opens_a_plain_store(adaptive: tuple[Path, dict]) -> None:
    path, _ = adaptive
    assert type(open_features(path)) is FeatureStore and type(open_features([path])) is FeatureStore
    assert FeatureStore(path).paths == (path,)
    with pytest.raises(DataError, match="no features file given"):
        FeatureShards([])


def test_an_image_in_two_shards_is_refused_naming_it_and_both_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_adaptive_h5(a, {1: 3, 2: 4, 3: 5})
    write_adaptive_h5(b, {9: 3, 3: 2, 2: 2})
    with pytest.raises(DataError, match=r"image 2 is in both .*a\.h5 and .*b\.h5 \(2 image id\(s\) in both\)"):
        open_features([a, b])


def test_a_file_given_twice_is_refused(adaptive: tuple[Path, dict]) -> None:
    path, _ = adaptive
    with pytest.raises(DataError, match=r"train\.hdf5: the features file is given twice"):
        open_features([path, path.parent / "." / path.name])


def test_shards_of_different_feature_dimensions_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.h5", tmp_path / "b36.h5"
    write_adaptive_h5(a, {1: 3})
    write_fixed_h5(b, [2], dim=16)
    with pytest.raises(DataError, match=r"b36\.h5 has 16-d features but .*a\.h5 has 8-d"):
        open_features([a, b])


def test_a_missing_image_names_every_shard(shards: tuple[list[Path], dict]) -> None:
    paths, _ = shards
    with pytest.raises(DataError, match=r"image 4242 is not in the features files .*train\.hdf5, .*val36\.hdf5"):
        open_features(paths).get(4242)


class _Reads:
    """A map-style dataset of (feature sum, reading pid) per image; module level so spawn can pickle it."""

    def __init__(self, store: FeatureShards, ids: list[str]) -> None:
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[float, int]:
        return float(self.store.get(self.ids[i]).features.sum()), os.getpid()


def test_shards_pickle_and_forked_workers_read_both_files(shards: tuple[list[Path], dict]) -> None:
    torch = pytest.importorskip("torch")
    paths, feats = shards
    store = open_features(paths)
    store.get(1001), store.get(42)  # handles open in this process, in both shards
    clone = pickle.loads(pickle.dumps(store))
    assert all(s._handle is None for s in clone._stores)
    np.testing.assert_array_equal(clone.get(43).features, feats["43"])
    ids = list(feats)
    for context in ("fork", "spawn"):  # spawn pickles the store to each worker
        loader = torch.utils.data.DataLoader(
            _Reads(store, ids), num_workers=2, batch_size=None, multiprocessing_context=context
        )
        sums, pids = zip(*loader, strict=True)
        assert list(sums) == pytest.approx([float(feats[i].sum()) for i in ids], rel=1e-5)
        assert os.getpid() not in pids


def test_manifest_entries_old_and_new_name_the_files() -> None:
    assert recorded_paths({"path": "/d/f.h5", "bytes": 3}) == [Path("/d/f.h5")]
    assert recorded_paths({"path": "/d/a.h5", "paths": ["/d/a.h5"]}) == [Path("/d/a.h5")]
    assert recorded_paths({"paths": ["/d/a.h5", "/d/b.h5"]}) == [Path("/d/a.h5"), Path("/d/b.h5")]
    with pytest.raises(DataError, match="names no file"):
        recorded_paths({"bytes": 3})
