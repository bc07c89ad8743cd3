"""Data-layer benchmarks: loader throughput, lazy-read memory, converter throughput. Prints a table, writes JSON.

    python benchmarks/bench_data.py [--images 400] [--repeats 3] [--out benchmarks/results/bench_data.json]

Every measurement runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own. Throughputs
are medians over `--repeats` runs. Inputs are synthetic files in the real formats with 2048-d
features (the bottom-up release's width) and 50 boxes per image.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

DIM, BOXES = 2048, 50


def write_features(path: Path, images: int) -> None:
    """An adaptive HDF5 file of `images` images x 50 boxes x 2048 floats, written in blocks."""
    rng = np.random.default_rng(0)
    rows = images * BOXES
    with h5py.File(path, "w") as f:
        feats = f.create_dataset("image_features", (rows, DIM), "f4")
        for start in range(0, rows, 10_000):
            end = min(rows, start + 10_000)
            feats[start:end] = rng.random((end - start, DIM), dtype=np.float32)
        boxes = np.tile(np.array([[10, 10, 100, 100]], np.float32), (rows, 1))
        f.create_dataset("image_bb", data=boxes)
        f.create_dataset(
            "spatial_features", data=np.tile(np.array([[0.1, 0.1, 0.5, 0.5, 0.4, 0.4]], np.float32), (rows, 1))
        )
        f.create_dataset("pos_boxes", data=np.array([[i * BOXES, (i + 1) * BOXES] for i in range(images)], np.int32))
        f.create_dataset("image_ids", data=np.array([str(i) for i in range(images)], dtype=h5py.string_dtype()))


def write_gqa(root: Path, images: int, per_image: int = 4) -> Path:
    """GQA-format questions and scene graphs over the same images."""
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    graphs = {
        str(i): {"width": 640, "height": 480, "objects": {
            str(j): {"name": f"thing{j % 7}", "x": 10 * j, "y": 5 * j, "w": 40, "h": 30, "attributes": ["red"],
                     "relations": [{"name": "near", "object": str((j + 1) % 8)}]} for j in range(8)}}
        for i in range(images)
    }  # fmt: skip
    questions = {
        f"{i}-{k}": {"imageId": str(i), "question": f"Is the thing{k} red?", "answer": ["yes", "no"][(i + k) % 2],
                     "types": {"structural": "verify", "semantic": "attr"}}
        for i in range(images) for k in range(per_image)
    }  # fmt: skip
    (raw / "train_balanced_questions.json").write_text(json.dumps(questions))
    (raw / "train_sceneGraphs.json").write_text(json.dumps(graphs))
    return raw


def write_tsv(path: Path, images: int) -> None:
    rng = np.random.default_rng(1)
    with path.open("w") as f:
        for i in range(images):
            n = int(rng.integers(10, 101))
            boxes = np.tile(np.array([[1, 2, 30, 40]], np.float32), (n, 1))
            feats = rng.random((n, DIM), dtype=np.float32)
            enc = [base64.b64encode(a.tobytes()).decode() for a in (boxes, feats)]
            f.write(f"{i}\t640\t480\t{n}\t{enc[0]}\t{enc[1]}\n")


# Child programs: each prints one JSON line with its measurement and its own peak RSS.
_RSS = "import resource; rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"

LOADER = """
import json, sys, time
from pathlib import Path
from isubg.data.dataset import VQADataset
from isubg.data.loaders import make_batches
from isubg.resolve import resolve_config
folder, workers, in_memory = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
data = VQADataset(folder, "train", question_len=12, max_boxes=50, num_stat_word=30, in_memory=in_memory)
cfg = resolve_config("default", sets=["batch_size=32", "train.seed=0", "data.num_workers=" + str(workers)]).config
loader = make_batches(data, cfg, epoch=0, train=True)  # the loader training reads: shuffled, 32 a batch
start = time.perf_counter(); n = sum(len(b) for b in loader); seconds = time.perf_counter() - start
{rss}
print(json.dumps({{"samples_per_s": n / seconds, "peak_rss_mib": rss}}))
"""

PASS = """
import json, sys, time
from pathlib import Path
from isubg.data.features import FeatureStore
store = FeatureStore(Path(sys.argv[1]), max_boxes=50, in_memory=sys.argv[2] == "1")
start = time.perf_counter(); total = 0.0
for image in store.image_ids:
    total += float(store.get(image).features[0, 0])
seconds = time.perf_counter() - start
{rss}
print(json.dumps({{"images_per_s": len(store) / seconds, "peak_rss_mib": rss}}))
"""

CONVERT = """
import json, sys
from pathlib import Path
from isubg.data.convert import convert_tsv
report = convert_tsv([Path(sys.argv[1])], Path(sys.argv[2]))
{rss}
print(json.dumps({{"rows_per_s": report.images / report.seconds, "peak_rss_mib": rss}}))
"""


def run(program: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", program.format(rss=_RSS), *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(repeats: int, program: str, *args: str) -> dict:
    runs = [run(program, *args) for _ in range(repeats)]
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="images in the small features file (the large has 4x)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_data.json")
    args = parser.parse_args()

    from isubg.data.prepare import discover_splits, prepare

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        small, large = tmp / "small.h5", tmp / "large.h5"
        write_features(small, args.images)
        write_features(large, args.images * 4)
        raw = write_gqa(tmp, args.images)
        prepare("gqa", discover_splits("gqa", raw, ["train"]), small, tmp / "processed")
        for workers in (0, 2):
            for in_memory in (False, True):
                r = median_of(args.repeats, LOADER, str(tmp / "processed"), str(workers), "1" if in_memory else "0")
                mode = "in-RAM" if in_memory else "lazy"
                rows.append({"bench": "loader", "setting": f"{mode}, {workers} workers, batch 32", **r})
        for path in (small, large):
            mib = path.stat().st_size / 2**20
            for in_memory in (False, True):
                r = median_of(args.repeats, PASS, str(path), "1" if in_memory else "0")
                mode = "in-RAM" if in_memory else "lazy"
                rows.append({"bench": "feature pass", "setting": f"{mode}, file {mib:.0f} MiB", **r})
        tsv = tmp / "rows.tsv"
        write_tsv(tsv, args.images)
        r = median_of(args.repeats, CONVERT, str(tsv), str(tmp / "converted.h5"))
        rows.append(
            {"bench": "convert", "setting": f"{args.images} rows, {tsv.stat().st_size / 2**20:.0f} MiB TSV", **r}
        )

    print(f"{'bench':<14} {'setting':<38} {'throughput':>22} {'peak RSS MiB':>13}")
    for row in rows:
        key = next(k for k in row if k.endswith("_per_s"))
        print(f"{row['bench']:<14} {row['setting']:<38} {row[key]:>12.0f} {key:<9} {row['peak_rss_mib']:>13.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dim": DIM, "boxes": BOXES, "images": args.images, "repeats": args.repeats, "time": time.time()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
