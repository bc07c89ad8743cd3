"""`isubg report RUN_DIR`: a training run's summary, per-epoch table and PNG curves.

isubg.report (and matplotlib, through it) is imported inside the command so `isubg --help` stays fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from isubg.cli._common import JsonOpt, user_errors
from isubg.console import err_console, out_console, print_json

_STATUS_NOTE = {
    "finished": "ran every epoch",
    "early_stopped": "stopped early: the validation score stopped improving",
    "interrupted": "interrupted; resume it with the same run directory",
    "diverged": "diverged: the loss became NaN or infinite",
    "pruned": "pruned by isubg tune: the trial looked hopeless against the study's others",
    "unfinished": "no end record: still running, or killed before it could write one",
}


def report(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="A run directory written by `isubg train` (holds metrics.jsonl).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", metavar="DIR", help="Where to write the PNGs; default RUN_DIR/plots.")
    ] = None,
    json_output: JsonOpt = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Do not draw the PNG curves.")] = False,
) -> None:
    """Summarise a training run: status, best epoch and accuracies, speed, memory; plus PNG curves.

    Writes loss.png, accuracy.png, throughput.png and memory.png. Works on a run that is still going.

    A half-written last line of metrics.jsonl (a crash) is skipped with a warning.
    """
    from isubg.report import epoch_table, plot, read_metrics, summary

    with user_errors():
        metrics = read_metrics(run_dir)
        info = summary(metrics)
        rows = epoch_table(metrics)
        plots = [] if no_plots else plot(metrics, out if out is not None else run_dir / "plots")
    err = err_console()
    for warning in info["warnings"]:
        err.print(Text("! ", style="yellow") + Text(warning), soft_wrap=True)
    if json_output:
        print_json({"summary": _jsonable(info), "epochs": _jsonable(rows), "plots": [str(p) for p in plots]})
        return
    console = out_console()
    console.print(_summary_table(info))
    if rows:
        console.print(_epoch_table(rows, metrics.acc_names()))
        console.print("* best epoch")
    else:
        console.print("No epoch has finished yet.")
    for path in plots:
        console.print(f"Wrote {path}", soft_wrap=True)


def _jsonable(value: Any) -> Any:
    """NaN and infinities (a diverged loss) become null: strict JSON readers such as jq reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value * 100:.2f}%"


def _num(value: Any, digits: int = 1, unit: str = "") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:,.{digits}f}{unit}"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _summary_table(info: dict[str, Any]) -> Table:
    table = Table(title=f"Run {info['run_dir']}", title_justify="left", show_header=False)
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value")
    status = info["status"]
    note = info["message"] or _STATUS_NOTE.get(status)
    table.add_row("status", f"{status} ({note})" if note else status)
    planned = info["epochs_planned"]
    table.add_row("epochs", f"{info['epochs_done']}" + (f" of {planned}" if planned is not None else ""))
    table.add_row("steps", _num(info["steps"], 0) + (f" ({info['resumes']} resume(s))" if info["resumes"] else ""))
    if info["device"] or info["precision"]:
        table.add_row("device", f"{info['device'] or '-'}, {info['precision'] or '-'}")
    if info["params_total"] is not None:
        table.add_row("parameters", _num(info["params_total"], 0))
    best = info["best_epoch"]
    table.add_row("best epoch", "-" if best is None else f"{best} (score {_num(info['best_score'], 4)})")
    table.add_row("fused accuracy at best", _pct(info["best_fused_acc"]))
    at_best = info["best_epoch_acc"]
    for name, top in info["best_acc"].items():
        highest = f"highest {_pct(top['value'])} (epoch {top['epoch']})"
        table.add_row(f"val {name}", f"{_pct(at_best.get(name))} at the best epoch; {highest}")
    table.add_row("majority baseline", _pct(info["majority_baseline"]))
    table.add_row("final train loss", _num(info["final_train_loss"], 4))
    table.add_row("median samples/s", _num(info["median_samples_per_s"], 1))
    table.add_row("peak memory", _num(info["peak_memory_mib"], 0, " MiB"))
    table.add_row("elapsed", _duration(info["elapsed_s"]))
    return table


def _epoch_table(rows: list[dict[str, Any]], acc_names: list[str]) -> Table:
    table = Table(title="Epochs", title_justify="left")
    table.add_column("", no_wrap=True)  # the best-epoch marker: a character, so it reads without colour
    table.add_column("epoch", justify="right")
    table.add_column("train loss", justify="right")
    for name in acc_names:
        table.add_column(name, justify="right")
    table.add_column("time", justify="right")
    table.add_column("samples/s", justify="right")
    table.add_column("peak MiB", justify="right")
    for row in rows:
        acc = row["val_acc"] or {}
        table.add_row(
            "*" if row["best"] else "",
            str(row["epoch"]),
            _num(row["train_loss"], 4),
            *(_pct(acc.get(name)) for name in acc_names),
            _duration(row["epoch_time_s"]),
            _num(row["samples_per_s"], 1),
            _num(row["peak_memory_mib"], 0),
            style="bold" if row["best"] else None,
        )
    return table
