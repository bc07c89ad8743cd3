"""`isubg import-checkpoint KIND FILE -o OUT.pt`: X-VLM, ban-vqa or MGHR weights as an isubg checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from isubg.cli._common import ConfigOpt, JsonOpt, SetOpt, user_errors
from isubg.console import err_console, out_console, print_json

__all__ = ["import_checkpoint"]


def import_checkpoint(
    kind: Annotated[str, typer.Argument(metavar="KIND", help="xvlm (X-VLM), ban (ban-vqa) or mghr (MGHR).")],
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The foreign checkpoint (.pth / .pt).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="OUT.pt", help="The isubg checkpoint to write (and OUT.yaml).")
    ],
    preset: Annotated[str, typer.Option("--preset", "-p", metavar="NAME", help="Preset under the file's settings.")] = (
        "default"
    ),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            metavar="DIR",
            help="Processed data folder the weights belong to: the model is built for its sizes and `isubg eval` "
            "accepts the result; unset: the sizes the file implies.",
        ),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Fail on any isubg tensor left unfilled, shape disagreement or unexplained tensor."
        ),
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Map a foreign checkpoint onto the isubg model and write it as an isubg checkpoint.

    Prints a table of mapped / reshaped / unused / new / missing / mismatched tensors with counts and bytes, then
    each group's reason. Start training from the result with `isubg train --config OUT.yaml --init-from OUT.pt`,
    or evaluate it with `isubg eval OUT.pt --data DIR` (import with --data DIR). Files are read with
    weights_only=True; a file holding pickled Python objects is refused.
    """
    from isubg.cli.train import resolve_data_dir
    from isubg.importers.convert import import_checkpoint as run_import
    from isubg.importers.convert import write_import

    with user_errors():
        start = time.perf_counter()
        data_dir = resolve_data_dir(data, "GQA", "small") if data is not None else None
        imported = run_import(
            kind, file, preset=preset, config_file=config, sets=list(set_ or []), data_dir=data_dir, strict=strict
        )
        settings = write_import(imported, output)
        seconds = time.perf_counter() - start
    report = imported.report
    if json_output:
        print_json({**report.to_json(), "output": str(output), "settings": str(settings), "seconds": seconds})
        return
    console = out_console()
    console.print(_table(report.counts(), f"{kind} {file} -> {output}"))
    for line in report.details():
        console.print(f"  {line}", highlight=False, markup=False)
    for setting, why in report.switches.items():
        console.print(f"  parity switch {setting}: {why}", highlight=False, markup=False)
    if report.extras:
        console.print(f"  not imported: {', '.join(report.extras)} (isubg starts a fresh optimizer)", highlight=False)
    err_console().print(f"wrote {output} and {settings} in {seconds:.1f} s", highlight=False, markup=False)


def _table(counts: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("tensors")
    table.add_column("count", justify="right")
    table.add_column("MiB", justify="right")
    for status, (n, nbytes) in counts.items():
        table.add_row(status, str(n), f"{nbytes / 2**20:.2f}")
    return table
