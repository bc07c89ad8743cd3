"""The shipped presets: all present, all valid, each documented, found via importlib.resources."""

from __future__ import annotations

import pytest

from isubg.config import config_diff, default_config
from isubg.presets import list_presets, preset_dir, preset_path, preset_purpose
from isubg.resolve import resolve_config
from isubg.yamlio import load_yaml_file

REQUIRED = {
    "default", "memory-optimized", "high-performance", "throughput", "low-memory", "8gb", "24gb", "gqa", "vqa", "demo",
}  # fmt: skip


def test_every_required_preset_ships() -> None:
    assert set(list_presets()) >= REQUIRED
    assert list_presets()[0] == "default"


def test_presets_folder_holds_only_yaml() -> None:
    # The wheel copies the folder verbatim; anything else in it would ship too. plans/ holds the tuning plans.
    files = [p for p in preset_dir().rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert {p.suffix for p in files} == {".yaml"}
    assert {p.parent.name for p in files} == {preset_dir().name, "plans"}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_preset_validates(name: str) -> None:
    resolved = resolve_config(name)
    assert resolved.config.effective_batch >= 1


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_preset_opens_with_purpose_and_command(name: str) -> None:
    lines = preset_path(name).read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith(f"# {name}: "), lines[0]
    assert preset_purpose(name) and not preset_purpose(name).startswith(name)
    comment = [line for line in lines if line.startswith("#")]
    assert any("isubg " in line for line in comment[1:]), "no command in the opening comment"


@pytest.mark.parametrize("name", sorted(REQUIRED - {"default"}))
def test_non_default_presets_extend_default_and_change_something(name: str) -> None:
    raw = load_yaml_file(preset_path(name))
    assert raw.get("extends") == "default"
    if name != "gqa":  # the guide's GQA setup equals the defaults; it only names the dataset
        assert config_diff(default_config(), resolve_config(name).config)


def test_default_preset_is_the_schema_defaults() -> None:
    assert resolve_config("default").config == default_config()


def test_demo_preset_is_cpu_sized() -> None:
    cfg = resolve_config("demo").config
    assert cfg.model.cfrf.num_hid <= 256 and cfg.model.isubg.general_hidden_dim <= 128
    assert cfg.model.xvlm.hidden_size <= 128 and cfg.data.num_workers == 0
    assert cfg.memory.mixed_precision is False


def test_hardware_presets_keep_the_guide_effective_batches() -> None:
    # 8 GB trades micro-batch for accumulation: the same samples per step as a larger card would use.
    assert resolve_config("8gb").config.effective_batch == 16 * 4 * 4
    assert resolve_config("24gb").config.effective_batch == 48 * 1 * 4
    assert resolve_config("throughput").config.effective_batch == 64 * 2
