"""`isubg tune run`: a plan's trials as an Optuna study, run by one or many worker processes.

The study is created once, by whichever worker gets there first, with every trial of the plan already
in it as a WAITING "slot" (`isubg.plans.expand`): fixed values for grids and one-at-a-time plans, an
empty slot for the TPE sampler to fill for search and staged plans. Workers take slots with Optuna's
atomic WAITING -> RUNNING transition, so any number of `isubg tune run` processes on one storage share
the work and no slot runs twice; a staged plan's step only opens once every earlier step is finished.

A trial trains the configuration once per seed (`tune.seeds`, seeds train.seed, +1, ...), each a normal
run directory `<output>/<study>/trial-NNNN/seed-S/`; its value is the mean best fused validation
accuracy, with the per-seed scores and their std in the trial's user attributes. The first seed reports
its accuracy after every epoch and the pruner (median, hyperband or none) may stop it: the trial is
recorded PRUNED. Bad configs, divergence (NaN), out-of-memory and crashes are recorded FAIL with the
reason (`isubg.reason`) and the worker goes on.

A worker that dies mid-trial leaves its trial RUNNING. Every worker, before taking a slot, marks such
trials FAILED ("worker died") and puts their configuration back as a new slot: a trial whose worker ran
on this host under a process id that no longer exists at once, any other once its heartbeat (refreshed
every `tune.stale_after / 5` seconds) is older than `tune.stale_after`. Restarting `tune run` on the
study therefore finishes it.

Study user attributes (written by the creating worker; `isubg.ready` last):
    isubg.plan (the plan), isubg.preset, isubg.base (the base config as JSON), isubg.preset_config (the
    preset alone, for diffs), isubg.choices ({path: values} of grid/one-at-a-time parameters),
    isubg.spaces ([[Dimension fields]] per step), isubg.seeds, isubg.slots, isubg.version.
Trial user attributes: isubg.step, isubg.step_name, isubg.retry_of, isubg.worker, isubg.heartbeat,
    isubg.overrides, isubg.inherited, isubg.seeds, isubg.scores, isubg.std, isubg.run_dirs, isubg.reason.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from isubg import __version__
from isubg.config import ConfigWarning, RunConfig, config_diff, get_value
from isubg.errors import ConfigError, DataError, ResourceError
from isubg.plans import Dimension, Plan, Slot, expand
from isubg.presets import is_file_ref
from isubg.resolve import override_config, resolve_config
from isubg.train import train
from isubg.tune_report import default_storage, matches, open_storage

__all__ = ["TuneRequest", "WorkerReport", "build_request", "run_study", "study_name"]

READY_WAIT_S = 120.0  # how long a joining worker waits for the creator to finish filling the study
POLL_S = 2.0  # a worker waiting for an earlier staged step to finish looks again this often


@dataclass
class TuneRequest:
    """Everything a worker needs, resolved by the CLI."""

    plan: Plan
    preset: str
    base: RunConfig  # preset + --config + --set + flags: what every trial starts from
    preset_config: RunConfig  # the preset alone, for "best configuration as a diff"
    pinned: list[str]  # dotted paths the command line fixed; not searched
    data_dir: Path
    output: Path
    storage: str  # an Optuna storage URL, or a journal file path

    @property
    def study(self) -> str:
        return self.base.tune.study or study_name(self.plan.name, self.preset)


@dataclass
class WorkerReport:
    """What one worker process did."""

    study: str
    ran: list[int] = field(default_factory=list)  # trial numbers this worker trained
    interrupted: bool = False


def build_request(
    plan: Plan,
    preset: str,
    *,
    find_data: Callable[[RunConfig], Path],
    output: Path,
    config_file: Path | None = None,
    sets: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> tuple[TuneRequest, list[ConfigWarning]]:
    """Resolve the base configuration (preset, --config, --set, flags) and everything a worker needs.

    Args:
        find_data: the processed data folder for a config (the CLI's `resolve_data_dir`).

    Raises:
        ConfigError: bad settings.
    """
    resolved = resolve_config(preset, config_file=config_file, sets=sets, flags=flags)
    alone = resolve_config(preset)
    # What the command line set is fixed for every trial, so plans do not search it.
    pinned = [p for p, src in resolved.sources.items() if alone.sources.get(p) != src and not p.startswith("tune.")]
    cfg = resolved.config
    request = TuneRequest(
        plan=plan,
        preset=preset,
        base=cfg,
        preset_config=alone.config,
        pinned=pinned,
        data_dir=find_data(cfg),
        output=output,
        storage=default_storage(cfg.tune.storage, output),
    )
    return request, resolved.warnings


def study_name(plan: str, preset: str) -> str:
    """The default study name: `<plan>-<preset>` (a preset file contributes its stem)."""
    return f"{plan}-{Path(preset).stem if is_file_ref(preset) else preset}"


# --------------------------------------------------------------------------------------------------
# Storage and study


def _pruner(cfg: RunConfig) -> optuna.pruners.BasePruner:
    if cfg.tune.pruner == "median":
        # Three finished trials before anything is pruned; a trial is judged from its first epoch on.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if cfg.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


# Settings that may differ between the workers of one study (each machine has its own data copy and device).
_PER_WORKER = ("tune.", "train.output", "train.device", "data.root")


def _differences(theirs: RunConfig, ours: RunConfig) -> list[str]:
    """The base-config differences that matter for joining a study, as "path: theirs there, ours here"."""
    return [
        f"{path}: {a!r} there, {b!r} here" for path, a, b in config_diff(theirs, ours) if not matches(path, _PER_WORKER)
    ]


def _fill(study: optuna.Study, req: TuneRequest, slots: list[Slot]) -> None:
    """The creating worker's job: the study's description, then every slot, then `isubg.ready`."""
    choices: dict[str, list[Any]] = {}
    for slot in slots:
        for path, value in slot.fixed.items():
            choices.setdefault(path, [])
            if value not in choices[path]:
                choices[path].append(value)
    for path, values in choices.items():  # every trial carries every fixed parameter, at its base value if unset
        base = _base_value(req.base, path)
        if any(path not in slot.fixed for slot in slots) and base not in values:
            values.insert(0, base)
    spaces = [[dataclasses.asdict(d) for d in s.search] for s in _first_of_each_step(slots)]
    attrs = {
        "isubg.plan": req.plan.model_dump(mode="json"),
        "isubg.preset": req.preset,
        "isubg.base": req.base.model_dump(mode="json"),
        "isubg.preset_config": req.preset_config.model_dump(mode="json"),
        "isubg.choices": choices,
        "isubg.spaces": spaces,
        "isubg.seeds": req.base.tune.seeds,
        "isubg.slots": len(slots),
        "isubg.version": __version__,
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    for i, slot in enumerate(slots):
        params = {path: slot.fixed.get(path, _base_value(req.base, path)) for path in choices}
        attrs = {"isubg.slot": i, "isubg.step": slot.step, "isubg.step_name": slot.step_name}
        study.enqueue_trial(params, user_attrs=attrs)
    study.set_user_attr("isubg.ready", True)


def _base_value(base: RunConfig, path: str) -> Any:
    value = get_value(base, path)
    return str(value) if isinstance(value, Path) else value


def _first_of_each_step(slots: list[Slot]) -> list[Slot]:
    seen: dict[int, Slot] = {}
    for slot in slots:
        seen.setdefault(slot.step, slot)
    return [seen[k] for k in sorted(seen)]


def open_study(storage: optuna.storages.BaseStorage, req: TuneRequest, say: Callable[[str], None]) -> optuna.Study:
    """Create the study and fill it with the plan's slots, or join it if another worker already did.

    Raises:
        ConfigError: the existing study was made from a different plan or base configuration.
    """

    # The creating worker samples with train.seed, so a one-worker search is reproducible; joining workers
    # mix in their process id, or two of them would propose the same configurations.
    def sampler(seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=seed)

    kwargs = {"storage": storage, "study_name": req.study, "pruner": _pruner(req.base)}
    slots, notes = expand(req.plan, req.base, req.base.tune.trials, req.pinned)
    try:
        study = optuna.create_study(
            direction="maximize", load_if_exists=False, sampler=sampler(req.base.train.seed), **kwargs
        )
    except DuplicatedStudyError:
        study = optuna.load_study(sampler=sampler(req.base.train.seed + os.getpid()), **kwargs)
        _wait_ready(study)
        _check_same(study, req)
        say(f"joined study '{req.study}'")
        return study
    for note in notes:
        say(note)
    _fill(study, req, slots)
    say(f"created study '{req.study}': plan {req.plan.name} ({req.plan.kind}), {len(slots)} trial(s)")
    return study


def _wait_ready(study: optuna.Study) -> None:
    deadline = time.monotonic() + READY_WAIT_S
    while not study.user_attrs.get("isubg.ready"):
        if time.monotonic() > deadline:
            raise ConfigError(
                f"study '{study.study_name}' exists but was never filled (its creating worker died while "
                "writing it); delete it or pick another --study name"
            )
        time.sleep(0.5)


def _check_same(study: optuna.Study, req: TuneRequest) -> None:
    attrs = study.user_attrs
    theirs = RunConfig.model_validate(attrs["isubg.base"])
    problems = []
    if attrs["isubg.plan"] != req.plan.model_dump(mode="json"):
        problems.append(f"plan {attrs['isubg.plan'].get('name')} (you asked for {req.plan.name}, or its file changed)")
    diffs = _differences(theirs, req.base)
    if diffs:
        problems.append("base configuration (" + "; ".join(diffs[:5]) + ")")
    if attrs.get("isubg.seeds") != req.base.tune.seeds:
        problems.append(f"seeds {attrs.get('isubg.seeds')} (you asked for {req.base.tune.seeds})")
    if problems:
        raise ConfigError(
            f"study '{req.study}' already exists with a different " + " and ".join(problems)
            + "; give the same settings to join it, or another --study name to start a new one"
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Dead workers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(trial: FrozenTrial, stale_after: float, now: float) -> str | None:
    """Why a RUNNING trial's worker is gone, or None while it may still be working."""
    worker = trial.user_attrs.get("isubg.worker") or {}
    if worker.get("host") == socket.gethostname() and worker.get("pid") != os.getpid() and not _alive(worker["pid"]):
        return f"worker died (process {worker['pid']} on {worker['host']} no longer exists)"
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    last = max(float(trial.user_attrs.get("isubg.heartbeat", 0.0)), started)
    if now - last > stale_after:
        where = f"process {worker.get('pid')} on {worker.get('host')}" if worker else "an unknown worker"
        return f"worker died ({where} sent no heartbeat for {now - last:.0f} s > tune.stale_after)"
    return None


def reap(study: optuna.Study, storage: optuna.storages.BaseStorage, stale_after: float) -> list[str]:
    """Mark trials of dead workers FAILED with the reason and queue their configuration again."""
    notes: list[str] = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = _stale(trial, stale_after, time.time())
        if why is None:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, "isubg.reason", why)
            # The state change is the lock: of two workers reaping the same trial only one gets past it.
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        _requeue(study, trial)
        notes.append(f"trial {trial.number}: {why}; marked failed, its configuration queued again")
    return notes


def _requeue(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> None:
    """Queue a trial's configuration again as a new slot of the same step."""
    frozen = trial if isinstance(trial, FrozenTrial) else study.get_trials(deepcopy=False)[trial.number]
    keep = {k: v for k, v in frozen.user_attrs.items() if k in ("isubg.slot", "isubg.step", "isubg.step_name")}
    params = frozen.system_attrs.get("fixed_params") or frozen.params
    study.enqueue_trial(params, user_attrs={**keep, "isubg.retry_of": frozen.number})


def _trial_id(study: optuna.Study, storage: optuna.storages.BaseStorage, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


@contextmanager
def _heartbeat(trial_id: int, storage: optuna.storages.BaseStorage, every: float) -> Iterator[None]:
    """Refresh the trial's `isubg.heartbeat` every `every` seconds while the block runs."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            try:
                storage.set_trial_user_attr(trial_id, "isubg.heartbeat", time.time())
            except UpdateFinishedTrialError:  # reaped by another worker: stop beating, the run still ends
                return

    thread = threading.Thread(target=beat, name=f"isubg-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# --------------------------------------------------------------------------------------------------
# Taking a slot


def _open_step(trials: list[FrozenTrial]) -> int:
    """The lowest staged step that still has unfinished (WAITING or RUNNING) trials."""
    unfinished = [t.user_attrs.get("isubg.step", 0) for t in trials if not t.state.is_finished()]
    return min(unfinished, default=0)


def take_slot(study: optuna.Study, storage: optuna.storages.BaseStorage) -> tuple[optuna.Trial | None, bool]:
    """Atomically take the next WAITING slot of the open step: (trial, False), or (None, should_wait).

    should_wait is True when slots of a later step wait for trials other workers are still running.
    """
    study_id = storage.get_study_id_from_name(study.study_name)
    trials = study.get_trials(deepcopy=False)
    step = _open_step(trials)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    for frozen in waiting:
        if frozen.user_attrs.get("isubg.step", 0) > step:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                return optuna.Trial(study, trial_id), False
        except UpdateFinishedTrialError:
            continue
    return None, bool(waiting)


# --------------------------------------------------------------------------------------------------
# One trial


@dataclass
class _Outcome:
    state: TrialState
    reason: str = ""
    value: float | None = None
    stop_worker: bool = False  # the user interrupted: end the worker after recording the trial
    retry: bool = False  # queue the configuration again (it never got a fair run)


def _suggest(trial: optuna.Trial, study: optuna.Study) -> dict[str, Any]:
    """The trial's own parameter values: fixed ones from the slot, the rest from the sampler."""
    attrs = study.user_attrs
    values = {path: trial.suggest_categorical(path, choices) for path, choices in attrs["isubg.choices"].items()}
    step = trial.user_attrs.get("isubg.step", 0)
    spaces = attrs["isubg.spaces"]
    for fields in spaces[step] if step < len(spaces) else []:
        dim = Dimension(**{**fields, "choices": tuple(fields["choices"])})
        values[dim.path] = dim.suggest(trial)
    return values


def _inherited(study: optuna.Study, step: int) -> dict[str, Any]:
    """A staged trial's fixed values: the best finished trial's parameters of every earlier step."""
    fixed: dict[str, Any] = {}
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for earlier in range(step):
        done = [t for t in trials if t.user_attrs.get("isubg.step", 0) == earlier and t.value is not None]
        if done:
            fixed.update(max(done, key=lambda t: t.value).params)
    return fixed


def _train_seeds(
    trial: optuna.Trial, cfg: RunConfig, req: TuneRequest, console: Console, say: Callable[[str], None]
) -> _Outcome:
    """Train every seed of the trial; the first seed's epochs feed the pruner."""
    scores: list[float] = []
    run_dirs: list[str] = []
    seeds = [cfg.train.seed + i for i in range(cfg.tune.seeds)]
    for i, seed in enumerate(seeds):
        run_dir = req.output / req.study / f"trial-{trial.number:04d}" / f"seed-{seed}"
        run_dirs.append(str(run_dir.resolve()))
        trial.set_user_attr("isubg.run_dirs", run_dirs)
        seeded = override_config(cfg, {"train.seed": seed}, f"trial {trial.number}")

        def on_epoch(epoch: int, score: float, i: int = i, seed: int = seed) -> bool:
            say(f"trial {trial.number} seed {seed}: epoch {epoch}/{cfg.train.epochs} val {100 * score:.1f}%")
            if i:
                return False
            trial.report(score, epoch)
            return trial.should_prune()

        result = train(seeded, run_dir, data_dir=req.data_dir, console=console, on_epoch=on_epoch, preset=req.preset)
        if result.status == "pruned":
            return _Outcome(TrialState.PRUNED, f"pruned by the {cfg.tune.pruner} pruner: {result.message}")
        if result.status == "diverged":
            return _Outcome(TrialState.FAIL, f"diverged (seed {seed}): {result.message}")
        if result.status == "interrupted":
            why = f"interrupted (seed {seed}): {result.message}"
            return _Outcome(TrialState.FAIL, why, stop_worker=True, retry=True)
        scores.append(float("nan") if result.best_score is None else result.best_score)
        trial.set_user_attr("isubg.scores", scores)
    mean = statistics.fmean(scores)
    trial.set_user_attr("isubg.std", statistics.stdev(scores) if len(scores) > 1 else 0.0)
    return _Outcome(TrialState.COMPLETE, value=mean)


def _run_trial(
    study: optuna.Study, trial: optuna.Trial, req: TuneRequest, console: Console, say: Callable[[str], None]
) -> _Outcome:
    """Build the trial's config and train it; every failure becomes an outcome with its reason."""
    try:
        values = _suggest(trial, study)
        inherited = _inherited(study, trial.user_attrs.get("isubg.step", 0))
        overrides = {**inherited, **values}
        trial.set_user_attr("isubg.overrides", overrides)
        trial.set_user_attr("isubg.inherited", inherited)
        cfg = override_config(req.base, overrides, f"trial {trial.number}")
        trial.set_user_attr("isubg.seeds", [cfg.train.seed + i for i in range(cfg.tune.seeds)])
        return _train_seeds(trial, cfg, req, console, say)
    except ConfigError as exc:
        return _Outcome(TrialState.FAIL, f"bad config: {exc}")
    except DataError:
        raise  # the data is wrong for every trial: stop the worker (the caller records the trial first)
    except ResourceError as exc:
        return _Outcome(TrialState.FAIL, f"out of resources: {exc}")
    except KeyboardInterrupt:
        return _Outcome(TrialState.FAIL, "interrupted (Ctrl-C)", stop_worker=True, retry=True)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc):
            return _Outcome(TrialState.FAIL, f"out of memory: {str(exc).splitlines()[0]}")
        return _Outcome(TrialState.FAIL, f"crashed: {type(exc).__name__}: {exc}")


def _record(study: optuna.Study, trial: optuna.Trial, outcome: _Outcome) -> None:
    """Tell the study how the trial ended (unless another worker already reaped it as dead)."""
    try:
        if outcome.reason:
            trial.set_user_attr("isubg.reason", outcome.reason)
        if outcome.state == TrialState.COMPLETE:
            study.tell(trial, outcome.value)
        else:
            study.tell(trial, state=outcome.state)
    except UpdateFinishedTrialError:
        return
    if outcome.retry:
        _requeue(study, trial)


# --------------------------------------------------------------------------------------------------
# The worker


def run_study(
    req: TuneRequest,
    *,
    say: Callable[[str], None] = print,
    train_console: Console | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> WorkerReport:
    """Work on the study until no slot is left for this worker (see the module docstring).

    Args:
        say: where progress lines go.
        train_console: where each training run prints (default: nowhere; the run directories keep the logs).
        pruner: replaces the configured pruner (tests).

    Raises:
        ConfigError: bad plan/storage, or a study of the same name made from other settings.
        DataError: the data cannot be read (recorded on the trial first).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = open_storage(req.storage)
    study = open_study(storage, req, say)
    if pruner is not None:
        study.pruner = pruner
    console = train_console or Console(quiet=True)
    report = WorkerReport(study=req.study)
    stale_after = float(req.base.tune.stale_after)
    while True:
        for note in reap(study, storage, stale_after):
            say(note)
        trial, wait = take_slot(study, storage)
        if trial is None:
            if not wait:
                return report
            time.sleep(POLL_S)  # a later staged step waits for another worker's trials
            continue
        trial.set_user_attr("isubg.worker", {"host": socket.gethostname(), "pid": os.getpid()})
        say(f"trial {trial.number} started ({_describe_slot(trial)})")
        with _heartbeat(_trial_id(study, storage, trial.number), storage, every=max(1.0, stale_after / 5)):
            try:
                outcome = _run_trial(study, trial, req, console, say)
            except DataError as exc:
                _record(study, trial, _Outcome(TrialState.FAIL, f"data error: {exc}", retry=True))
                raise
        _record(study, trial, outcome)
        report.ran.append(trial.number)
        say(_describe_end(trial.number, outcome, trial.user_attrs))
        if outcome.stop_worker:
            report.interrupted = True
            return report


def _describe_slot(trial: optuna.Trial) -> str:
    attrs = trial.user_attrs
    bits = [f"step {attrs['isubg.step_name']}"] if attrs.get("isubg.step_name") else []
    if "isubg.retry_of" in attrs:
        bits.append(f"retry of trial {attrs['isubg.retry_of']}")
    return ", ".join(bits) or "queued"


def _describe_end(number: int, outcome: _Outcome, attrs: dict[str, Any]) -> str:
    if outcome.state == TrialState.COMPLETE:
        scores = attrs.get("isubg.scores", [])
        spread = f" ± {100 * attrs.get('isubg.std', 0.0):.1f}" if len(scores) > 1 else ""
        return f"trial {number} complete: {100 * (outcome.value or 0.0):.1f}%{spread} over {len(scores)} seed(s)"
    return f"trial {number} {outcome.state.name.lower()}: {outcome.reason}"
