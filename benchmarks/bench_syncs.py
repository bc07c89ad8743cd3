"""Host-device synchronisations per training micro-batch, counted on the CPU.

    python benchmarks/bench_syncs.py [--preset demo] [--micro-batches 6] [--out benchmarks/results/bench_syncs.json]

On CUDA an op whose result the host must read (`.item()`, `.cpu()`, `nonzero`, `unique`, `bincount`,
`masked_select`, a data-dependent `repeat_interleave`) waits for the GPU to finish everything queued before it;
a few per micro-batch are unavoidable, dozens make a small model launch-bound. This script runs the trainer's
own step (isubg.step) on the tiny demo under a dispatch mode that counts those ops and the Python line that
caused each. The optimizers' `step` counters are left out: isubg keeps them on the CPU (a resumed run loads its
checkpoint there), where reading them costs no sync. The counts are what would sync on a GPU, measured without one.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from isubg.data.embedded import ensure_demo
from isubg.data.loaders import make_batches, open_split
from isubg.device import Precision
from isubg.models import build_model
from isubg.resolve import resolve_config
from isubg.step import apply_update, forward_backward, make_stepper, read_losses

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense.default,  # .item(), int(tensor), float(tensor), bool(tensor)
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
_OWN_FRAMES = ("/isubg/", "torch_geometric", "torch/distributions", "torch/nn/utils", "torch/optim")


class SyncCounter(TorchDispatchMode):
    """Counts syncing ops by the innermost isubg / library line that issued them."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        syncs = func in SYNCING or (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None)
        if func is aten._to_copy.default and str(kwargs.get("device", "")) == "cpu":
            syncs = True
        if syncs:
            frames = [f for f in traceback.extract_stack() if any(part in f.filename for part in _OWN_FRAMES)]
            where = f"{Path(frames[-1].filename).parent.name}/{Path(frames[-1].filename).name}:{frames[-1].lineno}"
            if "optim/optimizer.py" not in where:  # the step counters live on the CPU (module docstring)
                self.counts[f"{func.overloadpacket.__name__} @ {where}"] += 1
        return func(*args, **kwargs)


def count(preset: str, micro_batches: int, sets: list[str]) -> tuple[Counter[str], int]:
    """Sync counts over `micro_batches` micro-batches and one optimizer step after a warm-up step."""
    data = ensure_demo("tiny").processed("gqa")
    cfg = resolve_config(preset, sets=[f"data.root={data}", *sets]).config
    dataset = open_split(cfg, data, cfg.data.train_split, None)
    torch.manual_seed(0)
    model = build_model(cfg, dataset.spec()).train()
    stepper = make_stepper(cfg, model, torch.device("cpu"), Precision(None, False, "fp32"))
    batches = list(make_batches(dataset, cfg, epoch=0, train=True))[: micro_batches + 1]
    forward_backward(stepper, batches[0], 1.0)
    apply_update(stepper)
    counter = SyncCounter()
    with counter:  # as the trainer steps: the group's losses are read once, then the update
        losses = [forward_backward(stepper, batch, 1.0 / (len(batches) - 1)) for batch in batches[1:]]
        read_losses(losses)
        apply_update(stepper)
    return counter.counts, len(batches) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--micro-batches", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_syncs.json")
    args = parser.parse_args()
    counts, n = count(args.preset, args.micro_batches, args.set)
    print(f"syncs per micro-batch ({args.preset}, {n} micro-batches and one optimizer step)")
    for where, c in counts.most_common():
        print(f"{c / n:7.2f}  {where}")
    total = sum(counts.values()) / n
    print(f"{total:7.2f}  total")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"preset": args.preset, "sets": args.set, "micro_batches": n, "per_micro_batch": total,
              "sources": {k: v / n for k, v in counts.most_common()}, "torch": torch.__version__}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
