"""One training step, shared by `isubg train`, `isubg profile-memory --measure` and the benchmarks.

`make_optimizers` builds the optimizers the way the research system trains: one Adamax at `train.lr` over every
parameter of the Adamax branches (see `isubg.branches`), with the fusion weights as a second group at
`train.fusion_lr`, and one AdamW per AdamW branch (xvlm: `train.xvlm_lr`, weight decay
`optim.xvlm_weight_decay`, constant rate). Only the main Adamax follows the learning-rate schedule.

A step is `forward_backward` on each micro-batch of an accumulation group, then `apply_update`: unscale (fp16),
clip the global gradient norm, step every optimizer and the schedule, zero the gradients. `train_step` runs a
whole group; the trainer calls the two halves itself, as it handles out-of-memory, divergence and logging
between micro-batches. Whatever measures or times training calls the same functions, so it cannot drift from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from isubg.batch import Batch
from isubg.branches import BRANCHES
from isubg.config import RunConfig, get_value
from isubg.device import Precision
from isubg.errors import ConfigError
from isubg.models.fusion import FusedModel

__all__ = [
    "Optimizers",
    "Stepper",
    "apply_update",
    "forward_backward",
    "make_optimizers",
    "make_stepper",
    "read_losses",
    "train_step",
]

MAIN = "main"  # the Adamax's name in checkpoints; an AdamW branch's optimizer goes by the branch's name


@dataclass
class Optimizers:
    """The optimizers of one model by name: MAIN (Adamax, scheduled) first, then one per AdamW branch."""

    by_name: dict[str, torch.optim.Optimizer]

    @property
    def main(self) -> torch.optim.Optimizer:
        return self.by_name[MAIN]

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.by_name.values())

    def lr(self, name: str) -> float | None:
        """The current learning rate of `name`'s first parameter group, None when there is no such optimizer."""
        opt = self.by_name.get(name)
        return None if opt is None else opt.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.by_name.items()}

    def load_state_dict(self, states: dict[str, Any], where: object) -> None:
        """Load every optimizer's state (a checkpoint's `optimizers`).

        Raises:
            ConfigError: the checkpoint's main optimizer has another number of parameter groups (written before
                the fusion weights had a group of their own), or an optimizer's state is missing.
        """
        saved = len(states[MAIN]["param_groups"])
        if saved != len(self.main.param_groups):
            raise ConfigError(
                f"{where}: written by an older isubg whose main optimizer had {saved} parameter group(s) "
                f"(now {len(self.main.param_groups)}: the branches and the fusion weights); it can be evaluated "
                "but not resumed"
            )
        missing = [name for name in self.by_name if name not in states]
        if missing:
            raise ConfigError(f"{where}: has no optimizer state for {', '.join(missing)}; it cannot be resumed")
        for name, opt in self.by_name.items():
            opt.load_state_dict(states[name])


def make_optimizers(cfg: RunConfig, model: FusedModel) -> Optimizers:
    """The optimizers `isubg train` steps for `model` (module docstring)."""
    own = {name: spec for name, spec in BRANCHES.items() if spec.optimizer == "adamw" and name in model.branches}
    skip = {id(p) for name in own for p in model.branches[name].parameters()} | {id(model.adapted_w)}
    main_params = [p for p in model.parameters() if id(p) not in skip and p.requires_grad]
    # The fusion weights are their own group so that train.fusion_lr can move them faster than the branches.
    fusion_lr = cfg.train.fusion_lr if cfg.train.fusion_lr is not None else cfg.train.lr
    groups = [{"params": main_params}, {"params": [model.adapted_w], "lr": fusion_lr}]
    by_name: dict[str, torch.optim.Optimizer] = {MAIN: torch.optim.Adamax(groups, lr=cfg.train.lr)}
    for name, spec in own.items():
        assert spec.weight_decay_field is not None  # BranchSpec checks it for AdamW branches
        params = [p for p in model.branches[name].parameters() if p.requires_grad]
        lr, decay = get_value(cfg, spec.lr_field), get_value(cfg, spec.weight_decay_field)
        by_name[name] = torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    return Optimizers(by_name)


@dataclass
class Stepper:
    """Everything one optimizer step touches.

    Attributes:
        model: the fused model (its `loss` and parameters).
        wrapped: what runs the forward: the model, or its DistributedDataParallel wrapper.
        optimizers: from `make_optimizers`.
        schedule: the main Adamax's learning-rate schedule, stepped after each update (None: no schedule).
        scaler: fp16's gradient scaler (disabled otherwise).
        precision: the autocast settings.
        device: where the model is.
        clip_norm: the global gradient-norm clip (`optim.clip_norm`).
    """

    model: FusedModel
    wrapped: nn.Module
    optimizers: Optimizers
    schedule: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    clip_norm: float


def make_stepper(cfg: RunConfig, model: FusedModel, device: torch.device, precision: Precision) -> Stepper:
    """A single-process Stepper without a schedule: what measurements and benchmarks step (`isubg train` builds
    its own, with the schedule and the DDP wrapper)."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    return Stepper(model, model, make_optimizers(cfg, model), None, scaler, precision, device, cfg.optim.clip_norm)


def forward_backward(s: Stepper, batch: Batch, scale: float, sync: bool = True) -> torch.Tensor:
    """Forward and backward of one micro-batch; the loss is multiplied by `scale` before backward.

    Under DDP, `sync=False` skips the gradient all-reduce (every micro-batch of a group but the last).
    Returns the unscaled loss as a detached 0-d tensor on the device, not a float: reading it is a host-device
    sync on CUDA, so callers read a whole accumulation group's losses at once (`read_losses`). A non-finite loss
    still runs backward, so DDP ranks stay in step.
    """
    batch = batch.to(s.device, non_blocking=True)
    ddp = isinstance(s.wrapped, nn.parallel.DistributedDataParallel)
    with s.wrapped.no_sync() if ddp and not sync else nullcontext():  # type: ignore[operator]
        with s.precision.autocast(s.device):
            output = s.wrapped(batch)
        loss, _parts = s.model.loss(output, batch.targets, batch.question_ids)
        s.scaler.scale(loss * scale).backward()
    return loss.detach()


def read_losses(losses: Sequence[torch.Tensor]) -> list[float]:
    """The values of `forward_backward`'s losses, in one host-device sync; nan for each non-finite one."""
    if not losses:
        return []
    return [v if math.isfinite(v) else math.nan for v in torch.stack([x.float() for x in losses]).tolist()]


def apply_update(s: Stepper) -> tuple[float, bool]:
    """Unscale, clip, step every optimizer and the schedule, zero the gradients.

    Returns (the gradient norm before clipping, whether the optimizers stepped). Without a grad scaler a
    non-finite norm means divergence: nothing is stepped and the caller stops. (With fp16's scaler an overflow
    is expected now and then; the scaler skips that step itself and lowers its scale.)
    """
    for opt in s.optimizers:
        s.scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.clip_norm).item()
    stepped = math.isfinite(norm) or s.scaler.is_enabled()
    if stepped:
        for opt in s.optimizers:
            s.scaler.step(opt)
        s.scaler.update()
        if s.schedule is not None:
            s.schedule.step()
    for opt in s.optimizers:
        opt.zero_grad(set_to_none=True)
    return norm, stepped


def train_step(s: Stepper, micro_batches: Sequence[Batch]) -> tuple[list[float], float]:
    """One update from an accumulation group: each micro-batch's loss counts 1/len(group) of the mean gradient.

    Returns (each micro-batch's loss, the gradient norm before clipping).
    """
    losses = [
        forward_backward(s, batch, 1.0 / len(micro_batches), sync=i == len(micro_batches) - 1)
        for i, batch in enumerate(micro_batches)
    ]
    norm, _stepped = apply_update(s)
    return read_losses(losses), norm
