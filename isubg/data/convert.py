"""Convert bottom-up-attention TSV files into the adaptive HDF5 layout, streaming with bounded memory.

Input rows (tab-separated, no header, as `generate_tsv.py` writes them):
    image_id, image_w, image_h, num_boxes, boxes, features [, objects_id, objects_conf, attrs_id, attrs_conf]
where `boxes` is base64 of float32 (num_boxes, 4) pixel x1, y1, x2, y2, `features` base64 of float32
(num_boxes, D), and the optional label fields base64 of int64 ids / float32 confidences (num_boxes,).

Output: the adaptive layout read by `isubg.data.features.FeatureStore` (image_features, image_bb,
spatial_features, pos_boxes) plus `image_ids` and `image_size` datasets, the label datasets when every
row had them, and the id map `<stem>_imgid2idx.json` beside the file. Rows are appended one at a time
to chunked, resizable datasets, so memory does not grow with the input. Everything is written under a
temporary name and renamed at the end: an interrupted or failed conversion never leaves a half file
where a good one was.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from isubg.data.files import write_json_atomic
from isubg.errors import DataError

__all__ = ["ConvertReport", "TsvRow", "convert_tsv", "iter_tsv_rows", "parse_tsv_row"]

FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LABEL_DTYPES = {"objects_id": np.int64, "objects_conf": np.float32, "attrs_id": np.int64, "attrs_conf": np.float32}


@dataclass
class TsvRow:
    """One decoded TSV row."""

    image_id: str
    width: float
    height: float
    boxes: np.ndarray  # (n, 4) float32 pixels
    features: np.ndarray  # (n, D) float32
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # optional per-box fields, (n,)

    def spatials(self) -> np.ndarray:
        """(n, 6) float32: x1/W, y1/H, x2/W, y2/H, w/W, h/H, as the reference converters compute them."""
        x1, y1, x2, y2 = self.boxes.T
        w, h = self.width, self.height
        return np.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w, (y2 - y1) / h], axis=1).astype(np.float32)


def _decode(text: str, dtype: type, count: int, name: str, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: field '{name}' is not valid base64") from None
    itemsize = np.dtype(dtype).itemsize
    if len(raw) != count * itemsize:
        raise DataError(
            f"{where}: field '{name}' decodes to {len(raw)} bytes; {count} {np.dtype(dtype).name} values need "
            f"{count * itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).copy()


def parse_tsv_row(fields: list[str], where: str, feature_dim: int | None = None) -> TsvRow:
    """Decode one row's fields.

    Args:
        fields: the tab-separated fields of the row.
        where: "file:line", used in error messages.
        feature_dim: the expected feature width; None infers it from this row.

    Raises:
        DataError: wrong field count, non-numeric sizes, bad base64 or a byte length that does not
            match num_boxes; the message starts with `where`.
    """
    if len(fields) not in (len(FIELDS), len(FIELDS) + len(LABEL_DTYPES)):
        raise DataError(f"{where}: expected 6 or 10 tab-separated fields, found {len(fields)}")
    image_id = fields[0].strip()
    try:
        width, height, num_boxes = float(fields[1]), float(fields[2]), int(fields[3])
    except ValueError:
        raise DataError(f"{where}: image_w, image_h and num_boxes must be numbers, got {fields[1:4]}") from None
    if not image_id or width <= 0 or height <= 0 or num_boxes <= 0:
        raise DataError(f"{where}: need an image id, a positive size and at least one box (got {fields[:4]})")
    boxes = _decode(fields[4], np.float32, num_boxes * 4, "boxes", where).reshape(num_boxes, 4)
    if feature_dim is None:
        total = len(base64.b64decode(fields[5], validate=False)) // 4
        if total % num_boxes:
            raise DataError(f"{where}: 'features' holds {total} floats, not a multiple of num_boxes={num_boxes}")
        feature_dim = total // num_boxes
    features = _decode(fields[5], np.float32, num_boxes * feature_dim, "features", where)
    labels = {
        name: _decode(text, dtype, num_boxes, name, where)
        for (name, dtype), text in zip(LABEL_DTYPES.items(), fields[len(FIELDS) :], strict=False)
    }
    return TsvRow(image_id, width, height, boxes, features.reshape(num_boxes, feature_dim), labels)


def iter_tsv_rows(path: Path) -> Iterator[tuple[int, int, list[str]]]:
    """Yield (line number, bytes consumed, fields) for each non-empty row; a header line is skipped."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from None
    with handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.decode("ascii", errors="replace").rstrip("\r\n")
            if not text.strip() or (lineno == 1 and text.startswith("image_id\t")):
                yield lineno, len(line), []
                continue
            yield lineno, len(line), text.split("\t")


_BLOCK_ROWS = 4096


class _Writer:
    """Appends rows to resizable HDF5 datasets under a temporary name."""

    def __init__(self, tmp: Path, feature_dim: int, dtype: str, label_names: Sequence[str]) -> None:
        # No file lock: the temporary name is this process's alone, and HDF5's locks fail on some network file
        # systems (NFS, Lustre) with "unable to lock file", where converted features are usually written.
        self.file = h5py.File(tmp, "w", locking=False)
        chunk = 256
        self.sets = {
            "image_features": self.file.create_dataset(
                "image_features",
                (0, feature_dim),
                maxshape=(None, feature_dim),
                dtype=dtype,
                chunks=(chunk, feature_dim),
            ),
            "image_bb": self.file.create_dataset("image_bb", (0, 4), maxshape=(None, 4), dtype="f4", chunks=(chunk, 4)),
            "spatial_features": self.file.create_dataset(
                "spatial_features", (0, 6), maxshape=(None, 6), dtype="f4", chunks=(chunk, 6)
            ),
        }
        for name in label_names:
            self.sets[name] = self.file.create_dataset(
                name, (0,), maxshape=(None,), dtype=LABEL_DTYPES[name], chunks=(chunk,)
            )
        self.feature_dim = feature_dim
        self.label_names = set(label_names)
        self.rows = 0  # rows appended, written or buffered
        self.written = 0
        self.pending: list[dict[str, np.ndarray]] = []
        self.pos: list[tuple[int, int]] = []
        self.ids: list[str] = []
        self.sizes: list[tuple[float, float]] = []

    def append(self, row: TsvRow) -> None:
        n = row.boxes.shape[0]
        values = {"image_features": row.features, "image_bb": row.boxes, "spatial_features": row.spatials()}
        values.update(row.labels)
        self.pending.append(values)
        self.pos.append((self.rows, self.rows + n))
        self.ids.append(row.image_id)
        self.sizes.append((row.width, row.height))
        self.rows += n
        # Resizing and writing per row dominates the cost; a block of ~4k boxes (32 MiB at 2048-d) keeps
        # memory bounded while cutting the HDF5 calls by two orders of magnitude.
        if self.rows - self.written >= _BLOCK_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        for name, dataset in self.sets.items():
            block = np.concatenate([values[name] for values in self.pending])
            dataset.resize(self.rows, axis=0)
            dataset[self.written : self.rows] = block
        self.written = self.rows
        self.pending = []

    def finish(self) -> None:
        self.flush()
        self.file.create_dataset("pos_boxes", data=np.asarray(self.pos, dtype=np.int32).reshape(-1, 2))
        self.file.create_dataset("image_ids", data=np.asarray(self.ids, dtype=h5py.string_dtype()))
        self.file.create_dataset("image_size", data=np.asarray(self.sizes, dtype=np.float32).reshape(-1, 2))
        self.file.attrs["layout"] = "adaptive"
        self.file.attrs["written_by"] = "isubg data convert-features"
        self.file.close()


@dataclass
class ConvertReport:
    """What a conversion did."""

    output: Path
    images: int = 0
    boxes: int = 0
    feature_dim: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" for each row skipped
    seconds: float = 0.0


def convert_tsv(
    sources: Sequence[Path],
    output: Path,
    *,
    skip_bad: bool = False,
    dtype: str = "float32",
    progress: Callable[[int], None] | None = None,
) -> ConvertReport:
    """Convert TSV files into one adaptive HDF5 file plus `<stem>_imgid2idx.json`.

    Args:
        sources: TSV files, read in order.
        output: the HDF5 file to write (replaced only when the conversion succeeds).
        skip_bad: skip malformed rows and duplicate image ids (listed in the report) instead of failing.
        dtype: storage type of image_features, "float32" or "float16" (half the size).
        progress: called with the number of bytes consumed after each row.

    Raises:
        DataError: a malformed row or duplicate id (without `skip_bad`), rows with inconsistent
            feature widths or label fields, or no usable row at all.
    """
    if dtype not in ("float32", "float16"):
        raise DataError(f"dtype must be float32 or float16, got {dtype}")
    start, report = time.perf_counter(), ConvertReport(output=output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    writer: _Writer | None = None
    seen: set[str] = set()
    try:
        for source in sources:
            for lineno, consumed, fields in iter_tsv_rows(source):
                if progress:
                    progress(consumed)
                if not fields:
                    continue
                where = f"{source}:{lineno}"
                try:
                    row = parse_tsv_row(fields, where, writer.feature_dim if writer else None)
                    if row.image_id in seen:
                        raise DataError(f"{where}: image {row.image_id} appears twice")
                    if writer is not None and set(row.labels) != writer.label_names:
                        raise DataError(
                            f"{where}: has label fields {sorted(row.labels)}, the first row had "
                            f"{sorted(writer.label_names)}"
                        )
                except DataError as exc:
                    if not skip_bad:
                        raise
                    report.skipped.append(str(exc))
                    continue
                if writer is None:
                    output.parent.mkdir(parents=True, exist_ok=True)
                    writer = _Writer(tmp, row.features.shape[1], dtype, list(row.labels))
                writer.append(row)
                seen.add(row.image_id)
        if writer is None:
            raise DataError(f"no usable rows in {', '.join(map(str, sources))}")
        writer.finish()
        report.images, report.boxes, report.feature_dim = len(writer.ids), writer.rows, writer.feature_dim
        write_json_atomic(output.with_name(output.stem + "_imgid2idx.json"), {i: k for k, i in enumerate(writer.ids)})
        os.replace(tmp, output)
    finally:
        if writer is not None and writer.file.id.valid:
            writer.file.close()
        tmp.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - start
    return report
