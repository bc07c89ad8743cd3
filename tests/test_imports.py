"""Import rules: the CLI front door never imports torch, and modules import only downwards."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "isubg"

# Lower layers never import higher ones (docs/design.md#layers: config/batch/metrics/device -> data, models,
# checkpoint, memory -> train/evaluate -> tune -> cli). Every module must be listed here.
LAYERS = {
    "isubg": 0,
    "isubg.yamlio": 0,
    "isubg.errors": 0,
    "isubg.branches": 0,
    "isubg.config": 1,
    "isubg.metrics": 1,
    "isubg.device": 1,
    "isubg.gpu": 1,
    "isubg.checkpoint": 3,
    "isubg.data.order": 3,
    "isubg.console": 2,
    "isubg.presets": 2,
    "isubg.batch": 2,
    "isubg.ablation": 3,
    "isubg.resolve": 3,
    "isubg.paramdocs": 4,
    "isubg.data": 2,
    "isubg.data.files": 2,
    "isubg.data.jsonstream": 2,
    "isubg.data.answers": 3,
    "isubg.data.text": 3,
    "isubg.data.features": 3,
    "isubg.data.questions": 3,
    "isubg.data.scene_graphs": 3,
    "isubg.data.tables": 3.5,
    "isubg.data.convert": 3,
    "isubg.data.inspect": 5,
    "isubg.data.prepare": 4,
    "isubg.data.dataset": 5,
    "isubg.data.synthetic": 3,
    "isubg.data.images": 3,
    "isubg.data.demo": 5,
    "isubg.data.embedded": 6,
    "isubg.data.loaders": 6,
    "isubg.models": 6,
    "isubg.models.common": 3,
    "isubg.models.sampler": 4,
    "isubg.models.cfrf": 5,
    "isubg.models.isubg": 5,
    "isubg.models.xvlm": 5,
    "isubg.models.xvlm_config": 4,
    "isubg.models.fusion": 5,
    "isubg.report": 7,
    "isubg.step": 6,
    "isubg.memory": 7,  # the package re-exports its modules, which import one another downwards:
    "isubg.memory.estimate": 3,
    "isubg.memory.inputs": 4,
    "isubg.memory.measure": 6.5,
    "isubg.memory.advice": 6.7,
    "isubg.memory.cuda": 6.7,
    "isubg.evaluate": 7,
    "isubg.loggers": 1,
    "isubg.runlog": 7,
    "isubg.train": 8,
    "isubg.plans": 4,
    "isubg.importers": 0,  # the package holds only KINDS; its modules:
    "isubg.importers.core": 3,
    "isubg.importers.ban": 4,
    "isubg.importers.xvlm": 6,
    "isubg.importers.mghr": 6.5,
    "isubg.importers.convert": 8.5,
    "isubg.tune_report": 8,
    "isubg.tune": 9,
    "isubg.cli": 10,
    "isubg.__main__": 11,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return LAYERS[name]
    raise AssertionError(f"{module} has no layer in tests/test_imports.py LAYERS")


def _isubg_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("isubg"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("isubg"))
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path: Path) -> None:
    module = _module_name(path)
    own = _layer(module)
    for imported in _isubg_imports(path):
        if imported == "isubg" or (imported.startswith(module.rsplit(".", 1)[0] + ".") and own == LAYERS["isubg.cli"]):
            continue  # the package root (version) and siblings inside the cli package
        assert _layer(imported) < own or imported == module, f"{module} (layer {own}) imports {imported}"


@pytest.mark.parametrize(
    "args",
    [
        None,
        ["--help"],
        ["preset", "list"],
        ["preset", "show", "8gb"],
        ["preset", "show", "8gb", "--json"],
        ["data", "--help"],
        ["tune", "--help"],
        ["tune", "plans"],
    ],
    ids=["import", "help", "list", "show", "show-json", "data-help", "tune-help", "tune-plans"],
)
def test_front_door_does_not_import_torch(args: list[str] | None) -> None:
    assert_torch_not_imported(args)


def assert_torch_not_imported(args: list[str] | None) -> None:
    """In a fresh interpreter, `import isubg.cli` (args None) or `isubg ARGS` succeeds without importing torch."""
    if args is None:
        code = "import sys, isubg, isubg.cli; print('torch' in sys.modules)"
    else:
        code = (
            "import sys; from typer.testing import CliRunner; from isubg.cli import app; "
            f"r = CliRunner().invoke(app, {args!r}); assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules)"
        )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
