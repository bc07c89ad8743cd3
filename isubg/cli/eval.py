"""`isubg eval`: official accuracies of a trained run per branch and question type; exports for official scorers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from isubg.cli._common import JsonOpt, user_errors
from isubg.console import err_console, out_console, print_json
from isubg.errors import ConfigError

__all__ = ["evaluate_run"]


def evaluate_run(
    run: Annotated[Path, typer.Argument(metavar="RUN_DIR|CHECKPOINT", help="A run directory or a checkpoint file.")],
    split: Annotated[
        str | None, typer.Option("--split", help="Split to evaluate (val, testdev, ...); default: eval.split.")
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option("--export", metavar="FILE", help="Write predictions in the official VQA/GQA result format."),
    ] = None,
    explanations: Annotated[
        Path | None,
        typer.Option("--explanations", metavar="FILE", help="Write each question's selected subgraph (isubg)."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", metavar="DIR", help="Processed data folder; default: the run's.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Evaluation batch size.")] = None,
    scene_graphs: Annotated[
        str | None,
        typer.Option(
            "--scene-graphs",
            metavar="auto|gt|detected",
            help="Where scene graphs and stat words come from (data.scene_graphs); default: the run's.",
        ),
    ] = None,
    ablate: Annotated[
        str | None,
        typer.Option(
            "--ablate",
            metavar="boxes|zero|graphs|stats|image",
            help="Score with one input shuffled across each batch (boxes, graphs, stats, or all: image) or the "
            "boxes zeroed: a model that uses the input loses accuracy.",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Evaluate a trained run: accuracy per branch (cfrf, isubg, xvlm), fused, ens and bound, per question type.

    VQA uses the official VQA v2 accuracy (answer processing, 10-choose-9 soft score); GQA exact match.
    --export writes [{question_id, answer}] (VQA) or [{questionId, prediction}] (GQA) for the official scripts.
    The scene graphs and stat words come from the run's data.scene_graphs; which ones is printed (and is
    "inputs" in --json). --ablate shows whether the model uses an input (isubg.ablation): compare its accuracies
    with a plain run's.
    """
    with user_errors():
        result, paths, inputs = _run(
            run, split, export, explanations, data, batch_size, device, scene_graphs=scene_graphs, ablate=ablate
        )
    if json_output:
        print_json({**result.to_json(), "inputs": inputs, "files": paths})
        return
    console = out_console()
    console.print(
        f"{inputs['split']}: scene graphs {inputs['graphs']}; stat words {inputs['stat_words']} "
        f"(data.scene_graphs={inputs['scene_graphs']})"
        + (f"; ablation: {inputs['ablation']}" if inputs["ablation"] else ""),
        highlight=False,
        markup=False,
    )
    for table in _tables(result):
        console.print(table)
    for what, path in paths.items():
        console.print(f"{what}: {path}")


def _run(
    run: Path,
    split: str | None,
    export: Path | None,
    explanations: Path | None,
    data: Path | None,
    batch_size: int | None,
    device_name: str,
    *,
    scene_graphs: str | None = None,
    ablate: str | None = None,
) -> tuple[Any, dict[str, str], dict[str, Any]]:
    """Evaluate; returns the result, the files written and the inputs (graph and stat-word sources, ablation)."""
    from isubg.ablation import ABLATIONS, ablated
    from isubg.checkpoint import find_checkpoint, load_checkpoint, vocab_checksum
    from isubg.cli.train import resolve_data_dir
    from isubg.config import RunConfig
    from isubg.data.loaders import make_batches, open_split
    from isubg.device import pick_device
    from isubg.evaluate import evaluate, load_trained, write_explanations, write_predictions

    if scene_graphs not in (None, "auto", "gt", "detected"):
        raise ConfigError(f"--scene-graphs must be auto, gt or detected, got {scene_graphs!r}")
    if ablate is not None and ablate not in ABLATIONS:
        raise ConfigError(f"--ablate must be one of {', '.join(ABLATIONS)}, got {ablate!r}")
    if ablate is not None and explanations is not None:
        raise ConfigError(
            "--explanations with --ablate would pair each question's subgraph with another image's graph; "
            "write explanations from a plain run"
        )
    file = find_checkpoint(run)
    state = load_checkpoint(file)  # read once: it gives the config and the weights
    cfg = RunConfig.model_validate(state["config"])
    if batch_size is not None:
        cfg.eval.batch_size = batch_size
    if scene_graphs is not None:
        cfg.data.scene_graphs = scene_graphs  # type: ignore[assignment]
    cfg.data.num_workers = 0  # evaluation is one pass; worker start-up costs more than it saves on small splits
    data_dir = resolve_data_dir(data or cfg.data.root, cfg.data.dataset, cfg.data.demo_size)
    dataset = open_split(cfg, data_dir, split or cfg.eval.split, None)
    device = pick_device(device_name)
    model = load_trained(state, dataset.spec(), vocab_checksum(data_dir), file, device)
    loader = make_batches(dataset, cfg, epoch=0, train=False)
    console = err_console()
    with console.status(f"evaluating {len(dataset)} questions of {dataset.split}"):
        batches = ablated(loader, ablate)
        result = evaluate(model, batches, dataset, device=device, explanations=explanations is not None)
    paths: dict[str, str] = {}
    if export is not None:
        write_predictions(result, export, cfg.data.dataset)
        paths["predictions"] = str(export)
    if explanations is not None:
        write_explanations(result, explanations)
        paths["explanations"] = str(explanations)
    inputs = {
        "split": dataset.split,
        "scene_graphs": cfg.data.scene_graphs,
        **dataset.graph_sources,
        "ablation": ablate,
    }
    return result, paths, inputs


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _tables(result: Any) -> list[Table]:
    overall = Table(title=f"{result.dataset.upper()}, {result.counts.get('scored', 0)} questions")
    overall.add_column("prediction")
    overall.add_column("accuracy %", justify="right")
    for name in result.names:
        overall.add_row(name, _pct((result.accuracy or {}).get(name)))
    per_type = Table(title="per question type (accuracy %)")
    per_type.add_column("type")
    per_type.add_column("questions", justify="right")
    for name in result.names:
        per_type.add_column(name, justify="right")
    for key, accs in result.per_type.items():
        per_type.add_row(key, str(result.type_counts.get(key, 0)), *(_pct(accs.get(n)) for n in result.names))
    return [overall, per_type] if result.per_type else [overall]
