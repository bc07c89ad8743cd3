"""FeatureStore on files written by hand in the reference layouts, and its errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from datafiles import write_adaptive_h5, write_fixed_h5

from isubg.data.features import FeatureStore, read_id_map
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
    adaptive: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    import isubg.data.features as features

    opened: list[dict] = []
    real = h5py.File

    def spy(*args: object, **kwargs: object) -> h5py.File:
        opened.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(features.h5py, "File", spy)
    path, boxes = adaptive
    store = FeatureStore(path)
    assert store._handle is None, "a process that forks loader workers next must hold no HDF5 handle"
    store.get(next(iter(boxes)))
    assert store._handle is not None
    assert opened and all(kwargs.get("locking") is False for kwargs in opened)


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
