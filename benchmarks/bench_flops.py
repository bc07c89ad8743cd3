"""FLOPs per trained sample of the fused model, per preset.

    python benchmarks/bench_flops.py [--presets default,8gb,24gb,memory-optimized,high-performance] [--batch 2]
                                     [--out benchmarks/results/bench_flops.json]

Counts the floating-point operations of one training micro-batch (forward, loss and backward; not the
optimizer update) with torch's FlopCounterMode, on the worst-case input of each preset (data.max_boxes boxes,
question_len tokens, the default scene-graph bound of 100 nodes and 600 edges, GQA's 1,842 answers, as
`isubg profile-memory` sizes it), divided by the micro-batch. The count does not depend on the hardware: it is
what an MFU figure on a GPU divides by (scripts/gpu_check.py measures that). Per branch alone and fused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from isubg.memory import WorstCase, synthetic_spec, worst_case_batch
from isubg.models import build_model
from isubg.resolve import resolve_config


def flops_per_sample(preset: str, batch: int, branches: list[str] | None) -> dict[str, Any]:
    """FLOPs of one training micro-batch of `batch` worst-case samples, divided by `batch`."""
    sets = [] if branches is None else [f"model.branches=[{', '.join(branches)}]"]
    cfg = resolve_config(preset, sets=sets).config
    worst = WorstCase.for_config(cfg)
    spec = synthetic_spec(cfg, worst)
    torch.manual_seed(0)
    model = build_model(cfg, spec).train()
    inputs = worst_case_batch(spec, worst, batch, image_res=getattr(model.branch("xvlm"), "image_res", None))
    counter = FlopCounterMode(display=False)
    started = time.perf_counter()
    with counter:
        loss, _ = model.loss(model(inputs), inputs.targets)
        loss.backward()
    return {
        "preset": preset,
        "model": "fused" if branches is None else branches[0],
        "gflops_per_sample": counter.get_total_flops() / batch / 1e9,
        "batch": batch,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="default,8gb,24gb,memory-optimized,high-performance")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--branches", action="store_true", help="also count each branch alone")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_flops.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets.split(","):
        models: list[list[str] | None] = [None]
        if args.branches:
            models += [[b] for b in resolve_config(preset).config.model.branches]
        for branches in models:
            rows.append(flops_per_sample(preset, args.batch, branches))
            r = rows[-1]
            print(f"{r['preset']:18} {r['model']:6} {r['gflops_per_sample']:9.2f} GFLOP/sample  ({r['seconds']} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
