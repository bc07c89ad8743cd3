"""CUDA paths: autocast precisions, the grad scaler, the allocator cap, evaluation on the GPU.

Every test is marked `gpu` and skips without CUDA; `scripts/gpu_check.sh` runs them on a GPU machine. The
logic behind each (precision choice, OOM recovery, checkpoint layout) is also tested on CPU elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_train import config, read_metrics, run

from isubg.checkpoint import load_checkpoint
from isubg.device import Precision, pick_device, pick_precision
from isubg.memory.measure import cuda_autocast_rule

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gqa(tiny_demo: Path) -> Path:
    return tiny_demo / "processed" / "gqa"


def test_mixed_precision_picks_bf16_on_a_bf16_gpu() -> None:
    device = pick_device("cuda")
    precision = pick_precision(device, True)
    native = torch.cuda.get_device_capability(device)[0] >= 8 or bool(torch.version.hip)
    expected = torch.bfloat16 if native else torch.float16
    assert precision.dtype == expected and precision.scaler == (expected == torch.float16)


def test_training_on_cuda_with_autocast_finishes_and_loads_on_cpu(gqa: Path, tmp_path: Path) -> None:
    result = run(config("epochs=2", "mixed_precision=true", "train.device=cuda"), tmp_path / "run", gqa)
    assert result.status == "finished"
    start = read_metrics(tmp_path / "run").records[0]
    assert start["device"].startswith("cuda") and start["precision"] in ("bf16", "fp16")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", map_location="cpu")
    assert all(v.device.type == "cpu" for v in state["model"].values())


def test_fp16_with_grad_scaler_trains_and_saves_the_scaler(
    gqa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import isubg.train as train_module

    forced = Precision(torch.float16, True, "fp16 + grad scaler (forced by the test)")
    monkeypatch.setattr(train_module, "pick_precision", lambda device, mixed: forced)
    result = run(config("mixed_precision=true", "train.device=cuda"), tmp_path / "run", gqa)
    assert result.status == "finished"
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["scaler"] and state["scaler"]["scale"] > 0


def test_resume_on_cuda_continues_from_the_checkpoint(gqa: Path, tmp_path: Path) -> None:
    cfg = config("epochs=2", "update_freq=2", "train.device=cuda")
    first = run(cfg, tmp_path / "run", gqa, stop_after_steps=2)
    assert first.status == "interrupted"
    second = run(cfg, tmp_path / "run", gqa, resume=True)
    assert second.status == "finished" and second.steps == 6


def test_peak_memory_is_the_cuda_allocators(gqa: Path, tmp_path: Path) -> None:
    torch.cuda.reset_peak_memory_stats()
    result = run(config("train.device=cuda"), tmp_path / "run", gqa)
    assert 0 < result.peak_memory_mib <= torch.cuda.get_device_properties(0).total_memory / 2**20


@pytest.mark.parametrize(
    "op",
    [
        lambda x, w: x.softmax(-1),
        lambda x, w: torch.nn.functional.layer_norm(x, (x.shape[-1],)),
        lambda x, w: x.sum(-1),
        lambda x, w: torch.exp(x),
        lambda x, w: torch.nn.functional.log_softmax(x, -1),
        lambda x, w: torch.nn.functional.binary_cross_entropy_with_logits(x, torch.ones_like(x)),
        lambda x, w: x @ w,
        lambda x, w: torch.nn.functional.linear(x, w),
        lambda x, w: torch.sigmoid(x),
    ],
    ids=["softmax", "layer_norm", "sum", "exp", "log_softmax", "bce_logits", "matmul", "linear", "sigmoid"],
)
def test_cpu_measurement_follows_cuda_autocast_dtypes(op: Callable[..., torch.Tensor]) -> None:
    """The memory measurement's CPU rule (cuda_autocast_rule) gives each op the output dtype CUDA autocast does."""
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, 8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        on_cuda = op(x.cuda(), w.cuda()).dtype
    with cuda_autocast_rule(), torch.autocast("cpu", dtype=torch.bfloat16):
        on_cpu = op(x, w).dtype
    assert on_cpu == on_cuda
