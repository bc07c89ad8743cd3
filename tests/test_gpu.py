"""GPU probing through NVML (a stand-in module here), the `--preset auto` choice, memory sizes and `isubg gpu`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from test_imports import assert_torch_not_imported
from typer.testing import CliRunner

import isubg.gpu as gpu_mod
from isubg.cli import app
from isubg.errors import ConfigError
from isubg.gpu import GIB, GpuInfo, GpuProbe, choose_preset, parse_memory_size, probe, resolve_auto_preset
from isubg.presets import list_presets

# --------------------------------------------------------------------------------------------------
# A stand-in for the pynvml module


class NVMLError(Exception):
    pass


def _error_class(name: str) -> type[NVMLError]:
    return type(f"NVMLError_{name}", (NVMLError,), {})


ERRORS = {
    name: _error_class(name)
    for name in (
        "LibraryNotFound",
        "DriverNotLoaded",
        "NoPermission",
        "LibRmVersionMismatch",
        "NotSupported",
        "FunctionNotFound",
        "Uninitialized",
        "GpuIsLost",
        "Timeout",
    )
}


@dataclass
class FakeGpu:
    name: str
    total_gib: float
    used_gib: float = 1.0
    util: tuple[int, int] | None = (30, 10)
    capability: tuple[int, int] = (8, 6)
    uuid: str = ""
    lost: bool = False


class FakeNvml:
    """Implements the calls isubg.gpu makes, with the same error classes pynvml builds at import."""

    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu] | None = None, init_error: str | None = None, v2: bool = True) -> None:
        self.gpus = gpus or []
        self.init_error = init_error
        self.count_error: str | None = None
        self.v2 = v2
        self.inits = self.shutdowns = 0
        self.memory_versions: list[Any] = []
        for name, cls in ERRORS.items():
            setattr(self, f"NVMLError_{name}", cls)
        if v2:
            self.nvmlMemory_v2 = 0x2000028

    def _live(self) -> None:
        if self.inits <= self.shutdowns:
            raise ERRORS["Uninitialized"]()

    def nvmlInit(self) -> None:
        if self.init_error:
            raise ERRORS[self.init_error]()
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._live()
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._live()
        if self.count_error:
            raise ERRORS[self.count_error]()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._live()
        if self.gpus[index].lost:
            raise ERRORS["GpuIsLost"]()
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu, version: Any = None) -> SimpleNamespace:
        self.memory_versions.append(version)
        if version is not None and self.v2 == "broken":
            raise ERRORS["FunctionNotFound"]()
        total, used = int(handle.total_gib * GIB), int(handle.used_gib * GIB)
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        if handle.util is None:
            raise ERRORS["NotSupported"]()
        return SimpleNamespace(gpu=handle.util[0], memory=handle.util[1])

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeGpu) -> tuple[int, int]:
        return handle.capability

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu("NVIDIA GeForce RTX 3070", 8, uuid="GPU-aaaa1111"),
            FakeGpu("NVIDIA A100-SXM4-80GB", 80, capability=(8, 0), uuid="GPU-bbbb2222"),
        ]
    )


@pytest.fixture(autouse=True)
def _clean_cuda_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)


# --------------------------------------------------------------------------------------------------
# probe


def test_no_devices() -> None:
    nvml = FakeNvml([])
    result = probe(nvml)
    assert result.devices == () and result.error is None
    assert result.no_gpu_reason() == "the NVIDIA driver reports no GPUs"
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_one_device_fields() -> None:
    nvml = FakeNvml([FakeGpu("NVIDIA GeForce RTX 4090", 24, used_gib=2, uuid="GPU-1234")])
    result = probe(nvml)
    (d,) = result.devices
    assert (d.index, d.name, d.uuid, d.compute_capability) == (0, "NVIDIA GeForce RTX 4090", "GPU-1234", "8.6")
    assert (d.total_bytes, d.used_bytes, d.free_bytes) == (24 * GIB, 2 * GIB, 22 * GIB)
    assert (d.util_gpu, d.util_memory, d.visible) == (30, 10, True)
    assert (result.driver_version, result.cuda_driver_version) == ("550.54.15", "12.4")
    assert nvml.memory_versions == [nvml.nvmlMemory_v2]  # v2 asked first and accepted
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


@pytest.mark.parametrize("v2", [False, "broken"], ids=["binding-without-v2", "driver-without-v2"])
def test_memory_falls_back_to_v1(v2: Any) -> None:
    nvml = FakeNvml([FakeGpu("old", 8)], v2=v2)
    (d,) = probe(nvml).devices
    assert d.total_bytes == 8 * GIB
    assert nvml.memory_versions[-1] is None


def test_utilisation_not_supported_is_none() -> None:
    (d,) = probe(FakeNvml([FakeGpu("NVIDIA T4", 15, util=None)])).devices
    assert d.util_gpu is None and d.util_memory is None
    assert d.total_bytes == 15 * GIB


class NoUuidNvml(FakeNvml):
    """A binding too old to have nvmlDeviceGetUUID."""

    def __getattribute__(self, name: str) -> Any:
        if name == "nvmlDeviceGetUUID":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_call_missing_from_binding_is_none() -> None:
    (d,) = probe(NoUuidNvml([FakeGpu("x", 8, uuid="GPU-1")])).devices
    assert d.uuid is None and d.name == "x" and d.total_bytes == 8 * GIB


def test_library_not_found() -> None:
    nvml = FakeNvml([FakeGpu("x", 8)], init_error="LibraryNotFound")
    result = probe(nvml)
    assert result.devices == ()
    assert result.error is not None and result.error.startswith("no NVIDIA driver")
    if sys.platform.startswith("linux"):
        assert "libnvidia-ml.so.1 not found" in result.error
    assert nvml.shutdowns == 0  # nothing to shut down after a failed init
    assert choose_preset(result).name == "demo"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("DriverNotLoaded", "kernel module is not loaded"),
        ("NoPermission", "no permission"),
        ("LibRmVersionMismatch", "versions differ"),
        ("Timeout", "NVML failed: NVMLError_Timeout"),
    ],
)
def test_init_errors_are_explained(error: str, expected: str) -> None:
    result = probe(FakeNvml([FakeGpu("x", 8)], init_error=error))
    assert result.error is not None and expected in result.error
    assert "\n" not in result.error


def test_count_error_still_shuts_down() -> None:
    nvml = FakeNvml([FakeGpu("x", 8)])
    nvml.count_error = "NoPermission"
    result = probe(nvml)
    assert result.error is not None and "no permission" in result.error
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_lost_device_is_skipped_with_a_warning() -> None:
    nvml = FakeNvml([FakeGpu("gone", 80, lost=True), FakeGpu("ok", 8)])
    result = probe(nvml)
    assert [d.index for d in result.devices] == [1]
    assert len(result.warnings) == 1 and "GPU 0" in result.warnings[0]


def test_real_pynvml_never_raises() -> None:
    result = probe()
    assert isinstance(result, GpuProbe)
    if result.error is not None:
        assert result.devices == ()


# --------------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES and ordering


@pytest.mark.parametrize(
    ("value", "visible", "warns"),
    [
        ("1", [1], False),
        ("1,0", [0, 1], False),
        ("", [], False),
        ("-1", [], False),
        ("0,7,1", [0], True),  # CUDA stops at the first entry naming no device
        ("GPU-bbbb2222", [1], False),
        ("bbbb", [1], False),  # a UUID prefix, with or without GPU-
        ("GPU-", [], True),  # ambiguous prefix
        ("MIG-1234", [], True),
    ],
)
def test_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch, value: str, visible: list[int], warns: bool) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    result = probe(two_gpus())
    assert [d.index for d in result.visible_devices] == visible
    assert len(result.devices) == 2 and result.visible == value
    assert bool(result.warnings) == warns


def test_everything_visible_when_unset() -> None:
    result = probe(two_gpus())
    assert result.visible is None and [d.index for d in result.visible_devices] == [0, 1]


def test_hidden_gpus_give_cpu_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = probe(two_gpus())
    assert "hides all 2 GPU(s)" in (result.no_gpu_reason() or "")
    assert choose_preset(result).name == "demo"


def test_visible_restriction_changes_the_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_preset(probe(two_gpus())).name == "24gb"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert choose_preset(probe(two_gpus())).name == "8gb"


def test_order_note(monkeypatch: pytest.MonkeyPatch) -> None:
    note = probe(two_gpus()).order_note
    assert "PCI bus order" in note and "ignores CUDA_VISIBLE_DEVICES" in note and "not set" in note
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert "it is set" in probe(two_gpus()).order_note


# --------------------------------------------------------------------------------------------------
# Preset choice


def _one(total: int | None, free: int | None = None, name: str = "GPU") -> GpuProbe:
    return GpuProbe(devices=(GpuInfo(0, name, total_bytes=total, free_bytes=free),))


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (20 * GIB, "24gb"),
        (20 * GIB - 1, "8gb"),
        (7 * GIB, "8gb"),
        (7 * GIB - 1, "low-memory"),
        (4 * GIB, "low-memory"),
        (8 * GIB, "8gb"),
        (24 * GIB, "24gb"),
        (80 * GIB, "24gb"),
    ],
)
def test_thresholds(total: int, expected: str) -> None:
    choice = choose_preset(_one(total, name="NVIDIA Test"))
    assert choice.name == expected
    assert choice.device_bytes == total
    assert choice.reason.startswith("NVIDIA Test with ") and choice.reason.endswith(f"-> {expected}")


def test_largest_device_wins() -> None:
    choice = choose_preset(probe(two_gpus()))
    assert choice.name == "24gb"
    assert "largest of 2 visible GPUs: GPU 1, NVIDIA A100-SXM4-80GB with 80.0 GiB (>= 20 GiB) -> 24gb" in choice.reason


def test_fraction_scales_the_memory() -> None:
    choice = choose_preset(_one(24 * GIB), fraction=0.5)
    assert choice.name == "8gb" and choice.device_bytes == 12 * GIB
    assert "24.0 GiB x 0.5 = 12.0 GiB" in choice.reason


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        choose_preset(_one(24 * GIB), fraction=fraction)


def test_little_free_memory_is_mentioned() -> None:
    assert "free right now" in choose_preset(_one(24 * GIB, free=2 * GIB)).reason
    assert "free right now" not in choose_preset(_one(24 * GIB, free=23 * GIB)).reason


def test_unknown_memory_gives_low_memory() -> None:
    choice = choose_preset(_one(None))
    assert choice.name == "low-memory" and choice.device_bytes is None


def test_every_choice_is_a_shipped_preset() -> None:
    names = {choose_preset(_one(t)).name for t in (4 * GIB, 8 * GIB, 24 * GIB, None)}
    names.add(choose_preset(GpuProbe()).name)
    assert names == {"low-memory", "8gb", "24gb", "demo"}
    assert names <= set(list_presets())


def test_resolve_auto_preset() -> None:
    nvml = FakeNvml([FakeGpu("NVIDIA H200", 139.8)])
    assert resolve_auto_preset("8gb", nvml=nvml) == ("8gb", None)
    assert nvml.inits == 0  # a named preset never probes
    name, reason = resolve_auto_preset("auto", nvml=nvml)
    assert name == "24gb" and reason == "NVIDIA H200 with 139.8 GiB (>= 20 GiB) -> 24gb"


# --------------------------------------------------------------------------------------------------
# Memory sizes


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("8GB", 8 * GIB),
        ("24GiB", 24 * GIB),
        ("80G", 80 * GIB),
        ("8192MB", 8 * GIB),
        ("0.5TB", 512 * GIB),
        ("1.5 gib", 3 * GIB // 2),
        ("512k", 512 * 1024),
        ("1024B", 1024),
        ("1e1GB", 10 * GIB),
        (" 16 GB ", 16 * GIB),
        (4096, 4096),
    ],
)
def test_parse_memory_size(text: str | int, size: int) -> None:
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "24", "8 XB", "-8GB", "0GB", "0.1B", "8GB8", "lots", "nanGB", 0, -5])
def test_parse_memory_size_rejects(text: str | int) -> None:
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_memory_size(text, "--gpu-memory")


# --------------------------------------------------------------------------------------------------
# isubg gpu


@pytest.fixture
def fake_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    real = gpu_mod.probe
    monkeypatch.setattr(gpu_mod, "probe", lambda nvml=None: real(two_gpus()))


@pytest.mark.usefixtures("fake_probe")
def test_cli_table(runner: CliRunner) -> None:
    result = runner.invoke(app, ["gpu"])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 3070", "80.0 GiB", "8.0", "Driver 550.54.15, CUDA 12.4"):
        assert text in out
    assert "PCI bus order" in out
    assert "--preset auto picks 24gb" in out and "No GPU visible" not in out


@pytest.mark.usefixtures("fake_probe")
def test_cli_json(runner: CliRunner) -> None:
    result = runner.invoke(app, ["gpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["name"] for d in data["devices"]] == ["NVIDIA GeForce RTX 3070", "NVIDIA A100-SXM4-80GB"]
    assert data["devices"][1]["total_bytes"] == 80 * GIB and data["error"] is None
    assert data["auto_preset"]["name"] == "24gb" and data["auto_preset"]["device_bytes"] == 80 * GIB


def test_cli_real_machine(runner: CliRunner) -> None:
    """On a machine without a driver (as the CI machines): one line, exit 0; with GPUs: the table."""
    expected = probe()
    table, as_json = runner.invoke(app, ["gpu"]), runner.invoke(app, ["gpu", "--json"])
    assert table.exit_code == 0 and as_json.exit_code == 0, table.output + as_json.output
    data = json.loads(as_json.stdout)
    assert data["error"] == expected.error and data["auto_preset"]["name"] == choose_preset(expected).name
    reason = expected.no_gpu_reason()
    if reason is not None:
        assert f"No GPU visible: {reason}; isubg trains on the CPU." in table.output
        assert data["devices"] == [] or not any(d["visible"] for d in data["devices"])
    else:
        assert "GPUs (NVML)" in table.output


@pytest.mark.parametrize("args", [["gpu"], ["gpu", "--json"]], ids=["table", "json"])
def test_cli_does_not_import_torch(args: list[str]) -> None:
    assert_torch_not_imported(args)
