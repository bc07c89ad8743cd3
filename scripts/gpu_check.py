"""Every GPU check of isubg in one process, for a bare CUDA machine with no network (run by scripts/gpu_check.sh).

    python scripts/gpu_check.py [--out gpu-check] [--dry-run]

Sections, in order, each on its own so that one failure does not stop the rest:

1. environment: torch, CUDA, the device (name, capability, memory);
2. tests: the `gpu`-marked tests (pytest, JUnit XML into OUT/junit.xml);
3. memory: estimate vs measured peak (torch.cuda.max_memory_allocated) for the 8gb, 24gb, memory-optimized and
   high-performance presets, plus high-performance at the micro-batch dynamic sizing grows it to on this card;
4. throughput: the fused default-preset model trained with the trainer's own step (isubg.step) in bf16 autocast,
   fp32 and fp32+TF32: samples/s, FLOPs per step (FlopCounterMode) and MFU against a measured bf16 matmul peak;
5. loader: samples/s of the demo data's loader at 2 and 8 workers against what the step consumes;
6. syncs: host-device synchronisations per micro-batch (torch.cuda sync debug mode, and the dispatch counter of
   benchmarks/bench_syncs.py);
7. train: a short `isubg train --preset demo` on the demo data, then `--resume` of it; both must exit 0.

Writes OUT/summary.txt (a table), OUT/results.json (every number), OUT/junit.xml and OUT/gpu_check.log (all
output); generated data and the train run live in a temporary folder that is deleted at the end. Exit code 1 when
a section failed, 2 when CUDA is missing (without --dry-run).

--dry-run runs the same code paths on the CPU at toy sizes (tiny model, tiny demo, estimate only, fp32 only,
MFU against a CPU matmul peak), in about a minute on 2 cores: CI runs it so the script cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
MEMORY_PRESETS = ("8gb", "24gb", "memory-optimized", "high-performance")
# Toy sizes for --dry-run (those of tests/test_memory.py TINY).
TINY = [
    "model.xvlm.hidden_size=32", "model.xvlm.num_heads=2", "model.xvlm.intermediate_size=64",
    "model.xvlm.num_text_layers=1", "model.xvlm.num_cross_layers=2", "num_hid=64", "general_hidden_dim=32",
    "AOA_layers=2", "mgat_layers=2", "data.max_boxes=10", "question_len=8", "num_stat_word=6",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested in tests/test_gpu_check.py)


def matmul_flops(n: int) -> int:
    """Floating-point operations of one (n x n) @ (n x n) product: n^2 outputs of n multiply-adds."""
    return 2 * n**3


def flops_per_second(flops: float, seconds: float) -> float:
    return flops / seconds if seconds > 0 else 0.0


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float | None:
    """Model FLOPs utilisation: the FLOP/s one step achieves over the device's peak FLOP/s (None: unknown)."""
    if peak_flops_per_second <= 0 or step_seconds <= 0:
        return None
    return flops_per_second(flops_per_step, step_seconds) / peak_flops_per_second


def relative_error(estimate: float | None, measured: float | None) -> float | None:
    """(estimate - measured) / measured, None when either is missing or measured is 0."""
    if estimate is None or not measured:
        return None
    return (estimate - measured) / measured


def junit_counts(path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped / passed of a JUnit XML file (pytest's, one or more suites)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts (and lists of dicts) as (dotted key, leaf value) rows, in order."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [row for i, v in enumerate(value) for row in flatten(v, f"{prefix}[{i}]")]
    return [(prefix, value)]


def summary_table(results: dict[str, Any]) -> str:
    """results.json as a readable text: one block per section, one `key  value` line per number."""
    lines = [f"isubg GPU check ({'dry run, CPU' if results.get('dry_run') else 'CUDA'})", ""]
    for name, section in results["sections"].items():
        lines.append(f"== {name}: {section.get('status', '?')}")
        rows = flatten({k: v for k, v in section.items() if k not in ("status", "error")})
        width = max((len(k) for k, _ in rows), default=0)
        lines.extend(f"   {k:<{width}}  {_fmt(v)}" for k, v in rows)
        if section.get("error"):
            lines.append(f"   ERROR: {section['error']}")
        lines.append("")
    failed = [n for n, s in results["sections"].items() if s.get("status") != "ok"]
    lines.append(
        f"{len(results['sections']) - len(failed)} sections ok" + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Output: everything printed also goes to OUT/gpu_check.log


class _Tee:
    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        self.log.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self.stream, name)


@contextlib.contextmanager
def _tee(path: Path) -> Iterator[None]:
    with path.open("w", encoding="utf-8") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)  # type: ignore[assignment]
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The checks


class Check:
    """Shared state of one run: the options, the device, the temp folder and numbers later sections reuse."""

    def __init__(self, out: Path, work: Path, dry: bool) -> None:
        import torch

        self.out, self.work, self.dry = out, work, dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.demand: float | None = None  # samples/s the training step consumes (throughput section)
        self.stepper: Any = None  # the bf16 stepper and batch of the throughput section (syncs section)
        self.batch: Any = None

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def config(self, preset: str, *sets: str) -> Any:
        from isubg.resolve import resolve_config

        sets = (*TINY, *sets) if self.dry else sets
        return resolve_config(preset, sets=list(sets)).config

    def demo(self, dataset: str = "gqa") -> Path:
        from isubg.data.embedded import ensure_demo

        return ensure_demo("tiny" if self.dry else "small").processed(dataset)

    def free(self) -> None:
        import torch

        self.stepper = self.batch = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_environment(c: Check) -> dict[str, Any]:
    import platform

    import torch

    import isubg

    r: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "isubg": isubg.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    if c.device.type == "cuda":
        props = torch.cuda.get_device_properties(c.device)
        r |= {
            "device": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count,
            "device_count": torch.cuda.device_count(),
        }
    else:
        r |= {"device": "cpu", "capability": None, "memory_bytes": _host_memory(), "memory_gib": _host_memory() / 2**30}
    return r


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_tests(c: Check) -> dict[str, Any]:
    import pytest

    xml = c.out / "junit.xml"
    code = pytest.main(["-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests"), f"--junitxml={xml}"])
    r: dict[str, Any] = {"exit_code": int(code), **junit_counts(xml)}
    # 0: all passed; 5: nothing collected. Without CUDA every gpu test skips, which is what a dry run expects.
    if int(code) not in (0, 5) or r["failures"] or r["errors"]:
        raise RuntimeError(f"pytest -m gpu exited {int(code)}: {r['failures']} failed, {r['errors']} errors")
    if not c.dry and r["skipped"]:
        raise RuntimeError(f"{r['skipped']} gpu test(s) skipped on a CUDA machine")
    return r


def _memory_row(c: Check, cfg: Any, batch: int, worst: Any) -> dict[str, Any]:
    from isubg.memory import estimate, measure_peak_cuda

    est = estimate(cfg, None, worst)
    measured = None
    if not c.dry:
        c.free()
        measured = measure_peak_cuda(cfg, None, batch, worst=worst)
        c.free()
    allocated = est.allocated(batch)
    return {
        "batch_size": batch,
        "estimate_bytes": allocated,
        "estimate_total_bytes": est.total(batch),
        "measured_bytes": measured,
        "error": relative_error(allocated, measured),
        "_est": est,
    }


def check_memory(c: Check, total_memory: int) -> dict[str, Any]:
    from isubg.memory import WorstCase

    r: dict[str, Any] = {"device_memory_bytes": total_memory}
    failures = []
    for preset in MEMORY_PRESETS:
        say(f"memory: {preset}")
        try:
            cfg = c.config(preset)
            worst = WorstCase.for_config(cfg)
            if c.dry:  # toy graph and vocabulary (tests/test_memory.py WORST)
                worst = WorstCase(cfg.data.max_boxes, cfg.data.question_len, cfg.data.num_stat_word, 12, 30,
                                  num_answers=50, num_words=5000, num_graph_tokens=40, feature_dim=64)  # fmt: skip
            row = _memory_row(c, cfg, cfg.train.batch_size, worst)
            est = row.pop("_est")
            r[preset] = row
            print(f"{preset}: estimate {row['estimate_bytes'] / 2**30:.3f} GiB, measured "
                  f"{_fmt(row['measured_bytes'] and row['measured_bytes'] / 2**30)} GiB")  # fmt: skip
            if preset == "high-performance":
                geom = est.fitted_geometry(total_memory, cfg.memory.max_memory_usage)
                if geom is None:
                    r["high-performance-grown"] = {"batch_size": None, "fits": False}
                else:
                    grown = c.config(
                        preset,
                        f"train.batch_size={geom.batch_size}",
                        f"optim.gradient_accumulation_steps={geom.gradient_accumulation_steps}",
                        f"train.update_freq={geom.update_freq}",
                    )
                    row = _memory_row(c, grown, geom.batch_size, worst)
                    row.pop("_est")
                    row |= {
                        "gradient_accumulation_steps": geom.gradient_accumulation_steps,
                        "update_freq": geom.update_freq,
                        "samples_per_update": geom.samples_per_update,
                        "fits": True,
                    }
                    r["high-performance-grown"] = row
                    print(f"high-performance grown to micro-batch {geom.batch_size}: estimate "
                          f"{row['estimate_bytes'] / 2**30:.3f} GiB, measured "
                          f"{_fmt(row['measured_bytes'] and row['measured_bytes'] / 2**30)} GiB")  # fmt: skip
        except Exception as exc:
            traceback.print_exc()
            r[preset] = {"error": f"{type(exc).__name__}: {exc}"}
            failures.append(preset)
        finally:
            c.free()
    if failures:
        r["failed"] = failures
        raise _Partial(r, f"memory failed for {', '.join(failures)}")
    return r


class _Partial(Exception):
    """A section failed but has numbers to keep."""

    def __init__(self, result: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.result = result


def _matmul_peak(c: Check) -> dict[str, Any]:
    """FLOP/s of a large square matmul: bf16 on CUDA (the tensor-core peak MFU is relative to), fp32 on CPU."""
    import torch

    n, reps = (1024, 3) if c.dry else (8192, 20)
    dtype = torch.float32 if c.dry else torch.bfloat16
    a = torch.randn(n, n, device=c.device, dtype=dtype)
    b = torch.randn(n, n, device=c.device, dtype=dtype)
    for _ in range(2):
        a @ b
    c.sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        c.sync()
        times.append(time.perf_counter() - start)
    seconds = min(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_second": matmul_flops(n) / seconds}


def _time_steps(c: Check, stepper: Any, batch: Any, warmup: int, steps: int) -> list[float]:
    from isubg.step import train_step

    for _ in range(warmup):
        train_step(stepper, [batch])
    c.sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(stepper, [batch])
        c.sync()
        times.append(time.perf_counter() - start)
    return times


def _step_flops(stepper: Any, batch: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from isubg.step import train_step

    with FlopCounterMode(display=False) as counter:
        train_step(stepper, [batch])
    return int(counter.get_total_flops())


def check_throughput(c: Check) -> dict[str, Any]:
    import torch

    from isubg.device import Precision, configure_cuda_math
    from isubg.memory import WorstCase, synthetic_spec, worst_case_batch
    from isubg.models import build_model
    from isubg.models.common import parameter_count
    from isubg.step import make_stepper

    preset = "demo" if c.dry else "default"
    cfg = c.config(preset)
    worst = WorstCase.for_config(cfg)
    if c.dry:
        worst = WorstCase(cfg.data.max_boxes, cfg.data.question_len, cfg.data.num_stat_word, 12, 30,
                          num_answers=50, num_words=500, num_graph_tokens=40, feature_dim=64)  # fmt: skip
    spec = synthetic_spec(cfg, worst)
    batch_size = 8 if c.dry else cfg.train.batch_size
    peak = _matmul_peak(c)
    r: dict[str, Any] = {"preset": preset, "batch_size": batch_size, "peak": peak}
    variants = {"fp32": (None, False)} if c.dry else {"bf16": (torch.bfloat16, False), "fp32": (None, False),
                                                      "fp32+tf32": (None, True)}  # fmt: skip
    warmup, steps = (1, 2) if c.dry else (3, 8)
    for name, (dtype, tf32) in variants.items():
        say(f"throughput: {name}")
        if c.device.type == "cuda":
            configure_cuda_math(tf32)
        torch.manual_seed(0)
        model = build_model(cfg, spec).to(c.device).train()
        image_res = getattr(model.branch("xvlm"), "image_res", None)  # pixels only for an X-VLM image encoder
        batch = worst_case_batch(spec, worst, batch_size, image_res=image_res).to(c.device)
        stepper = make_stepper(cfg, model, c.device, Precision(dtype, False, name))
        times = _time_steps(c, stepper, batch, warmup, steps)
        flops = _step_flops(stepper, batch)
        step_s = statistics.median(times)
        row = {
            "step_seconds": step_s,
            "samples_per_s": batch_size / step_s,
            "flops_per_step": flops,
            "achieved_flops_per_second": flops_per_second(flops, step_s),
            "mfu": mfu(flops, step_s, peak["flops_per_second"]),
        }
        r[name] = row
        print(f"{name}: {row['samples_per_s']:.1f} samples/s, {flops / 1e9:.2f} GFLOP/step, MFU {_fmt(row['mfu'])}")
        if name == ("fp32" if c.dry else "bf16"):
            c.demand = row["samples_per_s"]
            c.stepper, c.batch = stepper, batch
        else:
            del stepper, model, batch
            gc.collect()
    if c.device.type == "cuda":
        configure_cuda_math(cfg.train.tf32)
        r["param_count"] = parameter_count(c.stepper.model, trainable_only=False)
    r["demand_samples_per_s"] = c.demand
    return r


def check_loader(c: Check) -> dict[str, Any]:
    from isubg.data.loaders import make_batches, open_split

    data = c.demo()
    r: dict[str, Any] = {"data": data.parent.parent.name, "demand_samples_per_s": c.demand}
    for workers in (0, 2) if c.dry else (2, 8):
        say(f"loader: {workers} workers")
        cfg = c.config("demo", f"data.root={data}", f"data.num_workers={workers}")
        dataset = open_split(cfg, data, cfg.data.train_split, None)
        start = time.perf_counter()
        samples = sum(len(b.question_ids) for b in make_batches(dataset, cfg, epoch=0, train=True))
        seconds = time.perf_counter() - start
        rate = samples / seconds
        r[f"workers_{workers}"] = {
            "samples": samples,
            "seconds": seconds,
            "samples_per_s": rate,
            "over_demand": rate / c.demand if c.demand else None,
        }
        print(
            f"{workers} workers: {rate:.0f} samples/s"
            + (f" ({rate / c.demand:.2f}x the step's demand)" if c.demand else "")
        )
    return r


def _bench_syncs() -> Any:
    spec = importlib.util.spec_from_file_location("bench_syncs", REPO / "benchmarks" / "bench_syncs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_syncs(c: Check) -> dict[str, Any]:
    import torch

    r: dict[str, Any] = {}
    counts, n = _bench_syncs().count("demo", 3, [])
    r["dispatch_micro_batches"] = n
    r["dispatch_per_micro_batch"] = sum(counts.values()) / n
    r["dispatch_sources"] = {k: v / n for k, v in counts.most_common(8)}
    print(f"dispatch counter: {r['dispatch_per_micro_batch']:.2f} syncs per micro-batch")
    if c.device.type == "cuda":
        from isubg.step import train_step

        if c.stepper is None:
            raise RuntimeError("the throughput section built no model to step")
        steps = 3
        train_step(c.stepper, [c.batch])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(steps):
                    train_step(c.stepper, [c.batch])
                torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        r["cuda_steps"] = steps
        r["cuda_syncs_per_step"] = len(syncs) / steps
        print(f"CUDA sync debug mode: {r['cuda_syncs_per_step']:.2f} syncs per step (default preset, bf16)")
    else:
        r["cuda_syncs_per_step"] = None
    c.free()
    return r


def check_train(c: Check) -> dict[str, Any]:
    data = c.demo()
    run = c.work / "run"
    limits = ["--set", "data.train_limit=256", "--set", "data.val_limit=64", "--set", "train.log_every=1"]
    if c.dry:
        limits += ["--set", "train.device=cpu"]
    first = [sys.executable, "-m", "isubg", "train", "--preset", "demo", "--data", str(data), "--epochs", "1",
             "--max-steps", "3", "--output", str(run), *limits]  # fmt: skip
    resume = [sys.executable, "-m", "isubg", "train", "--resume", str(run)]
    r: dict[str, Any] = {}
    for name, cmd in (("first", first), ("resume", resume)):
        say(f"train: {name}: {' '.join(cmd[1:])}")
        start = time.perf_counter()
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, cwd=c.work, capture_output=True, text=True, env=env)
        print(proc.stdout[-4000:], end="")
        print(proc.stderr[-4000:], end="", file=sys.stderr)
        r[name] = {"exit_code": proc.returncode, "seconds": time.perf_counter() - start}
    summary = run / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text(encoding="utf-8"))
        r["run_status"] = s.get("status")
        for key in ("best_accuracy", "steps", "epochs_done"):
            if key in s and isinstance(s[key], (int, float)):
                r[key] = s[key]
    bad = [n for n in ("first", "resume") if r[n]["exit_code"] != 0]
    if bad:
        raise _Partial(r, f"isubg train ({', '.join(bad)}) exited non-zero")
    return r


# ----------------------------------------------------------------------------------------------------------------


def run_section(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    say(name)
    start = time.perf_counter()
    try:
        section = {"status": "ok", **fn()}
    except _Partial as exc:
        traceback.print_exc()
        section = {"status": "failed", "error": str(exc), **exc.result}
    except Exception as exc:
        traceback.print_exc()
        section = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    section["seconds"] = time.perf_counter() - start
    results["sections"][name] = section
    print(f"-- {name}: {section['status']} ({section['seconds']:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="output folder (default gpu-check)")
    parser.add_argument("--dry-run", action="store_true", help="the same checks on the CPU at toy sizes")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"gpu_check: this torch sees no CUDA device (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'none'}); run on a GPU machine, or pass --dry-run for the CPU smoke test",
            file=sys.stderr,
        )
        return 2

    work = Path(tempfile.mkdtemp(prefix="isubg-gpu-check-"))
    os.environ["ISUBG_CACHE_DIR"] = str(work / "cache")
    os.chdir(REPO)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    results: dict[str, Any] = {"dry_run": args.dry_run, "sections": {}}
    start = time.perf_counter()
    try:
        with _tee(out / "gpu_check.log"):
            c = Check(out, work, args.dry_run)
            run_section(results, "environment", lambda: check_environment(c))
            total = results["sections"]["environment"].get("memory_bytes") or _host_memory()
            run_section(results, "tests", lambda: check_tests(c))
            run_section(results, "memory", lambda: check_memory(c, total))
            run_section(results, "throughput", lambda: check_throughput(c))
            run_section(results, "loader", lambda: check_loader(c))
            run_section(results, "syncs", lambda: check_syncs(c))
            run_section(results, "train", lambda: check_train(c))
            results["seconds"] = time.perf_counter() - start
            results["failed"] = [n for n, s in results["sections"].items() if s["status"] != "ok"]
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
            table = summary_table(results)
            (out / "summary.txt").write_text(table, encoding="utf-8")
            print("\n" + table, end="")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if results.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
