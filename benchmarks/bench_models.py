"""Model benchmarks: training throughput per branch and fused, parameters and activation memory per sample.

    python benchmarks/bench_models.py [--preset default] [--batch 32] [--warmup 2] [--steps 5] [--threads 2]
                                      [--branches cfrf,isubg,xvlm,fused] [--out benchmarks/results/bench_models.json]

A training step is the trainer's own (isubg.step.train_step: forward + loss + backward, clipping, the
Adamax/AdamW optimizers `isubg train` builds) in fp32 on one CPU process, on random batches
at the tuning guide's sizes: 50 boxes of 2048-d features, 12-token questions, 30 stat words, scene graphs of 30 nodes
and 170 edges, 3129 answers (the VQA v2 vocabulary). Throughput is the median over `--steps` timed steps
after `--warmup` untimed ones. Activation memory is the bytes of the tensors autograd saves for backward
during one forward pass (each storage counted once), divided by the batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isubg.batch import DataSpec
from isubg.data.synthetic import random_batch
from isubg.device import Precision
from isubg.models import build_model
from isubg.models.common import parameter_count
from isubg.resolve import resolve_config
from isubg.step import make_stepper, train_step


def _tfidf(words: int, per_row: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """A random sparse tf-idf matrix with `per_row` entries per word (rows sum to 1), as prepare writes it."""
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(words), per_row)
    cols = rng.integers(0, words, words * per_row)
    return rows, cols, np.full(words * per_row, 1.0 / per_row, np.float32), (words, words)


SPEC = DataSpec(num_words=20000, num_answers=3129, num_graph_tokens=2578, feature_dim=2048, tfidf=_tfidf(20000))


def saved_bytes(model: torch.nn.Module, batch: Any) -> int:
    """Bytes autograd keeps for backward during one training forward pass (shared storages once)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
        model.loss(out, batch.targets)
    return sum(seen.values())


def measure(name: str, preset: str, batch_size: int, warmup: int, steps: int) -> dict[str, Any]:
    branches = ["cfrf", "isubg", "xvlm"] if name == "fused" else [name]
    cfg = resolve_config(preset, sets=[f"model.branches=[{', '.join(branches)}]"]).config
    torch.manual_seed(0)
    model = build_model(cfg, SPEC)
    stepper = make_stepper(cfg, model, torch.device("cpu"), Precision(None, False, "fp32"))
    batches = [random_batch(SPEC, batch_size, seed=s) for s in range(2)]
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        train_step(stepper, [batches[step % 2]])
        if step >= warmup:
            times.append(time.perf_counter() - start)
    activations = saved_bytes(model, batches[0])
    return {
        "model": name,
        "preset": preset,
        "batch": batch_size,
        "params": parameter_count(model),
        "train_samples_per_s": batch_size / statistics.median(times),
        "step_seconds": {"median": statistics.median(times), "min": min(times), "max": max(times)},
        "activation_mib_per_sample": activations / batch_size / 2**20,
        "param_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--branches", default="cfrf,isubg,xvlm,fused")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_models.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(n, args.preset, args.batch, args.warmup, args.steps) for n in args.branches.split(",")]
    print(f"{'model':<7} {'params (M)':>11} {'train samples/s':>16} {'act. MiB/sample':>16} {'param MiB':>10}")
    for r in rows:
        print(
            f"{r['model']:<7} {r['params'] / 1e6:>11.2f} {r['train_samples_per_s']:>16.1f} "
            f"{r['activation_mib_per_sample']:>16.2f} {r['param_mib']:>10.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    spec = {k: v for k, v in SPEC.__dict__.items() if k not in ("glove", "tfidf")}
    meta = {"threads": args.threads, "torch": torch.__version__, "time": time.time(), "spec": spec}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
