"""Pieces every command shares: option types and turning user mistakes into exit code 2."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from isubg.config import guide_params, param_specs
from isubg.console import print_error
from isubg.errors import IsubgError
from isubg.yamlio import YamlError, parse_yaml_value

__all__ = ["ConfigOpt", "JsonOpt", "SetOpt", "guide_flags", "user_errors"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override one setting (repeatable): a dotted path or a guide name, "
        "e.g. --set train.lr=3e-4 --set AOA_layers=4.",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", metavar="FILE", help="A YAML config layered over the preset."),
]


@contextmanager
def user_errors() -> Iterator[None]:
    """Report a user error (bad config, bad data file) as one message on stderr and exit with code 2."""
    try:
        yield
    except IsubgError as exc:
        print_error(str(exc))
        raise typer.Exit(2) from None


# --------------------------------------------------------------------------------------------------
# One CLI flag per guide parameter, named as in the tuning guide


_FLAG_PREFIX = "guideflag_"
_PANEL = "Hyperparameters (guide names)"


def _flag_parameter(name: str, path: str) -> inspect.Parameter:
    spec = param_specs()[path]
    dashed = name.replace("_", "-")
    aliases = [f"--{dashed}"] + ([f"--{name}"] if dashed != name else [])
    annotation = spec.info.annotation
    base = next((a for a in get_args(annotation) if a is not type(None)), annotation)
    help_text = f"{spec.description} [{path}]"
    if base is bool:
        # Switches, as the guide's store_true flags: --mixed_precision / --no-mixed_precision. The guide's
        # `--tfidf False` and `--use_mgat 0` are written --no-tfidf, --no-use_mgat (or --set tfidf=false).
        decls = [f"--{dashed}/--no-{dashed}"] + ([f"--{name}/--no-{name}"] if dashed != name else [])
        option = typer.Option(*decls, help=help_text, rich_help_panel=_PANEL)
        kind: Any = bool | None
    else:
        # Values arrive as text and are validated by the schema together with the other layers, so a bad
        # value gets the same message whether it came from a flag, --set or a file.
        option = typer.Option(*aliases, help=help_text, rich_help_panel=_PANEL)
        kind = Path | None if base is Path else str | None
    return inspect.Parameter(
        _FLAG_PREFIX + name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind, option]
    )


def guide_flags(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command one option per guide parameter (`--lr`, `--AOA_layers`, `--mixed-precision`, ...).

    The decorated function must take a `flags: dict[str, Any]` keyword; it receives the flags the
    user gave, keyed by guide name, ready for `resolve_config(flags=...)`.
    """
    signature = inspect.signature(func, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "flags"]
    taken = {decl for p in kept for decl in _option_names(p)}
    # A command's own option wins over a guide flag of the same name (export's --output is a file).
    added = [
        _flag_parameter(name, path)
        for name, path in guide_params().items()
        if not {f"--{name}", f"--{name.replace('_', '-')}"} & taken
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = {k.removeprefix(_FLAG_PREFIX): kwargs.pop(k) for k in list(kwargs) if k.startswith(_FLAG_PREFIX)}
        for name, value in flags.items():
            if isinstance(value, str):
                flags[name] = _parse_flag(name, value)
        return func(*args, flags=flags, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    return wrapper


def _option_names(param: inspect.Parameter) -> set[str]:
    """The --names a command parameter is reachable by."""
    names = {f"--{param.name.replace('_', '-')}"}
    for meta in getattr(param.annotation, "__metadata__", ()):
        for decl in getattr(meta, "param_decls", None) or ():
            names.update(part for part in decl.split("/") if part.startswith("--"))
    return names


def _parse_flag(name: str, raw: str) -> Any:
    try:
        return parse_yaml_value(raw, f"--{name}")
    except YamlError as exc:
        print_error(str(exc))
        raise typer.Exit(2) from None
