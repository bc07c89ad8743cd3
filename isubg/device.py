"""Where a run computes and in which precision, and how much memory it holds.

`pick_device` turns `train.device` into a torch device; `pick_precision` decides what `memory.mixed_precision`
means on that device and says why, so the start banner can print the reason:

- CUDA with native bf16 (compute capability 8.0 and newer: Ampere, Hopper, ...; and ROCm): bf16 autocast, no
  grad scaler (bf16 has fp32's exponent range).
- Older CUDA (T4, V100, RTX 20xx): fp16 autocast with a GradScaler (fp16 gradients underflow without loss
  scaling). `torch.cuda.is_bf16_supported()` answers True on these cards too, as bf16 can be emulated there, but
  emulated bf16 runs far slower than fp16's tensor cores, so isubg asks for the capability instead.
- CPU with native bf16 instructions (AVX512-BF16 or AMX): bf16 autocast.
- Other CPUs: fp32. Their bf16 is emulated and measured ~7x slower than fp32 on an AVX2 machine, so autocast
  would cost time and save nothing worth having; the reason says so.

Memory readouts are MiB: CUDA allocator numbers on a GPU, the process's resident set on CPU.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from isubg.errors import ConfigError

__all__ = [
    "Precision",
    "configure_cuda_math",
    "cpu_has_native_bf16",
    "cuda_has_native_bf16",
    "memory_mib",
    "peak_memory_mib",
    "pick_device",
    "pick_precision",
    "prefer_expandable_segments",
    "reset_peak_memory",
]

_MIB = 1024 * 1024


def pick_device(setting: str) -> torch.device:
    """The device for `train.device` ("auto", "cpu", "cuda", "cuda:N"); a CUDA device always has its index.

    "auto" and "cuda" mean the current CUDA device (`torch.cuda.current_device()`, device 0 unless the process
    chose another), named with its index: several torch.cuda calls (`set_per_process_memory_fraction`, the memory
    statistics) reject a CUDA device without one.

    Raises:
        ConfigError: CUDA was asked for but is not available, or the index does not exist.
    """
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device is {setting!r} but this torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use device auto or cpu"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device is {setting!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


@dataclass(frozen=True)
class Precision:
    """What autocast does in this run.

    Attributes:
        dtype: the autocast dtype, or None for plain fp32.
        scaler: whether a GradScaler is needed (fp16 only).
        reason: one sentence for the banner.
    """

    dtype: torch.dtype | None
    scaler: bool
    reason: str

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """A context manager running the forward pass in this precision on `device`."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


ALLOCATOR_ENV = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def prefer_expandable_segments() -> bool:
    """Ask PyTorch's CUDA caching allocator for expandable segments unless the user configured it.

    Every batch has other box counts and scene-graph sizes, so the allocator's fixed-size blocks fragment and the
    reserved memory creeps above the allocated peak; expandable segments grow one mapping instead. It must be set
    before CUDA's first allocation (it has no effect afterwards, e.g. in a process that already used CUDA).
    Returns whether isubg set it (False: $PYTORCH_CUDA_ALLOC_CONF was already set and is left alone).
    """
    if os.environ.get(ALLOCATOR_ENV):
        return False
    os.environ[ALLOCATOR_ENV] = EXPANDABLE_SEGMENTS
    return True


def configure_cuda_math(tf32: bool) -> None:
    """Let float32 matrix products and cuDNN convolutions use TF32 tensor cores (`train.tf32`), or forbid it."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU executes bf16 natively (AVX512-BF16 or AMX-BF16); False where that cannot be read."""
    if not sys.platform.startswith("linux") or not cpuinfo.exists():
        return False
    flags = cpuinfo.read_text(encoding="utf-8", errors="replace").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: compute capability 8.0 or newer, or any ROCm device."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def pick_precision(
    device: torch.device,
    mixed: bool,
    *,
    cuda_bf16: Callable[[torch.device], bool] = cuda_has_native_bf16,
    cpu_bf16: Callable[[], bool] = cpu_has_native_bf16,
) -> Precision:
    """The precision for `memory.mixed_precision` on `device` (rules in the module docstring).

    The capability probes are arguments so the rules are tested on any machine.
    """
    if not mixed:
        return Precision(None, False, "fp32: memory.mixed_precision is off")
    if device.type == "cuda":
        if cuda_bf16(device):
            return Precision(torch.bfloat16, False, "bf16 autocast: mixed_precision on and this GPU has native bf16")
        return Precision(torch.float16, True, "fp16 autocast + grad scaler: this GPU has no native bf16")
    if device.type == "cpu" and cpu_bf16():
        return Precision(torch.bfloat16, False, "bf16 autocast: mixed_precision on and this CPU has native bf16")
    return Precision(
        None,
        False,
        f"fp32: mixed_precision is on, but this {device.type.upper()} has no native bf16 "
        "(emulated bf16 is several times slower than fp32), so autocast stays off",
    )


def memory_mib(device: torch.device) -> float:
    """Memory held now: CUDA tensors allocated on a GPU, the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / _MIB
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / _MIB
    except OSError:
        return peak_memory_mib(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory since the last reset (CUDA) or since the process started (CPU resident set)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak window (a no-op on CPU, whose peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
