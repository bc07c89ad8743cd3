"""`isubg tune run|report|plans`: the tuning guide's experiments as Optuna studies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from isubg.cli._common import ConfigOpt, JsonOpt, SetOpt, guide_flags, user_errors
from isubg.console import err_console, out_console, print_json, print_warnings
from isubg.errors import ConfigError

__all__ = ["app"]

app = typer.Typer(
    help="Tune hyperparameters: the guide's grids, staged and one-at-a-time plans, or a TPE search, on Optuna.",
    no_args_is_help=True,
)

DEFAULT_OUTPUT = Path("runs/tune")

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        metavar="URL|FILE",
        help="Optuna storage: a journal file (processes on one machine) or a database URL such as "
        "postgresql://user@host/db (workers on many machines). Default: OUTPUT/studies.journal.",
    ),
]
OutputOpt = Annotated[
    Path,
    typer.Option("--output", "-o", metavar="DIR", help="Folder for the trials' run directories and the journal."),
]


@app.command("plans")
def plans() -> None:
    """List the shipped plans (a plan YAML file of your own works too: isubg tune run --plan-file FILE)."""
    from rich.table import Table

    from isubg.plans import list_plans, load_plan

    table = Table("plan", "kind", "what it tries", box=None)
    for name in list_plans():
        with user_errors():
            try:
                plan = load_plan(name)
            except ConfigError:  # `search` needs --param before it is complete
                plan = load_plan(name, ["lr"])
        table.add_row(name, plan.kind, plan.description)
    out_console().print(table)


@app.command("run")
@guide_flags
def run(
    plan: Annotated[
        str | None,
        typer.Argument(
            metavar="PLAN", help="lr, complexity, isubg, staged, one-at-a-time or search (isubg tune plans)."
        ),
    ] = None,
    plan_file: Annotated[
        Path | None, typer.Option("--plan-file", metavar="FILE", help="A plan YAML file instead of a shipped plan.")
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            metavar="NAME[=LOW:HIGH[:log]|=A,B]",
            help="search / one-at-a-time: a parameter to vary (repeatable), in its advice range unless bounds "
            "or choices are given.",
        ),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            "--preset", "-p", metavar="NAME", help="Preset the trials start from (a name, a YAML file, or auto)."
        ),
    ] = "demo",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: Annotated[Path | None, typer.Option("--data", metavar="DIR", help="Processed data folder.")] = None,
    study: Annotated[
        str | None, typer.Option("--study", metavar="NAME", help="Study name (default PLAN-PRESET).")
    ] = None,
    storage: StorageOpt = None,
    trials: Annotated[
        int | None,
        typer.Option(
            "--trials", metavar="N", help="search: trials; staged: per step; grids: at most N configurations."
        ),
    ] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", metavar="N", help="Seeds per configuration.")] = None,
    pruner: Annotated[
        str | None, typer.Option("--pruner", metavar="median|hyperband|none", help="Early stopping of trials.")
    ] = None,
    output: OutputOpt = DEFAULT_OUTPUT,
    *,
    flags: dict[str, Any],
) -> None:
    """Run (or join, or resume) a study: every trial is a normal run directory under OUTPUT/STUDY/.

    Start the same command in several terminals (or machines, with a database --storage) to share the work.
    Ctrl-C stops after recording the current trial as failed; running the command again resumes the study.
    """
    from isubg.cli.train import resolve_data_dir
    from isubg.plans import load_plan
    from isubg.tune import build_request, run_study
    from isubg.tune_report import load_study, open_storage, study_report

    console = err_console()
    with user_errors():
        if (plan is None) == (plan_file is None):
            raise ConfigError("give a PLAN name (isubg tune plans) or --plan-file FILE, not both or neither")
        the_plan = load_plan(plan_file or plan, param or [])  # type: ignore[arg-type]
        if preset == "auto":
            from isubg.gpu import resolve_auto_preset

            preset, why = resolve_auto_preset(preset)
            console.print(f"--preset auto: {why}", highlight=False, markup=False)
        sets = list(set_ or [])
        options = {"study": study, "storage": storage, "trials": trials, "seeds": seeds, "pruner": pruner}
        sets += [f"tune.{k}={v}" for k, v in options.items() if v is not None]
        if data is not None:
            sets.append(f"data.root={data}")
        request, warnings = build_request(
            the_plan,
            preset,
            find_data=lambda cfg: resolve_data_dir(cfg.data.root, cfg.data.dataset, cfg.data.demo_size),
            output=output,
            config_file=config,
            sets=sets,
            flags=flags,
        )
        print_warnings(warnings)
        worker = run_study(request, say=lambda line: console.print(line, highlight=False, markup=False))
        report = study_report(load_study(request.study, open_storage(request.storage)))
    _print_report(report, top=10)
    if worker.interrupted:
        raise typer.Exit(130)


@app.command("report")
def report(
    study: Annotated[
        str | None,
        typer.Argument(metavar="[STUDY]", help="Study name (isubg tune run prints it); omit it to list the studies."),
    ] = None,
    storage: StorageOpt = None,
    output: OutputOpt = DEFAULT_OUTPUT,
    json_output: JsonOpt = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", metavar="DIR", help="Write PNG plots (history, metric vs each parameter).")
    ] = None,
    export_preset: Annotated[
        Path | None,
        typer.Option("--export-preset", metavar="FILE", help="Write the best configuration as a preset YAML."),
    ] = None,
) -> None:
    """The study's trials ranked by mean accuracy (with std over seeds), the best configuration, importances."""
    from isubg.tune_report import default_storage, list_studies, load_study, open_storage, plot_study, study_report
    from isubg.tune_report import export_preset as write_preset

    with user_errors():
        ref = default_storage(storage, output)
        if "://" not in ref and not Path(ref).is_file():
            raise ConfigError(f"no study storage at {ref}; give --storage URL|FILE or the --output DIR of tune run")
        if study is None:
            if plot is not None or export_preset is not None:
                raise ConfigError("--plot and --export-preset need a STUDY name (omit them to list the studies)")
            _print_studies(list_studies(open_storage(ref)), json_output)
            return
        the_study = load_study(study, open_storage(ref))
        result = study_report(the_study)
        written = plot_study(the_study, plot) if plot is not None else []
        exported = write_preset(result, export_preset) if export_preset is not None else None
    if json_output:
        print_json({**result.to_json(), "plots": [str(p) for p in written], "exported": str(exported or "") or None})
        return
    _print_report(result)
    console = err_console()
    for path in written:
        console.print(f"plot: {path}", highlight=False, markup=False)
    if exported is not None:
        console.print(f"best configuration written to {exported}; train it: isubg train --config {exported}",
                      highlight=False, markup=False)  # fmt: skip


def _print_studies(studies: list[dict[str, Any]], json_output: bool) -> None:
    from rich.table import Table

    if json_output:
        print_json(studies)
        return
    table = Table("study", "plan", "preset", "trials", "best %", box=None)
    for s in studies:
        counts = ", ".join(f"{n} {state}" for state, n in s["counts"].items())
        best = "-" if s["best"] is None else f"{100 * s['best']:.1f}"
        table.add_row(s["study"], s["plan"], s["preset"], counts, best)
    out_console().print(table)


def _print_report(result: Any, top: int | None = None) -> None:
    from rich.table import Table

    from isubg.config import format_value

    con = out_console()
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items())
    con.print(f"study {result.study}: plan {result.plan} ({result.kind}) on preset {result.preset}; {counts}",
              highlight=False, markup=False)  # fmt: skip
    params = sorted({p for r in result.rows for p in r.params})
    table = Table("#", "state", *[p.rsplit(".", 1)[-1] for p in params], "mean %", "std", "seeds", "note", box=None)
    for row in result.rows[:top] if top else result.rows:
        mean = "-" if row.mean is None else f"{100 * row.mean:.1f}"
        std = "-" if row.std is None else f"{100 * row.std:.1f}"
        values = [format_value(row.params.get(p)) for p in params]
        note = row.reason or (f"step {row.step}" if row.step else "")
        table.add_row(str(row.number), row.state, *values, mean, std, str(len(row.scores)), note[:60])
    con.print(table)
    if top and len(result.rows) > top:
        con.print(f"({len(result.rows) - top} more: isubg tune report {result.study})", highlight=False, markup=False)
    if result.best is not None:
        diff = ", ".join(f"{p} {format_value(a)} -> {format_value(b)}" for p, a, b in result.best_diff) or "none"
        con.print(f"best: trial {result.best.number}; changes from preset {result.preset}: {diff}",
                  highlight=False, markup=False)  # fmt: skip
    for step, values in result.importances.items():
        ranked = ", ".join(f"{p.rsplit('.', 1)[-1]} {v:.2f}" for p, v in sorted(values.items(), key=lambda kv: -kv[1]))
        con.print(f"importance{f' (step {step})' if step else ''}: {ranked}", highlight=False, markup=False)
    for note in result.notes:
        con.print(note, highlight=False, markup=False)
