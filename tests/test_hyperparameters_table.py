"""Walk the hyperparameter table (tests/data/HYPERPARAMETERS.md) and check the schema honours every row.

tests/data/HYPERPARAMETERS.md is the product's copy of the tuning guide's table: the contract between isubg
and the guide. It is kept verbatim, so its own references point outside this repository.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from isubg.config import ConfigError, guide_params, param_specs
from isubg.resolve import resolve_config

TABLE = Path(__file__).parent / "data" / "HYPERPARAMETERS.md"


def _rows() -> list[dict[str, str]]:
    rows = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("name", "") and not set(cells[0]) <= {"-"}:
            rows.append(dict(zip(("name", "default", "type", "meaning", "advice", "bound"), cells, strict=True)))
    return rows


ROWS = _rows()


def _value(name: str, sets: tuple[str, ...] = ()) -> Any:
    node: Any = resolve_config("default", sets=sets).config
    for part in guide_params()[name].split("."):
        node = getattr(node, part)
    return node


def _parse(text: str) -> Any:
    text = text.strip().strip("'")
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _rejects(name: str, value: Any) -> bool:
    try:
        resolve_config("default", sets=[f"{name}={value}"])
    except ConfigError:
        return True
    return False


def test_the_table_has_all_38_rows() -> None:
    assert len(ROWS) == 38


@pytest.mark.parametrize("row", ROWS, ids=[r["name"] for r in ROWS])
def test_row_is_in_the_schema_with_its_default_and_type(row: dict[str, str]) -> None:
    name = row["name"]
    assert name in guide_params(), f"{name} is missing from the schema"
    spec = param_specs()[guide_params()[name]]
    default = _parse(row["default"])
    if row["type"] == "0/1":
        assert spec.info.annotation is bool
        default = bool(default)
    expected_type = {"int": int, "float": float, "bool": bool}.get(row["type"])
    if expected_type is not None:
        assert spec.info.annotation is expected_type, f"{name}: {spec.info.annotation}"
    assert _value(name) == default
    assert spec.description, f"{name} has no description"


@pytest.mark.parametrize("row", ROWS, ids=[r["name"] for r in ROWS])
def test_row_advice_matches(row: dict[str, str]) -> None:
    advice = param_specs()[guide_params()[row["name"]]].advice or {}
    text = row["advice"]
    numeric = re.match(r"^([0-9.e-]+)\s*\.\.\s*([0-9.e-]+)|^([0-9.]+)-([0-9.]+)", text)
    if numeric:
        low, high = (g for g in numeric.groups() if g is not None)
        assert (advice.get("min"), advice.get("max")) == (float(low), float(high))
    elif text.startswith("'"):
        assert advice.get("choices") == [c.strip(" '") for c in text.split(",")]
    else:
        assert "min" not in advice


@pytest.mark.parametrize("row", ROWS, ids=[r["name"] for r in ROWS])
def test_row_hard_bound_is_enforced(row: dict[str, str]) -> None:
    name, bound = row["name"], row["bound"]
    is_int = row["type"] == "int"
    if m := re.match(r"^>=\s*([0-9.]+)", bound):
        edge = float(m.group(1))
        assert _rejects(name, int(edge) - 1 if is_int else edge - 1e-3)
        assert not _rejects(name, int(edge) if is_int else max(edge, 1e-3))
    elif m := re.match(r"^>\s*([0-9.]+)", bound):
        assert _rejects(name, m.group(1))
        assert not _rejects(name, float(m.group(1)) + 0.5)
    elif bound == "[0, 1)":
        assert _rejects(name, 1.0) and _rejects(name, -0.01) and not _rejects(name, 0.0)
    elif bound == "(0, 1]":
        assert _rejects(name, 0.0) and _rejects(name, 1.01) and not _rejects(name, 1.0)
    elif bound.startswith("one of"):
        assert _rejects(name, "not_a_real_choice")
    if row["type"] in ("bool", "0/1"):
        for false in ("False", "false", "0", "no", "off"):
            assert _value(name, (f"{name}=true", f"{name}={false}")) is False
        for true in ("True", "1", "yes"):
            assert _value(name, (f"{name}=false", f"{name}={true}")) is True
        assert _rejects(name, "2") and _rejects(name, "maybe")


def _preset_lines() -> dict[str, str]:
    text = TABLE.read_text(encoding="utf-8")
    block = text.split("## Presets the guide defines", 1)[1].split("\n## ", 1)[0]
    out, current = {}, None
    for line in block.splitlines():
        if m := re.match(r"^- `([\w-]+)`[^:]*:\s*(.*)", line):
            current = m.group(1)
            out[current] = m.group(2)
        elif current and line.startswith("  "):
            out[current] += " " + line.strip()
    return out


PRESETS = _preset_lines()


def test_every_guide_preset_is_parsed() -> None:
    assert set(PRESETS) == {
        "default", "memory-optimized", "high-performance", "throughput", "low-memory", "8gb", "24gb", "gqa", "vqa",
    }  # fmt: skip


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_has_the_guide_values(preset: str) -> None:
    cfg = resolve_config(preset).config
    spec = PRESETS[preset].rstrip(".")
    if spec.startswith("all defaults"):
        assert cfg == resolve_config("default").config
        return
    for item in spec.split(","):
        name, _, raw = item.strip().partition(" ")
        expected = _parse(raw) if raw else True
        node: Any = cfg
        for part in guide_params()[name].split("."):
            node = getattr(node, part)
        assert node == expected, f"{preset}: {name} is {node}, the guide says {expected}"
