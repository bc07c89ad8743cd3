"""`isubg data ...`: convert box features and inspect data files.

The data modules (h5py, numpy) are imported inside each command so `isubg --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from isubg.cli._common import JsonOpt, user_errors
from isubg.console import err_console, out_console, print_json
from isubg.errors import ConfigError

app = typer.Typer(help="Prepare, convert and inspect data.", no_args_is_help=True)


@app.command("convert-features")
def convert_features(
    sources: Annotated[list[Path], typer.Argument(help="Bottom-up-attention TSV files, read in order.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HDF5 file to write.")],
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed rows and list them.")] = False,
    float16: Annotated[bool, typer.Option("--float16", help="Store features as float16 (half the size).")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Convert bottom-up-attention TSV files into one adaptive HDF5 features file.

    Streams row by row (memory does not grow with the input), keeps the optional label fields
    (objects_id, objects_conf, attrs_id, attrs_conf), writes OUTPUT's id map beside it as
    <stem>_imgid2idx.json, and replaces OUTPUT only once the conversion has succeeded.
    """
    from isubg.data.convert import convert_tsv

    with user_errors():
        if output.exists() and not force:
            raise ConfigError(f"{output} exists; pass --force to replace it")
        missing = [str(s) for s in sources if not s.is_file()]
        if missing:
            raise ConfigError(f"no such TSV file: {', '.join(missing)}")
        total = sum(s.stat().st_size for s in sources)
        columns = (
            TextColumn("converting"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err_console(), transient=True) as bar:
            task = bar.add_task("convert", total=total)
            report = convert_tsv(
                sources,
                output,
                skip_bad=skip_bad,
                dtype="float16" if float16 else "float32",
                progress=lambda n: bar.advance(task, n),
            )
    console = out_console()
    rate = report.images / report.seconds if report.seconds else float("inf")
    console.print(
        f"Wrote {output}: {report.images} images, {report.boxes} boxes, {report.feature_dim}-d features "
        f"in {report.seconds:.1f} s ({rate:.0f} images/s)."
    )
    if report.skipped:
        err = err_console()
        err.print(f"Skipped {len(report.skipped)} bad row(s):")
        for line in report.skipped:
            err.print(f"  {line}", markup=False, soft_wrap=True)


@app.command()
def demo(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write it; default: the isubg cache folder.")
    ] = None,
    size: Annotated[str, typer.Option(help="tiny, small or medium.")] = "small",
    seed: Annotated[int, typer.Option(help="The world, features and questions depend only on size and seed.")] = 0,
) -> None:
    """Generate the embedded demo dataset (GQA and VQA v2 formats, TSV and HDF5 features) and prepare it.

    A synthetic world of objects with names, colours, materials and sizes; box features encode them
    with noise, so a model can learn the questions from the features or from the scene graphs.
    """
    from isubg.data.embedded import build_demo, demo_dir

    with user_errors():
        if size not in ("tiny", "small", "medium"):
            raise ConfigError(f"--size must be tiny, small or medium, got {size!r}")
        out = output or demo_dir(size, seed)  # type: ignore[arg-type]
        with err_console().status("generating") as status:
            build = build_demo(out, size=size, seed=seed, progress=lambda m: status.update(m))  # type: ignore[arg-type]
    console = out_console()
    generated = build.generated
    assert generated is not None
    console.print(f"Demo dataset ({size}, seed {seed}) in {out}, generated in {generated.seconds:.1f} s:")
    for split, count in generated.questions.items():
        console.print(f"  {split}: {generated.images[split]} images, {count} questions")
    for dataset, report in build.prepared.items():
        console.print(f"  processed {dataset}: {build.processed(dataset)} ({report.answers} answers)")
    console.print(f"Check it with: isubg data inspect {build.processed('gqa')}")


class _PrepareBars:
    """One progress bar per file read and per long step of `isubg data prepare` (on stderr)."""

    def __init__(self) -> None:
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console(),
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _PrepareBars:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def log(self, message: str) -> None:
        """A step without a measurable size: one line above the bars."""
        self.bars.console.print(message, markup=False, highlight=False)

    def __call__(self, what: str, done: int, total: int) -> None:
        task = self.tasks.get(what)
        if task is None:
            task = self.tasks[what] = self.bars.add_task(what, total=total)
        self.bars.update(task, completed=done, total=total)


@app.command()
def prepare(
    dataset: Annotated[str, typer.Argument(help="gqa or vqa.", metavar="gqa|vqa")],
    raw: Annotated[Path, typer.Argument(help="Folder holding the official question/annotation/scene-graph files.")],
    features: Annotated[
        list[Path],
        typer.Option(
            "--features",
            help="The HDF5 box features of every image used; repeat it for several files (each image in one).",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The processed folder to write.")],
    splits: Annotated[str, typer.Option(help="Comma-separated split names.")] = "train,val,testdev",
    train_split: Annotated[str, typer.Option(help="The split answers and tf-idf are learned from.")] = "train",
    glove: Annotated[Path | None, typer.Option(help="Local glove.6B.300d.txt for the embedding rows.")] = None,
    min_answer_count: Annotated[
        int | None, typer.Option(help="Keep answers seen this often in train (VQA default 9, GQA 1).", min=1)
    ] = None,
    object_vocab: Annotated[
        Path | None,
        typer.Option(help="The detector's objects_vocab.txt: names the boxes of the detector graphs and stat words."),
    ] = None,
    attribute_vocab: Annotated[
        Path | None,
        typer.Option(help="The detector's attributes_vocab.txt: box attributes in detector graphs and stat words."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Check the official files and build the processed folder training reads.

    Every question's image must have features (and, in a GQA split with a scene-graph file, a scene graph;
    testdev and test have none). Every image also gets a scene graph and stat words built from the detector
    boxes and labels; data.scene_graphs picks which a run reads. OUTPUT is replaced only after everything
    was written.
    """
    from isubg.data.prepare import discover_splits
    from isubg.data.prepare import prepare as run_prepare

    with user_errors():
        dataset = dataset.lower()
        if dataset not in ("gqa", "vqa"):
            raise ConfigError(f"dataset must be gqa or vqa, got {dataset!r}")
        if output.exists() and not force:
            raise ConfigError(f"{output} exists; pass --force to replace it")
        names = [s.strip() for s in splits.split(",") if s.strip()]
        files = discover_splits(dataset, raw, names)  # type: ignore[arg-type]
        with _PrepareBars() as bars:
            report = run_prepare(
                dataset,  # type: ignore[arg-type]
                files,
                features,
                output,
                train_split=train_split,
                glove=glove,
                min_answer_count=min_answer_count,
                object_vocab=object_vocab,
                attribute_vocab=attribute_vocab,
                log=bars.log,
                progress=bars,
            )
    console = out_console()
    console.print(f"Wrote {output} in {report.seconds:.1f} s: {report.dictionary} words, {report.answers} answers.")
    for split, counts in report.splits.items():
        lost = report.out_of_vocab.get(split, 0)
        graphs = "ground-truth and detector" if split in report.gt_splits else "detector"
        console.print(
            f"  {split}: {counts['questions']} questions, {counts['images']} images, {lost} unanswerable; "
            f"{graphs} scene graphs"
        )
    for warning in report.warnings:
        err_console().print(warning, style="yellow", markup=False, highlight=False)
    console.print(f"Check it with: isubg data inspect {output}")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A processed data folder or a features HDF5 file.")],
    json_output: JsonOpt = False,
) -> None:
    """Summarise a data file and check every cross-reference in it; exit 1 if any problem is found."""
    from isubg.data.inspect import inspect_path

    with user_errors():
        if not path.exists():
            raise ConfigError(f"{path}: no such file or folder")
        report = inspect_path(path)
    if json_output:
        print_json(report.to_json())
    else:
        _print_report(report)
    if report.problems:
        raise typer.Exit(1)


def _print_report(report: object) -> None:
    console = out_console()
    summary = Table(title=f"{report.path}", title_justify="left", show_header=False)  # type: ignore[attr-defined]
    summary.add_column("what", style="bold")
    summary.add_column("value")
    for key, value in report.summary.items():  # type: ignore[attr-defined]
        summary.add_row(key, str(value))
    console.print(summary)
    histogram = Table(title="boxes per image", title_justify="left")
    histogram.add_column("boxes", justify="right")
    histogram.add_column("images", justify="right")
    for bucket, count in report.box_histogram.items():  # type: ignore[attr-defined]
        histogram.add_row(bucket, str(count))
    console.print(histogram)
    problems = report.problems  # type: ignore[attr-defined]
    if problems:
        err = err_console()
        err.print(f"[bold red]{len(problems)} problem(s):[/]")
        for problem in problems:
            err.print(f"  - {problem}", markup=False, soft_wrap=True)
    else:
        console.print("No problems found.")
