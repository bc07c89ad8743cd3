"""Writers for small data files in the exact real formats, independent of isubg's own writers.

Tests use them to check that isubg reads what the reference tools and official releases produce,
not only what isubg itself writes.
"""

from __future__ import annotations

import base64
import pickle
from pathlib import Path

import h5py
import numpy as np


def boxes_for(n: int, width: float, height: float, rng: np.random.Generator) -> np.ndarray:
    """n random pixel boxes x1, y1, x2, y2 inside a width x height image."""
    x1 = rng.uniform(0, width * 0.6, n)
    y1 = rng.uniform(0, height * 0.6, n)
    return np.stack([x1, y1, x1 + rng.uniform(5, width * 0.4, n), y1 + rng.uniform(5, height * 0.4, n)], 1).astype(
        np.float32
    )


def spatial(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    x1, y1, x2, y2 = boxes.T
    return np.stack([x1 / width, y1 / height, x2 / width, y2 / height, (x2 - x1) / width, (y2 - y1) / height], 1)


def write_adaptive_h5(
    path: Path,
    counts: dict[int, int],
    dim: int = 8,
    seed: int = 0,
    dtype: str = "f",
    id_map: str = "pkl",
) -> dict[int, np.ndarray]:
    """The reference adaptive layout (adaptive_detection_features_converter.py): float32 datasets,
    int32 pos_boxes, and a pickled {int image_id: idx} `<stem>_imgid2idx.pkl` beside the file.

    Returns each image's features so tests can compare exactly.
    """
    rng = np.random.default_rng(seed)
    total = sum(counts.values())
    feats: dict[int, np.ndarray] = {}
    with h5py.File(path, "w") as f:
        image_features = f.create_dataset("image_features", (total, dim), dtype)
        image_bb = f.create_dataset("image_bb", (total, 4), "f")
        spatial_features = f.create_dataset("spatial_features", (total, 6), "f")
        pos_boxes = f.create_dataset("pos_boxes", (len(counts), 2), dtype="int32")
        row = 0
        for idx, (image_id, n) in enumerate(counts.items()):
            values = rng.standard_normal((n, dim)).astype(np.float32)
            boxes = boxes_for(n, 640, 480, rng)
            image_features[row : row + n] = values
            image_bb[row : row + n] = boxes
            spatial_features[row : row + n] = spatial(boxes, 640, 480)
            pos_boxes[idx] = [row, row + n]
            feats[image_id] = values
            row += n
    mapping = {image_id: idx for idx, image_id in enumerate(counts)}
    if id_map == "pkl":
        path.with_name(path.stem + "_imgid2idx.pkl").write_bytes(pickle.dumps(mapping))
    return feats


def write_fixed_h5(path: Path, image_ids: list[int], k: int = 36, dim: int = 8, seed: int = 0) -> np.ndarray:
    """The reference fixed-36 layout (detection_features_converter.py) with its id pickle."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((len(image_ids), k, dim)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("image_features", data=values)
        boxes = np.stack([boxes_for(k, 500, 400, rng) for _ in image_ids])
        f.create_dataset("image_bb", data=boxes)
        f.create_dataset("spatial_features", data=np.stack([spatial(b, 500, 400) for b in boxes]).astype(np.float32))
    path.with_name(path.stem + "_imgid2idx.pkl").write_bytes(pickle.dumps({i: n for n, i in enumerate(image_ids)}))
    return values


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def tsv_line(image_id: int, n: int, dim: int, rng: np.random.Generator, labels: bool = False) -> tuple[str, dict]:
    """One bottom-up-attention TSV row (generate_tsv.py field order) and the arrays it encodes."""
    boxes = boxes_for(n, 800, 600, rng)
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    fields = [str(image_id), "800", "600", str(n), b64(boxes), b64(feats)]
    arrays = {"boxes": boxes, "features": feats}
    if labels:
        arrays["objects_id"] = rng.integers(0, 1600, n).astype(np.int64)
        arrays["objects_conf"] = rng.uniform(0, 1, n).astype(np.float32)
        arrays["attrs_id"] = rng.integers(0, 400, n).astype(np.int64)
        arrays["attrs_conf"] = rng.uniform(0, 1, n).astype(np.float32)
        fields += [b64(arrays[k]) for k in ("objects_id", "objects_conf", "attrs_id", "attrs_conf")]
    return "\t".join(fields), arrays


def split_adaptive_h5(source: Path, shards: dict[Path, list[str]], scale: dict[Path, float] | None = None) -> None:
    """Write each shard as an adaptive file (with `image_ids`, as `isubg data convert-features` does) holding
    the listed images of `source`, an adaptive file with an `image_ids` dataset. Per-box datasets (every
    dataset with one row per box) and per-image ones (`image_ids`, `image_size`) are carried over;
    `scale[shard]` multiplies that shard's image_features, so a test can tell which shard a read came from.
    """
    with h5py.File(source, "r", locking=False) as f:  # the store under test may hold it open
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in f["image_ids"][()]]
        pos, rows = f["pos_boxes"][()], f["image_features"].shape[0]
        per_box = {k: f[k][()] for k in f if k != "pos_boxes" and f[k].shape[0] == rows}
        per_image = {k: f[k][()] for k in ("image_size",) if k in f}
    index = {image_id: i for i, image_id in enumerate(ids)}
    for shard, images in shards.items():
        picks = [index[i] for i in images]
        ranges = [np.arange(*pos[i]) for i in picks]
        counts = np.cumsum([0, *(len(r) for r in ranges)])
        box_rows = np.concatenate(ranges)
        with h5py.File(shard, "w") as out:
            for key, values in per_box.items():
                data = values[box_rows]
                if key == "image_features" and scale and shard in scale:
                    data = (data * scale[shard]).astype(values.dtype)
                out.create_dataset(key, data=data)
            if "image_size" in per_image:
                out.create_dataset("image_size", data=per_image["image_size"][picks])
            out.create_dataset("image_ids", data=np.asarray(images, dtype=h5py.string_dtype()))
            out.create_dataset("pos_boxes", data=np.stack([counts[:-1], counts[1:]], 1).astype(np.int32))
