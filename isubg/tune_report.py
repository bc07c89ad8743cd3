"""`isubg tune report`: a study's trials ranked, its best configuration, importances, plots and export.

Reads only the Optuna storage (`isubg.tune` writes it; the attributes are listed there) and never imports
torch. A row is a trial, i.e. one configuration: its mean over seeds, their std, how many seeds finished.
Completed trials come first, best mean first; then pruned (by their last reported accuracy), running,
waiting and failed ones with the reason.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from isubg.config import ConfigError, RunConfig, config_diff, format_value
from isubg.data.files import write_text_atomic
from isubg.presets import is_file_ref
from isubg.resolve import nest_paths, override_config
from isubg.yamlio import dump_yaml

__all__ = [
    "JOURNAL",
    "StudyReport",
    "TrialRow",
    "default_storage",
    "export_preset",
    "list_studies",
    "load_study",
    "matches",
    "open_storage",
    "plot_study",
    "study_report",
]

JOURNAL = "studies.journal"  # the default storage: a journal file in the tune output folder
_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 3}
_NOT_EXPORTED = ("train.output", "tune.")  # where a run goes and how it was tuned are not part of a preset


@dataclass
class TrialRow:
    """One trial (configuration) of the study."""

    number: int
    state: str  # complete | pruned | running | waiting | fail
    step: str
    params: dict[str, Any]  # dotted path -> value (the trial's own searched/fixed parameters)
    mean: float | None  # mean best fused validation accuracy over the seeds (pruned: last reported)
    std: float | None
    scores: list[float]
    seeds: list[int]
    run_dirs: list[str]
    reason: str = ""
    retry_of: int | None = None


@dataclass
class StudyReport:
    """Everything `isubg tune report` shows."""

    study: str
    plan: str
    kind: str
    preset: str
    rows: list[TrialRow]
    counts: dict[str, int]
    best: TrialRow | None
    best_diff: list[tuple[str, Any, Any]]  # (path, preset value, best value)
    importances: dict[str, dict[str, float]]  # step name ("" if one step) -> {path: importance}
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def row(r: TrialRow) -> dict[str, Any]:
            return {
                **r.__dict__,
                "mean": _finite(r.mean),
                "std": _finite(r.std),
                "scores": [_finite(s) for s in r.scores],
            }

        return {
            "study": self.study,
            "plan": self.plan,
            "kind": self.kind,
            "preset": self.preset,
            "counts": self.counts,
            "best": row(self.best) if self.best else None,
            "best_diff": [{"path": p, "preset": a, "best": b} for p, a, b in self.best_diff],
            "importances": self.importances,
            "trials": [row(r) for r in self.rows],
            "notes": self.notes,
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def open_storage(ref: str | Path) -> optuna.storages.BaseStorage:
    """An Optuna storage: a database URL (`sqlite:///tune.db`, `postgresql://...`) or a journal file path.

    A journal file (Optuna's JournalStorage, file-locked appends) serves several processes on one machine;
    a database URL serves workers on many machines.

    Raises:
        ConfigError: the URL cannot be opened or the journal's folder cannot be created.
    """
    text = str(ref)
    try:
        if "://" in text:
            return optuna.storages.RDBStorage(text)
        path = Path(text).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        # The open(O_EXCL) lock works on every filesystem, network ones included.
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        return optuna.storages.JournalStorage(backend)
    except (OSError, ImportError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--storage {text}: cannot open it as an Optuna storage: {exc}") from None
    except Exception as exc:  # SQLAlchemy's errors (bad driver, unreachable server) share no useful base here
        raise ConfigError(f"--storage {text}: cannot open it as an Optuna storage: {exc}") from None


def default_storage(storage: str | None, output: Path) -> str:
    """The storage to use: the one given, else the journal file in the output folder."""
    return storage or str(output / JOURNAL)


def load_study(name: str, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """The study `name` in `storage`, checked to be an isubg study.

    Raises:
        ConfigError: no such study (the message lists the ones there), or not made by `isubg tune run`.
    """
    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    if name not in names:
        listed = ", ".join(sorted(names)) or "none"
        raise ConfigError(f"no study '{name}' in this storage; studies there: {listed}")
    study = optuna.load_study(study_name=name, storage=storage)
    if "isubg.plan" not in study.user_attrs:
        raise ConfigError(f"study '{name}' was not made by `isubg tune run` (it has no isubg.plan attribute)")
    return study


def list_studies(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """One summary per isubg study in `storage`: name, plan, preset, trial counts by state, best mean accuracy."""
    out = []
    for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        attrs = study.user_attrs
        if "isubg.plan" not in attrs:
            continue
        trials = study.get_trials(deepcopy=False)
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        out.append({
            "study": summary.study_name,
            "plan": attrs["isubg.plan"].get("name", ""),
            "preset": attrs.get("isubg.preset", ""),
            "counts": counts,
            "best": max(values) if values else None,
        })  # fmt: skip
    return sorted(out, key=lambda s: s["study"])


def _row(trial: FrozenTrial) -> TrialRow:
    attrs = trial.user_attrs
    scores = [float(s) for s in attrs.get("isubg.scores", [])]
    mean: float | None = trial.value
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        mean = trial.intermediate_values[max(trial.intermediate_values)]
    std = attrs.get("isubg.std") if trial.state == TrialState.COMPLETE and len(scores) > 1 else None
    return TrialRow(
        number=trial.number,
        state=trial.state.name.lower(),
        step=attrs.get("isubg.step_name", ""),
        params=dict(trial.params),
        mean=mean,
        std=std,
        scores=scores,
        seeds=list(attrs.get("isubg.seeds", [])),
        run_dirs=list(attrs.get("isubg.run_dirs", [])),
        reason=attrs.get("isubg.reason", ""),
        retry_of=attrs.get("isubg.retry_of"),
    )


def _sort_key(row: TrialRow) -> tuple[int, float, int]:
    rank = _ORDER.get(TrialState[row.state.upper()], 4)
    score = row.mean if row.mean is not None and not math.isnan(row.mean) else -math.inf
    return rank, -score, row.number


def best_config(study: optuna.Study, trial: FrozenTrial) -> RunConfig:
    """The full configuration a trial trained: the study's base config with the trial's values."""
    base = RunConfig.model_validate(study.user_attrs["isubg.base"])
    overrides = trial.user_attrs.get("isubg.overrides", trial.params)
    return override_config(base, overrides, f"trial {trial.number}")


def matches(path: str, patterns: tuple[str, ...]) -> bool:
    """Whether a dotted path is one of `patterns` or lies under one ending in "." (a section: "tune.")."""
    return any(path == p or (p.endswith(".") and path.startswith(p)) for p in patterns)


def study_report(study: optuna.Study) -> StudyReport:
    """Rank the study's trials and describe its best one (see the module docstring)."""
    attrs = study.user_attrs
    trials = study.get_trials(deepcopy=False)
    rows = sorted((_row(t) for t in trials), key=_sort_key)
    counts = {state.name.lower(): 0 for state in TrialState}
    for t in trials:
        counts[t.state.name.lower()] += 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best_trial = max(complete, key=lambda t: t.value) if complete else None  # type: ignore[arg-type, return-value]
    best_diff: list[tuple[str, Any, Any]] = []
    if best_trial is not None:
        preset_cfg = RunConfig.model_validate(attrs["isubg.preset_config"])
        best_diff = [
            (path, *(str(v) if isinstance(v, Path) else v for v in pair))
            for path, *pair in config_diff(preset_cfg, best_config(study, best_trial))
            if not matches(path, _NOT_EXPORTED)
        ]
    plan = attrs["isubg.plan"]
    importances, notes = _importances(complete, staged=plan.get("kind") == "staged")
    return StudyReport(
        study=study.study_name,
        plan=plan.get("name", ""),
        kind=plan.get("kind", ""),
        preset=attrs.get("isubg.preset", ""),
        rows=rows,
        counts={k: v for k, v in counts.items() if v},
        best=next((r for r in rows if best_trial is not None and r.number == best_trial.number), None),
        best_diff=best_diff,
        importances=importances,
        notes=notes,
    )


def _importances(complete: list[FrozenTrial], staged: bool) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Optuna's parameter importances (PED-ANOVA), per step of a staged plan (each step searches its own
    parameters), else over the whole study; notes where there is too little to say."""
    by_step: dict[str, list[FrozenTrial]] = {}
    for t in complete:
        by_step.setdefault(t.user_attrs.get("isubg.step_name", "") if staged else "", []).append(t)
    out: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for step, trials in by_step.items():
        varied = {p for p in trials[0].params if len({repr(t.params.get(p)) for t in trials}) > 1}
        label = f"step {step}" if step else "study"
        if len(trials) < 3 or not varied:
            notes.append(f"importances ({label}): need at least 3 completed trials with varied parameters")
            continue
        mini = optuna.create_study(direction="maximize")
        mini.add_trials(trials)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                values = optuna.importance.get_param_importances(mini, params=sorted(varied))
            except (ValueError, RuntimeError) as exc:
                notes.append(f"importances ({label}): {exc}")
                continue
        out[step] = {k: float(v) for k, v in values.items()}
    return out, notes


# --------------------------------------------------------------------------------------------------
# Export and plots


def export_preset(report: StudyReport, path: Path) -> Path:
    """Write a study's best configuration as a preset YAML (`extends` the study's preset, then the diff).

    `isubg train --config FILE` (or `--preset FILE`) trains it.

    Raises:
        ConfigError: the study has no completed trial, or `path` cannot be written.
    """
    if report.best is None:
        raise ConfigError(f"study '{report.study}' has no completed trial yet; nothing to export")
    nested = nest_paths({dotted: value for dotted, _, value in report.best_diff})  # Paths are already text
    preset = report.preset
    extends = str(Path(preset).resolve()) if is_file_ref(preset) else preset
    best = report.best
    spread = f" ± {100 * best.std:.1f}" if best.std and len(best.scores) > 1 else ""
    header = (
        f"best configuration of isubg tune study '{report.study}' (plan {report.plan}): trial {best.number}, "
        f"validation accuracy {100 * (best.mean or 0):.1f}%{spread} over {len(best.scores)} seed(s).\n"
        f"Train it: isubg train --config {path.name}"
    )
    try:
        write_text_atomic(path, dump_yaml({"extends": extends, **nested}, header=header))
    except OSError as exc:
        raise ConfigError(f"--export-preset {path}: cannot write it ({exc.strerror or exc})") from None
    return path


def plot_study(study: optuna.Study, folder: Path) -> list[Path]:
    """PNG plots: optimisation history (value per trial, best so far) and the metric against each parameter."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from isubg.report import save_png

    folder.mkdir(parents=True, exist_ok=True)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.value is not None]
    if not done:
        raise ConfigError(f"study '{study.study_name}' has no completed trial yet; nothing to plot")
    written = [save_png(_history_figure(Figure(figsize=(6, 4)), done), folder / "history.png")]
    for param in sorted({p for t in done for p in t.params}):
        fig = _param_figure(Figure(figsize=(5, 4)), done, param)
        written.append(save_png(fig, folder / f"param-{param.replace('.', '_')}.png"))
    return written


def _history_figure(fig: Any, done: list[FrozenTrial]) -> Any:
    ax = fig.add_subplot()
    numbers = [t.number for t in done]
    values = [100 * t.value for t in done]  # type: ignore[operator]
    best = [max(values[: i + 1]) for i in range(len(values))]
    ax.scatter(numbers, values, label="trial (mean over seeds)")
    ax.step(numbers, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("optimisation history")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def _param_figure(fig: Any, done: list[FrozenTrial], param: str) -> Any:
    ax = fig.add_subplot()
    having = [t for t in done if param in t.params]
    xs = [t.params[param] for t in having]
    ys = [100 * t.value for t in having]  # type: ignore[operator]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    if numeric:
        ax.scatter(xs, ys)
        positive = all(x > 0 for x in xs)
        if positive and max(xs) / min(xs) >= 4:
            ax.set_xscale("log")
    else:
        labels = sorted({format_value(x) for x in xs})
        ax.scatter([labels.index(format_value(x)) for x in xs], ys)
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(param)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"accuracy vs {param.rsplit('.', 1)[-1]}")
    fig.tight_layout()
    return fig
