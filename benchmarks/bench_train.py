"""Training throughput of `isubg train` per preset, end to end (loader, forward, backward, both optimizers).

    python benchmarks/bench_train.py [--presets demo,default,gqa,vqa,high-performance,...] [--steps 6]
                                     [--threads 2] [--data DIR] [--out benchmarks/results/bench_train.json]

Each preset trains on the small demo dataset (GQA format; VQA for the `vqa` preset) through `isubg.train.train`
with the preset's own micro-batch size, one micro-batch per update, for `--steps` updates (logged every step). Samples/s
is the median of the per-step rates over the second half of the steps (the first steps pay for kernel selection
at every new box count and for cold caches). The
demo's 128-d features and 32 answers are smaller than real data (2048-d, 1842/3129 answers), so full-size
presets are a little faster here than on real files; the models themselves are the presets' full sizes.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from isubg.presets import list_presets
from isubg.report import read_metrics
from isubg.resolve import resolve_config
from isubg.train import train


def measure(preset: str, data_root: Path, steps: int) -> dict[str, Any]:
    dataset = "VQA" if preset == "vqa" else "GQA"
    probe = resolve_config(preset).config
    # One micro-batch per update: the rate per sample does not depend on accumulation, and the run stays short.
    sets = [f"data.dataset={dataset}", "data.num_workers=0", "train.log_every=1", "update_freq=1",
            "gradient_accumulation_steps=1", f"data.train_limit={probe.train.batch_size * steps}", "data.val_limit=1",
            "train.epochs=1"]  # fmt: skip
    cfg = resolve_config(preset, sets=sets).config
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = train(cfg, Path(tmp) / "run", data_dir=data_root / "processed" / dataset.lower(),
                       console=Console(file=io.StringIO()), stop_after_steps=steps, preset=preset)  # fmt: skip
        wall = time.perf_counter() - started
        records = read_metrics(Path(tmp) / "run").records
    rates = [r["samples_per_s"] for r in records if r["event"] == "step"]
    rates = rates[len(rates) // 2 :]  # the first steps pay for kernel selection at each new box count
    start = records[0]
    return {
        "preset": preset,
        "dataset": dataset,
        "effective_batch": probe.effective_batch,
        "micro_batch": cfg.train.batch_size,
        "params_m": round(start["params"]["total"] / 1e6, 2),
        "precision": start["precision"],
        "steps": result.steps,
        "samples_per_s": round(statistics.median(rates), 2) if rates else math.nan,
        "peak_rss_mib": round(result.peak_memory_mib, 1),
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(list_presets()))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None, help="A demo folder; default: the cached small demo.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_train.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.data is None:
        from isubg.data.embedded import ensure_demo

        args.data = ensure_demo("small").root
    rows = []
    for preset in args.presets.split(","):
        row = measure(preset, args.data, args.steps)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    header = f"{'preset':18} {'params M':>9} {'batch':>6} {'eff.':>5} {'prec':>5} {'samples/s':>10} {'peak MiB':>9}"
    print(header)
    for r in rows:
        print(f"{r['preset']:18} {r['params_m']:9.2f} {r['micro_batch']:6d} {r['effective_batch']:5d} "
              f"{r['precision']:>5} {r['samples_per_s']:10.2f} {r['peak_rss_mib']:9.0f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"torch": torch.__version__, "threads": args.threads, "cuda": torch.cuda.is_available()}
    args.out.write_text(json.dumps({"machine": machine, "steps": args.steps, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
