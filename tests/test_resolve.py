"""Config resolution: preset -> --config -> --set -> flags, key checks, errors, provenance, round trip."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from isubg.config import ConfigError, RunConfig
from isubg.resolve import dump_config, parse_set, resolve_config
from isubg.yamlio import load_yaml_file

WriteYaml = Callable[[str, str], Path]


def test_layers_apply_in_order_later_wins(write_yaml: WriteYaml) -> None:
    cfg_file = write_yaml("c.yaml", "train:\n  batch_size: 20\n  lr: 1.0e-4\n")
    r = resolve_config("8gb", config_file=cfg_file, sets=["train.lr=2e-4", "epochs=30"], flags={"epochs": 40})
    cfg = r.config
    assert cfg.memory.mixed_precision is True  # from the preset
    assert cfg.train.batch_size == 20  # the file beats the preset
    assert cfg.train.lr == 2e-4  # --set beats the file
    assert cfg.train.epochs == 40  # flags beat --set
    assert r.sources["memory.mixed_precision"] == "preset 8gb (8gb.yaml)"
    assert r.sources["train.batch_size"] == str(cfg_file)
    assert r.sources["train.lr"] == "--set"
    assert r.sources["train.epochs"] == "--epochs"


def test_flags_given_as_none_are_ignored() -> None:
    assert resolve_config("8gb", flags={"batch_size": None}).config.train.batch_size == 16


def test_set_values_are_typed_as_yaml() -> None:
    cfg = resolve_config(
        sets=["lr=1e-4", "tfidf=False", "model.branches=[cfrf, xvlm]", "dataset=vqa", "train.output=runs/x"]
    ).config
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.tfidf is False
    assert cfg.model.branches == ["cfrf", "xvlm"]
    assert cfg.data.dataset == "VQA"
    assert cfg.train.output == Path("runs/x")


def test_set_with_empty_value_unsets_an_optional_setting(write_yaml: WriteYaml) -> None:
    f = write_yaml("c.yaml", "model:\n  xvlm:\n    checkpoint: /ckpt/model.pth\n")
    assert resolve_config(config_file=f, sets=["checkpoint="]).config.model.xvlm.checkpoint is None


def test_bare_guide_names_work_at_the_top_of_a_file(write_yaml: WriteYaml) -> None:
    f = write_yaml("flat.yaml", "lr: 3.0e-4\nAOA_layers: 8\nmixed_precision: yes\n")
    cfg = resolve_config(config_file=f).config
    assert (cfg.train.lr, cfg.model.cfrf.AOA_layers, cfg.memory.mixed_precision) == (3e-4, 8, True)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("AOA_layer=3", "Did you mean 'model.cfrf.AOA_layers'"),
        ("train.AOA_layers=3", "'AOA_layers' lives at 'model.cfrf.AOA_layers'"),
        ("model.cfrf.num_hidden=3", "Did you mean 'model.cfrf.num_hid'"),
        ("learning_rate=3", "unknown key 'learning_rate'"),
        ("aoa_layers=3", "Did you mean 'model.cfrf.AOA_layers'"),
    ],
)
def test_unknown_set_keys_name_the_key_and_suggest(item: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        resolve_config(sets=[item])
    assert "--set" in str(info.value)


def test_wrong_type_names_key_value_source_and_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(sets=["batch_size=lots"])
    text = str(info.value)
    assert "train.batch_size = 'lots' (from --set)" in text
    assert "Allowed: an integer >= 1" in text


def test_all_errors_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(sets=["batch_size=0", "dropout=1.5", "sampler_type=simple"])
    text = str(info.value)
    for key in ("train.batch_size", "model.cfrf.dropout", "model.isubg.sampler_type"):
        assert key in text


def test_unknown_key_in_a_file_names_the_file(write_yaml: WriteYaml) -> None:
    f = write_yaml("typo.yaml", "model:\n  isubg:\n    mgat_layer: 3\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key 'model.isubg.mgat_layer'.*mgat_layers"):
        resolve_config(config_file=f)


def test_unknown_section_is_an_error(write_yaml: WriteYaml) -> None:
    f = write_yaml("s.yaml", "trainer:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trainer'.*'train'"):
        resolve_config(config_file=f)


def test_a_section_given_a_scalar_is_an_error(write_yaml: WriteYaml) -> None:
    f = write_yaml("s.yaml", "train: 3\n")
    with pytest.raises(ConfigError, match="'train' is a section"):
        resolve_config(config_file=f)


def test_out_of_bounds_value_in_a_file_names_file_and_key(write_yaml: WriteYaml) -> None:
    f = write_yaml("b.yaml", "memory:\n  max_memory_usage: 1.5\n")
    with pytest.raises(ConfigError, match=r"memory.max_memory_usage = 1.5 \(from .*b\.yaml\)"):
        resolve_config(config_file=f)


def test_yaml_syntax_error_gives_file_line_and_column(write_yaml: WriteYaml) -> None:
    f = write_yaml("broken.yaml", "train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+:\d+: not valid YAML"):
        resolve_config(config_file=f)


def test_duplicate_keys_are_errors(write_yaml: WriteYaml) -> None:
    f = write_yaml("dup.yaml", "train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match="found the key 'lr' twice"):
        resolve_config(config_file=f)


def test_top_level_must_be_a_mapping(write_yaml: WriteYaml) -> None:
    f = write_yaml("list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        resolve_config(config_file=f)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        resolve_config(config_file=tmp_path / "nope.yaml")


def test_empty_file_means_no_changes(write_yaml: WriteYaml) -> None:
    f = write_yaml("empty.yaml", "# nothing here\n")
    assert resolve_config(config_file=f).config == RunConfig()


def test_unknown_preset_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="Did you mean '8gb'"):
        resolve_config("8GB")
    with pytest.raises(ConfigError, match="Did you mean 'high-performance'"):
        resolve_config("high-perfomance")


def test_extends_chains_and_relative_files(write_yaml: WriteYaml) -> None:
    write_yaml("base.yaml", "extends: 8gb\ntrain:\n  epochs: 12\n")
    child = write_yaml("child.yaml", "extends: base.yaml\ntrain:\n  epochs: 14\n  lr: 2.0e-4\n")
    r = resolve_config(config_file=child)
    assert r.config.train.batch_size == 16  # from 8gb, two levels up
    assert r.config.train.epochs == 14
    assert r.config.optim.gradient_accumulation_steps == 4


def test_extends_cycles_are_reported(write_yaml: WriteYaml) -> None:
    write_yaml("a.yaml", "extends: b.yaml\n")
    b = write_yaml("b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        resolve_config(config_file=b)


def test_extends_must_be_a_name(write_yaml: WriteYaml) -> None:
    f = write_yaml("x.yaml", "extends: [8gb, 24gb]\n")
    with pytest.raises(ConfigError, match="'extends' must name one preset"):
        resolve_config(config_file=f)


def test_parse_set_rejects_items_without_equals() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set(["lr"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set(["=3"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_set(["model.branches=[cfrf"])


def test_unknown_flag_name_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown guide parameter"):
        resolve_config(flags={"learning_rate": 1e-4})


def test_dump_round_trips_through_config(write_yaml: WriteYaml, tmp_path: Path) -> None:
    original = resolve_config("memory-optimized", sets=["lr=1e-4", "checkpoint=/w/x.pth"]).config
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(original, header="exported\nfor a test"), encoding="utf-8")
    assert path.read_text().startswith("# exported\n# for a test\n")
    assert resolve_config(config_file=path).config == original
    assert load_yaml_file(path)["train"]["lr"] == 1e-4


def test_the_resolved_config_is_validated_once_and_independent_per_call() -> None:
    a = resolve_config("8gb").config
    a.train.batch_size = 2
    assert resolve_config("8gb").config.train.batch_size == 16
