"""The `isubg` command line: one Typer app, one file per command group.

Heavy libraries (torch, h5py, transformers) are imported inside the commands that need them, so
`isubg --help` and `isubg preset ...` start fast and never import torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from isubg import __version__
from isubg.cli import data, eval, gpu, import_checkpoint, preset, profile_memory, report, train, tune

app = typer.Typer(
    name="isubg",
    help="Train, evaluate, tune and size a three-branch VQA model (cfrf, isubg, xvlm) on GQA and VQA v2.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(preset.app, name="preset")
app.add_typer(data.app, name="data")
app.add_typer(tune.app, name="tune")
app.command("train")(train.train)
app.command("eval")(eval.evaluate_run)
app.command("report")(report.report)
app.command("gpu")(gpu.gpu)
app.command("profile-memory")(profile_memory.profile_memory)
app.command("import-checkpoint")(import_checkpoint.import_checkpoint)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"isubg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """isubg: train, evaluate, tune and size a three-branch VQA model on GQA and VQA v2."""


def main() -> None:
    """Console-script entry point."""
    app()
