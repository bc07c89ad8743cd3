"""`isubg tune`: plans, studies on Optuna storages, seeds, pruning, failures, workers and the report.

Trials train the tiny demo data with FAST settings (48 training questions, tiny branches, one epoch), so a
trial takes seconds; the multi-process tests start real `isubg tune run` processes on one journal file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from test_imports import assert_torch_not_imported
from test_train import FAST
from typer.testing import CliRunner

from isubg.cli import app
from isubg.config import ConfigError, get_value
from isubg.plans import dimension, expand, list_plans, load_plan, parse_param
from isubg.resolve import resolve_config
from isubg.tune import build_request, run_study
from isubg.tune_report import JOURNAL, export_preset, load_study, open_storage, study_report

runner = CliRunner()


def write_plan(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def request(plan: Any, tiny_demo: Path, output: Path, *sets: str) -> Any:
    sets_ = [*FAST, "train.epochs=1", f"data.root={tiny_demo / 'processed' / 'gqa'}", *sets]
    req, _ = build_request(plan, "demo", find_data=lambda cfg: cfg.data.root, output=output, sets=sets_)
    return req


def trials_of(output: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    return load_study(study, open_storage(output / JOURNAL)).get_trials(deepcopy=False)


def cli_args(tiny_demo: Path, output: Path, *extra: str) -> list[str]:
    sets = [arg for item in (*FAST, "train.epochs=1") for arg in ("--set", item)]
    return ["tune", "run", *extra, "--data", str(tiny_demo / "processed" / "gqa"), *sets, "--output", str(output)]


# --------------------------------------------------------------------------------------------------
# Plans


def test_shipped_plans_are_the_guides_experiments() -> None:
    assert set(list_plans()) == {"lr", "complexity", "isubg", "staged", "one-at-a-time", "search"}
    base = resolve_config("default").config
    lr, _ = expand(load_plan("lr"), base, None)
    assert [s.fixed for s in lr] == [
        {"train.lr": 2.8e-4, "train.xvlm_lr": 5e-5},
        {"train.lr": 3.5e-4, "train.xvlm_lr": 7e-5},
        {"train.lr": 2e-4, "train.xvlm_lr": 3e-5},
    ]
    complexity, _ = expand(load_plan("complexity"), base, None)
    assert [s.fixed["model.cfrf.num_hid"] for s in complexity] == [512, 1024, 2048]
    isubg, _ = expand(load_plan("isubg"), base, None)
    assert isubg[1].fixed == {"model.isubg.mgat_layers": 6, "model.isubg.alpha": 1.5, "model.isubg.beta": 15.0}
    staged, _ = expand(load_plan("staged"), base, 2)
    assert [s.step for s in staged] == [0, 0, 1, 1, 2, 2]
    assert [d.path for d in staged[0].search] == ["train.lr", "train.xvlm_lr", "train.batch_size", "train.epochs"]
    assert [d.path for d in staged[-1].search] == [
        "model.isubg.general_hidden_dim", "model.isubg.mgat_layers", "model.isubg.alpha", "model.isubg.beta",
    ]  # fmt: skip


def test_one_at_a_time_varies_each_parameter_alone_across_its_advice_range() -> None:
    base = resolve_config("default").config
    slots, _ = expand(load_plan("one-at-a-time", ["lr", "dropout", "use_counter"]), base, None)
    assert slots[0].fixed == {}  # the base configuration itself
    varied = [s.fixed for s in slots[1:]]
    assert all(len(f) == 1 for f in varied)
    assert [f["train.lr"] for f in varied if "train.lr" in f] == [1e-4, 2.24e-4, 5e-4]  # geometric: 1e-4 .. 5e-4
    assert [f["model.cfrf.dropout"] for f in varied if "model.cfrf.dropout" in f] == [0.3, 0.6]  # 0.45 is the base
    assert [f["model.cfrf.use_counter"] for f in varied if "model.cfrf.use_counter" in f] == [True]


def test_param_syntax_and_dimensions() -> None:
    assert parse_param("lr") == ("lr", None)
    assert parse_param("lr=1e-4:1e-3:log") == ("lr", {"low": 1e-4, "high": 1e-3, "log": True})
    assert parse_param("activation=relu,swish") == ("activation", ["relu", "swish"])
    lr = dimension("lr")
    assert (lr.path, lr.kind, lr.low, lr.high, lr.log) == ("train.lr", "float", 1e-4, 5e-4, True)
    layers = dimension("AOA_layers")
    assert (layers.kind, layers.low, layers.high, layers.log) == ("int", 4, 8, False)
    assert dimension("sampler_type").choices == ("imle", "gumbel")
    assert dimension("mixed_precision").choices == (False, True)
    with pytest.raises(ConfigError, match=r"Did you mean 'model\.cfrf\.AOA_layers'"):
        dimension("aoa_layers")
    with pytest.raises(ConfigError, match="no advised range"):
        dimension("seed")
    with pytest.raises(ConfigError, match="low < high"):
        dimension("lr", {"low": 1e-3, "high": 1e-4})
    with pytest.raises(ConfigError, match="LOW:HIGH"):
        parse_param("lr=1:2:3:4")


def test_plan_files_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs 'points'"):
        load_plan(write_plan(tmp_path, "a", "kind: grid\n"))
    with pytest.raises(ConfigError, match="kind"):
        load_plan(write_plan(tmp_path, "b", "kind: random\npoints: [{lr: 1.0e-4}]\n"))
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_plan(write_plan(tmp_path, "c", "kind: grid\npoints: [{nope: 1}]\n"))
    with pytest.raises(ConfigError, match="unknown plan 'lrr'"):
        load_plan("lrr")
    with pytest.raises(ConfigError, match="not to grid plan"):
        load_plan("lr", ["dropout"])


def test_command_line_values_are_not_searched_and_may_not_clash_with_a_grid() -> None:
    base = resolve_config("default").config
    slots, notes = expand(load_plan("staged"), base, 1, pinned=["train.epochs"])
    assert "train.epochs" not in [d.path for d in slots[0].search]
    assert notes == ["train.epochs is fixed on the command line; not searched"]
    with pytest.raises(ConfigError, match="all its parameters are fixed"):
        expand(
            load_plan("staged"), base, 1, pinned=["model.cfrf.AOA_layers", "model.cfrf.num_hid", "model.cfrf.dropout"]
        )
    with pytest.raises(ConfigError, match=r"sets train\.lr itself"):
        expand(load_plan("lr"), base, None, pinned=["train.lr"])


# --------------------------------------------------------------------------------------------------
# Studies, in process


@pytest.fixture(scope="module")
def grid_study(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `lr` grid, 2 seeds each, through the CLI: 3 configurations x 2 seeds."""
    output = tmp_path_factory.mktemp("tune-grid")
    result = runner.invoke(app, cli_args(tiny_demo, output, "lr", "--seeds", "2"))
    assert result.exit_code == 0, result.output
    return output


def test_grid_with_two_seeds_reports_three_rows_with_mean_and_std(grid_study: Path) -> None:
    result = runner.invoke(app, ["tune", "report", "lr-demo", "--output", str(grid_study), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["counts"] == {"complete": 3}
    rows = report["trials"]
    assert len(rows) == 3
    assert sorted(r["params"]["train.lr"] for r in rows) == [2e-4, 2.8e-4, 3.5e-4]
    for row in rows:
        assert row["seeds"] == [1204, 1205]
        assert len(row["scores"]) == 2
        assert row["mean"] == pytest.approx(sum(row["scores"]) / 2)
        spread = abs(row["scores"][0] - row["scores"][1]) / 2**0.5  # the sample std of two values
        assert row["std"] == pytest.approx(spread)
        for run_dir in map(Path, row["run_dirs"]):  # every seed is a normal run directory
            assert {"config.yaml", "metrics.jsonl", "summary.json", "train.log"} <= {p.name for p in run_dir.iterdir()}
            assert (run_dir / "checkpoints" / "best.pt").is_file()
    means = [r["mean"] for r in rows]
    assert means == sorted(means, reverse=True)
    assert report["best"]["number"] == rows[0]["number"]
    diff = {d["path"]: d["best"] for d in report["best_diff"]}
    assert diff["train.lr"] == rows[0]["params"]["train.lr"] and diff["train.epochs"] == 1


def test_seeded_trials_reproduce(grid_study: Path) -> None:
    trials = trials_of(grid_study, "lr-demo")
    first = Path(trials[0].user_attrs["isubg.run_dirs"][0])
    config = (first / "config.yaml").read_text()
    assert "seed: 1204" in config and "lr: 0.00028" in config
    assert trials[0].user_attrs["isubg.worker"]["pid"] == os.getpid()


def test_report_text_plots_and_exported_preset_trains(grid_study: Path, tmp_path: Path) -> None:
    exported = tmp_path / "best.yaml"
    args = ["tune", "report", "lr-demo", "--output", str(grid_study), "--plot", str(tmp_path / "plots")]
    result = runner.invoke(app, [*args, "--export-preset", str(exported)])
    assert result.exit_code == 0, result.output
    assert "best: trial" in result.output and "train.lr" in result.output
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"history.png", "param-train_lr.png", "param-train_xvlm_lr.png"} <= names
    text = exported.read_text()
    assert "extends: demo" in text
    trained = runner.invoke(app, ["train", "--config", str(exported), "--output", str(tmp_path / "run"), "--json"])
    assert trained.exit_code == 0, trained.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished"
    best = study_report(load_study("lr-demo", open_storage(grid_study / JOURNAL))).best
    cfg = resolve_config("demo", config_file=exported).config
    assert cfg.train.lr == best.params["train.lr"] and cfg.train.epochs == 1


def test_export_to_an_unwritable_place_is_a_one_line_error(grid_study: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["tune", "report", "lr-demo", "--output", str(grid_study), "--export-preset", str(blocker / "best.yaml")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--export-preset" in result.output and "cannot write it" in result.output


def test_failures_are_recorded_with_the_reason_and_the_study_goes_on(tiny_demo: Path, tmp_path: Path) -> None:
    plan = load_plan(
        write_plan(tmp_path, "mixed", "kind: grid\npoints: [{dropout: 1.5}, {lr: 1.0e+6}, {dropout: 0.3}]\n")
    )
    report = run_study(request(plan, tiny_demo, tmp_path / "out"), say=lambda _: None)
    assert report.ran == [0, 1, 2]
    trials = trials_of(tmp_path / "out", "mixed-demo")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["isubg.reason"].startswith("bad config:")
    assert "model.cfrf.dropout = 1.5" in trials[0].user_attrs["isubg.reason"]
    assert trials[1].user_attrs["isubg.reason"].startswith("diverged")


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_pruned_trials_stop_early_and_are_recorded_pruned(tiny_demo: Path, tmp_path: Path) -> None:
    plan = load_plan("lr")
    req = request(plan, tiny_demo, tmp_path, "train.epochs=3", "tune.trials=1", "tune.seeds=2")
    run_study(req, say=lambda _: None, pruner=_AlwaysPrune())
    (trial,) = trials_of(tmp_path, "lr-demo")
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]
    assert len(trial.user_attrs["isubg.run_dirs"]) == 1  # the second seed never started
    summary = json.loads((Path(trial.user_attrs["isubg.run_dirs"][0]) / "summary.json").read_text())
    assert summary["status"] == "pruned" and summary["steps"] > 0


def test_staged_steps_run_in_order_with_earlier_best_values_fixed(tiny_demo: Path, tmp_path: Path) -> None:
    text = (
        "kind: staged\ntrials: 2\nsteps:\n"
        "  - {name: rate, params: {lr: {low: 1.0e-4, high: 3.0e-3}}}\n"
        "  - {name: regularise, params: {dropout: [0.1, 0.3]}}\n"
    )
    plan = load_plan(write_plan(tmp_path, "two", text))
    run_study(request(plan, tiny_demo, tmp_path / "out"), say=lambda _: None)
    trials = trials_of(tmp_path / "out", "two-demo")
    assert [t.user_attrs["isubg.step_name"] for t in trials] == ["rate", "rate", "regularise", "regularise"]
    notes = study_report(load_study("two-demo", open_storage(tmp_path / "out" / JOURNAL))).notes
    assert [n.split(":")[0] for n in notes] == ["importances (step rate)", "importances (step regularise)"]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    best_rate = max(trials[:2], key=lambda t: t.value).params["train.lr"]
    for t in trials[2:]:
        assert t.user_attrs["isubg.inherited"] == {"train.lr": best_rate}
        assert set(t.params) == {"model.cfrf.dropout"}
        config = resolve_config(Path(t.user_attrs["isubg.run_dirs"][0]) / "config.yaml").config
        assert config.train.lr == best_rate


def test_search_samples_within_the_given_bounds_on_a_sqlite_storage(tiny_demo: Path, tmp_path: Path) -> None:
    plan = load_plan("search", ["lr=1e-4:1e-3", "activation=relu,swish"])
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    run_study(request(plan, tiny_demo, tmp_path, "tune.trials=3", f"tune.storage={url}"), say=lambda _: None)
    study = load_study("search-demo", open_storage(url))
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(
        1e-4 <= t.params["train.lr"] <= 1e-3 and t.params["model.cfrf.activation"] in ("relu", "swish") for t in trials
    )


def test_joining_a_study_with_other_settings_is_refused(grid_study: Path, tiny_demo: Path) -> None:
    result = runner.invoke(app, cli_args(tiny_demo, grid_study, "lr", "--seeds", "2", "--dropout", "0.3"))
    assert result.exit_code == 2
    assert "already exists with a different base configuration" in result.output
    assert "model.cfrf.dropout" in result.output


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tune", "run", "search"])
    assert result.exit_code == 2 and "give them with --param" in result.output
    result = runner.invoke(app, ["tune", "report", "nope", "--output", str(tmp_path)])
    assert result.exit_code == 2 and "no study storage" in result.output


def test_report_does_not_import_torch(grid_study: Path) -> None:
    assert_torch_not_imported(["tune", "report", "lr-demo", "--output", str(grid_study), "--json"])


def test_report_names_the_studies_in_a_storage(grid_study: Path) -> None:
    result = runner.invoke(app, ["tune", "report", "lr-dem", "--output", str(grid_study)])
    assert result.exit_code == 2 and "studies there: lr-demo" in result.output
    listed = runner.invoke(app, ["tune", "report", "--output", str(grid_study), "--json"])
    assert listed.exit_code == 0, listed.output
    (only,) = json.loads(listed.output)
    assert only["study"] == "lr-demo" and only["plan"] == "lr" and only["counts"] == {"complete": 3}
    assert only["best"] == max(t.value for t in trials_of(grid_study, "lr-demo"))
    result = runner.invoke(app, ["tune", "report", "--output", str(grid_study), "--plot", str(grid_study / "p")])
    assert result.exit_code == 2 and "need a STUDY name" in result.output


def test_export_needs_a_completed_trial(tiny_demo: Path, tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path, "bad", "kind: grid\npoints: [{dropout: 1.5}]\n"))
    run_study(request(plan, tiny_demo, tmp_path), say=lambda _: None)
    report = study_report(load_study("bad-demo", open_storage(tmp_path / JOURNAL)))
    with pytest.raises(ConfigError, match="no completed trial"):
        export_preset(report, tmp_path / "x.yaml")
    assert get_value(resolve_config("demo").config, "tune.pruner") == "median"


# --------------------------------------------------------------------------------------------------
# Worker processes


def _worker(tiny_demo: Path, output: Path, plan: Path, *extra: str) -> subprocess.Popen[str]:
    args = cli_args(tiny_demo, output, "--plan-file", str(plan), *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "isubg", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip


def _wait_for_first_step(worker: subprocess.Popen[str], study_dir: Path) -> None:
    """Return once trial 0's first seed has logged an optimizer step (the worker is mid-trial)."""
    metrics = study_dir / "trial-0000" / "seed-1204" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and '"event": "step"' in metrics.read_text()):
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()[0]
        time.sleep(0.2)


@pytest.mark.slow
def test_two_workers_share_a_study_without_running_a_configuration_twice(tiny_demo: Path, tmp_path: Path) -> None:
    points = "".join(f"  - {{dropout: {d}}}\n" for d in (0.1, 0.2, 0.3, 0.4))
    plan = write_plan(tmp_path, "four", f"kind: grid\npoints:\n{points}")
    workers = [_worker(tiny_demo, tmp_path, plan) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = trials_of(tmp_path, "four-demo")
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.params["model.cfrf.dropout"] for t in trials) == [0.1, 0.2, 0.3, 0.4]
    for t in trials:  # each configuration trained exactly once: one run directory, one start record
        (run_dir,) = t.user_attrs["isubg.run_dirs"]
        starts = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        assert sum(r["event"] == "start" for r in starts) == 1
    assert {t.user_attrs["isubg.worker"]["pid"] for t in trials} <= {w.pid for w in workers}


@pytest.mark.slow
def test_a_killed_worker_leaves_its_trial_failed_and_a_restart_completes_the_study(
    tiny_demo: Path, tmp_path: Path
) -> None:
    plan = write_plan(tmp_path, "pair", "kind: grid\npoints: [{dropout: 0.1}, {dropout: 0.2}]\n")
    worker = _worker(tiny_demo, tmp_path, plan, "--epochs", "3")
    _wait_for_first_step(worker, tmp_path / "pair-demo")
    os.killpg(worker.pid, signal.SIGKILL)  # mid-trial, no chance to clean up
    worker.wait(timeout=60)
    assert trials_of(tmp_path, "pair-demo")[0].state == TrialState.RUNNING

    lines: list[str] = []
    plan_obj = load_plan(plan)
    run_study(request(plan_obj, tiny_demo, tmp_path, "train.epochs=3"), say=lines.append)
    trials = trials_of(tmp_path, "pair-demo")
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["isubg.reason"].startswith(f"worker died (process {worker.pid}")
    assert any("marked failed, its configuration queued again" in line for line in lines)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["model.cfrf.dropout"] for t in done) == [0.1, 0.2]
    retry = next(t for t in done if t.user_attrs.get("isubg.retry_of") == 0)
    assert retry.params == trials[0].params


@pytest.mark.slow
def test_ctrl_c_fails_and_requeues_the_current_trial_and_the_study_resumes(tiny_demo: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path, "one", "kind: grid\npoints: [{dropout: 0.1}]\n")
    worker = _worker(tiny_demo, tmp_path, plan, "--epochs", "3")
    _wait_for_first_step(worker, tmp_path / "one-demo")
    worker.send_signal(signal.SIGINT)
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 130, output
    first, queued = trials_of(tmp_path, "one-demo")
    assert first.state == TrialState.FAIL and first.user_attrs["isubg.reason"].startswith("interrupted")
    assert queued.state == TrialState.WAITING and queued.user_attrs["isubg.retry_of"] == 0
    run_study(request(load_plan(plan), tiny_demo, tmp_path, "train.epochs=3"), say=lambda _: None)
    assert trials_of(tmp_path, "one-demo")[1].state == TrialState.COMPLETE
