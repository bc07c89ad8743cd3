"""A training run, read back: parse RUN/metrics.jsonl, summarise it and draw its curves (`isubg report`).

The trainer appends one JSON object per line to RUN/metrics.jsonl, each with an "event" key:
`start` (device, precision, params, branches, majority_baseline, epochs, ...), `step` (step, epoch, loss, lr,
samples_per_s, memory_mib, ...), `epoch` (epoch, step, train_loss, val_acc {branch|fused|ens|bound: fraction}
or null, score, best, epoch_time_s, samples_per_s, peak_memory_mib), `resume` (step, epoch) and `end`
(status, message, best_epoch, best_score, steps, elapsed_s, peak_memory_mib). Any key may be missing or null
(the trainer writes NaN and infinities as null).

Reading rules:
- A resumed run appends to the same file. Records of the abandoned stretch (steps, and epochs that ended,
  after the step the run resumed from) are dropped, a later record for the same step or epoch replaces an
  earlier one, and an `end` written before the resume no longer applies.
- A line that is not a JSON object is a DataError naming file:line, except the last line, which a crash can
  leave half-written: it is skipped and said so in `RunMetrics.warnings`.
- Unknown events are skipped, so older readers accept newer trainers.

Accuracies stay fractions (0..1) here; the CLI prints them as percentages. This module never imports torch;
matplotlib is imported only by `plot`, with the Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isubg.branches import ACCURACY_COLUMNS
from isubg.errors import DataError

__all__ = [
    "PLOT_NAMES",
    "RunMetrics",
    "best_epoch",
    "epoch_table",
    "plot",
    "read_metrics",
    "save_png",
    "summary",
]

# Accuracy keys in display order; names not listed here (a future branch) follow in order of appearance.
# "bound" (oracle: any branch right) sits near 100% and would flatten the curves that matter.
_PLOTTED_ACC = tuple(n for n in ACCURACY_COLUMNS if n != "bound")
PLOT_NAMES = ("loss.png", "accuracy.png", "throughput.png", "memory.png")

# Numeric fields per event: checked on read so a bad value is reported with its file:line, not as a crash later.
_NUMBERS = {
    "start": ("majority_baseline", "effective_batch", "train_size", "val_size", "epochs"),
    "step": ("loss", "lr", "xvlm_lr", "samples_per_s", "memory_mib", "grad_norm"),
    "epoch": ("train_loss", "score", "epoch_time_s", "samples_per_s", "peak_memory_mib"),
    "resume": (),
    "end": ("best_score", "elapsed_s", "peak_memory_mib"),
}
_INTEGERS = {
    "start": (),
    "step": ("step", "epoch"),
    "epoch": ("epoch", "step"),
    "resume": ("step", "epoch"),
    "end": ("best_epoch", "steps"),
}
_REQUIRED = {"step": "step", "epoch": "epoch"}


@dataclass
class RunMetrics:
    """The parsed, de-duplicated content of one metrics.jsonl.

    `steps` holds one record per step and `epochs` one per epoch, both ascending; `start` is the first start
    record updated by later ones (a resumed process may write its own), `end` is None while the run has not
    finished (or was killed before it could write one). `records` is every record as written, in file order,
    with nothing dropped or merged (unknown events included). `warnings` are non-fatal reading notes.
    """

    path: Path
    start: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    resumes: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        """The run directory holding metrics.jsonl."""
        return self.path.parent

    def acc_names(self) -> list[str]:
        """Every validation accuracy key seen in any epoch, in display order (ACCURACY_COLUMNS first)."""
        seen: list[str] = []
        for record in self.epochs:
            for name in record.get("val_acc") or {}:
                if name not in seen:
                    seen.append(name)
        return [n for n in ACCURACY_COLUMNS if n in seen] + [n for n in seen if n not in ACCURACY_COLUMNS]


# --------------------------------------------------------------------------------------------------
# Reading


def read_metrics(run_dir: Path | str) -> RunMetrics:
    """Parse RUN_DIR/metrics.jsonl into a `RunMetrics` (resume de-duplication applied).

    Raises:
        DataError: RUN_DIR is not a folder or has no metrics.jsonl, or a line other than the last is not a
            JSON object with a known shape (the message names file:line).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory (expected the folder `isubg train` writes its run into)")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(
            f"{run_dir} has no metrics.jsonl: is it a run directory written by `isubg train`? "
            "The trainer creates the file when the run starts."
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    metrics = RunMetrics(path=path)
    records = _parse_lines(path, raw, metrics.warnings)
    metrics.records = [record for _, record in records]
    _assemble(metrics, records)
    return metrics


def _parse_lines(path: Path, raw: bytes, warnings: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; a bad last line becomes a warning instead of an error."""
    lines = raw.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if i == last:
                # A crash (or a writer still busy) leaves a partial line at the end; the rest is still good.
                warnings.append(f"{where}: skipped the truncated last line (the run probably stopped while writing it)")
                continue
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
            raise DataError(f"{where}: not valid JSON ({reason}); each line must be one JSON object") from None
        _check_record(record, where)
        records.append((i + 1, record))
    return records


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_record(record: Any, where: str) -> None:
    """Raise DataError (naming file:line and field) unless the record has the shape its event promises."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with an 'event' key, got {type(record).__name__}")
    event = record.get("event")
    if not isinstance(event, str):
        raise DataError(f"{where}: the record has no 'event' key (expected start, step, epoch, resume or end)")
    if event not in _NUMBERS:
        return
    required = _REQUIRED.get(event)
    if required and record.get(required) is None:
        raise DataError(f"{where}: a '{event}' record needs an integer '{required}'")
    for key in _INTEGERS[event]:
        if record.get(key) is not None and not _is_int(record[key]):
            raise DataError(f"{where}: '{key}' must be an integer, got {record[key]!r}")
    for key in _NUMBERS[event]:
        if record.get(key) is not None and not _is_number(record[key]):
            raise DataError(f"{where}: '{key}' must be a number, got {record[key]!r}")
    acc = record.get("val_acc")
    numeric = isinstance(acc, dict) and all(v is None or _is_number(v) for v in acc.values())
    if event == "epoch" and acc is not None and not numeric:
        raise DataError(f"{where}: 'val_acc' must be null or an object of accuracies (fractions), got {acc!r}")


def _assemble(metrics: RunMetrics, records: list[tuple[int, dict[str, Any]]]) -> None:
    """Replay the records in file order, applying the resume and replacement rules of the module docstring."""
    steps: dict[int, dict[str, Any]] = {}
    epochs: dict[int, dict[str, Any]] = {}
    for _, record in records:
        event = record["event"]
        if event == "start":
            metrics.start = {**(metrics.start or {}), **record, "time": (metrics.start or record).get("time")}
        elif event == "step":
            steps[record["step"]] = record
        elif event == "epoch":
            epochs[record["epoch"]] = record
        elif event == "resume":
            metrics.resumes.append(record)
            metrics.end = None  # an interrupted run's end record is superseded by the resumed run
            at = record.get("step")
            if at is not None:
                steps = {s: r for s, r in steps.items() if s <= at}
                epochs = {e: r for e, r in epochs.items() if r.get("step") is None or r["step"] <= at}
        elif event == "end":
            metrics.end = record
    metrics.steps = [steps[s] for s in sorted(steps)]
    metrics.epochs = [epochs[e] for e in sorted(epochs)]


# --------------------------------------------------------------------------------------------------
# Summary


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if _is_number(v) and math.isfinite(v)]


def _first(*values: Any) -> Any:
    """The first value that is not None (a key the trainer wrote as null falls back like a missing one)."""
    return next((v for v in values if v is not None), None)


def best_epoch(metrics: RunMetrics) -> tuple[int | None, float | None]:
    """(best epoch, its score): the end record's, else the last epoch flagged best, else the highest score."""
    end = metrics.end or {}
    if end.get("best_epoch") is not None:
        return end["best_epoch"], end.get("best_score")
    flagged = [r for r in metrics.epochs if r.get("best")]
    if flagged:
        return flagged[-1]["epoch"], flagged[-1].get("score")
    scored = [r for r in metrics.epochs if _finite([r.get("score")])]
    if scored:
        top = max(scored, key=lambda r: r["score"])
        return top["epoch"], top["score"]
    return None, None


def _best_accuracies(metrics: RunMetrics) -> dict[str, dict[str, Any]]:
    """Per accuracy key, its highest value over the epochs and the (first) epoch that reached it."""
    best: dict[str, dict[str, Any]] = {}
    for record in metrics.epochs:
        for name, value in (record.get("val_acc") or {}).items():
            if _finite([value]) and (name not in best or value > best[name]["value"]):
                best[name] = {"value": value, "epoch": record["epoch"]}
    return {name: best[name] for name in metrics.acc_names() if name in best}


def summary(metrics: RunMetrics) -> dict[str, Any]:
    """The run at a glance, as a JSON-ready dict (accuracies as fractions, None where unknown).

    status is the end record's (finished, early_stopped, interrupted, diverged, pruned) or "unfinished" when there is
    none (still running, or killed before writing it). Without an end record (or with nulls in it) steps falls
    back to the last step, elapsed_s to the sum of epoch times and peak_memory_mib to the largest per-epoch peak
    or per-step memory.
    """
    start, end = metrics.start or {}, metrics.end or {}
    epoch, score = best_epoch(metrics)
    at_best = next((r for r in metrics.epochs if r["epoch"] == epoch), {})
    best_acc = at_best.get("val_acc") or {}
    last_step = metrics.steps[-1]["step"] if metrics.steps else None
    throughput = _finite([r.get("samples_per_s") for r in metrics.steps]) or _finite(
        [r.get("samples_per_s") for r in metrics.epochs]
    )
    memory = _finite([r.get("peak_memory_mib") for r in metrics.epochs] + [r.get("memory_mib") for r in metrics.steps])
    epoch_times = _finite([r.get("epoch_time_s") for r in metrics.epochs])
    return {
        "run_dir": str(metrics.run_dir),
        "status": end.get("status") or "unfinished",
        "message": end.get("message"),
        "started": start.get("time"),
        "device": start.get("device"),
        "precision": start.get("precision"),
        "branches": start.get("branches"),
        "params_total": (start.get("params") or {}).get("total"),
        "epochs_done": len(metrics.epochs),
        "epochs_planned": start.get("epochs"),
        "steps": _first(end.get("steps"), last_step),
        "resumes": len(metrics.resumes),
        "best_epoch": epoch,
        "best_score": score,
        "best_fused_acc": best_acc.get("fused"),
        "best_epoch_acc": best_acc,
        "best_acc": _best_accuracies(metrics),
        "majority_baseline": _first(start.get("majority_baseline"), end.get("majority_baseline")),
        "final_train_loss": metrics.epochs[-1].get("train_loss") if metrics.epochs else None,
        "final_step_loss": metrics.steps[-1].get("loss") if metrics.steps else None,
        "median_samples_per_s": statistics.median(throughput) if throughput else None,
        "peak_memory_mib": _first(end.get("peak_memory_mib"), max(memory) if memory else None),
        "elapsed_s": _first(end.get("elapsed_s"), sum(epoch_times) if epoch_times else None),
        "warnings": list(metrics.warnings),
    }


def epoch_table(metrics: RunMetrics) -> list[dict[str, Any]]:
    """One JSON-ready row per epoch; "best" marks the run's best epoch only (not every new best on the way)."""
    epoch, _ = best_epoch(metrics)
    keys = ("step", "train_loss", "score", "epoch_time_s", "samples_per_s", "peak_memory_mib")
    return [
        {"epoch": r["epoch"], **{k: r.get(k) for k in keys}, "val_acc": r.get("val_acc"), "best": r["epoch"] == epoch}
        for r in metrics.epochs
    ]


# --------------------------------------------------------------------------------------------------
# Plots


def plot(metrics: RunMetrics, out_dir: Path | str) -> list[Path]:
    """Write loss.png, accuracy.png, throughput.png and memory.png into OUT_DIR; return their paths.

    Every file is always written (a plot without data says so in its middle), so a folder never keeps a stale
    curve from an earlier report. Each PNG is saved under a temporary name and renamed into place.

    Raises:
        DataError: OUT_DIR cannot be created or written.
    """
    # matplotlib is slow to import and only plotting needs it
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot create the plot folder ({exc.strerror or exc})") from None
    drawers = (
        (_draw_loss, "training loss"),
        (_draw_accuracy, "validation accuracy"),
        (_draw_throughput, "throughput"),
        (_draw_memory, "memory"),
    )
    written = []
    for name, (draw, title) in zip(PLOT_NAMES, drawers, strict=True):
        fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole numbers
        draw(ax, metrics)
        ax.set_title(f"{metrics.run_dir.name}: {title}", loc="left", fontsize=10)
        written.append(save_png(fig, out_dir / name))
    return written


def save_png(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure to `path` as PNG atomically (temporary name in the same folder, then rename).

    Raises:
        DataError: the folder cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"{path}: cannot write the plot ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _series(records: list[dict[str, Any]], x_of: Any, key: str, scale: float = 1.0) -> tuple[list, list]:
    """(xs, ys) of the records that have both; infinities become NaN so matplotlib leaves a gap."""
    xs, ys = [], []
    for record in records:
        x, y = x_of(record), record.get(key)
        if x is None or not _is_number(y):
            continue
        xs.append(x)
        ys.append(y * scale if math.isfinite(y) else math.nan)
    return xs, ys


def _epoch_x(metrics: RunMetrics) -> tuple[Any, str]:
    """Where epoch records sit on a step plot (their own step, else their last step record), or by epoch."""
    if not metrics.steps:
        return (lambda r: r["epoch"]), "epoch"
    last_step = {r["epoch"]: r["step"] for r in metrics.steps if r.get("epoch") is not None}
    return (lambda r: r.get("step", last_step.get(r["epoch"]))), "step"


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _mark_resumes(ax: Any, metrics: RunMetrics) -> None:
    for i, record in enumerate(r for r in metrics.resumes if r.get("step") is not None):
        ax.axvline(record["step"], color="grey", ls=":", lw=1, label="resumed" if i == 0 else None)


def _step_and_epoch_plot(ax: Any, metrics: RunMetrics, keys: tuple[str, str], labels: tuple[str, str]) -> bool:
    """Per-step line plus per-epoch markers on one x axis; False when neither has any data."""
    xs, ys = _series(metrics.steps, lambda r: r["step"], keys[0])
    epoch_at, x_label = _epoch_x(metrics)
    ex, ey = _series(metrics.epochs, epoch_at, keys[1])
    if not ys and not ey:
        return False
    if ys:
        ax.plot(xs, ys, lw=1, alpha=0.8, label=labels[0])
    if ey:
        ax.plot(ex, ey, "o--", ms=5, label=labels[1])
    if x_label == "step":
        _mark_resumes(ax, metrics)
    ax.set_xlabel(x_label)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return True


def _draw_loss(ax: Any, metrics: RunMetrics) -> None:
    if not _step_and_epoch_plot(ax, metrics, ("loss", "train_loss"), ("step loss", "epoch train loss")):
        _no_data(ax, "no loss recorded yet")
        return
    ax.set_ylabel("loss")
    positive = _finite([r.get("loss") for r in metrics.steps] + [r.get("train_loss") for r in metrics.epochs])
    # Losses fall by orders of magnitude early on; a log axis keeps the later, flatter part readable.
    if positive and min(positive) > 0 and max(positive) / min(positive) > 20:
        ax.set_yscale("log")


def _draw_accuracy(ax: Any, metrics: RunMetrics) -> None:
    names = [n for n in metrics.acc_names() if n in _PLOTTED_ACC or n not in ACCURACY_COLUMNS]
    drawn = False
    for name in names:
        accuracies = [{"epoch": r["epoch"], "acc": (r.get("val_acc") or {}).get(name)} for r in metrics.epochs]
        xs, ys = _series(accuracies, lambda r: r["epoch"], "acc", 100.0)
        if xs:
            bold = name in ("fused", "ens")
            ax.plot(xs, ys, "o-" if bold else ".-", lw=2.2 if bold else 1.2, label=name)
            drawn = True
    if not drawn:
        _no_data(ax, "no validation accuracies (no validation set, or no epoch finished yet)")
        return
    baseline = (metrics.start or {}).get("majority_baseline")
    if _is_number(baseline):
        ax.axhline(baseline * 100.0, color="grey", ls="--", lw=1.2, label="majority baseline")
    epoch, _ = best_epoch(metrics)
    if epoch is not None:
        ax.axvline(epoch, color="black", ls=":", lw=1, label=f"best epoch {epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _draw_throughput(ax: Any, metrics: RunMetrics) -> None:
    if not _step_and_epoch_plot(ax, metrics, ("samples_per_s", "samples_per_s"), ("per step", "epoch mean")):
        _no_data(ax, "no throughput recorded yet")
        return
    ax.set_ylabel("samples / s")
    ax.set_ylim(bottom=0)


def _draw_memory(ax: Any, metrics: RunMetrics) -> None:
    if not _step_and_epoch_plot(ax, metrics, ("memory_mib", "peak_memory_mib"), ("per step", "epoch peak")):
        _no_data(ax, "no memory recorded yet")
        return
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
