"""Metric loggers: where a training run's records go (train.loggers).

A record is one event of the run (`start`, `step`, `epoch`, `checkpoint`, `oom`, `resume`, `end`; the fields of
each are listed in isubg/runlog.py) as a flat dict of JSON-ready values. `TrainUI.record` hands every record to
each logger of the run:

- `jsonl` (always on): one JSON object per line in `<run>/metrics.jsonl`, flushed at once, appended on resume.
  `isubg report`, the epoch table of a resumed run and `isubg tune` read it.
- `tensorboard` (optional dependency, `pip install 'isubg[tensorboard]'`): scalars under `<run>/tensorboard`,
  against the optimizer step: `train/*` from step records, `val/<branch>` accuracies and `epoch/*` from epoch
  records; the start and end records as text. A resumed run purges the events a killed run wrote after its
  checkpoint, so the curves do not fold back.

A new logger is a class with `write(event, record)` and `close()`, added to LOGGERS and to the Literal of
train.loggers in isubg/config.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from isubg.errors import ConfigError

__all__ = ["LOGGERS", "JsonlLogger", "MetricLogger", "TensorBoardLogger", "open_loggers"]


class MetricLogger(Protocol):
    """Receives every record of a run, in order, on the main process only."""

    def write(self, event: str, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """`<run>/metrics.jsonl`: one `{"event": ..., **record}` line per record; non-finite numbers become null."""

    def __init__(self, run_dir: Path) -> None:
        self._file: TextIO = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def write(self, event: str, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps({"event": event, **clean}) + "\n")
        self._file.flush()  # a crash loses nothing already shown

    def close(self) -> None:
        self._file.close()


_STEP_SCALARS = ("loss", "lr", "xvlm_lr", "grad_norm", "samples_per_s", "memory_mib")
_EPOCH_SCALARS = {"train_loss": "epoch/train_loss", "epoch_time_s": "epoch/time_s",
                  "samples_per_s": "epoch/samples_per_s", "peak_memory_mib": "epoch/peak_memory_mib"}  # fmt: skip


def _summary_writer() -> Any:
    """torch's SummaryWriter class, or a ConfigError saying how to install TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency: imported only when chosen
    except ImportError as exc:
        raise ConfigError(
            "train.loggers includes 'tensorboard', but the tensorboard package is not installed: "
            "pip install 'isubg[tensorboard]' (or drop it from train.loggers)"
        ) from exc
    return SummaryWriter


class TensorBoardLogger:
    """`<run>/tensorboard`: the run's scalars for TensorBoard (module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self._writer_class = _summary_writer()  # fails before training when TensorBoard is missing
        self._folder = Path(run_dir) / "tensorboard"
        self._writer: Any = None

    def _open(self, purge_step: int | None = None) -> Any:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self._folder), purge_step=purge_step)
        return self._writer

    def write(self, event: str, record: dict[str, Any]) -> None:
        if event == "resume":  # events after the checkpoint's step came from the run that was killed
            self._open(purge_step=int(record["step"]) + 1)
            return
        writer = self._open()
        step = int(record.get("step") or 0)
        if event == "step":
            for name in _STEP_SCALARS:
                _scalar(writer, f"train/{name}", record.get(name), step)
        elif event == "epoch":
            for name, value in (record.get("val_acc") or {}).items():
                _scalar(writer, f"val/{name}", value, step)
            for name, tag in _EPOCH_SCALARS.items():
                _scalar(writer, tag, record.get(name), step)
        elif event in ("start", "end"):
            writer.add_text(f"run/{event}", "```\n" + json.dumps(record, indent=2, default=str) + "\n```", step)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _scalar(writer: Any, tag: str, value: Any, step: int) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        writer.add_scalar(tag, float(value), step)


LOGGERS: dict[str, Callable[[Path], MetricLogger]] = {"jsonl": JsonlLogger, "tensorboard": TensorBoardLogger}


def open_loggers(names: Sequence[str], run_dir: Path) -> list[MetricLogger]:
    """The loggers named in train.loggers, writing into `run_dir` (which must exist).

    Raises:
        ConfigError: an unknown name, or an optional dependency that is not installed.
    """
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"unknown train.loggers {unknown}; known: {', '.join(LOGGERS)}")
    return [LOGGERS[name](run_dir) for name in names]
