"""Shared fixtures: a CLI runner, a YAML-writing helper and one tiny demo dataset for the whole session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def write_yaml(tmp_path: Path) -> Callable[[str, str], Path]:
    """write_yaml(name, text) -> path of a new file in tmp_path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return _write


@pytest.fixture
def h5py_opens(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """The keyword arguments of every `h5py.File(...)` call from here to the end of the test.

    Request it after the fixtures that write HDF5 files, so only the code under test is recorded.
    """
    import h5py

    opened: list[dict[str, object]] = []
    real = h5py.File

    def spy(*args: object, **kwargs: object) -> h5py.File:
        opened.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(h5py, "File", spy)
    return opened


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The root of a tiny demo build (processed/gqa and processed/vqa inside), built once per session."""
    from isubg.data.embedded import build_demo

    return build_demo(tmp_path_factory.mktemp("tiny-demo"), size="tiny", seed=0).root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-marked tests skip on machines without CUDA (torch is imported only if such tests exist)."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)
