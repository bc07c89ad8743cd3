"""`isubg report`: reading metrics.jsonl (resume, truncation, missing keys), the summary, PNGs and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from test_imports import assert_torch_not_imported
from typer.testing import CliRunner

from isubg.cli import app
from isubg.errors import DataError
from isubg.report import PLOT_NAMES, epoch_table, plot, read_metrics, summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BRANCHES = ("cfrf", "isubg", "xvlm")


def _start(branches: tuple[str, ...] = BRANCHES, epochs: int = 3) -> dict[str, Any]:
    params = {b: 100 for b in branches} | {"fusion": 10, "total": 100 * len(branches) + 10}
    return {
        "event": "start",
        "time": "2026-11-30T03:00:00",
        "device": "cpu",
        "precision": "fp32",
        "precision_reason": "no CUDA device",
        "params": params,
        "effective_batch": 32,
        "train_size": 320,
        "val_size": 64,
        "majority_baseline": 0.21,
        "branches": list(branches),
        "epochs": epochs,
    }


def _step(step: int, epoch: int, loss: float, samples_per_s: float = 50.0, memory: float = 500.0) -> dict[str, Any]:
    return {
        "event": "step",
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": 1e-3,
        "samples_per_s": samples_per_s,
        "memory_mib": memory,
        "grad_norm": 0.9,
    }


def _epoch(epoch: int, step: int, fused: float | None, best: bool, branches: tuple[str, ...] = BRANCHES) -> dict:
    acc = None
    if fused is not None:
        acc = {b: fused - 0.05 * (i + 1) for i, b in enumerate(branches)} | {"fused": fused, "ens": fused + 0.01}
        acc["bound"] = 0.9
    return {
        "event": "epoch",
        "epoch": epoch,
        "step": step,
        "train_loss": 4.0 - epoch,
        "val_acc": acc,
        "score": fused,
        "best": best,
        "epoch_time_s": 40.0 + epoch,
        "samples_per_s": 50.0 + epoch,
        "peak_memory_mib": 900.0 + epoch,
    }


def _end(status: str = "finished", best_epoch: int = 2, best_score: float = 0.41) -> dict[str, Any]:
    return {
        "event": "end",
        "status": status,
        "best_epoch": best_epoch,
        "best_score": best_score,
        "steps": 30,
        "elapsed_s": 3725.0,
        "peak_memory_mib": 950.0,
    }


def _finished_run() -> list[dict[str, Any]]:
    """3 epochs of 10 steps (logged every 5); epoch 2 is best, epoch 3 is worse but still flagged at the time."""
    records: list[dict[str, Any]] = [_start()]
    for epoch, fused in ((1, 0.30), (2, 0.41), (3, 0.39)):
        records += [_step(10 * epoch - 5, epoch, 4.5 - epoch, 40.0 + epoch), _step(10 * epoch, epoch, 4.2 - epoch)]
        records.append(_epoch(epoch, 10 * epoch, fused, best=epoch != 3))
    return [*records, _end()]


def _write_run(root: Path, records: list[dict[str, Any]], tail: str = "", name: str = "run") -> Path:
    run = root / name
    run.mkdir()
    text = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(text + tail, encoding="utf-8")
    return run


# --------------------------------------------------------------------------------------------------
# Reading and summary


def test_summary_of_a_finished_run(tmp_path: Path) -> None:
    info = summary(read_metrics(_write_run(tmp_path, _finished_run())))
    assert info["status"] == "finished"
    assert info["epochs_done"] == 3 and info["epochs_planned"] == 3 and info["steps"] == 30
    assert info["best_epoch"] == 2 and info["best_score"] == pytest.approx(0.41)
    assert info["best_fused_acc"] == pytest.approx(0.41)
    assert info["best_epoch_acc"]["cfrf"] == pytest.approx(0.36)
    assert info["best_acc"]["xvlm"] == {"value": pytest.approx(0.26), "epoch": 2}
    assert list(info["best_acc"]) == ["cfrf", "isubg", "xvlm", "fused", "ens", "bound"]
    assert info["best_acc"]["bound"]["epoch"] == 1  # ties keep the first epoch that reached the value
    assert info["majority_baseline"] == pytest.approx(0.21)
    assert info["final_train_loss"] == pytest.approx(1.0)
    # per-step throughput: 41, 50, 42, 50, 43, 50 -> median (43 + 50) / 2
    assert info["median_samples_per_s"] == pytest.approx(46.5)
    assert info["peak_memory_mib"] == 950.0 and info["elapsed_s"] == 3725.0
    assert info["params_total"] == 310 and info["warnings"] == []


def test_resume_drops_the_abandoned_stretch_and_replaces_duplicates(tmp_path: Path) -> None:
    before = [_start(), _step(10, 1, 3.0), _step(20, 1, 2.8), _epoch(1, 20, 0.30, True)]
    # The first process got to step 40 and wrote epoch 2, but its last checkpoint was at step 30.
    before += [_step(30, 2, 2.6), _step(40, 2, 9.9), _epoch(2, 40, 0.10, False), _end("interrupted", 1, 0.30)]
    after = [{"event": "resume", "step": 30, "epoch": 2}, _start(), _step(30, 2, 2.5), _step(40, 2, 2.4)]
    metrics = read_metrics(_write_run(tmp_path, before + after))
    assert [r["step"] for r in metrics.steps] == [10, 20, 30, 40]
    assert [r["loss"] for r in metrics.steps] == [3.0, 2.8, 2.5, 2.4]  # the later record for step 30 wins
    assert [r["epoch"] for r in metrics.epochs] == [1]  # epoch 2 ended after step 30: abandoned
    assert metrics.end is None and len(metrics.resumes) == 1
    info = summary(metrics)
    assert info["status"] == "unfinished" and info["resumes"] == 1 and info["steps"] == 40
    assert info["best_epoch"] == 1  # from the best flag, as the interrupted end record no longer applies
    assert info["elapsed_s"] == pytest.approx(41.0)  # no end: the sum of epoch times


def test_resume_then_finish(tmp_path: Path) -> None:
    records = _finished_run()
    resumed = [{"event": "resume", "step": 20, "epoch": 3}, _step(25, 3, 0.5), _epoch(3, 30, 0.45, True)]
    metrics = read_metrics(_write_run(tmp_path, records[:-1] + resumed + [_end(best_epoch=3, best_score=0.45)]))
    assert [r["step"] for r in metrics.steps] == [5, 10, 15, 20, 25]
    assert metrics.epochs[-1]["val_acc"]["fused"] == pytest.approx(0.45)
    assert summary(metrics)["best_fused_acc"] == pytest.approx(0.45)


def test_missing_branch_and_no_validation(tmp_path: Path) -> None:
    two = ("cfrf", "isubg")
    records = [_start(two), _step(5, 1, 3.0), _epoch(1, 5, 0.3, True, two), _end(best_epoch=1, best_score=0.3)]
    metrics = read_metrics(_write_run(tmp_path, records))
    assert metrics.acc_names() == ["cfrf", "isubg", "fused", "ens", "bound"]
    assert "xvlm" not in summary(metrics)["best_acc"]

    novalid = [_start(), _step(5, 1, 3.0), _epoch(1, 5, None, False), _epoch(2, 10, None, False) | {"val_acc": {}}]
    info = summary(read_metrics(_write_run(tmp_path, novalid, name="novalid")))
    assert info["best_epoch"] is None and info["best_fused_acc"] is None and info["best_acc"] == {}
    assert info["status"] == "unfinished" and info["final_train_loss"] == pytest.approx(2.0)


def test_truncated_last_line_is_a_warning(tmp_path: Path) -> None:
    run = _write_run(tmp_path, _finished_run()[:5], tail='{"event": "step", "step": 20, "lo')
    metrics = read_metrics(run)
    assert len(metrics.steps) == 3
    assert len(metrics.warnings) == 1
    assert "metrics.jsonl:6" in metrics.warnings[0] and "truncated" in metrics.warnings[0]
    assert summary(metrics)["warnings"] == metrics.warnings


def test_a_bad_line_before_the_last_is_an_error(tmp_path: Path) -> None:
    records = _finished_run()
    text = json.dumps(records[0]) + "\n{not json\n" + json.dumps(records[1]) + "\n"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(text)
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_metrics(run)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"event": "step", "step": 5, "loss": "high"}, "'loss' must be a number"),
        ({"event": "step", "loss": 1.0}, "needs an integer 'step'"),
        ({"event": "epoch", "epoch": 1, "val_acc": [0.3]}, "'val_acc' must be null or an object"),
        ({"step": 5}, "no 'event' key"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_badly_shaped_records_name_file_line_and_field(tmp_path: Path, record: Any, expected: str) -> None:
    run = _write_run(tmp_path, [_start(), record, _step(10, 1, 1.0)])
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: ") as info:
        read_metrics(run)
    assert expected in str(info.value)


def test_unknown_events_are_skipped(tmp_path: Path) -> None:
    metrics = read_metrics(_write_run(tmp_path, [_start(), {"event": "checkpoint", "step": 5}, _step(5, 1, 1.0)]))
    assert len(metrics.steps) == 1 and metrics.warnings == []


def test_missing_run_dir_and_missing_metrics(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such run directory"):
        read_metrics(tmp_path / "nope")
    with pytest.raises(DataError, match=r"has no metrics\.jsonl"):
        read_metrics(tmp_path)


def test_epoch_table_marks_only_the_overall_best(tmp_path: Path) -> None:
    rows = epoch_table(read_metrics(_write_run(tmp_path, _finished_run())))
    assert [r["best"] for r in rows] == [False, True, False]
    assert rows[0]["val_acc"]["fused"] == pytest.approx(0.30) and rows[2]["epoch_time_s"] == 43.0


# --------------------------------------------------------------------------------------------------
# Plots


def _assert_pngs(paths: list[Path], folder: Path) -> None:
    assert [p.name for p in paths] == list(PLOT_NAMES)
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC, path
        assert len(data) > 5_000, f"{path} is only {len(data)} bytes"
    assert sorted(p.name for p in folder.iterdir()) == sorted(PLOT_NAMES)  # no temporary files left behind


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    records = _finished_run()
    records.insert(5, {"event": "resume", "step": 10, "epoch": 2})
    metrics = read_metrics(_write_run(tmp_path, records))
    out = tmp_path / "deep" / "plots"
    _assert_pngs(plot(metrics, out), out)


def test_plots_without_data_are_still_written(tmp_path: Path) -> None:
    run = _write_run(tmp_path, [_start()])
    _assert_pngs(plot(read_metrics(run), tmp_path / "p"), tmp_path / "p")


def test_plots_with_a_nan_loss_and_epochs_only(tmp_path: Path) -> None:
    records = [_start(), _step(5, 1, 2.0), _step(10, 1, math.nan), _epoch(1, 10, 0.3, True), _end("diverged", 1)]
    paths = plot(read_metrics(_write_run(tmp_path, records)), tmp_path / "a")
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)
    no_steps = [_start(), _epoch(1, 10, 0.3, True), _epoch(2, 20, 0.35, True)]
    paths = plot(read_metrics(_write_run(tmp_path, no_steps, name="epochs_only")), tmp_path / "b")
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_prints_summary_and_epoch_tables(runner: CliRunner, tmp_path: Path) -> None:
    run = _write_run(tmp_path, _finished_run())
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "finished" in out and "41.00%" in out and "21.00%" in out and "1h 02m 05s" in out
    for column in ("epoch", "train loss", "cfrf", "isubg", "xvlm", "fused", "ens", "samples/s", "peak MiB"):
        assert column in out
    marked = [line for line in out.splitlines() if line.startswith("│ * │")]
    assert len(marked) == 1 and "41.00%" in marked[0], out
    for name in PLOT_NAMES:
        assert (run / "plots" / name).is_file() and name in out


def test_cli_json(runner: CliRunner, tmp_path: Path) -> None:
    records = [_start(), _step(5, 1, 2.0), _step(10, 1, math.nan), _epoch(1, 10, 0.3, True), _end("diverged", 1)]
    run = _write_run(tmp_path, records)
    out = tmp_path / "elsewhere"
    result = runner.invoke(app, ["report", str(run), "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"summary", "epochs", "plots"}
    assert data["summary"]["status"] == "diverged" and data["summary"]["final_step_loss"] is None  # NaN -> null
    assert data["epochs"][0]["val_acc"]["fused"] == pytest.approx(0.3) and data["epochs"][0]["best"] is True
    assert [Path(p).name for p in data["plots"]] == list(PLOT_NAMES) and (out / "loss.png").is_file()
    assert not (run / "plots").exists()


def test_cli_shows_the_end_message_and_tolerates_null_values(runner: CliRunner, tmp_path: Path) -> None:
    # The trainer writes NaN/inf as null; a diverged run ends with a message saying where.
    end = _end("diverged", 1) | {"message": "the loss became nan/inf at step 10 (epoch 1)", "peak_memory_mib": None}
    records = [_start(), _step(5, 1, 2.0), _step(10, 1, 1.0) | {"loss": None}, _epoch(1, 10, 0.3, True), end]
    run = _write_run(tmp_path, records)
    result = runner.invoke(app, ["report", str(run), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "diverged (the loss became nan/inf at step 10 (epoch 1))" in result.stdout
    info = summary(read_metrics(run))
    assert info["final_step_loss"] is None and info["peak_memory_mib"] == 901.0  # null in end: the epoch peak
    assert [p.read_bytes()[:8] for p in plot(read_metrics(run), tmp_path / "p")] == [PNG_MAGIC] * 4


def test_cli_no_plots_and_truncation_warning(runner: CliRunner, tmp_path: Path) -> None:
    run = _write_run(tmp_path, _finished_run()[:4], tail='{"event": "ep')
    result = runner.invoke(app, ["report", str(run), "--no-plots", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plots"] == []  # the warning goes to stderr, stdout stays pure JSON
    assert "truncated" in result.stderr
    assert not (run / "plots").exists()
    table = runner.invoke(app, ["report", str(run), "--no-plots"])
    assert table.exit_code == 0 and "unfinished" in table.stdout


@pytest.mark.parametrize("case", ["missing", "no-metrics", "bad-line"])
def test_cli_user_errors_exit_2(runner: CliRunner, tmp_path: Path, case: str) -> None:
    if case == "missing":
        target, expected = tmp_path / "nope", "no such run directory"
    elif case == "no-metrics":
        target, expected = tmp_path, "has no metrics.jsonl"
    else:
        target = _write_run(tmp_path, [_start()], tail="garbage\n" + json.dumps(_step(5, 1, 1.0)) + "\n")
        expected = "metrics.jsonl:2: not valid JSON"
    result = runner.invoke(app, ["report", str(target)])
    assert result.exit_code == 2
    assert expected in result.stderr and "Traceback" not in result.output


def test_report_does_not_import_torch(tmp_path: Path) -> None:
    run = _write_run(tmp_path, _finished_run())
    assert_torch_not_imported(["report", str(run), "--no-plots"])
