"""What GPUs this machine has, asked of NVML (not torch), and which preset `--preset auto` picks for them.

`probe()` talks to the NVIDIA driver through nvidia-ml-py (module `pynvml`), imported inside the function, so
`isubg gpu` answers in well under a second and never imports torch. It never raises for a missing or broken
driver: `GpuProbe.error` says in one line why NVML is unusable, and every per-device field that a GPU or
driver does not support is None.

Indices are NVML's: PCI bus order, as `nvidia-smi` prints them. NVML ignores `CUDA_VISIBLE_DEVICES`; the probe
applies it itself (integer entries are read as NVML indices, `GPU-...` entries are matched by UUID prefix, and as
in CUDA the list ends at the first entry that matches nothing; an empty value hides every GPU) and marks each
device `visible`. CUDA numbers the visible GPUs fastest first unless `CUDA_DEVICE_ORDER=PCI_BUS_ID`, so on a
machine with mixed GPU models `cuda:N` need not be NVML index N; `GpuProbe.order_note` says so.

`choose_preset()` picks by the total memory of the largest visible GPU (total, not free: free memory changes
from second to second while other processes come and go):

- >= 20 GiB -> `24gb` (cards sold as 24 GB report ~23.6 GiB; 20 GiB also admits 20 GB cards with room to spare);
- >= 7 GiB (and < 20 GiB) -> `8gb` (cards sold as 8 GB report 7.6-8 GiB);
- a smaller GPU, or one whose memory NVML cannot read -> `low-memory`;
- no usable GPU -> `demo`: the only shipped preset sized for a CPU (a toy model that trains in minutes); the
  full model on a CPU would take days, so a user who wants it names a preset explicitly.

Sizes are binary throughout: `parse_memory_size` reads GB, G and GiB alike as 2**30 bytes, because GPU
memory is quoted that way (an "80GB" A100 holds 80 GiB).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any

from isubg.errors import ConfigError

__all__ = [
    "CPU_PRESET",
    "GIB",
    "MIN_8GB",
    "MIN_24GB",
    "GpuInfo",
    "GpuProbe",
    "PresetChoice",
    "choose_preset",
    "explain_nvml_error",
    "format_gib",
    "parse_memory_size",
    "probe",
    "resolve_auto_preset",
]

GIB = 2**30
MIN_24GB = 20 * GIB
MIN_8GB = 7 * GIB
CPU_PRESET = "demo"
GPU_SMALL_PRESET = "low-memory"


def format_gib(size: int | None) -> str:
    """`size` bytes as "12.3 GiB" ("?" when unknown)."""
    return "?" if size is None else f"{size / GIB:.1f} GiB"


# --------------------------------------------------------------------------------------------------
# The probe


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it; a field the GPU or driver cannot report is None.

    Attributes:
        index: NVML index (PCI bus order, as nvidia-smi).
        name: the product name, e.g. "NVIDIA H200".
        total_bytes, free_bytes, used_bytes: device memory (NVML's v2 figures where the driver has them).
        util_gpu, util_memory: percent of recent time a kernel ran / memory was read or written (not occupancy).
        compute_capability: "major.minor", e.g. "9.0".
        uuid, pci_bus_id: stable identifiers ("GPU-...", "00000000:3B:00.0").
        visible: whether CUDA_VISIBLE_DEVICES lets CUDA (and so torch) see it.
    """

    index: int
    name: str
    total_bytes: int | None = None
    free_bytes: int | None = None
    used_bytes: int | None = None
    util_gpu: int | None = None
    util_memory: int | None = None
    compute_capability: str | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    visible: bool = True


@dataclass(frozen=True)
class GpuProbe:
    """Everything `probe()` learnt: the driver, the devices, and why NVML could not be used (`error`).

    Attributes:
        devices: every GPU NVML sees, visible or not, by NVML index.
        driver_version: e.g. "550.54.15".
        cuda_driver_version: the newest CUDA the driver supports, e.g. "12.4".
        error: one line saying why NVML is unusable (no driver, driver not loaded, ...); None when it worked.
        visible: the CUDA_VISIBLE_DEVICES value (None when unset).
        order_note: how NVML indices relate to CUDA's `cuda:N` here.
        warnings: devices that could not be queried, CUDA_VISIBLE_DEVICES entries that match nothing.
    """

    devices: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    error: str | None = None
    visible: str | None = None
    order_note: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def visible_devices(self) -> list[GpuInfo]:
        """The devices CUDA_VISIBLE_DEVICES lets through."""
        return [d for d in self.devices if d.visible]

    def no_gpu_reason(self) -> str | None:
        """Why no GPU is usable, in one line; None when at least one is visible."""
        if self.error is not None:
            return self.error
        if not self.devices:
            return "the NVIDIA driver reports no GPUs"
        if not self.visible_devices:
            return f"CUDA_VISIBLE_DEVICES={self.visible!r} hides all {len(self.devices)} GPU(s)"
        return None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (`isubg gpu --json`)."""
        data = asdict(self)
        data["warnings"] = list(self.warnings)
        return data


_NVML_LIBRARY = {"win32": "nvml.dll", "darwin": "NVML (NVIDIA dropped macOS drivers)"}.get(
    sys.platform, "libnvidia-ml.so.1"
)

# By class name, so a binding that builds its NVMLError_* classes at import (as nvidia-ml-py does) and a test
# double are read the same way.
_NVML_EXPLANATIONS = {
    "NVMLError_LibraryNotFound": f"no NVIDIA driver ({_NVML_LIBRARY} not found)",
    "NVMLError_DriverNotLoaded": "the NVIDIA driver is installed but its kernel module is not loaded "
    "(load it with modprobe nvidia, or reboot)",
    "NVMLError_NoPermission": "no permission to query the NVIDIA driver (check access to /dev/nvidia*, "
    "or the container's GPU options)",
    "NVMLError_LibRmVersionMismatch": "the NVIDIA driver library and kernel module versions differ "
    "(the driver was upgraded without reloading the module; reboot)",
    "NVMLError_FunctionNotFound": "the NVIDIA driver is too old for this nvidia-ml-py (a function is missing)",
    "NVMLError_GpuIsLost": "a GPU has fallen off the bus or otherwise become inaccessible",
    "NVMLError_Uninitialized": "NVML was not initialised",
}


def explain_nvml_error(exc: BaseException) -> str:
    """A one-line, human explanation of an NVMLError (or of any exception NVML raised)."""
    name = type(exc).__name__
    if name in _NVML_EXPLANATIONS:
        return _NVML_EXPLANATIONS[name]
    try:
        detail = str(exc)
    except Exception:  # nvidia-ml-py's __str__ calls into the library, which may be what is broken
        detail = ""
    return f"NVML failed: {name}{': ' + detail if detail else ''}"


def _text(value: Any) -> str:
    """NVML strings arrive as str from current bindings and as bytes from old ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _optional(nvml: Any, function: str, *args: Any) -> Any:
    """`nvml.<function>(*args)`, or None when the driver, GPU or binding does not support it."""
    call = getattr(nvml, function, None)
    if call is None:
        return None
    try:
        return call(*args)
    except nvml.NVMLError:
        return None


def _memory(nvml: Any, handle: Any) -> Any:
    """Memory info, v2 first: v1's `used` also counts memory the driver reserves (drivers >= 515 have v2)."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except (nvml.NVMLError, TypeError):  # driver without the v2 call, or a binding without `version`
            pass
    return _optional(nvml, "nvmlDeviceGetMemoryInfo", handle)


def _device(nvml: Any, index: int, handle: Any) -> GpuInfo:
    """One device's facts; whatever the device cannot report stays None."""
    name = _optional(nvml, "nvmlDeviceGetName", handle)
    memory = _memory(nvml, handle)
    rates = _optional(nvml, "nvmlDeviceGetUtilizationRates", handle)
    capability = _optional(nvml, "nvmlDeviceGetCudaComputeCapability", handle)
    uuid = _optional(nvml, "nvmlDeviceGetUUID", handle)
    pci = _optional(nvml, "nvmlDeviceGetPciInfo", handle)
    bus_id = getattr(pci, "busId", None)
    return GpuInfo(
        index=index,
        name=_text(name) if name is not None else f"GPU {index}",
        total_bytes=_int_field(memory, "total"),
        free_bytes=_int_field(memory, "free"),
        used_bytes=_int_field(memory, "used"),
        util_gpu=_int_field(rates, "gpu"),
        util_memory=_int_field(rates, "memory"),
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        uuid=_text(uuid) if uuid is not None else None,
        pci_bus_id=_text(bus_id) if bus_id is not None else None,
    )


def _int_field(record: Any, field: str) -> int | None:
    value = getattr(record, field, None)
    return None if value is None else int(value)


def _match(token: str, devices: list[GpuInfo]) -> int | None:
    """The NVML index a CUDA_VISIBLE_DEVICES entry names, or None."""
    if re.fullmatch(r"[+-]?\d+", token):
        wanted = int(token)
        return wanted if any(d.index == wanted for d in devices) else None
    prefix = token if token.upper().startswith("GPU-") else f"GPU-{token}"
    hits = [d.index for d in devices if d.uuid and d.uuid.lower().startswith(prefix.lower())]
    return hits[0] if len(hits) == 1 else None  # CUDA rejects an ambiguous prefix too


def _apply_visible(value: str | None, devices: list[GpuInfo]) -> tuple[list[GpuInfo], list[str]]:
    """Mark devices by CUDA_VISIBLE_DEVICES; also return warnings for entries that match nothing."""
    if value is None:
        return devices, []
    chosen: list[int] = []
    warnings: list[str] = []
    for token in (t.strip() for t in value.split(",")):
        index = _match(token, devices) if token else None
        if index is None:
            # CUDA stops reading at the first entry that names no device; "-1" is the usual way to hide all.
            if token and not re.fullmatch(r"-\d+", token):
                kind = "a MIG instance, which isubg cannot size" if token.upper().startswith("MIG-") else "no GPU"
                warnings.append(
                    f"CUDA_VISIBLE_DEVICES entry {token!r} names {kind}; it and every entry after it are ignored"
                )
            break
        chosen.append(index)
    return [_with_visible(d, d.index in chosen) for d in devices], warnings


def _with_visible(device: GpuInfo, visible: bool) -> GpuInfo:
    return GpuInfo(**{**asdict(device), "visible": visible})


def _order_note(visible: str | None) -> str:
    """How NVML's indices relate to CUDA's `cuda:N` under the current environment."""
    pci_order = os.environ.get("CUDA_DEVICE_ORDER", "").upper() == "PCI_BUS_ID"
    note = (
        "Indices are NVML's (PCI bus order, as nvidia-smi); NVML ignores CUDA_VISIBLE_DEVICES. "
        "CUDA (torch cuda:N) numbers only the visible GPUs, fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID"
    )
    if pci_order:
        note += " (it is set, so cuda:N follows this order among the visible GPUs)."
    else:
        note += " (not set: with mixed GPU models cuda:N may not be the GPU with this index)."
    if visible and not pci_order and any(re.fullmatch(r"\d+", t.strip()) for t in visible.split(",")):
        note += " Integer CUDA_VISIBLE_DEVICES entries are read here as these NVML indices."
    return note


def probe(nvml: Any | None = None) -> GpuProbe:
    """Ask NVML what GPUs there are; never raises for a missing or broken driver (see `GpuProbe.error`).

    Args:
        nvml: the NVML binding to use; default `pynvml` (nvidia-ml-py). Tests pass a stand-in module object.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    note = _order_note(visible)
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            error = "nvidia-ml-py is not installed (no pynvml module): pip install nvidia-ml-py"
            return GpuProbe(error=error, visible=visible, order_note=note)
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError) as exc:
        return GpuProbe(error=explain_nvml_error(exc), visible=visible, order_note=note)
    try:
        return _query(nvml, visible, note)
    finally:
        with contextlib.suppress(nvml.NVMLError):  # nothing left to release; the facts are already read
            nvml.nvmlShutdown()


def _query(nvml: Any, visible: str | None, note: str) -> GpuProbe:
    """The probe after a successful nvmlInit."""
    driver = _optional(nvml, "nvmlSystemGetDriverVersion")
    cuda = _optional(nvml, "nvmlSystemGetCudaDriverVersion")
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        return GpuProbe(error=explain_nvml_error(exc), visible=visible, order_note=note)
    devices: list[GpuInfo] = []
    warnings: list[str] = []
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as exc:
            warnings.append(f"GPU {index} cannot be queried: {explain_nvml_error(exc)}")
            continue
        devices.append(_device(nvml, index, handle))
    devices, visible_warnings = _apply_visible(visible, devices)
    return GpuProbe(
        devices=tuple(devices),
        driver_version=_text(driver) if driver is not None else None,
        cuda_driver_version=f"{int(cuda) // 1000}.{int(cuda) % 1000 // 10}" if cuda else None,
        visible=visible,
        order_note=note,
        warnings=tuple(warnings + visible_warnings),
    )


# --------------------------------------------------------------------------------------------------
# Preset choice


@dataclass(frozen=True)
class PresetChoice:
    """The preset `--preset auto` stands for, and why.

    Attributes:
        name: a shipped preset name.
        reason: one line, e.g. "NVIDIA H200 with 139.8 GiB (>= 20 GiB) -> 24gb".
        device_bytes: the memory the choice was made on (total x fraction); None on CPU or unknown memory.
    """

    name: str
    reason: str
    device_bytes: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def choose_preset(probe: GpuProbe, fraction: float | None = None) -> PresetChoice:
    """Pick a preset by the largest visible GPU's total memory (thresholds in the module docstring).

    Args:
        probe: what `probe()` found.
        fraction: the share of that memory the run may use (e.g. memory.max_memory_usage); None means all.

    Raises:
        ConfigError: `fraction` is not in (0, 1].
    """
    if fraction is not None and not (0 < fraction <= 1):
        raise ConfigError(f"GPU memory fraction must be in (0, 1], got {fraction!r}")
    devices = probe.visible_devices
    if not devices:
        return PresetChoice(
            CPU_PRESET,
            f"no usable GPU: {probe.no_gpu_reason()} -> {CPU_PRESET}, the only preset sized for a CPU "
            "(a toy-sized model that trains in minutes); name a preset to train the full model",
            None,
        )
    sized = [d for d in devices if d.total_bytes is not None]
    if not sized:
        reason = f"{len(devices)} GPU(s) visible but NVML cannot read their memory -> {GPU_SMALL_PRESET} (safest)"
        return PresetChoice(GPU_SMALL_PRESET, reason, None)
    best = max(sized, key=lambda d: (d.total_bytes, -d.index))
    total = int(best.total_bytes or 0)
    usable = int(total * fraction) if fraction is not None else total
    if usable >= MIN_24GB:
        name, rule = "24gb", f">= {MIN_24GB // GIB} GiB"
    elif usable >= MIN_8GB:
        name, rule = "8gb", f">= {MIN_8GB // GIB} GiB, < {MIN_24GB // GIB} GiB"
    else:
        name, rule = GPU_SMALL_PRESET, f"< {MIN_8GB // GIB} GiB"
    amount = format_gib(total) + (f" x {fraction:g} = {format_gib(usable)}" if fraction is not None else "")
    lead = f"largest of {len(devices)} visible GPUs: GPU {best.index}, " if len(devices) > 1 else ""
    reason = f"{lead}{best.name} with {amount} ({rule}) -> {name}"
    if best.free_bytes is not None and best.free_bytes < usable * 0.5:
        reason += f"; only {format_gib(best.free_bytes)} free right now (other processes hold the rest)"
    return PresetChoice(name, reason, usable)


def resolve_auto_preset(name: str, *, nvml: Any | None = None) -> tuple[str, str | None]:
    """`(name, None)` for any preset but "auto"; for "auto", probe and return `(chosen, reason)`."""
    if name != "auto":
        return name, None
    choice = choose_preset(probe(nvml))
    return choice.name, choice.reason


# --------------------------------------------------------------------------------------------------
# Memory sizes

_UNITS = {
    "b": 1,
    **{u: 2**10 for u in ("k", "kb", "kib")},
    **{u: 2**20 for u in ("m", "mb", "mib")},
    **{u: 2**30 for u in ("g", "gb", "gib")},
    **{u: 2**40 for u in ("t", "tb", "tib")},
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([A-Za-z]*)\s*")


def parse_memory_size(text: str | int, what: str = "memory size") -> int:
    """Bytes in a size such as "8GB", "24GiB", "80G", "8192MB", "0.5TB" or "1024B".

    Units are binary and case-insensitive: K/KB/KiB = 2**10, M/MB/MiB = 2**20, G/GB/GiB = 2**30,
    T/TB/TiB = 2**40, B = 1. GB is read as GiB because GPU memory is quoted that way. An int is taken
    as bytes. A bare number is refused: "24" could mean bytes or GB.

    Args:
        text: the size.
        what: how the message names the setting, e.g. "--gpu-memory".

    Raises:
        ConfigError: not a positive size with a known unit.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"{what}: a memory size must be positive, got {text}")
        return text
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    unit = match.group(3).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{what}: {text!r} is not a memory size; write a number and a unit, e.g. 8GB, 24GiB, 80G, 8192MB "
            "or 0.5TB (units are binary: GB = GiB = 2**30 bytes)"
        )
    number = float(match.group(1) + (f"e{match.group(2)}" if match.group(2) else ""))
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise ConfigError(f"{what}: {text!r} is not a positive memory size of at least one byte")
    return round(size)
