"""`isubg preset list|show|diff|export|validate`: the shipped presets and any config file, inspected."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from isubg import __version__
from isubg.cli._common import ConfigOpt, JsonOpt, SetOpt, guide_flags, user_errors
from isubg.config import (
    ConfigError,
    RunConfig,
    config_diff,
    default_config,
    format_advice,
    format_value,
    get_value,
    param_specs,
)
from isubg.console import err_console, out_console, print_json, print_warnings
from isubg.data.files import write_text_atomic
from isubg.presets import list_presets, preset_purpose
from isubg.resolve import Resolved, dump_config, resolve_config

app = typer.Typer(help="List, show, compare, export and validate presets and config files.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="A preset name (see `isubg preset list`) or a YAML file.")]


def _json_config(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def _json_value(dumped: dict[str, Any], path: str) -> Any:
    """The JSON value at a dotted path of a config dumped once with `_json_config`."""
    node: Any = dumped
    for part in path.split("."):
        node = node[part]
    return node


def _batch_formula(cfg: RunConfig) -> str:
    return (
        f"{cfg.effective_batch} = batch_size {cfg.train.batch_size} x gradient_accumulation_steps "
        f"{cfg.optim.gradient_accumulation_steps} x update_freq {cfg.train.update_freq}"
    )


# --------------------------------------------------------------------------------------------------
# list


@app.command("list")
def list_(json_output: JsonOpt = False) -> None:
    """List the shipped presets: purpose, effective batch and what each changes from `default`."""
    with user_errors():
        base = default_config()
        rows = []
        for name in list_presets():
            cfg = resolve_config(name).config
            changes = {path: new for path, _, new in config_diff(base, cfg)}
            rows.append((name, preset_purpose(name), cfg, changes))
    if json_output:
        print_json(
            [
                {
                    "name": name,
                    "purpose": purpose,
                    "effective_batch": cfg.effective_batch,
                    "changes": {p: _json_value(dumped, p) for p in changes},
                }
                for name, purpose, cfg, changes in rows
                for dumped in [_json_config(cfg)]
            ]
        )
        return
    table = Table(title="isubg presets", title_justify="left", show_lines=True)
    table.add_column("preset", style="bold", no_wrap=True)
    table.add_column("purpose", ratio=3)
    table.add_column("eff. batch", justify="right")
    table.add_column("differences from default", ratio=4)
    for name, purpose, cfg, changes in rows:
        diff = ", ".join(f"{p.rsplit('.', 1)[-1]}={format_value(v)}" for p, v in changes.items()) or "-"
        table.add_row(name, purpose, str(cfg.effective_batch), diff)
    console = out_console()
    console.print(table)
    console.print("Show one in full: isubg preset show NAME")


# --------------------------------------------------------------------------------------------------
# show


def _show_json(resolved: Resolved, name: str) -> dict[str, Any]:
    cfg = resolved.config
    dumped, base = _json_config(cfg), _json_config(default_config())
    warned = {w.path for w in resolved.warnings}
    params = {}
    for path, spec in param_specs().items():
        value, default = _json_value(dumped, path), _json_value(base, path)
        params[path] = {
            "value": value,
            "default": default,
            "changed": value != default,
            "advice": format_advice(spec.advice) or None,
            "allowed": spec.allowed(),
            "description": spec.description,
            "guide_name": spec.name if spec.guide else None,
            "section": spec.section,
            "warning": path in warned,
            "source": resolved.sources.get(path, "default"),
        }
    return {
        "preset": name,
        "purpose": preset_purpose(name),
        "effective_batch": cfg.effective_batch,
        "guide_parameters": {s.name: _json_value(dumped, p) for p, s in param_specs().items() if s.guide},
        "parameters": params,
        "warnings": [{"path": w.path, "message": w.message} for w in resolved.warnings],
        "config": dumped,
    }


_SHOW_COLUMNS = ("", "parameter", "value", "default", "advice", "description")


def _section_tables(resolved: Resolved, changed_only: bool) -> list[Table]:
    """One table per config section; marker and name columns share one width so the tables line up."""
    cfg, base = resolved.config, default_config()
    warned = {w.path for w in resolved.warnings}
    rows: dict[str, list[tuple[str, ...]]] = {}
    for path, spec in param_specs().items():
        value, default = get_value(cfg, path), get_value(base, path)
        if changed_only and value == default:
            continue
        marker = ("*" if value != default else " ") + ("!" if path in warned else " ")
        cells = (marker, spec.name, format_value(value), format_value(default), format_advice(spec.advice))
        rows.setdefault(spec.section, []).append((*cells, spec.description))
    widths = [max((len(r[i]) for rs in rows.values() for r in rs), default=1) for i in range(2)]
    tables = []
    for section, section_rows in rows.items():
        table = Table(title=section, title_justify="left", title_style="bold", expand=True)
        for i, name in enumerate(_SHOW_COLUMNS):
            if i < 2:
                table.add_column(name, no_wrap=True, min_width=max(widths[i], len(name)))
            elif i < 5:
                table.add_column(name, no_wrap=True)
            else:
                table.add_column(name, ratio=1)
        for row in section_rows:
            changed = row[0].startswith("*")
            table.add_row(*row[:2], Text(row[2], style="bold cyan" if changed else ""), *row[3:])
        tables.append(table)
    return tables


@app.command()
@guide_flags
def show(
    name: NameArg = "default",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    changed: Annotated[bool, typer.Option("--changed", help="Only parameters that differ from default.")] = False,
    json_output: JsonOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Show every parameter of a preset: value, default, changed marker, advice, description, warnings.

    Overrides (--config, --set, guide flags such as --lr) show what a run with them would use.
    """
    with user_errors():
        resolved = resolve_config(name, config_file=config, sets=set_ or [], flags=flags)
        purpose = preset_purpose(name)
    if json_output:
        print_json(_show_json(resolved, name))
        return
    console = out_console()
    console.print(Text(f"Preset {name}", style="bold") + Text(f": {purpose}" if purpose else ""))
    console.print(f"effective batch {_batch_formula(resolved.config)}")
    for table in _section_tables(resolved, changed):
        console.print(table)
    console.print("* changed from default   ! see the warnings below")
    print_warnings(resolved.warnings)


# --------------------------------------------------------------------------------------------------
# diff


@app.command()
def diff(a: NameArg, b: NameArg, json_output: JsonOpt = False) -> None:
    """Show the parameters on which two presets (or config files) differ."""
    with user_errors():
        cfg_a, cfg_b = resolve_config(a).config, resolve_config(b).config
    rows = config_diff(cfg_a, cfg_b)
    if json_output:
        dumped_a, dumped_b = _json_config(cfg_a), _json_config(cfg_b)
        print_json(
            {
                "a": a,
                "b": b,
                "effective_batch": {"a": cfg_a.effective_batch, "b": cfg_b.effective_batch},
                "differences": [
                    {"path": p, "a": _json_value(dumped_a, p), "b": _json_value(dumped_b, p)} for p, _, _ in rows
                ],
            }
        )
        return
    console = out_console()
    if not rows:
        console.print(f"{a} and {b} are identical (effective batch {cfg_a.effective_batch}).")
        return
    table = Table(title=f"{a} vs {b}", title_justify="left")
    table.add_column("parameter", no_wrap=True)
    table.add_column(a, no_wrap=True)
    table.add_column(b, no_wrap=True)
    for path, va, vb in rows:
        table.add_row(path, format_value(va), format_value(vb))
    table.add_row(Text("effective batch", style="italic"), str(cfg_a.effective_batch), str(cfg_b.effective_batch))
    console.print(table)


# --------------------------------------------------------------------------------------------------
# export


@app.command()
@guide_flags
def export(
    name: NameArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write here instead of standard output.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite FILE if it exists.")] = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Write the fully resolved config of a preset (plus overrides) as YAML that `--config` accepts.

    Guide flags make this a converter from a research-code command line to a config file:
    `isubg preset export default --lr 3e-4 --AOA_layers 8 --mixed_precision -o run.yaml`.
    """
    with user_errors():
        resolved = resolve_config(name, config_file=config, sets=set_ or [], flags=flags)
        given = [f"--{k} {format_value(v)}" for k, v in flags.items() if v is not None]
        layers = " + ".join([name] + ([str(config)] if config else []) + [f"--set {s}" for s in set_ or []] + given)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        header = (
            f"isubg {__version__} config exported from {layers} on {stamp}\n"
            f"effective batch {_batch_formula(resolved.config)}\n"
            f"Use: isubg train --config {output or 'THIS_FILE'}"
        )
        text = dump_config(resolved.config, header=header)
        if output is None:
            typer.echo(text, nl=False)
        else:
            if output.exists() and not force:
                raise ConfigError(f"{output} exists; pass --force to overwrite it or choose another --output")
            try:
                write_text_atomic(output, text)
            except OSError as exc:
                raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from None
            out_console().print(f"Wrote {output} (effective batch {resolved.config.effective_batch}).")
    print_warnings(resolved.warnings)


# --------------------------------------------------------------------------------------------------
# validate


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="YAML config files to check.")],
    json_output: JsonOpt = False,
) -> None:
    """Check config files against the schema: unknown keys, types, bounds and cross-field rules.

    Exit code 0 when every file is valid (warnings allowed), 2 otherwise.
    """
    results = []
    for path in files:
        try:
            resolved = resolve_config("default", config_file=path)
        except ConfigError as exc:
            results.append({"file": str(path), "valid": False, "error": str(exc), "warnings": []})
            continue
        results.append(
            {
                "file": str(path),
                "valid": True,
                "effective_batch": resolved.config.effective_batch,
                "warnings": [{"path": w.path, "message": w.message} for w in resolved.warnings],
                "_warnings": resolved.warnings,
            }
        )
    if json_output:
        print_json([{k: v for k, v in r.items() if not k.startswith("_")} for r in results])
    else:
        console = out_console()
        for r in results:
            if r["valid"]:
                console.print(
                    Text(f"ok  {r['file']}", style="green") + Text(f" (effective batch {r['effective_batch']})")
                )
                print_warnings(r["_warnings"])
            else:
                line = Text(f"bad {r['file']}: ", style="bold red") + Text(r["error"])
                err_console().print(line, soft_wrap=True)
    if not all(r["valid"] for r in results):
        raise typer.Exit(2)
