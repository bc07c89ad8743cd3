"""Metric loggers (isubg.loggers, train.loggers) and the mid-epoch checkpoint clock (train.checkpoint_every)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import config, run

from isubg.checkpoint import CheckpointClock
from isubg.config import checkpoint_interval
from isubg.errors import ConfigError
from isubg.loggers import JsonlLogger, TensorBoardLogger, open_loggers
from isubg.report import read_metrics
from isubg.resolve import resolve_config


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_logger_writes_the_runs_curves(tiny_demo: Path, tmp_path: Path) -> None:
    gqa = tiny_demo / "processed" / "gqa"
    result = run(config("epochs=2", "train.loggers=[jsonl, tensorboard]"), tmp_path / "run", gqa)
    assert result.status == "finished"
    records = read_metrics(tmp_path / "run").records
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    steps = [r for r in records if r["event"] == "step"]
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in steps]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in steps])
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [s for s, _ in scalars["val/fused"]] == [r["step"] for r in epochs] == [6, 12]
    assert [v for _, v in scalars["val/fused"]] == pytest.approx([r["val_acc"]["fused"] for r in epochs])
    assert {"val/cfrf", "val/isubg", "val/xvlm", "train/lr", "train/grad_norm", "epoch/train_loss"} <= set(scalars)


def test_jsonl_only_writes_no_tensorboard_folder(tiny_demo: Path, tmp_path: Path) -> None:
    run(config("epochs=1"), tmp_path / "run", tiny_demo / "processed" / "gqa")
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "tensorboard").exists()


def test_a_resumed_tensorboard_log_drops_what_the_killed_run_wrote_after_its_checkpoint(tmp_path: Path) -> None:
    first = TensorBoardLogger(tmp_path)
    for step in range(1, 6):  # the killed run got to step 5; its checkpoint holds step 3
        first.write("step", {"step": step, "loss": 10.0 + step})
    first.close()
    second = TensorBoardLogger(tmp_path)
    second.write("resume", {"step": 3, "epoch": 1})
    for step in (4, 5, 6):
        second.write("step", {"step": step, "loss": 20.0 + step})
    second.close()
    assert _scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 11), (2, 12), (3, 13), (4, 24), (5, 25), (6, 26)]


def test_jsonl_logger_appends_one_object_per_record_with_null_for_non_finite(tmp_path: Path) -> None:
    logger = JsonlLogger(tmp_path)
    logger.write("step", {"step": 1, "loss": float("nan")})
    logger.write("end", {"status": "diverged"})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"event": "step", "step": 1, "loss": None}, {"event": "end", "status": "diverged"}]


def test_missing_tensorboard_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    with pytest.raises(ConfigError, match=r"pip install 'isubg\[tensorboard\]'"):
        open_loggers(["jsonl", "tensorboard"], tmp_path)


def test_loggers_setting_keeps_jsonl_and_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="'jsonl' must stay"):
        resolve_config("demo", sets=["train.loggers=[tensorboard]"])
    with pytest.raises(ConfigError, match=r"train\.loggers"):
        resolve_config("demo", sets=["train.loggers=[jsonl, wandb]"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [(500, (500, None)), ("500", (500, None)), ("30s", (None, 30.0)), ("15min", (None, 900.0)),
     ("2h", (None, 7200.0)), ("1.5 h", (None, 5400.0)), ("off", (None, None)), (None, (None, None))],
)  # fmt: skip
def test_checkpoint_every_reads_updates_durations_and_off(value: int | str | None, expected: tuple) -> None:
    assert checkpoint_interval(value) == expected


@pytest.mark.parametrize("bad", ["0", "fast", "-3min", "10 days", "true"])
def test_checkpoint_every_rejects_what_it_cannot_read(bad: str) -> None:
    with pytest.raises(ConfigError, match="checkpoint_every"):
        resolve_config("demo", sets=[f"train.checkpoint_every={bad}"])
    assert resolve_config("demo", sets=["train.checkpoint_every=off"]).config.train.checkpoint_every is None


def test_checkpoint_clock_counts_updates_or_time_since_the_last_save() -> None:
    by_updates = CheckpointClock(3, step=10, now=0.0)  # a resumed run at step 10
    assert [by_updates.due(s, 0.0) for s in (11, 12, 13)] == [False, False, True]
    by_updates.saved(13, 0.0)
    assert not by_updates.due(15, 1e9) and by_updates.due(16, 0.0)
    by_time = CheckpointClock("15min", step=0, now=100.0)
    assert not by_time.due(1000, 100.0 + 899) and by_time.due(1, 100.0 + 900)
    by_time.saved(5, 1000.0)  # an epoch-end save restarts the clock
    assert not by_time.due(6, 1000.0 + 899)
    off = CheckpointClock(None, step=0, now=0.0)
    assert not off.due(10**6, 1e12)
