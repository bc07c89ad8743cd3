"""Scale simulator: does isubg's data path survive real GQA and VQA v2 sizes on a 32-64 GB workstation?

    python benchmarks/bench_scale.py [--scales 0.05,0.1,0.25 | --scale S] [--seed 0] [--work DIR] [--no-keep]
                                     [--stages prepare-gqa,prepare-vqa,loader,bookkeeping] [--workers 0,2,8]
                                     [--loader-batches 300] [--repeats 1] [--json benchmarks/results/bench_scale.json]

Per scale S, `scale_data.generate` writes synthetic files in the exact official formats at S times the real sizes
(GQA balanced questions and scene graphs, VQA v2 questions and annotations, one adaptive HDF5 features file per
dataset; the real sizes are constants in benchmarks/scale_data.py) into `--work`/scale-S-seedN, or reuses them when
that folder already holds a complete generation of the same scale and seed. It prints the disk a scale needs
first and refuses to start when `shutil.disk_usage` says it will not fit. Then each stage runs in a fresh
subprocess, started by a small launcher interpreter, so that its wall time and peak RSS are its own (peak RSS is
the launcher's RUSAGE_CHILDREN ru_maxrss; measured from this process it would include this process' RSS):

- prepare-gqa / prepare-vqa: `python -m isubg data prepare` on splits train,val,testdev (GQA) / train,val (VQA),
  with the detector vocabularies, into `processed/gqa` / `processed/vqa`.
- loader: `--loader-batches` batches of the prepared GQA train split, after a warm-up, through the trainer's own
  loader (isubg.data.loaders: open_split + make_batches, VQADataset + DataLoader + collate with the default
  config's question_len, max_boxes, num_stat_word, batch 64), once per `--workers` value; records samples/s, the
  main process' VmHWM and every worker's VmHWM (and Pss), read from /proc just before the iterator ends.
- bookkeeping: an epoch of the trainer's bookkeeping on the whole GQA train split without a model: the epoch
  order (EpochOrder), then `isubg.evaluate.evaluate` with a stand-in model whose logits are random, so every
  question goes through the per-question scoring, per-type accuracy table and prediction list; plus getitem and
  collate of a fixed sample of batches, timed per batch and projected to the epoch.

Fits. With two or more scales, per stage and metric the exponent is the least-squares slope of log(value) on
log(S), and the value at S = 1 is extrapolated along that line. Peak RSS is fitted above the interpreter's
baseline (a child that imports the same modules and does no work): rss ~ baseline + d * S^e, so the fixed cost of
Python, torch and isubg does not flatten the exponent. Peak RSS is also fitted with a straight line c + d * S:
fixed costs beyond the imports (a worker's own batches, allocator slack) read as slow growth to the power law and
not to the line, while the power law catches growth faster than linear; the extrapolation quoted is the larger of
the two. The limits checked at S = 1: prepare peak RSS <= 16 GB, and the largest data-loading process of the
loader (each worker; the main process with 0 workers) <= 4 GB. A worker's VmHWM counts the pages it shares with
the main process (fork, copy on write) as well as its own; its Pss and private MB are recorded beside it. MB and
GB are decimal (10^6, 10^9 bytes) throughout.

The table (stage x scale, exponent, extrapolation, limit, pass/fail) is printed and every number goes to the JSON.
Medians over `--repeats` runs are quoted (default 1: at full scale a repeat costs minutes). The loader and
bookkeeping processes run torch with `--threads` intra-op threads (default 1, as DataLoader workers do): with two
threads on a machine whose other cores are busy, collating one batch took 50x longer (OpenMP threads waiting for
a core), which measures the neighbours, not isubg.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import scale_data

REPO = Path(__file__).resolve().parent.parent
STAGES = ("prepare-gqa", "prepare-vqa", "loader", "bookkeeping")
LIMITS_MB = {"prepare-gqa": 16_000.0, "prepare-vqa": 16_000.0, "loader": 4_000.0}
BATCH_SIZE = 64
WARMUP_BATCHES = 5
COLLATE_BATCHES = 20  # bookkeeping: batches built and collated (a sample, not the epoch)
MB = 1e6


# -------------------------------------------------------------------------------------------------
# Measuring a child process


def _proc_kib(pid: int | str, field: str, name: str = "status") -> float | None:
    """A `field: N kB` line of /proc/<pid>/<name> in MB, or None when the process or the line is gone."""
    try:
        text = Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / MB
    return None


# A fresh, small interpreter runs the command and reports its children's peak RSS. Measured from this process,
# ru_maxrss would include this process' own RSS: at exec the kernel keeps the high-water mark of the memory the
# child inherited at fork, which is ours; the launcher hands down only its own few MB.
LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "wall_s": wall, "maxrss_kib": usage.ru_maxrss}, f)
"""


def run_child(argv: Sequence[str], log: Path) -> tuple[dict[str, Any], float, float]:
    """Run `argv` in the repository root, with this checkout's isubg first on the path, under `LAUNCHER`.

    Args:
        argv: the command.
        log: path stem for the command's .out / .err / .usage files.

    Returns:
        (the JSON object on the command's last stdout line, or {} when there is none; wall seconds; peak RSS in MB
        of the command, ru_maxrss of RUSAGE_CHILDREN in the launcher).

    Raises:
        SystemExit: the command failed; the message holds the tail of its stderr.
    """
    paths = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=paths)
    log.parent.mkdir(parents=True, exist_ok=True)
    usage_path = log.with_suffix(".usage")
    usage_path.unlink(missing_ok=True)
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        launcher = [sys.executable, "-c", LAUNCHER, str(usage_path), *argv]
        subprocess.run(launcher, stdout=out, stderr=err, cwd=REPO, env=env, check=False)
    usage = json.loads(usage_path.read_text()) if usage_path.exists() else {"rc": "no report"}
    if usage["rc"] != 0:
        tail = log.with_suffix(".err").read_text()[-3000:]
        raise SystemExit(f"{' '.join(argv[:6])} ... failed (exit {usage['rc']}):\n{tail}")
    lines = log.with_suffix(".out").read_text().strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return result, usage["wall_s"], usage["maxrss_kib"] * 1024 / MB  # Linux reports ru_maxrss in KiB


def _child(stage: str, **kwargs: Any) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--child-args", json.dumps(kwargs)]


# -------------------------------------------------------------------------------------------------
# Child programs (run as `bench_scale.py --child NAME`): each prints one JSON line


def child_baseline(kind: str) -> dict[str, Any]:
    """The imports of a stage and nothing else: the RSS every run of that stage pays before any data."""
    if kind == "prepare":
        import isubg.cli.data
        import isubg.data.prepare
    else:
        import torch  # noqa: F401

        import isubg.data.loaders
        import isubg.evaluate  # noqa: F401
    return {"peak_rss_mb": _proc_kib("self", "VmHWM")}


def _private_mb(pid: int) -> float | None:
    """Memory only this process holds (its own allocations and the pages it copied on write), in MB."""
    parts = [_proc_kib(pid, name, "smaps_rollup") for name in ("Private_Clean", "Private_Dirty")]
    return None if None in parts else sum(p for p in parts if p is not None)


def _worker_pids(iterator: Any, workers: int) -> list[int]:
    """The worker process ids of a DataLoader iterator (torch keeps them in its private `_workers` list)."""
    if workers == 0:
        return []
    procs = getattr(iterator, "_workers", None)
    if (
        not isinstance(procs, list)
        or len(procs) != workers
        or not all(isinstance(getattr(p, "pid", None), int) for p in procs)
    ):
        import torch

        raise RuntimeError(
            f"torch {torch.__version__}'s DataLoader iterator no longer keeps its worker processes in a `_workers` "
            "list; bench_scale reads the worker pids from it to measure their memory: update _worker_pids"
        )
    return [p.pid for p in procs]


def child_loader(folder: str, workers: int, batches: int, warmup: int, threads: int) -> dict[str, Any]:
    """Time `batches` batches of the GQA train split through the trainer's loader and read every process' VmHWM."""
    import torch

    from isubg.data.loaders import make_batches, open_split
    from isubg.resolve import resolve_config

    torch.set_num_threads(threads)
    sets = [f"train.batch_size={BATCH_SIZE}", f"data.num_workers={workers}"]
    cfg = resolve_config("default", sets=sets).config
    start = time.perf_counter()
    dataset = open_split(cfg, Path(folder), cfg.data.train_split, None)
    open_s = time.perf_counter() - start
    dataset.close_files()  # no HDF5 handle may cross the fork (make_batches does this too when workers > 0)
    loader = make_batches(dataset, cfg, epoch=0, train=True)
    available = len(loader)
    warm = min(warmup, max(0, available - 1))
    timed = min(batches, available - warm)
    iterator = iter(loader)
    pids = _worker_pids(iterator, workers)
    for _ in range(warm):
        next(iterator)
    samples, start = 0, time.perf_counter()
    for _ in range(timed):
        samples += len(next(iterator))
    seconds = time.perf_counter() - start
    # Read before the iterator ends: its workers exit with it.
    worker_rss = [_proc_kib(pid, "VmHWM") for pid in pids]
    worker_pss = [_proc_kib(pid, "Pss", "smaps_rollup") for pid in pids]
    worker_private = [_private_mb(pid) for pid in pids]
    del iterator
    main_rss = _proc_kib("self", "VmHWM")
    return {
        "questions": len(dataset),
        "answers": dataset.num_answers,
        "open_s": round(open_s, 3),
        "batches": timed,
        "samples_per_s": round(samples / seconds, 1),
        "main_rss_mb": main_rss,
        "worker_rss_mb": worker_rss,
        "worker_pss_mb": worker_pss,
        "worker_private_mb": worker_private,
        # The limit applies to each process that loads data: the workers, or the main process without them.
        "loader_rss_mb": max(worker_rss) if worker_rss else main_rss,
    }


class _Rows:
    """A stand-in batch: the question ids are all `evaluate` reads from a batch besides its length."""

    def __init__(self, question_ids: list[str]) -> None:
        self.question_ids = question_ids

    def to(self, _device: Any) -> _Rows:
        return self

    def __len__(self) -> int:
        return len(self.question_ids)


def _random_model(names: Sequence[str], answers: int, batch: int) -> Any:
    """A module shaped like isubg's FusedModel whose outputs are random (cycled from a pool of 8)."""
    import torch
    from torch import nn

    from isubg.models.common import BranchOutput
    from isubg.models.fusion import FusedOutput

    generator = torch.Generator().manual_seed(0)
    pool = [
        (
            {n: torch.randn(batch, answers, generator=generator) for n in names},
            torch.rand(batch, answers, generator=generator),
        )
        for _ in range(8)
    ]

    class RandomModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = list(names)
            self.calls = 0

        def forward(self, rows: _Rows) -> FusedOutput:
            logits, fused = pool[self.calls % len(pool)]
            self.calls += 1
            n = len(rows)
            return FusedOutput({k: BranchOutput(v[:n]) for k, v in logits.items()}, fused[:n])

    return RandomModel()


def child_bookkeeping(folder: str, collate_batches: int, threads: int) -> dict[str, Any]:
    """An epoch of ordering and per-question scoring on the GQA train split, and a sample of collated batches."""
    import torch

    from isubg.data.dataset import collate
    from isubg.data.loaders import open_split
    from isubg.data.order import EpochOrder
    from isubg.evaluate import evaluate
    from isubg.resolve import resolve_config

    torch.set_num_threads(threads)
    cfg = resolve_config("default", sets=[f"train.batch_size={BATCH_SIZE}"]).config
    start = time.perf_counter()
    dataset = open_split(cfg, Path(folder), cfg.data.train_split, None)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    order = list(EpochOrder(len(dataset), seed=cfg.train.seed, epoch=0, shuffle=True))
    order_s = time.perf_counter() - start
    chunks = [order[i : i + BATCH_SIZE] for i in range(0, len(order), BATCH_SIZE)]
    records = dataset.records
    model = _random_model(cfg.model.branches, dataset.num_answers, BATCH_SIZE)
    start = time.perf_counter()
    result = evaluate(model, (_Rows([records[i]["question_id"] for i in c]) for c in chunks), dataset, device="cpu")
    evaluate_s = time.perf_counter() - start
    fetch, merge = [], []
    for chunk in chunks[:collate_batches]:
        start = time.perf_counter()
        samples = [dataset[i] for i in chunk]
        fetch.append(time.perf_counter() - start)
        start = time.perf_counter()
        collate(samples, num_answers=dataset.num_answers)
        merge.append(time.perf_counter() - start)
    return {
        "questions": len(dataset),
        "scored": result.counts["scored"],
        "batches": len(chunks),
        "open_s": round(open_s, 3),
        "order_s": round(order_s, 4),
        "evaluate_s": round(evaluate_s, 3),
        "evaluate_us_per_question": round(evaluate_s / len(dataset) * 1e6, 2),
        "getitem_ms_per_batch": round(statistics.median(fetch) * 1e3, 2),
        "collate_ms_per_batch": round(statistics.median(merge) * 1e3, 2),
        "collate_epoch_s_estimate": round(statistics.median(merge) * len(chunks), 1),
        "peak_rss_mb": _proc_kib("self", "VmHWM"),
    }


CHILDREN: dict[str, Callable[..., dict[str, Any]]] = {
    "baseline": child_baseline,
    "loader": child_loader,
    "bookkeeping": child_bookkeeping,
}


# -------------------------------------------------------------------------------------------------
# Stages (run from the parent)


def _folder_bytes(folder: Path) -> dict[str, int]:
    """Bytes per top-level entry of a processed folder (a table folder counts all its arrays)."""
    sizes = {}
    for entry in sorted(folder.iterdir()):
        files = [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
        sizes[entry.name] = sum(f.stat().st_size for f in files)
    return sizes


def stage_prepare(dataset: str, folder: Path, scale: float) -> dict[str, Any]:
    """`isubg data prepare` on the generated files of one dataset; peak RSS of the isubg process."""
    features = folder / "features"
    out = folder / "processed" / dataset
    splits = "train,val,testdev" if dataset == "gqa" else "train,val"
    argv = [sys.executable, "-m", "isubg", "data", "prepare", dataset, str(folder / "raw" / dataset),
            "--features", str(features / f"{dataset}.h5"), "--output", str(out), "--splits", splits,
            "--object-vocab", str(features / "objects_vocab.txt"),
            "--attribute-vocab", str(features / "attributes_vocab.txt"), "--force"]  # fmt: skip
    _, wall, rss = run_child(argv, folder / "logs" / f"prepare-{dataset}")
    manifest = json.loads((out / "manifest.json").read_text())
    files = _folder_bytes(out)
    return {
        "stage": f"prepare-{dataset}",
        "scale": scale,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(rss, 1),
        "questions": {s: c["questions"] for s, c in manifest["splits"].items()},
        "images": {s: c["images"] for s, c in manifest["splits"].items()},
        "answers": manifest["answer_count"],
        "dictionary": manifest["dictionary_size"],
        "processed_format": manifest["format_version"],
        "processed_mb": round(sum(files.values()) / MB, 1),
        "processed_files_mb": {name: round(size / MB, 2) for name, size in files.items()},
    }


def _need_gqa(folder: Path) -> Path:
    processed = folder / "processed" / "gqa"
    if not (processed / "manifest.json").exists():
        raise SystemExit(f"{processed}: not prepared; add prepare-gqa to --stages (loader and bookkeeping read it)")
    return processed


def stage_loader(folder: Path, scale: float, workers: int, batches: int, threads: int) -> dict[str, Any]:
    """The loader child for one worker count."""
    argv = _child("loader", folder=str(_need_gqa(folder)), workers=workers, batches=batches, warmup=WARMUP_BATCHES,
                  threads=threads)  # fmt: skip
    result, wall, _ = run_child(argv, folder / "logs" / f"loader-w{workers}")
    return {"stage": "loader", "workers": workers, "scale": scale, "wall_s": round(wall, 2), **result}


def stage_bookkeeping(folder: Path, scale: float, threads: int) -> dict[str, Any]:
    """The bookkeeping child."""
    argv = _child("bookkeeping", folder=str(_need_gqa(folder)), collate_batches=COLLATE_BATCHES, threads=threads)
    result, wall, _ = run_child(argv, folder / "logs" / "bookkeeping")
    return {"stage": "bookkeeping", "scale": scale, "wall_s": round(wall, 2), **result}


def measure_baselines(log: Path) -> dict[str, float]:
    """Peak RSS of a child that only imports what each kind of stage imports."""
    out = {}
    for kind in ("prepare", "torch"):
        result, _, _ = run_child(_child("baseline", kind=kind), log / f"baseline-{kind}")
        out[kind] = round(float(result["peak_rss_mb"]), 1)
    return out


def _median_record(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from repeated runs: the median of every top-level number, the rest from the first run."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("scale", "workers"):
            out[key] = statistics.median(r[key] for r in runs)
    out["repeats"] = len(runs)
    return out


def run_stages(folder: Path, scale: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every selected stage on one generated scale, `args.repeats` times each (medians kept)."""
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for stage in args.stages:
        if stage.startswith("prepare-"):
            jobs.append((stage, lambda s=stage: stage_prepare(s.split("-")[1], folder, scale)))
        elif stage == "loader":
            for w in args.workers:
                jobs.append(
                    (f"loader w={w}", lambda w=w: stage_loader(folder, scale, w, args.loader_batches, args.threads))
                )
        else:
            jobs.append((stage, lambda: stage_bookkeeping(folder, scale, args.threads)))
    records = []
    for name, job in jobs:
        record = _median_record([job() for _ in range(args.repeats)])
        print(f"  S={scale:g} {name}: {record['wall_s']:.1f} s, peak {_peak(record):.0f} MB", flush=True)
        records.append(record)
    return records


def _peak(record: dict[str, Any]) -> float:
    return float(record.get("peak_rss_mb") or record.get("loader_rss_mb") or 0.0)


# -------------------------------------------------------------------------------------------------
# Generation with a disk check


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def prepare_data(work: Path, scale: float, seed: int) -> tuple[Path, dict[str, Any]]:
    """Generate (or reuse) one scale's files, after checking that they fit on the disk.

    Raises:
        SystemExit: the disk has less free space than the estimate.
    """
    folder = work / f"scale-{scale:g}-seed{seed}"
    existing = scale_data.read_generated(folder)
    reusable = existing is not None and (existing.version, existing.scale, existing.seed) == (
        scale_data.GENERATOR_VERSION, scale, seed)  # fmt: skip
    need = scale_data.disk_estimate(scale_data.plan(scale))
    if reusable:
        need = {"processed": need["processed"], "total": need["processed"]}  # the raw files are there already
    free = _free_bytes(work)
    parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in need.items() if k != "total")
    reuse = "; reusing the generated files" if reusable else ""
    print(f"scale {scale:g}: needs about {need['total'] / 1e9:.1f} GB on disk ({parts} GB{reuse}); "
          f"{free / 1e9:.1f} GB free")  # fmt: skip
    if need["total"] > free:
        raise SystemExit(
            f"scale {scale:g} needs about {need['total'] / 1e9:.1f} GB but {work} has {free / 1e9:.1f} GB free; "
            "free some space, pick another --work folder or a smaller scale"
        )
    generated = scale_data.generate(folder, scale, seed, say=lambda m: print(f"  generating {m}", flush=True))
    info = asdict(generated)
    info["disk_estimate_gb"] = round(need["total"] / 1e9, 2)
    print(f"  data {'reused' if generated.reused else f'generated in {generated.seconds:.0f} s'}", flush=True)
    return folder, info


# -------------------------------------------------------------------------------------------------
# Fits, limits, table

# (stage key, metric, kind, limit in MB or None); kind "rss" is fitted above the baseline.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("prepare-gqa", "wall_s", "time"),
    ("prepare-gqa", "peak_rss_mb", "rss"),
    ("prepare-vqa", "wall_s", "time"),
    ("prepare-vqa", "peak_rss_mb", "rss"),
    ("loader", "samples_per_s", "time"),
    ("loader", "main_rss_mb", "rss"),
    ("loader", "loader_rss_mb", "rss"),
    ("bookkeeping", "wall_s", "time"),
    ("bookkeeping", "evaluate_s", "time"),
    ("bookkeeping", "peak_rss_mb", "rss"),
)


def fit_power(scales: Sequence[float], values: Sequence[float], baseline: float = 0.0) -> dict[str, float] | None:
    """Fit value ~ baseline + a * S^b by least squares on log(value - baseline) against log(S).

    Returns:
        {"exponent": b, "at_1": baseline + a, "baseline": baseline}, or None with fewer than two distinct scales.
        Values at or below the baseline count as 1 MB above it (the fit needs a positive logarithm).
    """
    points = [(s, v) for s, v in zip(scales, values, strict=True) if v is not None]
    if len({s for s, _ in points}) < 2:
        return None
    x = np.log([s for s, _ in points])
    y = np.log([max(v - baseline, 1.0 if baseline else 1e-9) for _, v in points])
    slope, intercept = np.polyfit(x, y, 1)
    return {"exponent": round(float(slope), 3), "at_1": round(baseline + math.exp(intercept), 2), "baseline": baseline}


def fit_linear(scales: Sequence[float], values: Sequence[float]) -> dict[str, float] | None:
    """Fit value ~ c + d * S by least squares (memory that holds the data grows at most linearly with it).

    Returns:
        {"fixed": c, "per_scale": d, "at_1": c + d}, or None with fewer than two distinct scales.
    """
    points = [(s, v) for s, v in zip(scales, values, strict=True) if v is not None]
    if len({s for s, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit([s for s, _ in points], [v for _, v in points], 1)
    return {
        "fixed": round(float(intercept), 2),
        "per_scale": round(float(slope), 2),
        "at_1": round(float(slope + intercept), 2),
    }


def fit_metric(scales: Sequence[float], values: Sequence[float], kind: str, baseline: float) -> dict[str, Any] | None:
    """A time's power law; for memory the power law above `baseline` and a straight line, the larger value at S=1.

    Peak RSS carries fixed costs beyond the imports (buffers, a worker's own batches) that a power law above the
    import baseline reads as slow growth; a straight line through the points is not fooled by them, while the
    power law catches growth faster than linear. The limit is checked against the larger of the two.
    """
    power = fit_power(scales, values, baseline)
    if kind != "rss" or power is None:
        return power
    line = fit_linear(scales, values)
    assert line is not None
    return {**power, "at_1": max(power["at_1"], line["at_1"]), "power_at_1": power["at_1"], "linear": line}


def _key(record: dict[str, Any]) -> str:
    return f"loader w={record['workers']}" if record["stage"] == "loader" else record["stage"]


def fit_all(records: list[dict[str, Any]], baselines: dict[str, float]) -> list[dict[str, Any]]:
    """One row per (stage, metric): the value at each scale, the fit, the extrapolation and the limit check."""
    rows = []
    keys = list(dict.fromkeys(_key(r) for r in records))
    for key in keys:
        stage = key.split(" ")[0]
        for metric_stage, metric, kind in METRICS:
            mine = [r for r in records if _key(r) == key and metric in r]
            if metric_stage != stage or not mine:
                continue
            base = baselines["prepare" if stage.startswith("prepare") else "torch"] if kind == "rss" else 0.0
            values = {r["scale"]: r[metric] for r in mine}
            fit = fit_metric(list(values), list(values.values()), kind, base)
            limit = LIMITS_MB.get(stage) if metric in ("peak_rss_mb", "loader_rss_mb") else None
            passed = None if limit is None or fit is None else fit["at_1"] <= limit
            rows.append({"stage": key, "metric": metric, "values": values, "fit": fit, "limit": limit, "pass": passed})
    return rows


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def print_table(rows: list[dict[str, Any]], scales: Sequence[float]) -> None:
    head = f"{'stage':<14} {'metric':<14}" + "".join(f" {'S=' + format(s, 'g'):>9}" for s in scales)
    print(head + f" {'exponent':>8} {'at S=1':>10} {'limit':>8} {'result':>6}")
    for row in rows:
        fit = row["fit"] or {}
        cells = "".join(f" {_cell(row['values'].get(s)):>9}" for s in scales)
        verdict = "-" if row["pass"] is None else ("pass" if row["pass"] else "FAIL")
        exponent = f"{fit['exponent']:.2f}" if fit else "-"
        print(f"{row['stage']:<14} {row['metric']:<14}{cells} {exponent:>8} {_cell(fit.get('at_1')):>10} "
              f"{_cell(row['limit']):>8} {verdict:>6}")  # fmt: skip


# -------------------------------------------------------------------------------------------------
# Main


def _machine() -> dict[str, Any]:
    mem = None
    if Path("/proc/meminfo").exists():
        line = next((x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal:")), None)
        mem = None if line is None else int(line.split()[1]) * 1024 / MB
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gb": None if mem is None else round(mem / 1e3, 1),
        "commit": commit.stdout.strip() or None,
    }


def _real_sizes() -> dict[str, Any]:
    s = scale_data
    return {"gqa_questions": s.GQA_QUESTIONS, "gqa_images": s.GQA_IMAGES, "gqa_graph_images": s.GQA_GRAPH_IMAGES,
            "gqa_feature_images": s.GQA_FEATURE_IMAGES, "vqa_questions": s.VQA_QUESTIONS, "vqa_images": s.VQA_IMAGES,
            "vqa_feature_images": s.VQA_FEATURE_IMAGES}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="0.05,0.1,0.25", help="Comma-separated fractions of the real sizes.")
    parser.add_argument("--scale", type=float, default=None, help="One scale (overrides --scales).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "isubg_scale",
                        help="Scratch folder; a scale generated there with the same seed is reused.")  # fmt: skip
    parser.add_argument("--no-keep", action="store_true", help="Delete each scale's files once measured.")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"Any of {', '.join(STAGES)}.")
    parser.add_argument("--workers", default="0,2,8", help="DataLoader worker counts for the loader stage.")
    parser.add_argument("--loader-batches", type=int, default=300, help="Timed batches of 64 (after a warm-up).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the loader/bookkeeping process.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per stage; medians are kept.")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bench_scale.json")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-args", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scales = [args.scale] if args.scale is not None else [float(s) for s in args.scales.split(",") if s.strip()]
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; pick from {', '.join(STAGES)}")
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not args.scales or any(not 0 < s <= 1 for s in args.scales):
        parser.error("scales must lie in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](**json.loads(args.child_args))))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    baselines = measure_baselines(args.work / "logs")
    print(f"baseline peak RSS (imports only): {baselines} MB")
    records, generated = [], {}
    for scale in args.scales:
        folder, generated[f"{scale:g}"] = prepare_data(args.work, scale, args.seed)
        records += run_stages(folder, scale, args)
        if args.no_keep:
            shutil.rmtree(folder)
    rows = fit_all(records, baselines)
    print_table(rows, args.scales)
    meta = {"scales": args.scales, "seed": args.seed, "stages": args.stages, "workers": args.workers,
            "threads": args.threads, "loader_batches": args.loader_batches, "batch_size": BATCH_SIZE,
            "repeats": args.repeats,
            "limits_mb": LIMITS_MB, "baseline_rss_mb": baselines, "real_sizes": _real_sizes(),
            "machine": _machine(), "time": time.time()}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "generated": generated, "records": records, "fits": rows}
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
