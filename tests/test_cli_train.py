"""`isubg train` and `isubg eval` from the outside: flags, presets on the demo data, signals, torchrun, exports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processed import question_records
from test_metrics import official_gqa, official_vqa
from test_train import FAST, TINY
from typer.testing import CliRunner

from isubg.checkpoint import load_checkpoint
from isubg.cli import app

RUNNER = CliRunner()


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train_cli(*args: str) -> object:
    return RUNNER.invoke(app, ["train", *args])


@pytest.fixture(scope="module")
def trained(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "gqa"
    result = train_cli("--preset", "demo", "--data", str(tiny_demo), *sets(*FAST), "--epochs", "1",
                       "--output", str(run_dir))  # fmt: skip
    assert result.exit_code == 0, result.output
    return run_dir


def test_train_prints_banner_epochs_and_summary(trained: Path) -> None:
    log = (trained / "train.log").read_text()
    for words in ("device", "precision", "parameters", "per update", "train /", "majority answer", "epoch 1/1"):
        assert words in log
    assert "finished" in log and "vs majority baseline" in log
    # data.scene_graphs auto on GQA: the official graphs of train and val, the detector's stat words.
    inputs = "scene graphs: ground truth (train), ground truth (val); stat words: detector"
    assert f"inputs      {inputs}" in log
    start = json.loads((trained / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["inputs"] == inputs and start["scene_graphs"] == "auto"


def test_guide_flags_reach_the_config(tiny_demo: Path, tmp_path: Path) -> None:
    result = train_cli("--preset", "demo", "--data", str(tiny_demo), *sets(*FAST), "--lr", "5e-4", "--batch-size",
                       "4", "--max-steps", "1", "--output", str(tmp_path / "r"))  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "lr: 0.0005" in saved and "batch_size: 4" in saved


def test_existing_run_is_not_overwritten(trained: Path, tiny_demo: Path) -> None:
    result = train_cli("--preset", "demo", "--data", str(tiny_demo), *sets(*FAST), "--output", str(trained))
    assert result.exit_code == 2 and "--resume" in result.output


def test_no_arguments_means_the_demo_preset_on_the_cached_demo(
    tiny_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from isubg.data.embedded import demo_dir

    monkeypatch.setenv("ISUBG_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(tiny_demo, demo_dir("tiny"))
    monkeypatch.chdir(tmp_path)
    result = train_cli(*sets("data.demo_size=tiny", *TINY), "--max-steps", "1")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("-demo")
    assert "(demo)" in (run_dir / "config.yaml").read_text().splitlines()[0]
    start = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["data"] == str(demo_dir("tiny") / "processed" / "gqa")  # data.demo_size picked the tiny demo


def test_bad_data_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = train_cli("--data", str(tmp_path), "--max-steps", "1")
    assert result.exit_code == 2 and "not a processed data folder" in result.output


# --------------------------------------------------------------------------------------------------
# eval


@pytest.mark.parametrize("kind", ["gqa", "vqa"])
def test_eval_exports_official_formats_that_score_like_the_official_scripts(
    kind: str, tiny_demo: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / kind
    result = train_cli("--preset", "demo", "--data", str(tiny_demo), "--dataset", kind.upper(), *sets(*FAST),
                       "--epochs", "1", "--output", str(run_dir))  # fmt: skip
    assert result.exit_code == 0, result.output
    export, explained = tmp_path / "pred.json", tmp_path / "expl.json"
    result = RUNNER.invoke(app, ["eval", str(run_dir), "--export", str(export), "--explanations", str(explained),
                                 "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    records = question_records(tiny_demo / "processed" / kind, "val")
    predictions = json.loads(export.read_text())
    assert len(predictions) == len(records)
    truth = {str(r["question_id"]): r for r in records}
    if kind == "vqa":
        assert all(set(p) == {"question_id", "answer"} and isinstance(p["question_id"], int) for p in predictions)
        scores = [official_vqa(p["answer"], truth[str(p["question_id"])]["answers"]) for p in predictions]
    else:
        assert all(set(p) == {"questionId", "prediction"} for p in predictions)
        scores = [official_gqa(p["prediction"], truth[p["questionId"]]["answer"]) for p in predictions]
    assert report["accuracy"]["fused"] == pytest.approx(sum(scores) / len(scores), abs=1e-12)
    assert report["per_type"] and {e["question_id"] for e in json.loads(explained.read_text())} == set(truth)
    graphs = "ground truth" if kind == "gqa" else "detector"  # VQA has no ground-truth scene graphs
    assert report["inputs"] == {
        "split": "val",
        "scene_graphs": "auto",
        "graphs": graphs,
        "stat_words": "detector",
        "ablation": None,
    }
    if kind == "gqa":  # the same run read with the detector's graphs; its testdev has ground truth in the demo
        result = RUNNER.invoke(app, ["eval", str(run_dir), "--scene-graphs", "detected", "--split", "testdev"])
        assert result.exit_code == 0, result.output
        assert "testdev: scene graphs detector; stat words detector (data.scene_graphs=detected)" in result.output


def test_eval_of_a_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["eval", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run directory" in result.output


def test_eval_refuses_a_non_checkpoint_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    result = RUNNER.invoke(app, ["eval", str(bad)])
    assert result.exit_code == 2 and "not a readable isubg checkpoint" in result.output


# --------------------------------------------------------------------------------------------------
# presets on the demo data (the presets that crashed the reference included)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "dataset"), [("high-performance", "GQA"), ("gqa", "GQA"), ("vqa", "VQA")], ids=str)
def test_full_size_presets_train_an_epoch_on_a_demo_subset(
    preset: str, dataset: str, tiny_demo: Path, tmp_path: Path
) -> None:
    result = train_cli("--preset", preset, "--data", str(tiny_demo), "--dataset", dataset, "--epochs", "1",
                       "--batch-size", "2", *sets("data.train_limit=4", "data.val_limit=4", "data.num_workers=0"),
                       "--output", str(tmp_path / "run"))  # fmt: skip
    assert result.exit_code == 0, result.output
    epoch = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-2]
    assert epoch["event"] == "epoch" and set(epoch["val_acc"]) >= {"cfrf", "isubg", "xvlm", "fused"}


# --------------------------------------------------------------------------------------------------
# processes: signals and torchrun


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ISUBG_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_exits_cleanly_and_resume_finishes(tiny_demo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "demo", "--data", str(tiny_demo), *sets(*TINY, "data.num_workers=0",
            "batch_size=2", "train.log_every=1"), "--epochs", "2", "--output", str(run_dir)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "isubg", *args], env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and '"event": "step"' in metrics.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "stopped by SIGINT" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    resumed = subprocess.run([sys.executable, "-m", "isubg", "train", "--resume", str(run_dir), *sets(
        "data.train_limit=16", "data.val_limit=8")], env=_env(tmp_path), capture_output=True, text=True,
        timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_one_run(tiny_demo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    options = sets(*FAST, "data.num_workers=0", "train.device=cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "isubg",
           "train", "--preset", "demo", "--data", str(tiny_demo), *options, "--epochs", "1",
           "--output", str(run_dir)]  # fmt: skip
    done = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["world_size"] == 2 and records[0]["effective_batch"] == 16
    assert [r["event"] for r in records].count("start") == 1, "only rank 0 writes"
    assert records[-1]["status"] == "finished" and (run_dir / "checkpoints" / "best.pt").is_file()
    # 48 questions / 2 ranks / batch 8 = 3 updates, every one on both ranks
    assert records[-1]["steps"] == 3


def test_preset_auto_says_what_it_chose(tiny_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import isubg.gpu

    monkeypatch.setattr(isubg.gpu, "resolve_auto_preset", lambda name: ("demo", "no usable GPU (test) -> demo"))
    result = train_cli("--preset", "auto", "--data", str(tiny_demo), *sets(*FAST), "--max-steps", "1",
                       "--output", str(tmp_path / "r"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--preset auto: no usable GPU (test) -> demo" in result.output
    assert "(demo)" in (tmp_path / "r" / "config.yaml").read_text().splitlines()[0]


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_from_the_periodic_checkpoint_to_the_same_weights(
    tiny_demo: Path, tmp_path: Path
) -> None:
    """kill -9 (no handler runs) right after a mid-epoch checkpoint; the resumed run ends with the weights of a
    run that was never killed."""
    options = [*sets(*FAST, "data.num_workers=0", "train.checkpoint_every=1"), "--epochs", "2"]
    command = [sys.executable, "-m", "isubg", "train", "--preset", "demo", "--data", str(tiny_demo), *options]
    whole, split = tmp_path / "whole", tmp_path / "split"
    done = subprocess.run([*command, "--output", str(whole)], env=_env(tmp_path), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen([*command, "--output", str(split)], env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    progress = _stop_at_a_mid_epoch_checkpoint(proc, split)
    proc.kill()  # SIGKILL: nothing is saved on the way out
    proc.wait(timeout=60)
    assert progress["batch"] > 0 and progress["step"] < 12, progress
    resumed = subprocess.run([sys.executable, "-m", "isubg", "train", "--resume", str(split)], env=_env(tmp_path),
                             capture_output=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "resume" and r["step"] == progress["step"] for r in records)
    assert records[-1]["status"] == "finished" and records[-1]["steps"] == 12
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (whole, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stop_at_a_mid_epoch_checkpoint(proc: subprocess.Popen[bytes], run_dir: Path) -> dict[str, int]:
    """Freeze `proc` (SIGSTOP) as soon as its last.pt holds a mid-epoch position; return that position."""
    last, deadline = run_dir / "checkpoints" / "last.pt", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists():
            proc.send_signal(signal.SIGSTOP)
            progress = load_checkpoint(last)["progress"]
            if progress["batch"] > 0:
                return progress
            proc.send_signal(signal.SIGCONT)  # an epoch-end checkpoint: let it run to the next one
        time.sleep(0.05)
    raise AssertionError(f"no mid-epoch checkpoint appeared (exit code {proc.poll()})")
