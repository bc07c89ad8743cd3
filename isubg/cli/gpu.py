"""`isubg gpu [--json]`: the GPUs NVML sees, the driver, and the preset `--preset auto` would pick.

It asks NVML through `isubg.gpu` and never imports torch, so it answers at once. With no driver or no GPU it
prints one line saying why and exits 0: training on the CPU is a supported setup, not an error.
"""

from __future__ import annotations

from rich.console import JustifyMethod
from rich.table import Table
from rich.text import Text

from isubg import gpu as gpu_probe
from isubg.cli._common import JsonOpt
from isubg.console import err_console, out_console, print_json

__all__ = ["gpu"]


def _percent(value: int | None) -> str:
    return "n/a" if value is None else f"{value}%"


def _table(probe: gpu_probe.GpuProbe) -> Table:
    table = Table(title="GPUs (NVML)", title_justify="left")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("index", "right"),
        ("name", "left"),
        ("visible", "left"),
        ("total", "right"),
        ("used", "right"),
        ("free", "right"),
        ("util", "right"),
        ("mem util", "right"),
        ("compute cap.", "right"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name != "name")
    for d in probe.devices:
        table.add_row(
            str(d.index),
            Text(d.name),
            "yes" if d.visible else "no",
            gpu_probe.format_gib(d.total_bytes),
            gpu_probe.format_gib(d.used_bytes),
            gpu_probe.format_gib(d.free_bytes),
            _percent(d.util_gpu),
            _percent(d.util_memory),
            d.compute_capability or "n/a",
        )
    return table


def gpu(json_output: JsonOpt = False) -> None:
    """Show the GPUs, the driver, how NVML and CUDA number them, and the preset `--preset auto` picks.

    Exit code 0 also when there is no driver or no GPU (isubg then trains on the CPU).
    """
    probe = gpu_probe.probe()
    choice = gpu_probe.choose_preset(probe)
    if json_output:
        print_json({**probe.to_json(), "auto_preset": choice.to_json()})
        return
    console = out_console()
    for warning in probe.warnings:
        err_console().print(Text("  ! ", style="yellow") + Text(warning), soft_wrap=True)
    if probe.devices:
        console.print(_table(probe))
        cuda = f", CUDA {probe.cuda_driver_version}" if probe.cuda_driver_version else ""
        console.print(Text(f"Driver {probe.driver_version or 'unknown'}{cuda}"))
        console.print(Text(probe.order_note), soft_wrap=True)
    reason = probe.no_gpu_reason()
    if reason is not None:
        console.print(Text(f"No GPU visible: {reason}; isubg trains on the CPU."), soft_wrap=True)
    console.print(Text(f"--preset auto picks {choice.name}: {choice.reason}"), soft_wrap=True)
