"""`isubg train`: resolve the config, find the data, train, and report where everything went."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from isubg.cli._common import ConfigOpt, JsonOpt, SetOpt, guide_flags, user_errors
from isubg.console import err_console, print_json, print_warnings
from isubg.errors import ConfigError, DataError

__all__ = ["train"]

PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        "-p",
        metavar="NAME",
        help="Preset (isubg preset list), a YAML file, or auto (chosen from the GPU memory NVML reports); "
        "default: demo on the embedded demo data, else default.",
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", metavar="DIR", help="Processed data folder (isubg data prepare); sets data.root."),
]
ResumeOpt = Annotated[
    Path | None,
    typer.Option(
        "--resume",
        metavar="RUN_DIR",
        help="Continue the run in RUN_DIR exactly where its last checkpoint left off, with its saved config "
        "(--set/flags still apply, e.g. --epochs to train longer).",
    ),
]
InitOpt = Annotated[
    Path | None,
    typer.Option(
        "--init-from",
        metavar="CHECKPOINT",
        help="Start from the model weights of this isubg checkpoint (e.g. from `isubg import-checkpoint`); sets "
        "train.init_from.",
    ),
]
StepsOpt = Annotated[
    int | None,
    typer.Option("--max-steps", metavar="N", help="Stop (and checkpoint, as on Ctrl-C) after N optimizer steps."),
]


def resolve_data_dir(root: Path | None, dataset: str, demo_size: str, main: bool = True) -> Path:
    """The processed folder to train on: `root` itself, `root/processed/<dataset>` (a demo folder), or the demo.

    Raises:
        DataError: `root` holds neither layout.
    """
    if root is None:
        from isubg.data.embedded import ensure_demo

        say = err_console().print if main else None
        return ensure_demo(demo_size, progress=say).processed(dataset.lower())  # type: ignore[arg-type]
    for candidate in (root, root / "processed" / dataset.lower()):
        if (candidate / "manifest.json").is_file():
            return candidate
    raise DataError(
        f"{root}: not a processed data folder (no manifest.json in it or in processed/{dataset.lower()}/); "
        "write one with `isubg data prepare` or `isubg data demo`"
    )


def _shared(value: Any) -> Any:
    """Rank 0's `value` on every torchrun process (the run directory name must agree)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return value
    import torch.distributed as tdist

    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


@guide_flags
def train(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: DataOpt = None,
    resume: ResumeOpt = None,
    init_from: InitOpt = None,
    max_steps: StepsOpt = None,
    json_output: JsonOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Train the model; with no arguments, the demo preset on the embedded demo dataset (CPU, minutes).

    Writes RUN_DIR/config.yaml, metrics.jsonl, train.log, summary.json and checkpoints/{last,best}.pt.
    Ctrl-C (or SIGTERM) finishes the current update, saves checkpoints/last.pt and exits; --resume continues.
    """
    from isubg.resolve import resolve_config
    from isubg.train import default_run_dir, start_processes
    from isubg.train import train as run_training

    with user_errors():
        sets = list(set_ or [])
        if data is not None:
            sets.append(f"data.root={data}")
        if init_from is not None:
            sets.append(f"train.init_from={init_from}")
        if resume is not None:
            if config is not None:
                raise ConfigError("--resume uses the run's saved config.yaml; give changes with --set or flags")
            config = resume / "config.yaml"
            if not config.is_file():
                raise ConfigError(f"--resume: {resume} has no config.yaml; is it an isubg run directory?")
        name = preset or ("default" if data is not None or resume is not None else "demo")
        if name == "auto":
            from isubg.gpu import resolve_auto_preset

            name, why = resolve_auto_preset(name)
            err_console().print(f"--preset auto: {why}", highlight=False, markup=False)
        resolved = resolve_config(name, config_file=config, sets=sets, flags=flags)
        cfg = resolved.config
        procs = start_processes(cfg.train.device)
        if procs.main:
            print_warnings(resolved.warnings)
        run_dir = resume or cfg.train.output or _shared(default_run_dir(name) if procs.main else None)
        if resume is None and (run_dir / "checkpoints").exists():
            raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick --output")
        if procs.main:
            data_dir = resolve_data_dir(cfg.data.root, cfg.data.dataset, cfg.data.demo_size)
        data_dir = _shared(data_dir if procs.main else None)
        result = run_training(
            cfg, Path(run_dir), data_dir=data_dir, resume=resume is not None, stop_after_steps=max_steps, preset=name
        )
    if json_output and procs.main:
        print_json(_summary(Path(run_dir)))
    if result.status == "diverged":
        raise typer.Exit(1)
    if result.status == "interrupted" and max_steps is None:
        raise typer.Exit(130)


def _summary(run_dir: Path) -> Any:
    import json

    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
