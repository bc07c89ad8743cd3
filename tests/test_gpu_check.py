"""scripts/gpu_check.sh --dry-run (the GPU check's CPU smoke run, as CI runs it) and gpu_check.py's helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("environment", "tests", "memory", "throughput", "loader", "syncs", "train")


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


def test_matmul_flops_and_mfu() -> None:
    assert gpu_check.matmul_flops(2) == 16
    assert gpu_check.matmul_flops(1024) == 2 * 1024**3
    # 1e12 FLOP in 0.5 s is 2e12 FLOP/s: 20% of a 1e13 FLOP/s peak.
    assert gpu_check.flops_per_second(1e12, 0.5) == pytest.approx(2e12)
    assert gpu_check.mfu(1e12, 0.5, 1e13) == pytest.approx(0.2)
    assert gpu_check.mfu(1e12, 0.0, 1e13) is None
    assert gpu_check.mfu(1e12, 0.5, 0.0) is None


def test_relative_error() -> None:
    assert gpu_check.relative_error(110, 100) == pytest.approx(0.1)
    assert gpu_check.relative_error(90, 100) == pytest.approx(-0.1)
    assert gpu_check.relative_error(90, None) is None
    assert gpu_check.relative_error(None, 100) is None
    assert gpu_check.relative_error(90, 0) is None


def test_junit_counts(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="7" failures="1" errors="0" skipped="2">'
        "</testsuite></testsuites>"
    )
    assert gpu_check.junit_counts(xml) == {"tests": 7, "failures": 1, "errors": 0, "skipped": 2, "passed": 4}


def test_summary_table_lists_every_number_and_failure() -> None:
    results = {
        "dry_run": True,
        "sections": {
            "memory": {"status": "ok", "8gb": {"estimate_bytes": 123, "measured_bytes": None}, "seconds": 1.5},
            "train": {"status": "failed", "error": "boom", "first": {"exit_code": 1}},
        },
    }
    table = gpu_check.summary_table(results)
    assert "8gb.estimate_bytes" in table and "123" in table
    assert "8gb.measured_bytes" in table
    assert "first.exit_code" in table
    assert "ERROR: boom" in table
    assert "FAILED: train" in table


def _numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = os.environ | {"ISUBG_CACHE_DIR": str(tmp_path / "cache"), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [p for p in out.rglob("*")]
    assert len(files) <= 8, files
    assert {p.name for p in files} == {"summary.txt", "results.json", "junit.xml", "gpu_check.log"}
    assert list(tmp_path.glob("cache/*")) == [], "the dry run must keep generated data in its own temp folder"

    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True and results["failed"] == []
    assert tuple(results["sections"]) == SECTIONS
    for name in SECTIONS:
        section = results["sections"][name]
        assert section["status"] == "ok", (name, section)
        assert _numbers({k: v for k, v in section.items() if k != "seconds"}), f"{name} has no numbers"
    s = results["sections"]
    assert s["tests"]["failures"] == 0 and s["tests"]["errors"] == 0
    for preset in ("8gb", "24gb", "memory-optimized", "high-performance", "high-performance-grown"):
        assert s["memory"][preset]["estimate_bytes"] > 0
        assert s["memory"][preset]["measured_bytes"] is None  # no CUDA: estimate only
    assert s["throughput"]["fp32"]["samples_per_s"] > 0
    assert s["throughput"]["fp32"]["flops_per_step"] > 0
    assert 0 < s["throughput"]["fp32"]["mfu"] < 10
    assert s["loader"]["workers_0"]["samples_per_s"] > 0 and s["loader"]["workers_2"]["samples_per_s"] > 0
    assert s["syncs"]["dispatch_per_micro_batch"] >= 0
    assert s["train"]["first"]["exit_code"] == 0 and s["train"]["resume"]["exit_code"] == 0

    summary = (out / "summary.txt").read_text()
    assert "7 sections ok" in summary
    assert "fp32.mfu" in summary
    assert "== train" in (out / "gpu_check.log").read_text()


def test_gpu_check_without_cuda_fails_fast(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
