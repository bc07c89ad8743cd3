"""The training loop. `train(cfg, run_dir)` runs one training job; read it top to bottom.

1. Set-up: processes (torchrun's environment -> DDP), device, precision, seed.
2. Data: the processed train and validation splits, visited in a seeded, resumable `EpochOrder`.
3. Model: `build_model`, then its optimizers (`isubg.step.make_optimizers`), as in the research system:
   Adamax at `train.lr` for the cfrf and isubg branches (the fusion weights in a group of their own at
   `train.fusion_lr`) and AdamW at `train.xvlm_lr` (weight decay `optim.xvlm_weight_decay`, constant rate)
   for the xvlm branch.
4. Schedule (`train.schedule: ban`): BAN's epoch schedule, as MGHR runs it for its default 20 epochs,
   stretched or squeezed to `train.epochs` and applied per optimizer step. With p = 20 x (fraction of
   training done): p < 4 -> 0.5, 1.0, 1.5, 2.0 x lr by whole p (warm-up); 4 <= p < 10 -> 2 x lr; then x 0.25
   at p = 10, 12, 14, 16, 18. At epochs = 20 it equals the reference at every epoch start.
5. Micro-batches: the loss of each is divided by the number of micro-batches in its accumulation group
   (update_freq x gradient_accumulation_steps, fewer for the last group of an epoch), so one update sees
   the mean gradient; then unscale (fp16), clip the global norm to `optim.clip_norm`, step the optimizers
   (`isubg.step`: the same step `profile-memory --measure` and the benchmarks take).
   A non-finite loss or gradient norm stops the run ("diverged") before the update, keeping the last good
   checkpoint.
6. After each epoch: validation accuracy per branch and fused, `last.pt` (and `best.pt` when the fused
   accuracy improved), early stopping after `train.patience` epochs without improvement.
7. SIGINT/SIGTERM: finish the current update, save `last.pt` with the position inside the epoch, exit.
   `resume=True` restores everything (weights, optimizers, schedule, scaler, RNG, position), so an
   interrupted and resumed run ends with the same weights as one that was never interrupted.
   The same mid-epoch `last.pt` is written every `train.checkpoint_every` updates or minutes, so a kill -9 or
   a lost node costs at most that much work.

Only rank 0 writes files and prints; metrics are reduced across ranks.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from isubg.checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointClock,
    initialise_from,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    strip_module_prefix,
    vocab_checksum,
)
from isubg.config import RunConfig
from isubg.data.dataset import VQADataset
from isubg.data.loaders import make_batches, open_split
from isubg.device import (
    Precision,
    configure_cuda_math,
    peak_memory_mib,
    pick_device,
    pick_precision,
    prefer_expandable_segments,
)
from isubg.errors import ConfigError, ResourceError
from isubg.evaluate import evaluate
from isubg.memory import WorstCase, estimate, largest_graph
from isubg.metrics import AccuracyTable, gqa_accuracy, vqa_accuracy
from isubg.models import build_model, parameter_counts
from isubg.models.fusion import FusedModel
from isubg.resolve import dump_config
from isubg.runlog import TrainResult, TrainUI
from isubg.step import Stepper, apply_update, forward_backward, make_optimizers, read_losses

__all__ = ["EpochHook", "TrainResult", "ban_multiplier", "seed_everything", "train"]

# (epochs done, fused validation accuracy) -> stop now? Called once per epoch on every rank.
EpochHook = Callable[[int, float], bool]

REFERENCE_EPOCHS = 20  # the MGHR default the BAN schedule's milestones are written for


# --------------------------------------------------------------------------------------------------
# Set-up


@dataclass(frozen=True)
class Processes:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def fit_micro_batch(cfg: RunConfig, spec: Any, device: torch.device, data_dir: Path) -> str | None:
    """memory.dynamic_batch_size before training: the largest micro-batch that fits, the effective batch kept.

    On CUDA the memory model (isubg.memory) sizes the worst-case input (max_boxes boxes, the data's largest
    graph) against max_memory_usage x the device's memory and picks the largest micro-batch that divides the
    samples per update (`MemoryEstimate.fitted_geometry`): smaller when the configured one does not fit, larger
    when the card has room (fewer, larger micro-batches; accumulation lowered to match). `cfg` is changed in
    place. Returns a line for the log, or None when off.

    Raises:
        ResourceError: not even a micro-batch of 1 fits.
    """
    if not cfg.memory.dynamic_batch_size:
        return None
    if device.type != "cuda":
        return "dynamic_batch_size: no device memory to fit on the CPU; the micro-batch stays, OOM recovery is on"
    model = estimate(cfg, spec, WorstCase.for_config(cfg, spec, graph=largest_graph(data_dir), source="data"))
    total = torch.cuda.get_device_properties(device).total_memory
    fitted = model.fitted_geometry(total, cfg.memory.max_memory_usage)
    if fitted is None:
        raise ResourceError(
            f"memory.dynamic_batch_size: not even a micro-batch of 1 fits in {cfg.memory.max_memory_usage:.0%} of "
            f"{total / 2**30:.1f} GiB; see `isubg profile-memory` for what to change"
        )
    old, gib = cfg.train.batch_size, model.total(cfg.train.batch_size) / 2**30
    if fitted.batch_size == old:
        return f"dynamic_batch_size: micro-batch {old} fits (estimate {gib:.2f} GiB); no larger one divides the update"
    cfg.train.batch_size = fitted.batch_size
    cfg.optim.gradient_accumulation_steps = fitted.gradient_accumulation_steps
    cfg.train.update_freq = fitted.update_freq
    why = "needs" if fitted.batch_size < old else "takes only"
    return (
        f"dynamic_batch_size: micro-batch {old} {why} {gib:.2f} GiB; using {fitted.batch_size} x accumulation "
        f"{fitted.gradient_accumulation_steps} x update_freq {fitted.update_freq} (same effective batch)"
    )


def start_processes(device_setting: str) -> Processes:
    """Join torchrun's process group when WORLD_SIZE > 1: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_setting != "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo")
    return Processes(rank=rank, world=world, local_rank=local)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python and numpy, and ask for deterministic kernels where they exist."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def ban_multiplier(step: int, steps_per_epoch: int, epochs: int) -> float:
    """The BAN/MGHR learning-rate multiplier at optimizer step `step` (see the module docstring)."""
    p = REFERENCE_EPOCHS * step / (steps_per_epoch * epochs)
    if p < 4:
        return 0.5 * (math.floor(p) + 1)
    if p < 10:
        return 2.0
    return 2.0 * 0.25 ** (math.floor((p - 10) / 2) + 1)


# --------------------------------------------------------------------------------------------------
# Model, optimizers, schedule


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch being trained (0-based)
    batch: int = 0  # micro-batches of that epoch already trained on
    step: int = 0  # optimizer steps so far
    best_score: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the best one
    elapsed_s: float = 0.0
    # The epoch before `epoch` is trained and saved but not yet validated (a crash in validation loses nothing;
    # a resumed run validates it first).
    pending_validation: bool = False


@dataclass
class Trainer(Stepper):
    """A Stepper (what one optimizer step touches) with the run's config, processes and progress."""

    cfg: RunConfig
    procs: Processes
    progress: Progress = field(default_factory=Progress)


def make_trainer(
    cfg: RunConfig,
    model: FusedModel,
    steps_per_epoch: int,
    device: torch.device,
    precision: Precision,
    procs: Processes,
) -> Trainer:
    """Optimizers, schedule, scaler and (under torchrun) the DDP wrapper for `model`, already on `device`."""
    optimizers = make_optimizers(cfg, model)
    if cfg.train.schedule == "ban":
        rule = partial(ban_multiplier, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs)
    else:
        rule = partial(lambda _step: 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizers.main, rule)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    wrapped: nn.Module = model
    if procs.world > 1:
        # find_unused_parameters: which parameters get no gradient changes from step to step (the isubg sampler's
        # masks, batches without held-out fusion questions), so DDP must look every time.
        # broadcast_buffers off: every buffer is a constant derived from the data folder (tf-idf matrix, graph
        # word ids), the same on every rank; broadcasting them from rank 0 on each forward only cost bandwidth.
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets instead of beside a bucket copy
        # of them, so DDP adds no gradient-sized memory (and the memory model needs no term for it).
        wrapped = nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=True, broadcast_buffers=False, gradient_as_bucket_view=True
        )
    return Trainer(
        model, wrapped, optimizers, schedule, scaler, precision, device, cfg.optim.clip_norm, cfg=cfg, procs=procs
    )


def gather_rng(t: Trainer) -> list[dict[str, Any]]:
    """Every rank's random generator states (rank order), so a resumed DDP run gives each rank its own noise back.

    Collective under DDP: every rank must call it.
    """
    local = rng_state(t.device)
    if t.procs.world == 1:
        return [local]
    gathered: list[Any] = [None] * t.procs.world
    tdist.all_gather_object(gathered, local)
    return gathered


def checkpoint_state(t: Trainer, spec: dict[str, int], vocab: str, rngs: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything `restore` needs (layout in isubg.checkpoint); `rngs` from `gather_rng`."""
    extra = {"rng_ranks": rngs} if len(rngs) > 1 else {}
    return {
        "version": CHECKPOINT_VERSION,
        "model": strip_module_prefix(t.model.state_dict()),
        "optimizers": t.optimizers.state_dict(),
        "scheduler": t.schedule.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else {},
        "rng": rngs[0],
        **extra,
        "progress": asdict(t.progress),
        "config": t.cfg.model_dump(mode="json"),
        "spec": spec,
        "vocab_sha256": vocab,
    }


def restore(t: Trainer, state: dict[str, Any], vocab: str, where: Path) -> None:
    """Load a checkpoint's weights, optimizer, schedule, scaler, RNG and position into `t`.

    Raises:
        ConfigError: the checkpoint was trained on other vocabularies or with other settings that shape the model.
    """
    if state.get("vocab_sha256") != vocab:
        raise ConfigError(f"{where}: trained on a different dictionary/answer list than {t.cfg.data.root}")
    # The micro-batch geometry is the checkpoint's: dynamic batch sizing may have changed it during the run,
    # and the saved position counts micro-batches of that size.
    t.cfg.train.batch_size = state["config"]["train"]["batch_size"]
    t.cfg.optim.gradient_accumulation_steps = state["config"]["optim"]["gradient_accumulation_steps"]
    t.cfg.train.update_freq = state["config"]["train"]["update_freq"]
    t.model.load_state_dict(state["model"])
    t.optimizers.load_state_dict(state["optimizers"], where)
    t.schedule.load_state_dict(state["scheduler"])
    if state["scaler"]:
        t.scaler.load_state_dict(state["scaler"])
    t.progress = Progress(**state["progress"])
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) == t.procs.world:
        set_rng_state(ranks[t.procs.rank], t.device)
    elif t.procs.main:
        set_rng_state(ranks[0], t.device)
    else:
        # Saved with another number of processes: this rank has no state of its own, so it draws fresh noise,
        # distinct per rank and per position (exact resume needs the same process count).
        seed_everything(t.cfg.train.seed + 1_000_003 * (t.progress.step + 1) + t.procs.rank)


# --------------------------------------------------------------------------------------------------
# One epoch


class StopFlag:
    """Set by SIGINT/SIGTERM (or a test); the loop stops at the next update boundary. A second signal aborts."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is not None

    @contextmanager
    def catching(self) -> Iterator[None]:
        """Install the handlers for the duration of training (main thread only; elsewhere a no-op)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, _frame: Any) -> None:
            if self.reason is not None:  # the second signal: stop now
                signal.signal(signum, previous[signum])
                raise KeyboardInterrupt
            self.reason = signal.Signals(signum).name

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _any_rank(t: Trainer, *flags: bool) -> list[bool]:
    """Each flag, true when it is true on any rank (so every process stops at the same update)."""
    if t.procs.world == 1:
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags], device=t.device)
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def _mean_across(t: Trainer, values: list[float]) -> list[float]:
    if t.procs.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=t.device)
    tdist.all_reduce(tensor)
    return [v / t.procs.world for v in tensor.tolist()]


def out_of_memory(t: Trainer) -> None:
    """Drop the interrupted group's gradients and free the cache, or explain why the run cannot go on.

    Raises:
        ResourceError: memory.dynamic_batch_size is off, the micro-batch is already 1, or the run is
            distributed (every rank would have to agree on the new size mid-step).
    """
    cfg = t.cfg
    _free_memory(t)
    if not cfg.memory.dynamic_batch_size or cfg.train.batch_size == 1 or t.procs.world > 1:
        why = (
            "memory.dynamic_batch_size is off" if not cfg.memory.dynamic_batch_size
            else "the micro-batch is already 1" if cfg.train.batch_size == 1
            else "OOM recovery is not available in distributed runs"
        )  # fmt: skip
        raise ResourceError(
            f"out of {t.device.type.upper()} memory at micro-batch size {cfg.train.batch_size} ({why}). Turn on "
            "memory.dynamic_batch_size, lower train.batch_size (raising optim.gradient_accumulation_steps keeps "
            "the effective batch), or see `isubg profile-memory` for what fits; checkpoints/last.pt is kept"
        )


def _free_memory(t: Trainer) -> None:
    """Drop the gradients and return the cached device memory (after an out-of-memory error, once released)."""
    for opt in t.optimizers:
        opt.zero_grad(set_to_none=True)
    gc.collect()
    if t.device.type == "cuda":
        torch.cuda.empty_cache()


def _update(t: Trainer) -> tuple[float, bool]:
    """`apply_update`, with an out-of-memory error in the optimizer step turned into a clear one.

    Raises:
        ResourceError: the optimizer step ran out of memory. A smaller micro-batch cannot help (the activations
            are freed by then; the step needs the weights, gradients, optimizer states and foreach's copies).
    """
    try:
        return apply_update(t)
    except torch.OutOfMemoryError:
        pass  # handled below, outside the except block, whose traceback holds the step's tensors
    _free_memory(t)
    raise ResourceError(
        f"out of {t.device.type.upper()} memory in the optimizer step (step {t.progress.step + 1}): the weights, "
        "gradients and optimizer states do not fit, whatever the micro-batch. Use a smaller model (--preset "
        "memory-optimized) or see `isubg profile-memory`; checkpoints/last.pt is kept"
    )


def halve_micro_batch(t: Trainer) -> tuple[int, int]:
    """The largest divisor of the micro-batch up to half of it, with accumulation raised to keep the effective batch.

    Progress is kept in micro-batches of the current size, so the position is rescaled (exactly: the new size
    divides the old one). Returns the new (batch_size, gradient_accumulation_steps).
    """
    train_cfg, optim_cfg, prog = t.cfg.train, t.cfg.optim, t.progress
    old = train_cfg.batch_size
    new = max(d for d in range(1, old // 2 + 1) if old % d == 0)
    optim_cfg.gradient_accumulation_steps *= old // new
    train_cfg.batch_size = new
    prog.batch = prog.batch * old // new
    return new, optim_cfg.gradient_accumulation_steps


@dataclass
class EpochOutcome:
    """How an epoch ended: completed, or stopped early by a signal, a step limit or divergence."""

    train_loss: float
    samples: int
    seconds: float
    stopped: str | None = None  # "interrupted" | "diverged" | "oom" (redo the group at a smaller micro-batch)
    message: str = ""


@dataclass
class Periodic:
    """Mid-epoch checkpoints: when (train.checkpoint_every) and how (the same last.pt a signal writes)."""

    clock: CheckpointClock
    save: Callable[[], None]


def train_epoch(
    t: Trainer,
    loader: DataLoader,
    ui: TrainUI,
    stop: StopFlag,
    stop_after: int | None,
    periodic: Periodic,
) -> EpochOutcome:
    """Train on the rest of the current epoch (from `t.progress.batch`), one accumulation group at a time.

    After an update, `periodic` writes last.pt when train.checkpoint_every says so (all ranks decide together,
    in the same collective as the NaN and signal checks).
    """
    cfg, prog = t.cfg, t.progress
    group = cfg.train.update_freq * cfg.optim.gradient_accumulation_steps
    total = prog.batch + len(loader)  # micro-batches in the whole epoch
    t.model.train()
    losses: list[float] = []  # read once per accumulation group (one host-device sync), not per micro-batch
    pending: list[tuple[torch.Tensor, int]] = []  # (loss, samples) of the group's micro-batches so far
    samples, started = 0, time.perf_counter()
    window = (0, 0, started)  # (micro-batches, first loss index, time) since the last step record

    def outcome(stopped: str | None = None, message: str = "") -> EpochOutcome:
        finite = [v for v in losses if math.isfinite(v)]
        (mean,) = _mean_across(t, [sum(finite) / max(1, len(finite))]) if stopped is None else (math.nan,)
        return EpochOutcome(mean, samples, time.perf_counter() - started, stopped, message)

    for batch in loader:
        group_start = prog.batch - prog.batch % group
        in_group = min(group, total - group_start)  # the last group of an epoch may be short
        last_of_group = prog.batch - group_start == in_group - 1
        oom = False
        try:
            pending.append((forward_backward(t, batch, 1.0 / in_group, sync=last_of_group), len(batch)))
        except torch.OutOfMemoryError:
            oom = True
        if oom:  # handled outside the except block, whose traceback holds the failed step's graph and batch
            out_of_memory(t)
            prog.batch = group_start  # the interrupted group is redone from its first sample
            return outcome("oom", f"out of memory at micro-batch size {cfg.train.batch_size}")
        samples += len(batch) * t.procs.world
        prog.batch += 1
        if not last_of_group:
            continue
        group_losses = read_losses([loss for loss, _ in pending])
        for value, (_, size) in zip(group_losses, pending, strict=True):
            ui.advance(value, size * t.procs.world)
        losses += group_losses
        pending.clear()
        due = periodic.clock.due(prog.step + 1, time.monotonic()) and prog.batch < total  # not at the epoch's end
        bad_loss, interrupted, due = _any_rank(t, math.isnan(sum(group_losses)), bool(stop), due)
        if bad_loss:
            return outcome("diverged", f"the loss became nan/inf at step {prog.step + 1} (epoch {prog.epoch + 1})")
        norm, stepped = _update(t)
        if stepped:
            prog.step += 1
        else:
            return outcome("diverged", f"the gradient norm became {norm} at step {prog.step + 1}")
        if prog.step % cfg.train.log_every == 0:
            count, first, since = len(losses) - window[1], window[1], window[2]
            (mean_loss,) = _mean_across(t, [sum(losses[first:]) / count])
            rate = count * cfg.train.batch_size * t.procs.world / (time.perf_counter() - since)
            ui.step_record(
                step=prog.step, epoch=prog.epoch + 1, loss=mean_loss, lr=t.optimizers.lr("main"),
                xvlm_lr=t.optimizers.lr("xvlm"), grad_norm=norm,
                samples_per_s=rate,
            )  # fmt: skip
            window = (0, len(losses), time.perf_counter())
        if interrupted or (stop_after is not None and prog.step >= stop_after):
            return outcome("interrupted", f"stopped by {stop.reason or f'the step limit {stop_after}'}")
        if due:
            periodic.save()
    return outcome()


# --------------------------------------------------------------------------------------------------
# The job


def validate(t: Trainer, val_set: VQADataset) -> dict[str, float]:
    """Validation accuracy per branch, fused, ens and bound, over every validation question (all ranks)."""
    loader = make_batches(val_set, t.cfg, rank=t.procs.rank, world=t.procs.world, epoch=0, train=False)
    result = evaluate(t.model, loader, val_set, device=t.device, autocast=partial(t.precision.autocast, t.device))
    table = result.table
    assert table is not None
    if t.procs.world > 1:
        gathered: list[Any] = [None] * t.procs.world
        tdist.all_gather_object(gathered, table.state())
        table = AccuracyTable.from_state(gathered[0])
        for state in gathered[1:]:
            table.merge(AccuracyTable.from_state(state))
    return table.accuracy() or {}


def _save(t: Trainer, run_dir: Path, spec: dict[str, int], vocab: str, best: bool) -> None:
    """Write last.pt (and best.pt) on rank 0; collective under DDP (every rank's RNG state is gathered)."""
    rngs = gather_rng(t)
    if not t.procs.main:
        return
    last = run_dir / "checkpoints" / "last.pt"
    save_checkpoint(last, checkpoint_state(t, spec, vocab, rngs))
    if best:
        tmp = last.with_name(".best.pt.tmp")
        shutil.copyfile(last, tmp)
        os.replace(tmp, last.with_name("best.pt"))


def _validate_epoch(
    t: Trainer, val_set: VQADataset, outcome: EpochOutcome, ui: TrainUI, save: Callable[[bool], None]
) -> dict[str, float]:
    """Validate the epoch just trained (`t.progress.epoch` epochs done), record it, update best/patience, save.

    The epoch's training is saved before validation starts (`pending_validation`), so a crash or out-of-memory
    error while validating loses nothing; last.pt (and best.pt when the fused accuracy improved) is saved again
    afterwards.
    """
    prog = t.progress
    prog.pending_validation = True
    save(False)
    val = validate(t, val_set)
    score = val.get("fused", math.nan)
    improved = prog.best_score is None or score > prog.best_score
    if improved:
        prog.best_score, prog.best_epoch, prog.bad_epochs = score, prog.epoch, 0
    else:
        prog.bad_epochs += 1
    prog.pending_validation = False
    ui.epoch_record(
        prog.epoch, t.cfg.train.epochs, prog.step, outcome.train_loss, outcome.samples, outcome.seconds, val, improved
    )  # fmt: skip
    save(improved)
    return val


def train(
    cfg: RunConfig,
    run_dir: Path,
    *,
    data_dir: Path,
    resume: bool = False,
    console: Console | None = None,
    stop_after_steps: int | None = None,
    preset: str = "",
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Train `cfg` on the processed folder `data_dir`, writing into `run_dir` (see the module docstring).

    Args:
        stop_after_steps: behave as if interrupted after this many optimizer steps (tests, smoke runs).
        on_epoch: called after each epoch's validation and checkpoint with (epochs done, fused validation
            accuracy); returning True ends the run with status "pruned" (a tuner stopping a hopeless trial).

    Raises:
        ConfigError / DataError: bad settings or data, before anything is trained.
    """
    cfg = cfg.model_copy(deep=True)  # dynamic batch sizing may change the micro-batch; the caller's config stays
    prefer_expandable_segments()  # before CUDA's first allocation
    procs = start_processes(cfg.train.device)
    one_device = procs.world == 1 or cfg.train.device == "cpu" or not torch.cuda.is_available()
    device = pick_device(cfg.train.device if one_device else f"cuda:{procs.local_rank}")
    precision = pick_precision(device, cfg.memory.mixed_precision)
    if device.type == "cuda":
        configure_cuda_math(cfg.train.tf32)
        # Caps PyTorch's caching allocator, so the run raises (and dynamic batch sizing recovers) before it
        # takes more than its share of a shared card.
        torch.cuda.set_per_process_memory_fraction(cfg.memory.max_memory_usage, device)
    seed_everything(cfg.train.seed)
    train_set = open_split(cfg, data_dir, cfg.data.train_split, cfg.data.train_limit)
    val_set = open_split(cfg, data_dir, cfg.data.val_split, cfg.data.val_limit)
    spec = train_set.spec()
    fitted = None if resume else fit_micro_batch(cfg, spec, device, data_dir)  # a resumed run keeps its sizes
    model = build_model(cfg, spec).to(device)
    micro_batches = math.ceil(math.ceil(len(train_set) / procs.world) / cfg.train.batch_size)
    steps_per_epoch = math.ceil(micro_batches / (cfg.train.update_freq * cfg.optim.gradient_accumulation_steps))
    t = make_trainer(cfg, model, steps_per_epoch, device, precision, procs)
    vocab = vocab_checksum(data_dir)
    initialised = initialise_from(model, cfg.train.init_from, vocab) if cfg.train.init_from and not resume else ""
    spec_sizes = {k: getattr(spec, k) for k in ("num_words", "num_answers", "num_graph_tokens", "feature_dim")}
    last = run_dir / "checkpoints" / "last.pt"
    if resume:
        if not last.is_file():
            raise ConfigError(f"--resume: {run_dir} has no checkpoints/last.pt to continue from")
        # Loaded on the CPU: load_state_dict moves weights and optimizer moments to their parameters' device and
        # keeps the optimizers' `step` counters on the CPU, where foreach Adamax/AdamW read them without a sync.
        restore(t, load_checkpoint(last, map_location="cpu"), vocab, last)
    if procs.rank and not resume:
        torch.manual_seed(cfg.train.seed + procs.rank)  # same initial weights (DDP broadcasts), own dropout noise
    ui = TrainUI(run_dir, procs.main, console, resume=resume, loggers=cfg.train.loggers)
    if procs.main and not resume:
        (run_dir / "config.yaml").write_text(dump_config(cfg, header=f"resolved config of this run ({preset})"))
    baseline = majority_baseline(train_set, val_set)
    position = (t.progress.epoch, t.progress.batch, t.progress.step)
    counts = parameter_counts(model)
    ui.start(cfg, device, procs.world, position, counts, precision, len(train_set), len(val_set), baseline, data_dir)
    if fitted:
        ui.log(fitted)
    if initialised:
        ui.log(initialised)
    return _run_epochs(t, train_set, val_set, ui, run_dir, spec_sizes, vocab, baseline, stop_after_steps, on_epoch)


def _run_epochs(
    t: Trainer,
    train_set: VQADataset,
    val_set: VQADataset,
    ui: TrainUI,
    run_dir: Path,
    spec: dict[str, int],
    vocab: str,
    baseline: float | None,
    stop_after: int | None,
    on_epoch: EpochHook | None,
) -> TrainResult:
    cfg, prog, stop = t.cfg, t.progress, StopFlag()
    status, message, val = "finished", "", None
    started = time.perf_counter() - prog.elapsed_s

    clock = CheckpointClock(cfg.train.checkpoint_every, prog.step, time.monotonic())

    def save(best: bool) -> None:
        _save(t, run_dir, spec, vocab, best=best)
        clock.saved(prog.step, time.monotonic())

    def save_mid_epoch() -> None:
        save(False)
        ui.record("checkpoint", step=prog.step, epoch=prog.epoch + 1, batch=prog.batch)

    with stop.catching():
        verdict = None
        if prog.pending_validation:  # resumed after a crash while the last epoch was validated
            val = _validate_epoch(t, val_set, EpochOutcome(math.nan, 0, 0.0), ui, save)
            verdict = _stop_after_epoch(t, val, stop, on_epoch)
        while verdict is None and prog.epoch < cfg.train.epochs:
            skip = prog.batch * cfg.train.batch_size
            loader = make_batches(
                train_set, cfg, rank=t.procs.rank, world=t.procs.world, epoch=prog.epoch, train=True, skip=skip
            )
            ui.begin_epoch(prog.epoch, prog.batch, prog.batch + len(loader))
            outcome = train_epoch(t, loader, ui, stop, stop_after, Periodic(clock, save_mid_epoch))
            prog.elapsed_s = time.perf_counter() - started
            if outcome.stopped == "oom":
                size, accumulation = halve_micro_batch(t)
                ui.record("oom", step=prog.step, epoch=prog.epoch + 1, batch_size=size,
                          gradient_accumulation_steps=accumulation)  # fmt: skip
                ui.log(f"out of memory: micro-batch {size} x accumulation {accumulation} from here on "
                       f"(effective batch unchanged); redoing the interrupted update")  # fmt: skip
                if t.procs.main:
                    (run_dir / "config.yaml").write_text(
                        dump_config(cfg, header="resolved config of this run (after OOM)")
                    )
                continue
            if outcome.stopped == "diverged":
                status, message = "diverged", outcome.message
                break
            if outcome.stopped == "interrupted":
                save(False)
                status, message = "interrupted", outcome.message
                break
            prog.epoch, prog.batch = prog.epoch + 1, 0
            prog.elapsed_s = time.perf_counter() - started
            val = _validate_epoch(t, val_set, outcome, ui, save)
            verdict = _stop_after_epoch(t, val, stop, on_epoch)
        if verdict is not None:
            status, message = verdict
    result = TrainResult(
        run_dir=run_dir, status=status, message=message, best_score=prog.best_score, best_epoch=prog.best_epoch,
        steps=prog.step, elapsed_s=prog.elapsed_s, peak_memory_mib=peak_memory_mib(t.device), baseline=baseline,
        last_val=val,
    )  # fmt: skip
    ui.finish(result)
    return result


def _stop_after_epoch(
    t: Trainer, val: dict[str, float], stop: StopFlag, on_epoch: EpochHook | None
) -> tuple[str, str] | None:
    """(status, message) when the run ends after this validated epoch: patience, the caller's hook, a signal."""
    prog = t.progress
    if t.cfg.train.patience is not None and prog.bad_epochs >= t.cfg.train.patience:
        return "early_stopped", f"no better validation accuracy for {prog.bad_epochs} epochs (train.patience)"
    if on_epoch is not None and on_epoch(prog.epoch, val.get("fused", math.nan)):
        return "pruned", f"stopped after epoch {prog.epoch} by the caller (pruned)"
    if stop:
        return "interrupted", f"stopped by {stop.reason}"
    return None


def default_run_dir(preset: str, root: Path = Path("runs")) -> Path:
    """runs/<date>-<time>-<preset>, unique."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = root / f"{stamp}-{preset or 'run'}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{preset or 'run'}-{n}"
    return path


def majority_baseline(train_set: VQADataset, val_set: VQADataset) -> float | None:
    """Validation accuracy of always giving the most frequent training answer (None without validation answers)."""
    train, val = train_set.records, val_set.records
    counts = Counter(a for a in train.column_text("answer") if a)  # a question without an answer stores ""
    if not counts or not val.answered(0):
        return None
    answer = counts.most_common(1)[0][0]
    if train_set.manifest["dataset"].upper() == "VQA":
        scores = [vqa_accuracy(answer, val.human_answers(i)) for i in range(len(val))]
    else:
        scores = [gqa_accuracy(answer, a) for a in val.column_text("answer")]
    return sum(scores) / len(scores)
