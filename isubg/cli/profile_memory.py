"""`isubg profile-memory`: will this config fit on the card, and what to change when it does not.

Prints the memory model of `isubg.memory` for a resolved config: a table per branch (parameters, gradients,
optimizer states, activations of the worst-case input) plus the shared parts, the verdict against
memory.max_memory_usage x the device memory (from --gpu-memory, else the largest GPU NVML sees), the largest
micro-batch that fits with the gradient_accumulation_steps that keeps the effective batch, and quantified
suggestions when it does not fit. --measure runs real steps on a CUDA device and prints the measured peak beside
the estimate; --plot draws memory against the micro-batch per branch with the device limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from isubg.cli._common import ConfigOpt, JsonOpt, SetOpt, guide_flags, user_errors
from isubg.console import out_console, print_json, print_warnings

if TYPE_CHECKING:
    from isubg.batch import DataSpec
    from isubg.config import RunConfig
    from isubg.memory import MemoryEstimate, WorstCase

__all__ = ["profile_memory"]

PresetOpt = Annotated[
    str,
    typer.Option(
        "--preset", "-p", metavar="NAME", help="Preset (isubg preset list), a YAML file, or auto (from the GPU)."
    ),
]
GpuMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu-memory",
        metavar="SIZE",
        help="Device memory to plan for, e.g. 8GB, 24GB, 80GB; default: the largest GPU NVML sees.",
    ),
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch",
        min=1,
        metavar="N",
        help="Micro-batch to check (accumulation adjusted to keep the effective batch); default: train.batch_size.",
    ),
]
MeasureOpt = Annotated[
    bool, typer.Option("--measure", help="Also run real training steps on the GPU and print the measured peak.")
]
PlotOpt = Annotated[
    Path | None, typer.Option("--plot", metavar="FILE", help="Write a PNG of memory against the micro-batch.")
]

_MIB, _GIB = 2**20, 2**30
_PLOT_MAX_BATCH = 2048


def _size(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value / _GIB:.2f} GiB" if abs(value) >= _GIB else f"{value / _MIB:.1f} MiB"


def _device_memory(gpu_memory: str | None) -> tuple[int | None, str]:
    """(bytes, where they come from): --gpu-memory, else the largest visible GPU, else (None, why not)."""
    from isubg.gpu import format_gib, parse_memory_size, probe

    if gpu_memory is not None:
        return parse_memory_size(gpu_memory, "--gpu-memory"), "--gpu-memory"
    found = probe()
    sized = [d for d in found.visible_devices if d.total_bytes is not None]
    if not sized:
        why = found.no_gpu_reason() or "NVML cannot read the GPU memory"
        return None, f"no GPU ({why}): give --gpu-memory, e.g. --gpu-memory 24GB"
    best = max(sized, key=lambda d: d.total_bytes or 0)
    return best.total_bytes, f"GPU {best.index}, {best.name} ({format_gib(best.total_bytes)}, probed)"


def _data_sizes(cfg: RunConfig) -> tuple[DataSpec | None, WorstCase]:
    """The real data's sizes and largest scene graph when data.root is set, else the defaults (module docs)."""
    from isubg.memory import WorstCase, largest_graph

    if cfg.data.root is None:
        return None, WorstCase.for_config(cfg)
    from isubg.cli.train import resolve_data_dir
    from isubg.data.dataset import VQADataset

    folder = resolve_data_dir(cfg.data.root, cfg.data.dataset, cfg.data.demo_size)
    d = cfg.data
    data = VQADataset(
        folder,
        d.train_split,
        question_len=d.question_len,
        max_boxes=d.max_boxes,
        num_stat_word=d.num_stat_word,
        scene_graphs=d.scene_graphs,
    )
    spec = data.spec()
    # Both graph files: whichever a split reads, its largest graph is among them.
    source = f"{folder / 'graphs_gt'} + {folder / 'graphs_detected'}"
    return spec, WorstCase.for_config(cfg, spec, largest_graph(folder), source=source)


def _with_micro_batch(cfg: RunConfig, batch: int | None) -> RunConfig:
    """`cfg` at micro-batch `batch`, gradient_accumulation_steps raised (or lowered) to keep the effective batch."""
    if batch is None or batch == cfg.train.batch_size:
        return cfg
    per_update = cfg.train.batch_size * cfg.optim.gradient_accumulation_steps
    out = cfg.model_copy(deep=True)
    out.train.batch_size = batch
    out.optim.gradient_accumulation_steps = -(-per_update // batch)  # ceil: at least the effective batch
    return out


def _report(est: MemoryEstimate, device_bytes: int | None, device_source: str, measured: int | None) -> dict[str, Any]:
    """Everything the command shows, as JSON-ready data (bytes throughout)."""
    cfg, w, batch = est.cfg, est.worst, est.batch_size
    out: dict[str, Any] = {
        "batch_size": batch,
        "gradient_accumulation_steps": cfg.optim.gradient_accumulation_steps,
        "update_freq": cfg.train.update_freq,
        "effective_batch": est.effective_batch(batch),
        "precision": est.precision,
        "memory_efficient_attention": est.memory_efficient,
        "worst_case": {
            "boxes": w.boxes,
            "question_len": w.question_len,
            "stat_words": w.stat_words,
            "graph_nodes": w.nodes,
            "graph_edges": w.edges,
            "graph_source": w.graph_source,
            "answers": w.num_answers,
        },
        "breakdown": est.breakdown(batch),
        "estimate_bytes": est.allocated(batch),
        "total_bytes": est.total(batch),
        "measured_bytes": measured,
        "device_memory_bytes": device_bytes,
        "device_source": device_source,
        "max_memory_usage": cfg.memory.max_memory_usage,
        "budget_bytes": None,
        "fits": None,
        "largest_batch": None,
        "largest_batch_accumulation": None,
        "recommended_batch": None,
        "recommended_accumulation": None,
        "recommended_update_freq": None,
        "suggestions": [],
    }
    if device_bytes is None:
        return out
    largest = est.largest_batch(device_bytes, max_batch=batch * cfg.optim.gradient_accumulation_steps)
    fitted = est.fitted_geometry(device_bytes)
    out.update(
        budget_bytes=est.budget(device_bytes),
        fits=est.fits(device_bytes),
        largest_batch=largest,
        largest_batch_accumulation=est.accumulation_for(largest) if largest else None,
        recommended_batch=fitted.batch_size if fitted else None,
        recommended_accumulation=fitted.gradient_accumulation_steps if fitted else None,
        recommended_update_freq=fitted.update_freq if fitted else None,
    )
    if not out["fits"]:
        from isubg.memory import suggestions  # the CLI front door stays torch-free until a command runs

        out["suggestions"] = suggestions(est, device_bytes)
    return out


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Peak training memory (worst-case input)", title_justify="left")
    table.add_column("part", no_wrap=True)
    for name in ("params", "grads", "optimizer", "activations", "total"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        last = row["part"] == "total"
        cells = [_size(row[k]) for k in ("params", "grads", "optimizer", "activations", "total")]
        table.add_row(row["part"], *cells, style="bold" if last else None, end_section=row is rows[-2])
    return table


def _print(report: dict[str, Any], preset: str, auto_reason: str | None) -> None:
    console = out_console()
    say = lambda text: console.print(Text(text), soft_wrap=True)  # noqa: E731 (plain text, no markup)
    w, batch = report["worst_case"], report["batch_size"]
    if auto_reason:
        say(f"--preset auto: {auto_reason}")
    say(
        f"Preset {preset}: micro-batch {batch} x gradient_accumulation_steps {report['gradient_accumulation_steps']} "
        f"x update_freq {report['update_freq']} = effective batch {report['effective_batch']}; "
        f"{report['precision']}; memory-efficient attention {'on' if report['memory_efficient_attention'] else 'off'}"
    )
    bound = "configured bound" if w["graph_source"] == "bound" else w["graph_source"]
    say(
        f"Worst case per sample: {w['boxes']} boxes, {w['question_len']} tokens, {w['stat_words']} stat words, "
        f"a scene graph of {w['graph_nodes']} nodes / {w['graph_edges']} edges ({bound}), {w['answers']} answers"
    )
    console.print(_table(report["breakdown"]))
    say(f"Allocated at the peak (compare with torch.cuda.max_memory_allocated): {_size(report['estimate_bytes'])}")
    if report["measured_bytes"] is not None:
        error = (report["estimate_bytes"] - report["measured_bytes"]) / report["measured_bytes"]
        say(f"Measured peak on this GPU: {_size(report['measured_bytes'])} (estimate {error:+.1%})")
    if report["device_memory_bytes"] is None:
        say(f"Device: {report['device_source']}")
        return
    _print_verdict(report, say)


def _print_verdict(report: dict[str, Any], say: Any) -> None:
    batch, budget = report["batch_size"], report["budget_bytes"]
    say(
        f"Device: {_size(report['device_memory_bytes'])} ({report['device_source']}); budget "
        f"{report['max_memory_usage']:.0%} (memory.max_memory_usage) = {_size(budget)}"
    )
    verdict = "FITS" if report["fits"] else "DOES NOT FIT"
    say(f"Verdict: micro-batch {batch} needs {_size(report['total_bytes'])} of {_size(budget)}: {verdict}")
    largest, exact = report["largest_batch"], report["recommended_batch"]
    if not largest:
        say("Not even micro-batch 1 fits.")
    else:
        say(
            f"Largest micro-batch that fits: {largest} (gradient_accumulation_steps "
            f"{report['largest_batch_accumulation']} keeps at least the effective batch)"
        )
        if exact:
            # What memory.dynamic_batch_size picks: the largest micro-batch dividing the samples per update,
            # larger than the configured one when the card has room.
            say(
                f"Same effective batch exactly (what memory.dynamic_batch_size picks): --set batch_size={exact} "
                f"--set gradient_accumulation_steps={report['recommended_accumulation']} "
                f"--set update_freq={report['recommended_update_freq']}"
            )
    if report["suggestions"]:
        say("Changes that save memory (each re-estimated):")
        for line in report["suggestions"]:
            say(f"  - {line}")


def _plot(est: MemoryEstimate, device_bytes: int | None, path: Path) -> None:
    """Stacked memory per branch against the micro-batch, with the budget and device lines (atomic PNG write)."""
    from matplotlib.figure import Figure

    from isubg.report import save_png  # attaches the Agg canvas and writes atomically

    batch = est.batch_size
    top = max(2 * batch, 8)
    if device_bytes is not None:
        top = max(top, min(_PLOT_MAX_BATCH, int(est.largest_batch(device_bytes, max_batch=_PLOT_MAX_BATCH) * 1.25)))
    xs = list(range(1, top + 1))
    layers = [(b.name, [(b.static() + b.activations(x)) / _GIB for x in xs]) for b in est.branches]
    shared = [(est.inputs(x) + est.transient(x)) / _GIB for x in xs]
    overhead = [(est.total(x) - est.allocated(x)) / _GIB for x in xs]
    layers += [("inputs + transient", shared), ("allocator + CUDA context", overhead)]
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    ax.stackplot(xs, *[ys for _, ys in layers], labels=[name for name, _ in layers], alpha=0.85)
    if device_bytes is not None:
        ax.axhline(est.budget(device_bytes) / _GIB, color="red", label="budget (max_memory_usage)")
        ax.axhline(device_bytes / _GIB, color="gray", linestyle="--", label="device memory")
    ax.axvline(batch, color="black", linestyle=":", label=f"micro-batch {batch}")
    ax.set(xlabel="micro-batch size", ylabel="GiB", title="Estimated peak training memory (worst-case input)")
    ax.legend(loc="upper left", fontsize="small")
    save_png(fig, path)


@guide_flags
def profile_memory(
    preset: PresetOpt = "default",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    batch: BatchOpt = None,
    measure: MeasureOpt = False,
    json_output: JsonOpt = False,
    plot: PlotOpt = None,
    *,
    flags: dict[str, Any],
) -> None:
    """Estimate a config's peak training memory per branch and check it against the GPU before launching.

    Activations are measured on the CPU for the worst-case input at micro-batch 1 and 2, then scaled.
    The worst case: data.max_boxes boxes, question_len tokens, the largest graph of data.root (else 100 nodes).
    """
    from isubg.gpu import resolve_auto_preset
    from isubg.memory import estimate, measure_peak_cuda, require_cuda
    from isubg.resolve import resolve_config

    with user_errors():
        name, auto_reason = resolve_auto_preset(preset)
        resolved = resolve_config(name, config_file=config, sets=set_ or [], flags=flags)
        cfg = _with_micro_batch(resolved.config, batch)
        if measure:
            require_cuda()  # before the estimate: say at once that --measure cannot run here
        device_bytes, device_source = _device_memory(gpu_memory)
        spec, worst = _data_sizes(cfg)
        est = estimate(cfg, spec, worst)
        measured = measure_peak_cuda(cfg, spec, est.batch_size, worst=worst) if measure else None
        report = _report(est, device_bytes, device_source, measured)
        if plot is not None:
            _plot(est, device_bytes, plot)
    print_warnings(resolved.warnings)
    if json_output:
        print_json({"preset": name, "auto_reason": auto_reason, **report, "plot": str(plot) if plot else None})
        return
    _print(report, name, auto_reason)
    if plot is not None:
        out_console().print(Text(f"Wrote {plot}"))
