"""Generated documentation stays in step with the code."""

from __future__ import annotations

from pathlib import Path

from isubg.config import param_specs
from isubg.paramdocs import render_hyperparameters

REPO = Path(__file__).resolve().parent.parent


def test_hyperparameters_md_is_current() -> None:
    committed = (REPO / "docs" / "hyperparameters.md").read_text(encoding="utf-8")
    assert committed == render_hyperparameters(), "docs/hyperparameters.md is stale: run python scripts/gen_docs.py"


def test_hyperparameters_md_mentions_every_parameter() -> None:
    text = render_hyperparameters()
    for spec in param_specs().values():
        assert f"`{spec.name}`" in text


def _commands(markdown: str) -> list[str]:
    """Every `isubg ...` line inside the fenced bash blocks of a markdown file."""
    lines, inside = [], False
    for line in markdown.splitlines():
        if line.strip().startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside and line.strip().startswith("isubg "):
            lines.append(line.strip())
    return lines


def test_every_tuning_guide_example_is_a_valid_isubg_command() -> None:
    import shlex

    import click
    import typer

    from isubg.cli import app

    commands = _commands((REPO / "docs" / "tuning.md").read_text(encoding="utf-8"))
    assert len(commands) >= 15
    root = typer.main.get_command(app)
    for line in commands:
        args = shlex.split(line)[1:]
        command: click.Command = root
        while isinstance(command, click.Group):  # walk down `tune run ...` to the command itself
            name, args = args[0], args[1:]
            sub = command.get_command(click.Context(command), name)
            assert sub is not None, f"{line}: no command {name!r}"
            command = sub
        command.make_context(command.name, list(args))  # raises on an unknown option or a bad value
