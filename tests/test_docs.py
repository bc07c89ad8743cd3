"""Generated documentation stays in step with the code."""

from __future__ import annotations

from pathlib import Path

from isubg.config import param_specs
from isubg.reference import render_reference

REPO = Path(__file__).resolve().parent.parent


def test_hyperparameter_reference_is_current() -> None:
    committed = (REPO / "docs" / "hyperparameters.md").read_text(encoding="utf-8")
    assert committed == render_reference(), "docs/hyperparameters.md is stale: run python scripts/gen_docs.py"


def test_reference_mentions_every_parameter() -> None:
    text = render_reference()
    for spec in param_specs().values():
        assert f"`{spec.name}`" in text
