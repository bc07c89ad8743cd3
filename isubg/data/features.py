"""Read per-image box features from HDF5, lazily and safely across DataLoader workers.

Two layouts are understood, both as written by the bottom-up-attention converters:

adaptive (10-100 boxes per image; one row per box, images stacked)
    image_features   (N_boxes, D) float32 or float16
    image_bb         (N_boxes, 4) pixel x1, y1, x2, y2
    spatial_features (N_boxes, 6) x1/W, y1/H, x2/W, y2/H, w/W, h/H
    pos_boxes        (N_images, 2) int32 [start, end) row range of image index i
fixed (the "36 boxes" release)
    image_features   (N_images, K, D), image_bb (N_images, K, 4), spatial_features (N_images, K, 6)

Optional per-box datasets written by `isubg data convert-features` when the TSV had them:
`objects_id`, `objects_conf`, `attrs_id`, `attrs_conf` (N_boxes,). Optional per-image: `image_size`
(N_images, 2) as (W, H).

The image id -> index map is found, in this order: an explicit `id_map` path; an `image_ids` dataset
inside the file (index i holds image i's id); a file beside it named `<stem>_imgid2idx.json` (our
converter's) or `<stem>_imgid2idx.pkl` (the reference converters' pickle, read with an unpickler
that only accepts plain dicts, ints and strings). Ids are always handled as strings: GQA ids are
strings and VQA ids are ints, and one type avoids silent misses.

**Box limit rule.** When an image has more than `max_boxes` boxes, the most confident `max_boxes`
are kept if the file carries detector confidences (`objects_conf`), in their stored order;
otherwise the first `max_boxes` rows in stored order are kept, which is what BAN and CFR do (the
bottom-up extractor stores boxes in RPN order, so that is not a confidence ranking).

**Shards.** GQA and VQA box features often come as several files (per split or per shard).
`open_features` opens one path as a `FeatureStore` and several as a `FeatureShards`, which reads them as
one store: one image-id map spanning every file (an id may be in one file only), one feature dimension.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from isubg.errors import DataError

__all__ = ["FeatureShards", "FeatureStore", "ImageBoxes", "open_features", "read_id_map", "recorded_paths"]

_REQUIRED = ("image_features", "image_bb", "spatial_features")
_OPTIONAL_PER_BOX = ("objects_id", "objects_conf", "attrs_id", "attrs_conf")


@dataclass(frozen=True)
class ImageBoxes:
    """The boxes of one image after the `max_boxes` rule; n <= max_boxes rows everywhere.

    Attributes:
        features: (n, D) float32 region features.
        boxes: (n, 4) float32 pixel boxes x1, y1, x2, y2.
        spatials: (n, 6) float32 normalised x1, y1, x2, y2, w, h.
        labels: (n,) int64 detector class ids, or None when the file has no `objects_id`.
        attributes: (n,) int64 detector attribute ids, or None when the file has no `attrs_id`.
        total: how many boxes the image had before the limit.
        label_conf: (n,) float32 confidence of each label, or None when the file has no `objects_conf`.
        attribute_conf: (n,) float32 confidence of each attribute, or None when the file has no `attrs_conf`.
    """

    features: np.ndarray
    boxes: np.ndarray
    spatials: np.ndarray
    labels: np.ndarray | None
    attributes: np.ndarray | None
    total: int
    label_conf: np.ndarray | None = None
    attribute_conf: np.ndarray | None = None


class _SafeUnpickler(pickle.Unpickler):
    # The reference id maps are pickled dicts of int/str; anything else in a pickle could run code.
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain dicts of ids are accepted")


def read_id_map(path: Path) -> dict[str, int]:
    """Read an image-id -> index map from `*_imgid2idx.json` or the reference `*_imgid2idx.pkl`.

    Raises:
        DataError: unreadable file, or not a mapping of ids to non-negative integers.
    """
    try:
        raw = path.read_bytes()
        data = json.loads(raw) if path.suffix == ".json" else _SafeUnpickler(io.BytesIO(raw)).load()
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the image id map ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, int) and v >= 0 for v in data.values()):
        raise DataError(f"{path}: expected a mapping of image id -> row index (non-negative integers)")
    return {str(k): v for k, v in data.items()}


def _find_id_map(path: Path, handle: h5py.File, id_map: Path | None) -> dict[str, int]:
    if id_map is not None:
        return read_id_map(id_map)
    if "image_ids" in handle:
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in handle["image_ids"][()]]
        return {image_id: i for i, image_id in enumerate(ids)}
    for suffix in ("_imgid2idx.json", "_imgid2idx.pkl"):
        beside = path.with_name(path.stem + suffix)
        if beside.exists():
            return read_id_map(beside)
    raise DataError(
        f"{path}: no image id map: the file has no 'image_ids' dataset and neither "
        f"{path.stem}_imgid2idx.json nor {path.stem}_imgid2idx.pkl is beside it"
    )


class FeatureStore:
    """Box features of many images, read one image at a time.

    The HDF5 handle is opened on first use in each process and reopened after a fork, so a store
    built in the main process can be handed to DataLoader workers: each worker gets its own handle.
    With `in_memory=True` every array is read into RAM once at construction instead.

    Args:
        path: the HDF5 file (adaptive or fixed layout).
        max_boxes: keep at most this many boxes per image (see the module docstring); None keeps all.
        in_memory: read the whole file into RAM up front.
        id_map: an explicit image-id map file (JSON or the reference pickle).

    Raises:
        DataError: not an HDF5 file, truncated, missing datasets, inconsistent shapes, `pos_boxes`
            out of range, or no id map; every message names the file and the dataset or record.
    """

    def __init__(
        self, path: str | Path, *, max_boxes: int | None = None, in_memory: bool = False, id_map: Path | None = None
    ) -> None:
        self.path = Path(path)
        self.max_boxes = max_boxes
        self.in_memory = in_memory
        self._handle: h5py.File | None = None
        self._pid: int | None = None
        self._datasets: dict[str, Any] = {}
        handle = self._open()
        try:
            self.layout = self._check_layout(handle)
            self._id_to_index = _find_id_map(self.path, handle, id_map)
            self.feature_dim = int(handle["image_features"].shape[-1])
            self.optional = tuple(k for k in _OPTIONAL_PER_BOX if k in handle)
            self.has_image_size = "image_size" in handle
            num_images = self._load_index(handle)
            self._check_id_map(num_images)
            self._arrays: dict[str, np.ndarray] | None = None
            if in_memory:
                keys = (*_REQUIRED, *self.optional, *(("image_size",) if self.has_image_size else ()))
                self._arrays = {k: handle[k][()] for k in keys}
        except (OSError, KeyError) as exc:
            raise DataError(f"{self.path}: cannot read the features file ({exc})") from None
        finally:
            # Closed either way: a lazy store reopens on its first read, so a process that forks DataLoader
            # workers before reading holds no HDF5 handle across the fork (HDF5 is not fork-safe).
            self.close()

    @property
    def paths(self) -> tuple[Path, ...]:
        """The one file, as a tuple (what `FeatureShards.paths` gives for several)."""
        return (self.path,)

    # ---------------------------------------------------------------------------------------------
    # Opening and checking

    def _open(self) -> h5py.File:
        """The process-local handle; a fork (a DataLoader worker) gets a fresh one."""
        if self._handle is None or self._pid != os.getpid():
            if not self.path.exists():
                raise DataError(f"{self.path}: no such features file")
            try:
                # locking=False: a read-only open needs no lock, and HDF5's file locks fail on some network
                # file systems (NFS, Lustre) with "unable to lock file" even for readers.
                self._handle = h5py.File(self.path, "r", locking=False)
            except OSError as exc:
                raise DataError(
                    f"{self.path}: not a readable HDF5 file (truncated or another format?): {exc}"
                ) from None
            self._pid = os.getpid()
        return self._handle

    def _check_layout(self, handle: h5py.File) -> str:
        missing = [k for k in _REQUIRED if k not in handle]
        if missing:
            raise DataError(f"{self.path}: missing dataset(s) {', '.join(missing)}; found {', '.join(handle)}")
        feats = handle["image_features"]
        if feats.dtype.kind != "f":
            raise DataError(f"{self.path}: image_features has dtype {feats.dtype}; expected float32 or float16")
        if feats.ndim == 3:
            expect = {"image_bb": (*feats.shape[:2], 4), "spatial_features": (*feats.shape[:2], 6)}
            layout = "fixed"
        elif feats.ndim == 2:
            if "pos_boxes" not in handle:
                raise DataError(f"{self.path}: 2-D image_features need a 'pos_boxes' dataset (adaptive layout)")
            expect = {"image_bb": (feats.shape[0], 4), "spatial_features": (feats.shape[0], 6)}
            layout = "adaptive"
        else:
            raise DataError(f"{self.path}: image_features has {feats.ndim} dimensions; expected 2 or 3")
        for key, shape in expect.items():
            if handle[key].shape != shape:
                raise DataError(f"{self.path}: {key} has shape {handle[key].shape}, expected {shape}")
        for key in _OPTIONAL_PER_BOX:
            if key in handle and handle[key].shape[0] != feats.shape[0]:
                raise DataError(f"{self.path}: {key} has {handle[key].shape[0]} rows, image_features {feats.shape[0]}")
        return layout

    def _load_index(self, handle: h5py.File) -> int:
        """Read `pos_boxes` (adaptive) and check every row range; return the image count."""
        if self.layout == "fixed":
            self._pos = None
            return int(handle["image_features"].shape[0])
        pos = np.asarray(handle["pos_boxes"][()], dtype=np.int64)
        rows = handle["image_features"].shape[0]
        if pos.ndim != 2 or pos.shape[1] != 2:
            raise DataError(f"{self.path}: pos_boxes has shape {pos.shape}, expected (images, 2)")
        bad = np.flatnonzero((pos[:, 0] < 0) | (pos[:, 1] > rows) | (pos[:, 0] >= pos[:, 1]))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{self.path}: pos_boxes[{i}] = {pos[i].tolist()} is not a non-empty range inside the "
                f"{rows} feature rows ({bad.size} bad image(s) in all)"
            )
        self._pos = pos
        return int(pos.shape[0])

    def _check_id_map(self, num_images: int) -> None:
        self.num_images = num_images
        bad = [(k, v) for k, v in self._id_to_index.items() if v >= num_images]
        if bad:
            raise DataError(
                f"{self.path}: the id map sends image {bad[0][0]} to index {bad[0][1]}, "
                f"but the file holds {num_images} images"
            )

    # ---------------------------------------------------------------------------------------------
    # Reading

    def __len__(self) -> int:
        return len(self._id_to_index)

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._id_to_index

    @property
    def image_ids(self) -> list[str]:
        """Every image id in the file, in index order."""
        return sorted(self._id_to_index, key=self._id_to_index.__getitem__)

    def num_boxes(self, image_id: str) -> int:
        """Boxes stored for an image, before the `max_boxes` rule."""
        index = self._index(image_id)
        if self._pos is None:
            return int(self._source("image_features").shape[1])
        start, end = self._pos[index]
        return int(end - start)

    def _index(self, image_id: object) -> int:
        try:
            return self._id_to_index[str(image_id)]
        except KeyError:
            raise DataError(f"{self.path}: image {image_id} is not in the features file") from None

    def _source(self, key: str) -> Any:
        if self._arrays is not None:
            return self._arrays[key]
        handle = self._open()
        # Looking a dataset up by name costs about as much as reading 50 boxes; keep the objects per handle.
        if self._datasets.get("__handle__") is not handle:
            self._datasets = {"__handle__": handle}
        if key not in self._datasets:
            self._datasets[key] = handle[key]
        return self._datasets[key]

    def _read(self, key: str, index: int) -> np.ndarray:
        if self._pos is None:
            return np.asarray(self._source(key)[index])
        start, end = self._pos[index]
        return np.asarray(self._source(key)[start:end])

    def get(self, image_id: object) -> ImageBoxes:
        """The boxes of one image, limited by `max_boxes`.

        Raises:
            DataError: the image id is not in the file.
        """
        index = self._index(image_id)
        features = self._read("image_features", index)
        total = features.shape[0]
        keep = self._keep(index, total)
        extra = {k: self._read(k, index)[keep] for k in self.optional}
        return ImageBoxes(
            features=features[keep].astype(np.float32, copy=False),
            boxes=self._read("image_bb", index)[keep].astype(np.float32, copy=False),
            spatials=self._read("spatial_features", index)[keep].astype(np.float32, copy=False),
            labels=extra["objects_id"].astype(np.int64) if "objects_id" in extra else None,
            attributes=extra["attrs_id"].astype(np.int64) if "attrs_id" in extra else None,
            total=total,
            label_conf=extra["objects_conf"].astype(np.float32) if "objects_conf" in extra else None,
            attribute_conf=extra["attrs_conf"].astype(np.float32) if "attrs_conf" in extra else None,
        )

    def _keep(self, index: int, total: int) -> slice | np.ndarray:
        if self.max_boxes is None or total <= self.max_boxes:
            return slice(None)
        if "objects_conf" in self.optional:
            conf = self._read("objects_conf", index)
            # Stable sort so equal confidences keep stored order; the kept rows stay in stored order.
            top = np.argsort(-conf, kind="stable")[: self.max_boxes]
            return np.sort(top)
        return slice(0, self.max_boxes)

    def image_size(self, image_id: object) -> tuple[float, float] | None:
        """(width, height) in pixels when the file records it, else None."""
        if not self.has_image_size:
            return None
        w, h = self._source("image_size")[self._index(image_id)]
        return float(w), float(h)

    def close(self) -> None:
        """Close this process's handle (reopened on the next read)."""
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None
        self._pid = None
        self._datasets = {}

    def __getstate__(self) -> dict[str, Any]:
        # An h5py handle cannot cross a process boundary; the receiving process opens its own.
        state = self.__dict__.copy()
        state.update(_handle=None, _pid=None, _datasets={})
        return state

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: h5py may already be gone
            self.close()


def _restrict(store: FeatureStore, optional: tuple[str, ...], has_image_size: bool) -> None:
    """Make `store` read as if it held only the `optional` datasets (and `image_size` when `has_image_size`)."""
    store.optional = optional
    store.has_image_size = has_image_size
    if store._arrays is not None:  # in_memory: drop what is no longer read
        kept = {*optional, *(("image_size",) if has_image_size else ())}
        for key in {*_OPTIONAL_PER_BOX, "image_size"} - kept:
            store._arrays.pop(key, None)


class FeatureShards:
    """Several feature files read as one `FeatureStore`: the same public interface, one id map over all files.

    Each file is a `FeatureStore` of its own (its own id map, lazy per-process handle opened with
    `locking=False`, closed before a fork), so pickling this object to a DataLoader worker and reading there is
    as safe as with one file. An image id is looked up in O(1) through one dict from id to shard number whose
    keys are the shards' own id strings (not copies); the per-shard maps are not duplicated.

    Rules across shards:
        - every shard has the same `feature_dim` (their dtypes may differ: reads are float32 anyway);
        - an image id is in one shard only;
        - `optional` holds the optional per-box datasets (objects_id, objects_conf, attrs_id, attrs_conf) present
          in EVERY shard, and `has_image_size` is true only when every shard has `image_size`. A dataset some
          shard lacks is ignored in all of them, so every image follows the same rules: `get` fills the same
          fields for every image, and the `max_boxes` rule ranks by `objects_conf` everywhere or nowhere;
        - layouts may differ: `layouts` lists each shard's, `layout` is the distinct ones in shard order joined
          by "+" ("adaptive", or e.g. "adaptive+fixed").

    Args:
        paths: two or more HDF5 files (a single file works too, but `open_features` gives a FeatureStore then).
        max_boxes: keep at most this many boxes per image; None keeps all.
        in_memory: read every file into RAM up front.

    Attributes:
        path: the files joined by " + ", for messages only; `paths` holds the files.

    Raises:
        DataError: no file, a file given twice, any error a `FeatureStore` raises, different feature
            dimensions, or an image id in two files; the message names both files (and the id).
    """

    def __init__(self, paths: Sequence[str | Path], *, max_boxes: int | None = None, in_memory: bool = False) -> None:
        self.paths = tuple(Path(p) for p in paths)
        if not self.paths:
            raise DataError("no features file given")
        seen: dict[Path, Path] = {}
        for path in self.paths:
            if path.resolve() in seen:
                raise DataError(f"{path}: the features file is given twice (also as {seen[path.resolve()]})")
            seen[path.resolve()] = path
        self.path = " + ".join(str(p) for p in self.paths)
        self.max_boxes, self.in_memory = max_boxes, in_memory
        self._stores = [FeatureStore(p, max_boxes=max_boxes, in_memory=in_memory) for p in self.paths]
        first = self._stores[0]
        for store in self._stores[1:]:
            if store.feature_dim != first.feature_dim:
                raise DataError(
                    f"{store.path} has {store.feature_dim}-d features but {first.path} has {first.feature_dim}-d; "
                    "every features file must have the same feature dimension"
                )
        self.feature_dim = first.feature_dim
        self._owner = self._id_owners()
        self.layouts = tuple(s.layout for s in self._stores)
        self.layout = "+".join(dict.fromkeys(self.layouts))
        self.optional = tuple(k for k in _OPTIONAL_PER_BOX if all(k in s.optional for s in self._stores))
        self.has_image_size = all(s.has_image_size for s in self._stores)
        for store in self._stores:
            _restrict(store, self.optional, self.has_image_size)
        self.num_images = sum(s.num_images for s in self._stores)

    def _id_owners(self) -> dict[str, int]:
        """Image id -> shard number, refusing an id that two shards hold."""
        owner: dict[str, int] = {}
        for number, store in enumerate(self._stores):
            ids = store._id_to_index.keys()
            clash = ids & owner.keys()  # a set operation: linear in the ids, not per-id Python work
            if clash:
                image = min(clash)
                raise DataError(
                    f"image {image} is in both {self._stores[owner[image]].path} and {store.path} "
                    f"({len(clash)} image id(s) in both); an image may be in one features file only"
                )
            owner.update(dict.fromkeys(ids, number))  # the keys are the shard's own strings, shared, not copied
        return owner

    def _store(self, image_id: object) -> FeatureStore:
        try:
            return self._stores[self._owner[str(image_id)]]
        except KeyError:
            raise DataError(
                f"image {image_id} is not in the features files {', '.join(map(str, self.paths))}"
            ) from None

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._owner

    @property
    def image_ids(self) -> list[str]:
        """Every image id, shard by shard in the order of `paths`, each shard in index order."""
        return [image_id for store in self._stores for image_id in store.image_ids]

    def num_boxes(self, image_id: str) -> int:
        """Boxes stored for an image, before the `max_boxes` rule."""
        return self._store(image_id).num_boxes(image_id)

    def get(self, image_id: object) -> ImageBoxes:
        """The boxes of one image, limited by `max_boxes` (see `FeatureStore.get`).

        Raises:
            DataError: the image id is in none of the files.
        """
        return self._store(image_id).get(image_id)

    def image_size(self, image_id: object) -> tuple[float, float] | None:
        """(width, height) in pixels when every file records it, else None."""
        return self._store(image_id).image_size(image_id)

    def close(self) -> None:
        """Close this process's handles (reopened on the next read)."""
        for store in self._stores:
            store.close()


def open_features(
    paths: str | Path | Sequence[str | Path], *, max_boxes: int | None = None, in_memory: bool = False
) -> FeatureStore | FeatureShards:
    """Open box features from one file (a `FeatureStore`) or several (a `FeatureShards`).

    A one-element sequence opens a plain `FeatureStore`.

    Raises:
        DataError: as `FeatureStore` and `FeatureShards`; an empty sequence.
    """
    if isinstance(paths, (str, Path)):
        return FeatureStore(paths, max_boxes=max_boxes, in_memory=in_memory)
    if len(paths) == 1:
        return FeatureStore(paths[0], max_boxes=max_boxes, in_memory=in_memory)
    return FeatureShards(paths, max_boxes=max_boxes, in_memory=in_memory)


def recorded_paths(entry: Mapping[str, Any]) -> list[Path]:
    """The features files a processed folder's manifest records: its "features" entry's "paths", or "path" (the
    one file, in folders prepared before "paths" was written).

    Raises:
        DataError: the entry names no file.
    """
    paths = entry.get("paths") or ([entry["path"]] if entry.get("path") else [])
    if not paths:
        raise DataError(f"the manifest's features entry names no file: {dict(entry)}")
    return [Path(p) for p in paths]
