"""The schema itself: types, bounds, cross-field rules, effective batch and warnings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from isubg.config import (
    RunConfig,
    config_diff,
    config_warnings,
    default_config,
    format_advice,
    format_value,
    get_value,
    guide_params,
    param_specs,
)


def test_defaults_validate_and_have_no_warnings() -> None:
    cfg = default_config()
    assert cfg.effective_batch == 32 * 1 * 4
    assert config_warnings(cfg) == []


def test_effective_batch_multiplies_the_three_factors() -> None:
    cfg = RunConfig.model_validate(
        {"train": {"batch_size": 6, "update_freq": 3}, "optim": {"gradient_accumulation_steps": 5}}
    )
    assert cfg.effective_batch == 90


def test_unknown_keys_are_rejected_in_every_section() -> None:
    for section in ("data", "train", "optim", "memory", "eval", "tune"):
        with pytest.raises(ValidationError, match="Extra inputs"):
            RunConfig.model_validate({section: {"no_such_key": 1}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        RunConfig.model_validate({"model": {"cfrf": {"AOA_layer": 4}}})


def test_booleans_are_not_numbers_and_numbers_are_not_booleans() -> None:
    with pytest.raises(ValidationError, match="boolean"):
        RunConfig.model_validate({"train": {"batch_size": True}})
    with pytest.raises(ValidationError, match="boolean"):
        RunConfig.model_validate({"train": {"lr": False}})
    with pytest.raises(ValidationError):
        RunConfig.model_validate({"model": {"isubg": {"use_mgat": 2}}})


def test_non_finite_floats_are_rejected() -> None:
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="finite"):
            RunConfig.model_validate({"train": {"lr": bad}})


def test_dataset_is_case_insensitive() -> None:
    assert RunConfig.model_validate({"data": {"dataset": "vqa"}}).data.dataset == "VQA"
    with pytest.raises(ValidationError):
        RunConfig.model_validate({"data": {"dataset": "coco"}})


def test_branches_must_be_a_nonempty_set_of_known_names() -> None:
    assert RunConfig.model_validate({"model": {"branches": ["isubg"]}}).model.branches == ["isubg"]
    for bad in ([], ["cfrf", "cfrf"], ["ban"]):
        with pytest.raises(ValidationError):
            RunConfig.model_validate({"model": {"branches": bad}})


def test_features_are_one_path_or_a_nonempty_list_of_paths(tmp_path: Path) -> None:
    from isubg.errors import ConfigError
    from isubg.resolve import resolve_config

    assert RunConfig.model_validate({"data": {"features": "a.h5"}}).data.features == Path("a.h5")
    listed = RunConfig.model_validate({"data": {"features": ["a.h5", "b.h5"]}}).data.features
    assert listed == [Path("a.h5"), Path("b.h5")]
    with pytest.raises(ValidationError, match="an empty list names no features file"):
        RunConfig.model_validate({"data": {"features": []}})
    assert resolve_config("demo", sets=["data.features=[a.h5, b.h5]"]).config.data.features == listed
    assert resolve_config("demo", sets=["data.features=a.h5"]).config.data.features == Path("a.h5")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data:\n  features:\n    - /f/train.h5\n    - /f/val.h5\n")
    from_file = resolve_config("demo", config_file=yaml_file).config
    assert from_file.data.features == [Path("/f/train.h5"), Path("/f/val.h5")]
    dumped = RunConfig.model_validate(from_file.model_dump(mode="json"))  # a run directory's config.yaml reloads
    assert dumped.data.features == from_file.data.features
    with pytest.raises(ConfigError, match=r"data\.features = \[\]"):
        resolve_config("demo", sets=["data.features=[]"])


def test_cross_field_rules() -> None:
    with pytest.raises(ValidationError, match=r"multiple of model\.xvlm\.num_heads"):
        RunConfig.model_validate({"model": {"xvlm": {"hidden_size": 100, "num_heads": 12}}})
    # Without the xvlm branch its sizes do not matter.
    RunConfig.model_validate({"model": {"branches": ["cfrf"], "xvlm": {"hidden_size": 100, "num_heads": 12}}})
    with pytest.raises(ValidationError, match=r"data\.image_root"):
        RunConfig.model_validate({"model": {"xvlm": {"vision": "swin"}}})
    RunConfig.model_validate({"model": {"xvlm": {"vision": "swin"}}, "data": {"image_root": "/images"}})


def test_assignment_is_validated() -> None:
    cfg = default_config()
    with pytest.raises(ValidationError):
        cfg.train.batch_size = 0


def test_guide_names_are_unique_and_point_at_leaves() -> None:
    names = guide_params()
    assert len(names) == len(set(names.values()))
    for name, path in names.items():
        assert path.rsplit(".", 1)[-1] == name
        assert path in param_specs()


def test_every_parameter_is_documented() -> None:
    for path, spec in param_specs().items():
        assert spec.description.strip(), path
        assert spec.allowed(), path


def test_allowed_describes_type_and_bounds() -> None:
    specs = param_specs()
    assert specs["train.batch_size"].allowed() == "an integer >= 1"
    assert specs["model.cfrf.dropout"].allowed() == "a number >= 0.0 and < 1.0"
    assert specs["memory.max_memory_usage"].allowed() == "a number > 0.0 and <= 1.0"
    assert specs["model.isubg.sampler_type"].allowed() == "one of 'imle', 'gumbel'"
    assert specs["data.root"].allowed() == "a path or null"
    assert specs["data.features"].allowed() == "a path or a list of paths or null"


def test_advice_warnings_name_path_value_and_range() -> None:
    cfg = RunConfig.model_validate({"model": {"cfrf": {"num_hid": 256}}, "train": {"lr": 1e-3}})
    messages = {w.path: w.message for w in config_warnings(cfg)}
    assert set(messages) == {"model.cfrf.num_hid", "train.lr"}
    assert "256" in messages["model.cfrf.num_hid"] and "512-2048" in messages["model.cfrf.num_hid"]
    assert "0.001" in messages["train.lr"]


def test_choice_advice_warns_for_legal_but_unadvised_values() -> None:
    cfg = RunConfig.model_validate({"model": {"cfrf": {"activation": "gelu"}}})
    assert [w.path for w in config_warnings(cfg)] == ["model.cfrf.activation"]


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"model": {"cfrf": {"counter_act": "identity"}}}, "model.cfrf.counter_act"),
        ({"model": {"isubg": {"sampler_type": "gumbel", "alpha": 1.5}}}, "model.isubg.alpha"),
        ({"model": {"branches": ["cfrf", "isubg"]}, "train": {"xvlm_lr": 7e-5}}, "train.xvlm_lr"),
        ({"model": {"branches": ["cfrf", "xvlm"], "isubg": {"mgat_layers": 6}}}, "model.isubg.mgat_layers"),
        ({"model": {"branches": ["cfrf", "isubg"], "xvlm": {"topk": 3}}}, "model.xvlm.topk"),
        ({"model": {"branches": ["isubg"], "fusion": {"fusion_ratio": 0.2}}}, "model.fusion.fusion_ratio"),
        ({"model": {"branches": ["isubg"], "fusion": {"holdout": 0.1}}}, "model.fusion.holdout"),
        ({"model": {"fusion": {"holdout": 0.1, "fusion_ratio": 0.0}}}, "model.fusion.holdout"),
        ({"model": {"cfrf": {"AOA_layers": 0, "aoa_norm": "post"}}}, "model.cfrf.aoa_norm"),
    ],
)
def test_changed_settings_that_cannot_act_are_flagged(data: dict, path: str) -> None:
    warnings = config_warnings(RunConfig.model_validate(data))
    assert any(w.path == path and "no effect" in w.message for w in warnings), warnings


def test_no_effect_rules_stay_quiet_at_defaults() -> None:
    # Branch settings at their defaults, and alpha/beta untouched under gumbel, say nothing.
    assert config_warnings(RunConfig.model_validate({"model": {"branches": ["cfrf"]}})) == []
    assert config_warnings(RunConfig.model_validate({"model": {"isubg": {"sampler_type": "gumbel"}}})) == []


def test_config_diff_lists_changed_paths_in_schema_order() -> None:
    a = default_config()
    b = RunConfig.model_validate({"train": {"lr": 1e-4}, "data": {"max_boxes": 36}})
    assert config_diff(a, b) == [("data.max_boxes", 50, 36), ("train.lr", 2.8e-4, 1e-4)]
    assert get_value(b, "train.lr") == 1e-4


def test_formatting() -> None:
    assert format_value(5e-5) == "5e-5"
    assert format_value(2.8e-4) == "0.00028"
    assert format_value(8.0) == "8.0"
    assert format_value(True) == "true"
    assert format_value(None) == "-"
    assert format_value(["cfrf", "xvlm"]) == "cfrf, xvlm"
    assert format_advice({"min": 10, "max": 50}) == "10-50"
    assert format_advice({"min": 1e-4, "max": 5e-4}) == "0.0001 .. 0.0005"
    assert format_advice({"choices": ["relu", "swish"]}) == "relu | swish"
