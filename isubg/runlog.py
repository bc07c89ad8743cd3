"""What a training run shows and records: the banner, the progress bar, per-epoch lines, metrics.jsonl, train.log.

`metrics.jsonl` holds one JSON object per line, keyed by "event" (`isubg report` reads it):

    start   time, device, precision, precision_reason, params (per branch, fusion, total), effective_batch,
            train_size, val_size, majority_baseline, branches, epochs, world_size, data, scene_graphs (the
            data.scene_graphs mode), inputs (the banner's line of scene-graph and stat-word sources)
    step    step, epoch (1-based), loss (mean since the last record), lr, xvlm_lr, samples_per_s, memory_mib,
            grad_norm
    epoch   epoch (1-based), step, train_loss, val_acc {branch..., fused, ens, bound}, score (fused), best,
            epoch_time_s, samples_per_s, peak_memory_mib
    checkpoint  step, epoch (1-based), batch (micro-batches done in it): a mid-epoch last.pt
                (train.checkpoint_every)
    oom     step, epoch, batch_size, gradient_accumulation_steps (the micro-batch was halved)
    resume  step, epoch (a resumed run appends to the same file; later records win)
    end     status (finished | early_stopped | interrupted | diverged | pruned), message, best_epoch, best_score,
            steps, elapsed_s, peak_memory_mib, majority_baseline

Records go to every logger of train.loggers (isubg.loggers: metrics.jsonl always, TensorBoard optionally).
Only the main process (rank 0) writes or prints; elsewhere every method is a no-op.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from isubg.branches import ACCURACY_COLUMNS
from isubg.config import RunConfig
from isubg.console import err_console
from isubg.data.files import write_json_atomic
from isubg.data.prepare import describe_sources, read_manifest
from isubg.device import Precision, memory_mib, peak_memory_mib
from isubg.loggers import MetricLogger, open_loggers

__all__ = ["TrainResult", "TrainUI", "pct"]


def pct(value: float | None) -> str:
    """An accuracy fraction as a percentage with one decimal ("-" when missing)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    status: str  # finished | early_stopped | interrupted | diverged | pruned
    message: str
    best_score: float | None
    best_epoch: int | None
    steps: int
    elapsed_s: float
    peak_memory_mib: float
    baseline: float | None
    last_val: dict[str, float] | None


class TrainUI:
    """The run's console output and files (see the module docstring)."""

    def __init__(
        self,
        run_dir: Path,
        main: bool,
        console: Console | None,
        *,
        resume: bool = False,
        loggers: Sequence[str] = ("jsonl",),
    ) -> None:
        """Opens the run's files on the main process: train.log and the loggers (`loggers`, train.loggers).

        Raises:
            ConfigError: a logger's optional dependency is missing.
        """
        self.main, self.run_dir = main, Path(run_dir)
        self.console = console or err_console()
        self.progress: Progress | None = None
        self._task: Any = None
        self._losses: list[float] = []
        self._loggers: list[MetricLogger] = []
        self._log: TextIO | None = None
        self._device: Any = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._loggers = open_loggers(loggers, self.run_dir)
            self._log = open(self.run_dir / "train.log", "a", encoding="utf-8")  # noqa: SIM115
        self.resume = resume

    # -- files ---------------------------------------------------------------------------------------------

    def record(self, event: str, **fields: Any) -> None:
        """Hand one record to every logger (metrics.jsonl flushes it at once: a crash loses nothing shown)."""
        for logger in self._loggers:
            logger.write(event, fields)

    def log(self, message: str, *, show: bool = True) -> None:
        """A timestamped train.log line, also printed unless `show` is false."""
        if not self.main:
            return
        assert self._log is not None
        self._log.write(f"{datetime.now().isoformat(timespec='seconds')} {message}\n")
        self._log.flush()
        if show:
            self.console.print(message, highlight=False, markup=False)

    # -- the run -------------------------------------------------------------------------------------------

    def start(
        self,
        cfg: RunConfig,
        device: Any,
        world: int,
        position: tuple[int, int, int],
        params: dict[str, int],
        precision: Precision,
        n_train: int,
        n_val: int,
        baseline: float | None,
        data_dir: Path,
    ) -> None:
        """The banner: device, precision and why, parameters per branch, effective batch, data and where its
        scene graphs and stat words come from (data.scene_graphs), run dir."""
        self._device = device
        if not self.main:
            return
        if self.resume:
            epoch, batch, step = position
            self.record("resume", step=step, epoch=epoch + 1)
            self.log(f"resuming {self.run_dir} at epoch {epoch + 1}, micro-batch {batch}, step {step}")
        branch_params = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items() if k not in ("total", "fusion"))
        d = cfg.data
        inputs = describe_sources(read_manifest(Path(data_dir)), [d.train_split, d.val_split], d.scene_graphs, data_dir)
        lines = [
            f"isubg train -> {self.run_dir}",
            f"  device      {device}" + (f" x {world} processes" if world > 1 else ""),
            f"  precision   {precision.reason}",
            f"  parameters  {params['total'] / 1e6:.2f}M ({branch_params}, fusion {params['fusion']})",
            f"  batch       {cfg.train.batch_size} x update_freq {cfg.train.update_freq} x accumulation "
            f"{cfg.optim.gradient_accumulation_steps} x {world} process(es) = {cfg.effective_batch * world} per update",
            f"  data        {cfg.data.dataset} {data_dir}: {n_train} train / {n_val} validation questions",
            f"  inputs      {inputs}",
            f"  schedule    {cfg.train.epochs} epochs, lr {cfg.train.lr:g} ({cfg.train.schedule}), "
            f"xvlm_lr {cfg.train.xvlm_lr:g}, clip {cfg.optim.clip_norm:g}",
            f"  baseline    majority answer: {pct(baseline)}% validation accuracy",
        ]
        for line in lines:
            self.log(line)
        if not self.resume:
            self.record(
                "start", time=datetime.now().isoformat(timespec="seconds"), device=str(device),
                precision=precision.name, precision_reason=precision.reason, params=params,
                effective_batch=cfg.effective_batch * world, train_size=n_train, val_size=n_val,
                majority_baseline=baseline, branches=list(cfg.model.branches), epochs=cfg.train.epochs,
                world_size=world, data=str(data_dir), scene_graphs=d.scene_graphs, inputs=inputs,
            )  # fmt: skip

    def begin_epoch(self, epoch: int, done: int, total: int) -> None:
        """Open the progress bar of `epoch` (0-based), already `done` of `total` micro-batches in."""
        self._losses = []
        if not self.main:
            return
        self.close_bar()
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[rate]} samples/s  {task.fields[mem]} MiB"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self._task = self.progress.add_task("train", total=total, completed=done, epoch=epoch + 1, loss="-",
                                            rate="-", mem="-")  # fmt: skip
        self._epoch_started = datetime.now()
        self._samples_seen = 0

    def advance(self, loss: float, samples: int = 0) -> None:
        """One micro-batch done."""
        self._losses.append(loss)
        if self.progress is None:
            return
        recent = [v for v in self._losses[-20:] if math.isfinite(v)]
        elapsed = max(1e-9, (datetime.now() - self._epoch_started).total_seconds())
        self._samples_seen += samples
        self.progress.update(
            self._task, advance=1, loss=f"{sum(recent) / len(recent):.3f}" if recent else "nan",
            rate=f"{self._samples_seen / elapsed:.0f}", mem=f"{memory_mib(self._device):.0f}",
        )  # fmt: skip

    def close_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def step_record(self, **fields: Any) -> None:
        """A metrics.jsonl step line: step, epoch (1-based), loss, lr, xvlm_lr, grad_norm, samples_per_s."""
        self.record("step", **fields, memory_mib=memory_mib(self._device))

    def epoch_record(
        self, epoch: int, epochs: int, step: int, loss: float, samples: int, seconds: float, val: dict[str, float],
        best: bool,
    ) -> None:  # fmt: skip
        """The metrics line and printed row of `epoch` (1-based)."""
        self.close_bar()
        peak = peak_memory_mib(self._device)
        rate = samples / max(seconds, 1e-9)
        self.record(
            "epoch", epoch=epoch, step=step, train_loss=loss, val_acc=val, score=val.get("fused"), best=best,
            epoch_time_s=seconds, samples_per_s=rate, peak_memory_mib=peak,
        )  # fmt: skip
        accs = "  ".join(f"{k} {pct(val[k])}" for k in ACCURACY_COLUMNS if k in val)
        mark = " *best" if best else ""
        self.log(
            f"epoch {epoch}/{epochs}  loss {loss:.4f}  val% {accs}{mark}  "
            f"{seconds:.0f}s  {rate:.0f} samples/s  peak {peak:.0f} MiB"
        )

    def finish(self, result: TrainResult) -> None:
        """The end record, summary.json and the final summary on the console."""
        self.close_bar()
        if not self.main:
            return
        self.record(
            "end", status=result.status, message=result.message, best_epoch=result.best_epoch,
            best_score=result.best_score, steps=result.steps, elapsed_s=result.elapsed_s,
            peak_memory_mib=result.peak_memory_mib, majority_baseline=result.baseline,
        )  # fmt: skip
        summary = {
            "status": result.status,
            "message": result.message,
            "best_epoch": result.best_epoch,
            "best_fused_accuracy": result.best_score,
            "majority_baseline": result.baseline,
            "last_validation": result.last_val,
            "steps": result.steps,
            "elapsed_s": round(result.elapsed_s, 2),
            "peak_memory_mib": round(result.peak_memory_mib, 1),
            "checkpoints": {
                name: str(self.run_dir / "checkpoints" / f"{name}.pt")
                for name in ("last", "best")
                if (self.run_dir / "checkpoints" / f"{name}.pt").exists()
            },
        }
        write_json_atomic(self.run_dir / "summary.json", summary, indent=2)
        self.console.print(self._epoch_table())
        best = (
            f"best fused validation accuracy {pct(result.best_score)}% (epoch {result.best_epoch})"
            if result.best_epoch is not None
            else "no epoch finished yet"
        )
        self.log(
            f"{result.status}: {result.message or 'all epochs done'}; {best} vs majority baseline "
            f"{pct(result.baseline)}%; {result.steps} steps in {result.elapsed_s:.0f}s, peak memory "
            f"{result.peak_memory_mib:.0f} MiB; checkpoints in {self.run_dir / 'checkpoints'}"
        )
        for logger in self._loggers:
            logger.close()
        if self._log is not None:
            self._log.close()

    def _epoch_table(self) -> Table:
        """Every epoch of the run so far (from metrics.jsonl, so a resumed run shows its earlier epochs too)."""
        epochs: dict[int, dict[str, Any]] = {}
        for line in (self.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "epoch":
                epochs[record["epoch"]] = record
        names = [k for k in ACCURACY_COLUMNS if any(k in (r.get("val_acc") or {}) for r in epochs.values())]
        table = Table(title="epochs (validation accuracy %; * = best)")
        for column in ("epoch", "train loss", *names, "time s", "samples/s", "peak MiB"):
            table.add_column(column, justify="right")
        for epoch, r in sorted(epochs.items()):
            val = r.get("val_acc") or {}
            loss = r.get("train_loss")
            table.add_row(
                f"{epoch}{'*' if r.get('best') else ''}", "-" if loss is None else f"{loss:.4f}",
                *(pct(val.get(k)) for k in names), f"{r['epoch_time_s']:.0f}", f"{r['samples_per_s']:.0f}",
                f"{r['peak_memory_mib']:.0f}",
            )  # fmt: skip
        return table
