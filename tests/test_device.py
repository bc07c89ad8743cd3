"""Device and precision choice: the CUDA rules checked on any machine, with torch.cuda's probes faked."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from torch.cuda._utils import _get_device_index

from isubg.device import cuda_has_native_bf16, pick_device, pick_precision
from isubg.errors import ConfigError


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda answering as on a machine with two GPUs whose current device is 1 (capability 7.5 and 9.0)."""
    majors = {0: 7, 1: 9}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=majors[_get_device_index(device)])
    )
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("setting", ["auto", "cuda"])
def test_cuda_devices_carry_their_index(two_gpus: None, setting: str) -> None:
    device = pick_device(setting)
    assert device == torch.device("cuda", 1)
    # What torch.cuda.set_per_process_memory_fraction and the memory statistics do with the device: an
    # unindexed torch.device("cuda") raises here ("Expected a torch.device with a specified index").
    assert _get_device_index(device) == 1
    with pytest.raises(ValueError, match="specified index"):
        _get_device_index(torch.device("cuda"))


def test_an_explicit_index_is_kept_and_checked(two_gpus: None) -> None:
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        pick_device("cuda:2")


def test_without_cuda_auto_is_the_cpu_and_cuda_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        pick_device("cuda")


def test_bf16_only_where_the_gpu_computes_it_natively(two_gpus: None) -> None:
    # A T4/V100-class card (capability 7.x) emulates bf16: is_bf16_supported() says True, isubg takes fp16.
    assert not cuda_has_native_bf16(torch.device("cuda", 0))
    assert cuda_has_native_bf16(torch.device("cuda", 1))
    old = pick_precision(torch.device("cuda", 0), True)
    assert (old.dtype, old.scaler) == (torch.float16, True)
    new = pick_precision(torch.device("cuda", 1), True)
    assert (new.dtype, new.scaler) == (torch.bfloat16, False)
    assert pick_precision(torch.device("cuda", 1), False).dtype is None


def test_rocm_devices_use_bf16(two_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert pick_precision(torch.device("cuda", 0), True).dtype == torch.bfloat16


def test_tf32_setting_switches_the_cuda_math_mode() -> None:
    from isubg.device import configure_cuda_math

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_cuda_math(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        configure_cuda_math(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    from isubg.device import ALLOCATOR_ENV, prefer_expandable_segments

    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    assert prefer_expandable_segments()
    assert os.environ[ALLOCATOR_ENV] == "expandable_segments:True"
    monkeypatch.setenv(ALLOCATOR_ENV, "max_split_size_mb:128")
    assert not prefer_expandable_segments()
    assert os.environ[ALLOCATOR_ENV] == "max_split_size_mb:128"
