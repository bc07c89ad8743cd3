"""The `isubg` command line, driven through Typer's CliRunner and, where it matters, a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from isubg import __version__
from isubg.cli import app
from isubg.config import guide_params
from isubg.presets import list_presets
from isubg.resolve import resolve_config

WriteYaml = Callable[[str, str], Path]


def test_help_lists_the_commands(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "preset" in result.output


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("command", ["list", "show", "diff", "export", "validate"])
def test_every_preset_command_has_help(runner: CliRunner, command: str) -> None:
    result = runner.invoke(app, ["preset", command, "--help"])
    assert result.exit_code == 0, result.output


def test_list_shows_every_preset(runner: CliRunner) -> None:
    result = runner.invoke(app, ["preset", "list"])
    assert result.exit_code == 0
    for name in list_presets():
        assert name in result.output


def test_list_json(runner: CliRunner) -> None:
    result = runner.invoke(app, ["preset", "list", "--json"])
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(list_presets())
    assert rows["8gb"]["effective_batch"] == 256
    assert rows["8gb"]["changes"]["train.batch_size"] == 16
    assert rows["default"]["changes"] == {}


def test_show_8gb_table(runner: CliRunner) -> None:
    result = runner.invoke(app, ["preset", "show", "8gb"])
    assert result.exit_code == 0
    out = result.output
    assert "effective batch 256" in out
    for heading in ("data", "model.cfrf", "model.isubg", "model.xvlm", "train", "optim", "memory"):
        assert heading in out
    for name in guide_params():
        assert name in out, name
    # Readable without colour: the changed marker is a character on the row.
    assert any(line.lstrip("│ ").startswith("*") and "batch_size" in line for line in out.splitlines())


def test_show_json_holds_every_guide_parameter_and_the_effective_batch(runner: CliRunner) -> None:
    result = runner.invoke(app, ["preset", "show", "8gb", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["effective_batch"] == 256
    assert set(data["guide_parameters"]) == set(guide_params())
    assert data["guide_parameters"]["batch_size"] == 16
    assert data["guide_parameters"]["mixed_precision"] is True
    param = data["parameters"]["train.batch_size"]
    assert param == param | {"value": 16, "default": 32, "changed": True, "guide_name": "batch_size"}
    assert param["source"] == "preset 8gb (8gb.yaml)"
    assert data["config"]["train"]["batch_size"] == 16


def test_show_with_overrides_and_warnings(runner: CliRunner) -> None:
    result = runner.invoke(app, ["preset", "show", "default", "--set", "lr=1e-3", "--num_hid", "256", "--json"])
    data = json.loads(result.stdout)
    assert data["guide_parameters"]["lr"] == 1e-3 and data["guide_parameters"]["num_hid"] == 256
    assert {w["path"] for w in data["warnings"]} == {"train.lr", "model.cfrf.num_hid"}
    text = runner.invoke(app, ["preset", "show", "default", "--set", "lr=1e-3"])
    assert text.exit_code == 0
    assert "warning" in text.output and "train.lr" in text.output


def test_show_changed_only(runner: CliRunner) -> None:
    result = runner.invoke(app, ["preset", "show", "24gb", "--changed"])
    assert result.exit_code == 0
    assert "batch_size" in result.output and "AOA_layers" not in result.output


def test_diff(runner: CliRunner) -> None:
    result = runner.invoke(app, ["preset", "diff", "8gb", "24gb", "--json"])
    data = json.loads(result.stdout)
    paths = {row["path"]: (row["a"], row["b"]) for row in data["differences"]}
    assert paths["train.batch_size"] == (16, 48)
    assert data["effective_batch"] == {"a": 256, "b": 192}
    same = runner.invoke(app, ["preset", "diff", "gqa", "default"])
    assert same.exit_code == 0 and "identical" in same.output
    table = runner.invoke(app, ["preset", "diff", "8gb", "24gb"])
    assert "train.batch_size" in table.output


def test_export_round_trips(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "run.yaml"
    result = runner.invoke(
        app, ["preset", "export", "vqa", "-o", str(out), "--set", "epochs=3", "--AOA_layers", "4", "--no-tfidf"]
    )
    assert result.exit_code == 0, result.output
    cfg = resolve_config(config_file=out).config
    assert cfg.data.dataset == "VQA" and cfg.train.epochs == 3 and cfg.model.cfrf.AOA_layers == 4
    assert cfg.data.tfidf is False
    assert out.read_text().startswith("# isubg")


def test_export_refuses_to_overwrite_without_force(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "run.yaml"
    out.write_text("keep me")
    result = runner.invoke(app, ["preset", "export", "8gb", "-o", str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_text() == "keep me"
    assert runner.invoke(app, ["preset", "export", "8gb", "-o", str(out), "--force"]).exit_code == 0
    assert resolve_config(config_file=out).config.train.batch_size == 16


def test_export_to_stdout_is_pure_yaml(runner: CliRunner) -> None:
    result = runner.invoke(app, ["preset", "export", "demo"])
    assert result.exit_code == 0
    assert result.stdout.startswith("# isubg") and "model:" in result.stdout


def test_validate_good_and_bad_files(runner: CliRunner, write_yaml: WriteYaml) -> None:
    good = write_yaml("good.yaml", "extends: 8gb\ntrain:\n  epochs: 5\n")
    bad = write_yaml("bad.yaml", "train:\n  batch_size: 0\n")
    ok = runner.invoke(app, ["preset", "validate", str(good)])
    assert ok.exit_code == 0 and "ok" in ok.output
    result = runner.invoke(app, ["preset", "validate", str(good), str(bad), "--json"])
    assert result.exit_code == 2
    rows = {Path(r["file"]).name: r for r in json.loads(result.stdout)}
    assert rows["good.yaml"]["valid"] and rows["good.yaml"]["effective_batch"] == 16 * 4 * 4
    assert not rows["bad.yaml"]["valid"] and "train.batch_size" in rows["bad.yaml"]["error"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  lr: [1\n", "not valid YAML"),
        ("train:\n  batch_size: many\n", "train.batch_size = 'many'"),
        ("train:\n  batchsize: 3\n", "Did you mean 'train.batch_size'"),
        ("memory:\n  max_memory_usage: 2\n", "memory.max_memory_usage = 2"),
    ],
)
def test_bad_config_files_exit_2_with_file_and_key(
    runner: CliRunner, write_yaml: WriteYaml, text: str, expected: str
) -> None:
    path = write_yaml("cfg.yaml", text)
    for args in (["preset", "show", "default", "--config", str(path)], ["preset", "validate", str(path)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert expected in result.output and "cfg.yaml" in result.output
        assert "Traceback" not in result.output
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_unknown_preset_exits_2(runner: CliRunner) -> None:
    result = runner.invoke(app, ["preset", "show", "9gb"])
    assert result.exit_code == 2 and "Known presets" in result.output


def test_bad_flag_value_exits_2(runner: CliRunner) -> None:
    result = runner.invoke(app, ["preset", "show", "--batch-size", "lots"])
    assert result.exit_code == 2 and "from --batch_size" in result.output


def test_python_dash_m_runs_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "isubg", "preset", "show", "8gb", "--json"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["effective_batch"] == 256


def test_bad_config_in_a_real_process_has_no_traceback(write_yaml: WriteYaml) -> None:
    path = write_yaml("cfg.yaml", "model:\n  cfrf:\n    dropout: 1.0\n")
    result = subprocess.run(
        [sys.executable, "-m", "isubg", "preset", "show", "default", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "model.cfrf.dropout = 1.0" in result.stderr


def test_guide_flags_reach_their_parameters(runner: CliRunner) -> None:
    args = ["--lr", "1e-4", "--batch_size", "8", "--AOA-layers", "5", "--sampler_type", "gumbel"]
    args += ["--mixed_precision", "--no-tfidf", "--use_mgat", "--no-use-instruction", "--dataset", "vqa"]
    result = runner.invoke(app, ["preset", "show", "default", *args, "--json"])
    assert result.exit_code == 0, result.output
    guide = json.loads(result.stdout)["guide_parameters"]
    assert guide | {
        "lr": 1e-4, "batch_size": 8, "AOA_layers": 5, "sampler_type": "gumbel", "mixed_precision": True,
        "tfidf": False, "use_mgat": True, "use_instruction": False, "dataset": "VQA",
    } == guide  # fmt: skip


def test_every_guide_parameter_has_a_flag(runner: CliRunner) -> None:
    result = runner.invoke(app, ["preset", "show", "--help"], env={"COLUMNS": "200"})
    for name in guide_params():
        assert f"--{name.replace('_', '-')}" in result.output, name
