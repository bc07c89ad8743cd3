"""The real peak on a GPU: what `isubg profile-memory --measure` compares the estimate with.

`measure_peak_cuda` takes real training steps on the worst-case batch with the trainer's own step
(isubg.step: the same optimizers, loss scaling, clipping and precision as `isubg train`), so the measured peak
cannot drift from what training does.
"""

from __future__ import annotations

import torch

from isubg.batch import DataSpec
from isubg.config import RunConfig
from isubg.device import pick_precision
from isubg.errors import ConfigError
from isubg.memory.estimate import WorstCase
from isubg.memory.inputs import synthetic_spec, worst_case_batch
from isubg.models import build_model
from isubg.step import make_stepper, train_step

__all__ = ["measure_peak_cuda", "require_cuda"]


def require_cuda() -> None:
    """Raise ConfigError unless torch sees a CUDA device (what `--measure` needs)."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "--measure runs real training steps on a GPU, but this torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); drop --measure for the estimate"
        )


def measure_peak_cuda(
    cfg: RunConfig,
    spec: DataSpec | None,
    batch: int,
    steps: int = 2,
    *,
    worst: WorstCase | None = None,
    device: str = "cuda",
) -> int:
    """torch.cuda.max_memory_allocated over `steps` real optimizer steps on the worst-case batch of size `batch`.

    Each step runs two micro-batches when the config accumulates (update_freq x gradient_accumulation_steps > 1),
    so the second forward runs with the gradients held, as in training; the step is the trainer's (isubg.step).
    Compare the result with `MemoryEstimate.allocated(batch)`.

    Raises:
        ConfigError: this machine has no CUDA device.
    """
    require_cuda()
    worst = worst if worst is not None else WorstCase.for_config(cfg, spec)
    spec = spec if spec is not None else synthetic_spec(cfg, worst)
    dev = torch.device(device)
    precision = pick_precision(dev, cfg.memory.mixed_precision)
    torch.manual_seed(0)
    model = build_model(cfg, spec).to(dev)
    model.train()
    inputs = worst_case_batch(spec, worst, batch, image_res=getattr(model.branch("xvlm"), "image_res", None))
    stepper = make_stepper(cfg, model, dev, precision)
    # Two micro-batches when the config accumulates, so the second forward runs with the gradients held.
    micro = 2 if cfg.train.update_freq * cfg.optim.gradient_accumulation_steps > 1 else 1
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(steps):
        train_step(stepper, [inputs] * micro)
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev))
