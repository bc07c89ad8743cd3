"""The wheel carries the presets, and an installed copy finds them through importlib.resources."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # builds and installs a wheel in subprocesses


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{result.stderr[-2000:]}")
    (path,) = out.glob("isubg-*.whl")
    return path


def test_wheel_ships_every_preset_and_tuning_plan(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in (REPO / "presets").glob("*.yaml"):
        assert f"isubg/_presets/{preset.name}" in names
    plans = list((REPO / "presets" / "plans").glob("*.yaml"))
    assert len(plans) == 6
    for plan in plans:
        assert f"isubg/_presets/plans/{plan.name}" in names
    assert "isubg/cli/preset.py" in names


def test_installed_wheel_finds_presets_via_importlib_resources(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import isubg, isubg.presets as p; from isubg.resolve import resolve_config; "
        "print(isubg.__file__); print(p.preset_dir()); print(resolve_config('8gb').config.effective_batch)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    module_file, preset_dir, batch = result.stdout.split()
    assert module_file.startswith(str(site)) and preset_dir == str(site / "isubg" / "_presets")
    assert batch == "256"
