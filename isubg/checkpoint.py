"""Checkpoints: written atomically, read with `weights_only=True`, carrying everything an exact resume needs.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing pickled beyond what
`torch.load(weights_only=True)` accepts):

    version           CHECKPOINT_VERSION
    model             the FusedModel state dict (never with DDP's `module.` prefix)
    optimizers        {"main": Adamax state, "xvlm": AdamW state (absent without the xvlm branch)}
    scheduler         the main optimizer's LambdaLR state
    scaler            the GradScaler state ({} when no scaler runs)
    rng               torch CPU/CUDA, Python and numpy generator states (see `rng_state`)
    progress          {"epoch", "batch" (micro-batches done in that epoch), "step", "best_score",
                       "best_epoch", "bad_epochs", "elapsed_s"}
    config            the resolved RunConfig as JSON-ready data
    spec              the data sizes the model was built for (DataSpec without embeddings)
    vocab_sha256      checksum of the processed folder's dictionary.json + answers.json

The write goes to a temporary file in the same folder, is flushed to disk, then renamed over the target,
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isubg.config import checkpoint_interval
from isubg.errors import DataError

__all__ = [
    "CHECKPOINT_VERSION",
    "CheckpointClock",
    "find_checkpoint",
    "initialise_from",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "strip_module_prefix",
    "vocab_checksum",
]

CHECKPOINT_VERSION = 1
_REQUIRED = ("version", "model", "config", "spec")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, with `weights_only=True`.

    Raises:
        DataError: the file is missing, not a torch file, truncated, holds objects a weights-only load
            refuses, or is not an isubg checkpoint of a version this release reads.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{path}: not a readable isubg checkpoint ({first}). The file may be truncated by a crash or written "
            "by another program; isubg loads checkpoints with weights_only=True and never unpickles code"
        ) from None
    if not isinstance(state, dict) or any(key not in state for key in _REQUIRED):
        raise DataError(f"{path}: a torch file, but not an isubg checkpoint (it lacks {', '.join(_REQUIRED)})")
    if state["version"] != CHECKPOINT_VERSION:
        raise DataError(
            f"{path}: checkpoint format version {state['version']}; this isubg reads version {CHECKPOINT_VERSION}"
        )
    return state


def initialise_from(model: torch.nn.Module, path: Path, vocab: str) -> str:
    """Copy the model weights of the isubg checkpoint `path` into `model` (train.init_from); returns a summary line.

    Only weights are read: optimizers, schedule and position start fresh. Every tensor of `model` must be in the
    file with the same shape, and the file must hold nothing else. A file written by `isubg import-checkpoint`
    without --data has no vocabulary checksum; its word and answer rows are taken to follow the data's order.

    Raises:
        DataError: unreadable file (see `load_checkpoint`), another vocabulary than the data's, or weights that do
            not fit `model` (each disagreement named with both shapes).
    """
    state = load_checkpoint(path)
    saved, own = state["model"], model.state_dict()
    if state.get("vocab_sha256") not in (None, vocab):
        raise DataError(f"train.init_from={path} was trained on another dictionary/answer list than this data")
    problems = [
        f"{k} {list(v.shape)} in the file vs {list(own[k].shape)} in the model"
        for k, v in saved.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems += [f"{k} only in the model" for k in own if k not in saved]
    problems += [f"{k} only in the file" for k in saved if k not in own]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise DataError(
            f"train.init_from={path} does not fit the model these settings build ({shown}); train with the "
            "settings it was written with (for an import: --config OUT.yaml)"
        )
    model.load_state_dict(saved)
    origin = state.get("imported", {})
    source = f" (imported from {origin.get('kind')} {origin.get('path')})" if origin else ""
    return f"initialised all {len(own)} model tensors from {path}{source}"


def find_checkpoint(path: Path) -> Path:
    """The checkpoint a user means by `path`: the file itself, or a run directory's best (else last) checkpoint.

    Raises:
        DataError: nothing there, or a run directory without checkpoints.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise DataError(f"{path}: no such run directory or checkpoint file")
    for name in ("best.pt", "last.pt"):
        candidate = path / "checkpoints" / name
        if candidate.is_file():
            return candidate
    raise DataError(f"{path}: a folder without checkpoints/best.pt or checkpoints/last.pt; is it an isubg run?")


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without DDP's `module.` key prefix, so single- and multi-process runs share checkpoints."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every random generator this process draws from, in weights-only-loadable types.

    On a CUDA `device` the state of that device's generator is kept ("cuda", one tensor): the run's own GPU,
    not every visible one, so a checkpoint resumes on a machine with fewer GPUs.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng_state` captured; the CUDA state goes to `device` when it is a CUDA device.

    Checkpoints of isubg 0.1 before this change hold a list of every visible GPU's state; the entry of the
    device's index is used (the last one when the list is shorter).
    """
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    saved = state.get("cuda")
    if saved is None or device is None or device.type != "cuda":
        return
    if isinstance(saved, (list, tuple)):
        if not saved:
            return
        saved = saved[min(device.index or 0, len(saved) - 1)]
    torch.cuda.set_rng_state(saved.cpu(), device)


def _as_tuple(value: Any) -> Any:
    # random.setstate needs tuples all the way down; a weights-only load may hand back lists.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def vocab_checksum(folder: Path) -> str:
    """sha256 over a processed folder's dictionary.json and answers.json: the ids a model's rows depend on."""
    digest = hashlib.sha256()
    for name in ("dictionary.json", "answers.json"):
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()


class CheckpointClock:
    """When the next mid-epoch checkpoint is due (train.checkpoint_every).

    Due once `updates` optimizer updates or `seconds` of wall time have passed since the last save of any kind
    (mid-epoch, end of epoch or resume); never when the setting is off. Times are `time.monotonic()` values.
    """

    def __init__(self, every: int | str | None, step: int, now: float) -> None:
        self.updates, self.seconds = checkpoint_interval(every)
        self.saved(step, now)

    def due(self, step: int, now: float) -> bool:
        """Whether a checkpoint is due once optimizer update `step` is done."""
        if self.updates is not None:
            return step - self._step >= self.updates
        return self.seconds is not None and now - self._time >= self.seconds

    def saved(self, step: int, now: float) -> None:
        """A checkpoint holding `step` updates was just written."""
        self._step, self._time = step, now
