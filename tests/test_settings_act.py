"""Every setting acts, enforced: each leaf of `model.*`, `data.*`, `train.*` and `memory.*` names a test that shows
its effect, or is exempt with a reason.

Where the effect is shown:

- the parametrised tables `EFFECTS` of tests/test_models.py and tests/test_model_isubg.py (one test case per row,
  the row's first item a guide name or dotted path, resolved as `--set NAME=...` resolves it);
- `SHOWN_BY` below: path -> "tests/test_x.py::test_name" or "tests/test_x.py::test_name[param-id]".

`EXEMPT` lists the settings that are not expected to change what a run computes (speed, where files go, logging),
each with a one-line reason. A test that only validates or parses a value is not an effect test. The tests at the
end of this file show the effects no other test showed.
"""

from __future__ import annotations

import ast
import io
import itertools
import json
import re
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from datafiles import split_adaptive_h5
from processed import question_records
from rich.console import Console

from isubg.config import RunConfig, param_specs
from isubg.data.dataset import collate
from isubg.data.loaders import open_split
from isubg.device import Precision
from isubg.errors import ConfigError
from isubg.models import build_model
from isubg.resolve import canonical_key, resolve_config
from isubg.step import apply_update, forward_backward
from isubg.train import Processes, ban_multiplier, make_trainer, train

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("model", "data", "train", "memory")

# Parametrised effect tables: file -> (table name, the test parametrised over it, one case per row).
TABLES = {
    "tests/test_models.py": ("EFFECTS", "test_every_model_hyperparameter_has_an_effect"),
    "tests/test_model_isubg.py": ("EFFECTS", "test_every_hyperparameter_has_an_effect"),
}

# Settings the tables above do not cover: path -> the test that shows the setting's effect.
SHOWN_BY: dict[str, str] = {
    "model.cfrf.box_input": "tests/test_importers.py::test_box_input_features_feeds_ban_the_raw_boxes",
    "model.xvlm.cross_width": "tests/test_importers.py::test_cross_width_sets_the_width_cross_attention_reads",
    "model.xvlm.vit_layout": "tests/test_importers.py::test_vit_layout_clip_computes_what_x_vlm_clip_vit_computes",
    "train.init_from": "tests/test_importers.py::test_cli_import_then_train_and_eval_start_from_it",
    "data.dataset": (
        "tests/test_cli_train.py::test_eval_exports_official_formats_that_score_like_the_official_scripts[vqa]"
    ),
    "data.root": "tests/test_memory.py::test_cli_uses_the_sizes_and_largest_graph_of_the_data",
    "data.demo_size": "tests/test_cli_train.py::test_no_arguments_means_the_demo_preset_on_the_cached_demo",
    "data.features": "tests/test_settings_act.py::test_data_features_names_the_feature_files_read",
    "data.image_root": "tests/test_model_xvlm.py::test_image_input_tells_the_dataset_what_to_load",
    "data.train_split": "tests/test_settings_act.py::test_splits_and_limits_choose_the_questions",
    "data.val_split": "tests/test_settings_act.py::test_splits_and_limits_choose_the_questions",
    "data.train_limit": "tests/test_settings_act.py::test_splits_and_limits_choose_the_questions",
    "data.val_limit": "tests/test_settings_act.py::test_splits_and_limits_choose_the_questions",
    "data.scene_graphs": "tests/test_prepare.py::test_detected_mode_gives_a_gqa_train_split_detector_graphs",
    "model.branches": "tests/test_models.py::test_any_subset_of_branches",
    "model.cfrf.counter_act": "tests/test_models.py::test_counter_activation_has_an_effect",
    "model.cfrf.aoa_norm": "tests/test_model_cfrf.py::test_every_setting_changes_the_output[aoa_norm-pre-post]",
    "model.xvlm.checkpoint": "tests/test_model_xvlm.py::test_build_loads_the_configured_checkpoint",
    "model.xvlm.xvlm_config": "tests/test_model_xvlm.py::test_use_swin_and_use_clip_vit_pick_the_image_encoder",
    "model.xvlm.text_encoder": "tests/test_model_xvlm.py::test_tokenizer_sees_the_raw_question",
    "model.xvlm.vision": "tests/test_model_xvlm.py::test_image_tokens_replace_the_region_tokens",
    "model.xvlm.image_res": "tests/test_model_xvlm.py::test_image_input_tells_the_dataset_what_to_load",
    "model.xvlm.hidden_size": (
        "tests/test_model_xvlm.py::test_size_hyperparameters_change_the_parameter_count[hidden_size-24]"
    ),
    "model.xvlm.num_heads": "tests/test_model_xvlm.py::test_num_heads_changes_the_output",
    "model.xvlm.num_text_layers": (
        "tests/test_model_xvlm.py::test_size_hyperparameters_change_the_parameter_count[num_text_layers-2]"
    ),
    "model.xvlm.num_cross_layers": (
        "tests/test_model_xvlm.py::test_size_hyperparameters_change_the_parameter_count[num_cross_layers-2]"
    ),
    "model.xvlm.intermediate_size": (
        "tests/test_model_xvlm.py::test_size_hyperparameters_change_the_parameter_count[intermediate_size-48]"
    ),
    "model.xvlm.max_tokens": "tests/test_model_xvlm.py::test_max_tokens_truncates_word_ids",
    "model.fusion.holdout": "tests/test_fusion.py::test_held_out_questions_train_the_fusion_weights_only",
    "train.epochs": "tests/test_train.py::test_run_directory_holds_config_metrics_log_summary_and_checkpoints",
    "train.lr": "tests/test_settings_act.py::test_each_optimizer_steps_at_its_learning_rate",
    "train.xvlm_lr": "tests/test_settings_act.py::test_each_optimizer_steps_at_its_learning_rate",
    "train.fusion_lr": "tests/test_train.py::test_fusion_weights_step_at_their_own_learning_rate[0.05]",
    "train.tf32": "tests/test_device.py::test_tf32_setting_switches_the_cuda_math_mode",
    "train.checkpoint_every": "tests/test_train.py::test_checkpoint_every_n_updates_writes_mid_epoch_checkpoints",
    "train.loggers": "tests/test_loggers.py::test_tensorboard_logger_writes_the_runs_curves",
    "train.batch_size": "tests/test_settings_act.py::test_batch_size_and_update_freq_set_the_optimizer_steps",
    "train.update_freq": "tests/test_settings_act.py::test_batch_size_and_update_freq_set_the_optimizer_steps",
    "train.seed": "tests/test_train.py::test_same_seed_same_weights_other_seed_other_weights",
    "train.schedule": "tests/test_settings_act.py::test_schedule_picks_the_main_learning_rate_rule",
    "train.patience": "tests/test_train.py::test_patience_stops_when_validation_accuracy_stops_improving",
    "memory.dynamic_batch_size": (
        "tests/test_train.py::test_out_of_memory_halves_the_micro_batch_and_keeps_every_update"
    ),
    "memory.max_memory_usage": "tests/test_memory.py::test_cli_json_verdict_per_preset",
    "memory.mixed_precision": (
        "tests/test_memory.py::test_mixed_precision_and_memory_efficient_attention_save_activations"
    ),
    "memory.memory_efficient_attention": (
        "tests/test_memory.py::test_mixed_precision_and_memory_efficient_attention_save_activations"
    ),
}

# Settings with no effect on what a run computes, by design: path -> why none is expected.
EXEMPT: dict[str, str] = {
    "data.num_workers": "loader processes only change speed; batches and their order come from the seeded EpochOrder",
    "data.in_memory": "reads the feature file into RAM instead of lazily from disk: speed and RAM, the same boxes",
    "train.output": "where the run directory goes, not what is trained in it",
    "train.device": "which hardware computes (CPU or a CUDA device), not what; results agree up to rounding",
    "train.log_every": "how often a step line is written to metrics.jsonl: logging only",
}

_REF = re.compile(r"^(tests/test_\w+\.py)::(\w+)(?:\[(.+)\])?$")


# --------------------------------------------------------------------------------------------------
# Reading test files with ast


@cache
def _module(file: str) -> ast.Module:
    return ast.parse((REPO / file).read_text(encoding="utf-8"), filename=file)


def _functions(file: str) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in _module(file).body if isinstance(node, ast.FunctionDef)}


def _assigned(file: str, name: str) -> ast.expr | None:
    """The value of a module-level `name = ...` (or `name: T = ...`) of `file`."""
    for node in _module(file).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node.value
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node.value
    return None


def _parametrize_calls(func: ast.FunctionDef) -> list[ast.Call]:
    return [
        d
        for d in func.decorator_list
        if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "parametrize"
    ]


def _argument(call: ast.Call, index: int, name: str) -> ast.expr | None:
    if len(call.args) > index:
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == name), None)


def _idval(value: Any, argname: str, index: int) -> str:
    """The id pytest derives from one parameter value (its rules for the types a literal can hold)."""
    if isinstance(value, str):
        return value.encode("unicode_escape").decode("ascii")
    if value is None or isinstance(value, (bool, int, float, complex)):
        return str(value)
    return f"{argname}{index}"


def _decorator_ids(file: str, call: ast.Call) -> list[str] | None:
    """The ids of one `@pytest.mark.parametrize`, or None where they cannot be read statically."""
    names_node, values_node = _argument(call, 0, "argnames"), _argument(call, 1, "argvalues")
    if names_node is None or values_node is None:
        return None
    try:
        names = ast.literal_eval(names_node)
    except ValueError:
        return None
    argnames = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    table = values_node.id if isinstance(values_node, ast.Name) else None
    if table is not None:
        values_node = _assigned(file, table)
    try:
        rows = list(ast.literal_eval(values_node)) if values_node is not None else None
    except ValueError:
        return None  # pytest.param(...), computed values
    if rows is None:
        return None
    ids_node = next((k.value for k in call.keywords if k.arg == "ids"), None)
    if ids_node is None:
        cases = [(row,) if len(argnames) == 1 else tuple(row) for row in rows]
        ids = ["-".join(_idval(v, n, i) for v, n in zip(case, argnames, strict=True)) for i, case in enumerate(cases)]
    elif isinstance(ids_node, (ast.List, ast.Tuple)):
        try:
            ids = [str(v) for v in ast.literal_eval(ids_node)]
        except ValueError:
            return None
    elif _is_first_items_of(ids_node, table):
        ids = [str(row[0]) for row in rows]
    else:
        return None
    return ids if len(set(ids)) == len(ids) else None  # pytest suffixes duplicates; not needed here


def _is_first_items_of(node: ast.expr, table: str | None) -> bool:
    """`[e[0] for e in TABLE]`: the ids are the first items of the table's rows."""
    if table is None or not isinstance(node, ast.ListComp) or len(node.generators) != 1:
        return False
    gen, elt = node.generators[0], node.elt
    return (
        isinstance(gen.iter, ast.Name)
        and gen.iter.id == table
        and isinstance(gen.target, ast.Name)
        and isinstance(elt, ast.Subscript)
        and isinstance(elt.value, ast.Name)
        and elt.value.id == gen.target.id
        and isinstance(elt.slice, ast.Constant)
        and elt.slice.value == 0
    )


def _test_ids(file: str, func: ast.FunctionDef) -> list[str] | None:
    """Every case id of a parametrised test (stacked decorators combine nearest first), None where unknown."""
    per_decorator = [_decorator_ids(file, call) for call in reversed(_parametrize_calls(func))]
    if any(ids is None for ids in per_decorator):
        return None
    return ["-".join(parts) for parts in itertools.product(*per_decorator)]  # type: ignore[arg-type]


def reference_problem(ref: str) -> str | None:
    """Why `ref` ("tests/test_x.py::test_name[id]") names no existing test, or None when it does."""
    match = _REF.match(ref)
    if not match:
        return "not written as tests/test_x.py::test_name or tests/test_x.py::test_name[param-id]"
    file, name, case = match.groups()
    if not (REPO / file).is_file():
        return f"{file} does not exist"
    func = _functions(file).get(name)
    if func is None:
        return f"{file} has no test function {name}"
    if case is None:
        return None
    if not _parametrize_calls(func):
        return f"{name} is not parametrised, so it has no case [{case}]"
    ids = _test_ids(file, func)
    if ids is not None and case not in ids:
        return f"{name} has no case [{case}] (its cases: {', '.join(ids)})"
    return None


# --------------------------------------------------------------------------------------------------
# The tables


def schema_leaves() -> list[str]:
    return [path for path in param_specs() if path.split(".")[0] in SECTIONS]


def table_effects() -> tuple[dict[str, list[str]], list[str]]:
    """Paths shown by the parametrised tables -> their test cases, and the problems found reading the tables."""
    shown: dict[str, list[str]] = {}
    problems: list[str] = []
    for file, (table, test) in TABLES.items():
        func = _functions(file).get(test)
        node = _assigned(file, table)
        if func is None or node is None:
            problems.append(f"{file}: no table {table} or no test {test}")
            continue
        values = [_argument(call, 1, "argvalues") for call in _parametrize_calls(func)]
        if not any(isinstance(v, ast.Name) and v.id == table for v in values):
            problems.append(f"{file}::{test} is not parametrised over {table}")
            continue
        ids = _test_ids(file, func)
        for row in ast.literal_eval(node):
            name = row[0]
            try:
                path = canonical_key(name, f"{file} {table}")
            except ConfigError as exc:
                problems.append(f"stale: {exc}")
                continue
            ref = f"{file}::{test}[{name}]" if ids is not None and name in ids else f"{file}::{test}"
            shown.setdefault(path, []).append(ref)
    return shown, problems


def test_every_setting_acts_or_is_exempt() -> None:
    leaves = schema_leaves()
    from_tables, problems = table_effects()
    shown = set(from_tables) | set(SHOWN_BY)
    for path in leaves:
        if path not in shown and path not in EXEMPT:
            problems.append(f"{path}: neither shown to act by a test nor exempt")
    for label, entries in (
        ("a table of tests/test_models.py or tests/test_model_isubg.py", from_tables),
        ("SHOWN_BY", SHOWN_BY),
        ("EXEMPT", EXEMPT),
    ):
        for path in entries:
            if path not in leaves:
                problems.append(f"stale: {path} in {label} is not a leaf of {', '.join(SECTIONS)}")
    for path in sorted(shown & set(EXEMPT)):
        where = SHOWN_BY.get(path) or from_tables[path][0]
        problems.append(f"{path}: exempt, but also shown to act by {where}")
    assert not problems, "\n".join(problems)


def test_every_effect_names_an_existing_test() -> None:
    from_tables, _ = table_effects()
    refs = set(SHOWN_BY.items())
    refs |= {(path, ref) for path, found in from_tables.items() for ref in found}
    problems = [f"{path}: {ref}: {why}" for path, ref in sorted(refs) if (why := reference_problem(ref))]
    assert not problems, "\n".join(problems)


def test_every_exemption_has_a_one_line_reason() -> None:
    assert all(reason.strip() and "\n" not in reason for reason in EXEMPT.values())


def test_the_checks_catch_missing_stale_doubled_and_dangling_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = {k: v for k, v in SHOWN_BY.items() if k != "train.seed"}
    shown["train.no_such_setting"] = "tests/test_train.py::test_same_seed_same_weights_other_seed_other_weights"
    exempt = {**EXEMPT, "train.patience": "a reason"}
    monkeypatch.setitem(globals(), "SHOWN_BY", shown)
    monkeypatch.setitem(globals(), "EXEMPT", exempt)
    with pytest.raises(AssertionError) as failure:
        test_every_setting_acts_or_is_exempt()
    message = str(failure.value)
    assert "train.seed: neither shown to act by a test nor exempt" in message
    assert "stale: train.no_such_setting in SHOWN_BY" in message
    assert "train.patience: exempt, but also shown to act by tests/test_train.py::test_patience" in message
    assert reference_problem("tests/test_train.py::test_no_such_test") == (
        "tests/test_train.py has no test function test_no_such_test"
    )
    assert "no case [gamma-9-9]" in str(
        reference_problem("tests/test_model_cfrf.py::test_every_setting_changes_the_output[gamma-9-9]")
    )
    assert reference_problem("tests/test_model_cfrf.py::test_every_setting_changes_the_output[gamma-1-2]") is None
    assert reference_problem("tests/test_models.py::test_every_model_hyperparameter_has_an_effect[gamma]") is None
    assert reference_problem("tests/test_nowhere.py::test_x") == "tests/test_nowhere.py does not exist"
    assert reference_problem("test_train.py::test_x") is not None  # not a path from the repository root


# --------------------------------------------------------------------------------------------------
# Effects no other test showed

# A CPU-sized cfrf model on the first 48 questions of the tiny demo: 6 micro-batches of 8 per epoch.
FAST = [
    "model.branches=[cfrf]", "num_hid=64", "AOA_layers=1", "data.train_limit=48", "data.val_limit=16",
    "batch_size=8", "update_freq=1", "epochs=1",
]  # fmt: skip
TINY_XVLM = [
    "model.xvlm.hidden_size=32", "model.xvlm.num_heads=2", "model.xvlm.intermediate_size=64",
    "model.xvlm.num_text_layers=1", "model.xvlm.num_cross_layers=1",
]  # fmt: skip


def config(*sets: str) -> RunConfig:
    return resolve_config("demo", sets=[*FAST, *sets]).config


def run(cfg: RunConfig, run_dir: Path, data: Path, **kwargs: Any) -> Any:
    return train(cfg, run_dir, data_dir=data, console=Console(file=io.StringIO()), **kwargs)


def start_record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def gqa(tiny_demo: Path) -> Path:
    return tiny_demo / "processed" / "gqa"


def test_each_optimizer_steps_at_its_learning_rate(gqa: Path) -> None:
    # The branches at train.lr (Adamax), the X-VLM branch at train.xvlm_lr (AdamW). No clipping, no weight decay:
    # the first step of either optimizer moves a parameter by its learning rate times the gradient's sign.
    sets = ["model.branches=[cfrf,xvlm]", *TINY_XVLM, "lr=1e-3", "xvlm_lr=1e-2", "optim.clip_norm=1e6"]
    cfg = config(*sets, "optim.xvlm_weight_decay=0")
    data = open_split(cfg, gqa, "train", 8)
    torch.manual_seed(0)
    model = build_model(cfg, data.spec())
    t = make_trainer(cfg, model, 1, torch.device("cpu"), Precision(None, False, "fp32"), Processes())
    forward_backward(t, collate([data[i] for i in range(8)], data.num_answers), 1.0, sync=True)
    before = {id(p): (p.detach().clone(), p.grad.abs() > 1e-4) for p in model.parameters() if p.grad is not None}
    apply_update(t)
    for branch, lr in (("cfrf", 1e-3), ("xvlm", 1e-2)):
        params = [p for p in model.branches[branch].parameters() if id(p) in before]
        steps = torch.cat([(p.detach() - before[id(p)][0]).abs()[before[id(p)][1]] for p in params])
        assert steps.numel() > 100, branch
        torch.testing.assert_close(steps, torch.full_like(steps, lr), rtol=1e-3, atol=0.0, msg=branch)


@pytest.mark.parametrize("schedule", ["ban", "constant"])
def test_schedule_picks_the_main_learning_rate_rule(gqa: Path, schedule: str) -> None:
    cfg = config(f"train.schedule={schedule}", "lr=1e-3", "epochs=20")
    model = build_model(cfg, open_split(cfg, gqa, "train", 8).spec())
    t = make_trainer(cfg, model, 3, torch.device("cpu"), Precision(None, False, "fp32"), Processes())
    rates = []
    for _ in range(60):  # 20 epochs of 3 steps; no gradients, so the optimizer steps move nothing
        rates.append(t.optimizers.lr("main"))
        t.optimizers.main.step()
        t.schedule.step()
    rule = [ban_multiplier(step, 3, 20) if schedule == "ban" else 1.0 for step in range(60)]
    assert rates == pytest.approx([1e-3 * m for m in rule], rel=1e-12)
    assert (len(set(rates)) == 1) is (schedule == "constant")  # BAN warms up, holds, then decays


def test_batch_size_and_update_freq_set_the_optimizer_steps(gqa: Path, tmp_path: Path) -> None:
    # 48 questions: micro-batches of batch_size, one optimizer step every update_freq micro-batches.
    steps = {}
    for sets in [(), ("batch_size=16",), ("update_freq=3",), ("batch_size=16", "update_freq=3")]:
        run_dir = tmp_path / "-".join(sets or ("base",))
        steps[sets] = run(config(*sets), run_dir, gqa).steps
        assert start_record(run_dir)["effective_batch"] == 8 * (2 if "batch_size=16" in sets else 1) * (
            3 if "update_freq=3" in sets else 1
        )
    assert list(steps.values()) == [6, 3, 2, 1]


def test_splits_and_limits_choose_the_questions(gqa: Path, tmp_path: Path) -> None:
    runs = itertools.count()

    def sizes(*sets: str) -> tuple[int, int]:
        run_dir = tmp_path / f"run{next(runs)}"
        run(config(*sets), run_dir, gqa, stop_after_steps=1)
        start = start_record(run_dir)
        return start["train_size"], start["val_size"]

    count = {s: len(question_records(gqa, s)) for s in ("train", "val", "testdev")}
    assert len(set(count.values())) == 3, count  # the splits tell apart by their sizes
    whole = ["data.train_limit=null", "data.val_limit=null"]
    assert sizes() == (48, 16)
    assert sizes("data.train_limit=20", "data.val_limit=8") == (20, 8)
    assert sizes(*whole) == (count["train"], count["val"])
    assert sizes(*whole, "data.train_split=val", "data.val_split=testdev") == (count["val"], count["testdev"])


def test_data_features_names_the_feature_files_read(gqa: Path, tmp_path: Path) -> None:
    source = Path(json.loads((gqa / "manifest.json").read_text())["features"]["path"])
    other = tmp_path / "other.h5"
    shutil.copyfile(source, other)
    with h5py.File(other, "r+") as f:
        f["image_features"][...] = 2 * f["image_features"][...]
    plain = open_split(config(), gqa, "train", 4)
    doubled = open_split(config(f"data.features={other}"), gqa, "train", 4)
    for i in range(4):
        np.testing.assert_allclose(doubled[i].features, 2 * plain[i].features, rtol=1e-6)
        np.testing.assert_array_equal(doubled[i].spatials, plain[i].spatials)
    # A list: the images split over two shards, scaled by 2 and 3, so each read tells which shard it came from.
    with h5py.File(source, "r", locking=False) as f:  # the store under test may hold it open
        ids = [v.decode() for v in f["image_ids"][()]]
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    split_adaptive_h5(source, {a: ids[::2], b: ids[1::2]}, scale={a: 2.0, b: 3.0})
    sharded = config(f"data.features=[{a}, {b}]", "data.num_workers=2")
    shards = open_split(sharded, gqa, "train", None)
    plain = open_split(config(), gqa, "train", None)
    factors = set()
    for i in range(len(plain)):
        factor = 2.0 if shards.records[i]["image_id"] in ids[::2] else 3.0
        np.testing.assert_allclose(shards[i].features, factor * plain[i].features, rtol=1e-6)
        factors.add(factor)
    assert factors == {2.0, 3.0}
    run_dir = tmp_path / "run"
    run(sharded, run_dir, gqa, stop_after_steps=2)  # a run reads them too, through forked loader workers
    assert start_record(run_dir)["train_size"] == 48
