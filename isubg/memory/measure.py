"""Measured activation memory: the bytes autograd saves for backward, counted on a real model.

`estimate(cfg)` builds the model of a config (weights zero: only shapes matter) and runs forward + loss of the
worst-case batch (isubg.memory.inputs) at B = 1 and B = 2 under `saved_tensors_hooks`, each storage counted
once; the difference gives bytes per sample and the intercept the fixed bytes (autocast's low-precision weight
copies are fixed bytes). Saved tensors are charged to the branch whose forward saved them; the loss and the
fusion's own to "fusion". With memory.mixed_precision the passes run under bf16 autocast (fp16 saves the same
bytes); with memory.memory_efficient_attention the model takes its checkpointed / SDPA / chunked code paths,
so what checkpointing keeps (segment inputs) is what gets counted. With checkpointing, backward re-runs one
segment at a time and holds its saved tensors for the moment: each checkpointed module is re-run outside the
checkpoint to measure the largest segment.

The passes run on the CPU with real tensors; matrix products return zeros of the right shape instead of
computing (saved bytes depend on shapes, not values; a test checks the counts equal a fully computed run).
CPU autocast keeps a few ops in another precision than CUDA autocast: CUDA runs softmax, layer_norm, sum, exp,
the losses and the other ops of CUDA_FP32_OPS in float32 (their outputs, and the float32 copies of their inputs,
are what backward saves), CPU keeps them in bf16. The passes on the CPU apply CUDA's rule (`cuda_autocast_rule`),
since the estimate sizes a GPU. CUDA kernels (cuDNN GRU, flash attention) still save slightly different buffers;
`isubg.memory.cuda.measure_peak_cuda` measures the real peak.

This is the only module of isubg that relies on private or unstable torch APIs, listed in PRIVATE_TORCH_APIS.
They were checked on torch TESTED_TORCH (hence the `torch<2.14` pin in pyproject.toml); `check_torch()` warns
on another release and fails clearly when one of them is gone. Whoever upgrades torch re-runs
tests/test_memory.py and checks these lines.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from isubg.batch import Batch, DataSpec
from isubg.config import RunConfig
from isubg.errors import ConfigError
from isubg.memory.estimate import BranchMemory, Linear, MemoryEstimate, WorstCase, optimizer_name
from isubg.memory.inputs import batch_tensors, synthetic_spec, worst_case_batch
from isubg.models import build_model
from isubg.models.fusion import FusedModel

__all__ = [
    "CUDA_FP32_OPS",
    "PRIVATE_TORCH_APIS",
    "TESTED_TORCH",
    "build_for_measure",
    "check_torch",
    "cuda_autocast_rule",
    "estimate",
    "measure_model",
]

TESTED_TORCH = "2.13"  # the torch release (major.minor) these measurements were checked on; pyproject pins <2.14
# The private or unstable torch APIs this module uses: (where, name).
PRIVATE_TORCH_APIS: tuple[tuple[str, str], ...] = (
    ("torch._C._autograd", "_top_saved_tensors_default_hooks"),  # is a checkpoint's pack hook active?
    ("torch.utils._python_dispatch", "TorchDispatchMode"),  # matrix products return zeros of their shape
    ("torch.overrides", "TorchFunctionMode"),  # random initialisation becomes zeros; CUDA's float32 ops
)
# The ops CUDA autocast runs in float32 whatever their input dtype (torch's autocast op reference, "CUDA Ops
# that can autocast to float32"), by the Python name they are called by; CPU autocast runs most of them in the
# input's dtype (bf16 after a bf16 matrix product).
CUDA_FP32_OPS: frozenset[str] = frozenset(
    {
        "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits",
        "cosh", "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum",
        "dist", "erfinv", "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss",
        "layer_norm", "log", "log_softmax", "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss",
        "multilabel_margin_loss", "multi_margin_loss", "nll_loss", "norm", "normalize", "pdist",
        "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh", "smooth_l1_loss", "soft_margin_loss",
        "softmax", "softmin", "softplus", "sum", "renorm", "tan", "triplet_margin_loss",
    }
)  # fmt: skip


def check_torch(version: str | None = None) -> None:
    """Warn when torch is not the release the measurement was checked on; fail when a private API it uses is gone.

    Raises:
        ConfigError: one of PRIVATE_TORCH_APIS is missing from this torch.
    """
    version = torch.__version__ if version is None else version
    for module, name in PRIVATE_TORCH_APIS:
        if not hasattr(importlib.import_module(module), name):
            raise ConfigError(
                f"the memory measurement needs {module}.{name}, which torch {version} does not have; it was checked "
                f"on torch {TESTED_TORCH} (pyproject pins torch<2.14): install that, or port isubg/memory/measure.py"
            )
    if not version.startswith(TESTED_TORCH + "."):
        warnings.warn(
            f"isubg's memory measurement relies on private torch APIs checked on torch {TESTED_TORCH}, not "
            f"{version}; if the estimates look wrong, see isubg/memory/measure.py",
            RuntimeWarning,
            stacklevel=2,
        )


def estimate(
    cfg: RunConfig, spec: DataSpec | None = None, worst: WorstCase | None = None, *, device: str = "cpu"
) -> MemoryEstimate:
    """The memory model of `cfg` (isubg.memory.estimate): builds the model once and measures two small passes.

    Args:
        spec: the real data's sizes (VQADataset.spec()); None: synthetic sizes for cfg.data.dataset.
        worst: the worst-case input; None: `WorstCase.for_config(cfg, spec)` (the default graph bound).
        device: where the measurement passes run ("cpu"; a CUDA device measures CUDA's own kernels).

    Raises:
        ConfigError / DataError: the model cannot be built for this config and data, or this torch lacks an API
            the measurement needs.
    """
    check_torch()
    worst = worst if worst is not None else WorstCase.for_config(cfg, spec)
    spec = spec if spec is not None else synthetic_spec(cfg, worst)
    return measure_model(build_for_measure(cfg, spec, device), cfg, spec, worst)


def build_for_measure(cfg: RunConfig, spec: DataSpec, device: str = "cpu") -> nn.Module:
    """The model of `cfg` in training mode on `device`, its weights zero (only its shapes matter here)."""
    with torch.random.fork_rng(devices=[]), _zero_init_class()():
        torch.manual_seed(0)
        return build_model(cfg, spec).to(device).train()


_RANDOM_INITS = frozenset(
    {"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_"}
)


@cache
def _zero_init_class() -> type:
    """A torch-function mode that turns random weight initialisation into zeros, for `build_for_measure`.

    Drawing the random numbers took most of a full-size build (about 4 of 6 s for the default preset); the
    memory measurement reads shapes, never weight values, and zeros keep every op finite.
    """

    class ZeroInit(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") in _RANDOM_INITS:
                tensor = args[0] if args else kwargs["tensor"]
                with torch.no_grad():
                    return tensor.zero_()
            return func(*args, **kwargs)

    return ZeroInit


def measure_model(model: FusedModel, cfg: RunConfig, spec: DataSpec, worst: WorstCase) -> MemoryEstimate:
    """`estimate` with the model already built for `cfg` (precision and input sizes may differ from its build)."""
    device = next(model.parameters()).device
    image_res = getattr(model.branch("xvlm"), "image_res", None)  # pixels only for an X-VLM image encoder
    dtype = torch.bfloat16 if cfg.memory.mixed_precision else None
    with _measurement_threads(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        passes = [
            _measure_pass(model, worst_case_batch(spec, worst, b, image_res=image_res, seed=b).to(device), dtype)
            for b in (1, 2)
        ]
    branches = []
    for name, module in [*model.branches.items(), ("fusion", None)]:
        weights, trainable = _weight_bytes(model, module)
        branches.append(
            BranchMemory(
                name=name,
                weights=weights,
                trainable=trainable,
                optimizer=optimizer_name(name),
                activations=Linear.fit(passes[0].saved.get(name, 0), passes[1].saved.get(name, 0)),
                recompute=Linear.fit(passes[0].recompute.get(name, 0), passes[1].recompute.get(name, 0)),
            )
        )
    return MemoryEstimate(
        cfg=cfg,
        spec=spec,
        worst=worst,
        branches=tuple(branches),
        inputs=Linear.fit(passes[0].inputs, passes[1].inputs),
        autocast_cache=max(p.autocast_cache for p in passes),
        precision="bf16 autocast" if dtype is not None else "fp32",
        memory_efficient=cfg.memory.memory_efficient_attention,
    )


def _weight_bytes(model: nn.Module, branch: nn.Module | None) -> tuple[int, int]:
    """(parameter + buffer bytes, trainable parameter bytes) of a branch, or of the fusion's own weights."""
    if branch is None:  # the fusion: the model's parameters that belong to no branch
        inside = {id(p) for b in model.branches.values() for p in b.parameters()}
        params = [p for p in model.parameters() if id(p) not in inside]
        buffers: list[Any] = []
    else:
        params, buffers = list(branch.parameters()), list(branch.buffers())
    weights = sum(t.numel() * t.element_size() for t in [*params, *buffers])
    return weights, sum(p.numel() * p.element_size() for p in params if p.requires_grad)


@contextlib.contextmanager
def _measurement_threads() -> Iterator[None]:
    """One intra-op thread during the small passes: they gain nothing from threads, and a busy machine's
    oversubscribed thread pool made them 5-10x slower (measured on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Pass:
    """Saved bytes per owner (branch or "fusion"), largest checkpointed segment per owner, input bytes, and the
    autocast weight copies that were not saved for backward (held by autocast's cache until the forward ends)."""

    saved: dict[str, int]
    recompute: dict[str, int]
    inputs: int
    autocast_cache: int


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class _Meter:
    """Counts the storages autograd saves, once each, charged to the branch whose forward is running.

    Storages in `exclude` (weights, the batch, storages already counted) are not charged. Module pre-hooks
    also record the outermost module called inside someone else's saved-tensor hooks: that is a
    torch.utils.checkpoint segment, re-run later to measure what its recomputation holds.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.seen: dict[int, tuple[int, str]] = {}
        self.owner = "fusion"
        self.segments: list[tuple[str, nn.Module, tuple[Any, ...], dict[str, Any]]] = []
        self._inside: nn.Module | None = None

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage_key(tensor)
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen[ptr] = (nbytes, self.owner)
        return tensor

    def hooks(self, model: nn.Module) -> contextlib.ExitStack:
        """Forward hooks that track the running branch and record checkpointed segments."""
        stack = contextlib.ExitStack()
        for name, branch in model.branches.items():
            pre = branch.register_forward_pre_hook(lambda _m, _a, n=name: setattr(self, "owner", n))
            post = branch.register_forward_hook(lambda _m, _a, _o: setattr(self, "owner", "fusion"))
            stack.callback(pre.remove)
            stack.callback(post.remove)
            for module in branch.modules():
                if module is not branch:
                    stack.callback(module.register_forward_pre_hook(self._enter, with_kwargs=True).remove)
                    stack.callback(module.register_forward_hook(self._leave).remove)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack))
        return stack

    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._inside is not None or not torch.is_grad_enabled():
            return
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is not None and getattr(top[0], "__self__", None) is not self:
            self._inside = module
            self.segments.append((self.owner, module, args, kwargs))

    def _leave(self, module: nn.Module, _args: Any, _out: Any) -> None:
        if module is self._inside:
            self._inside = None

    def total(self, owner: str | None = None) -> int:
        return sum(n for n, who in self.seen.values() if owner is None or who == owner)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _measure_pass(model: nn.Module, batch: Batch, dtype: torch.dtype | None) -> _Pass:
    """Forward + loss of `batch` under saved-tensor hooks (module docstring); nothing is kept afterwards."""
    inputs = {_storage_key(t) for t in batch_tensors(batch)}
    exclude = {_storage_key(t)[0] for t in [*model.parameters(), *model.buffers()]} | {p for p, _ in inputs}
    weights = {_storage_key(t)[0] for t in model.parameters()}
    meter, mode = _Meter(exclude), _shapes_only(weights)
    device_type = batch.features.device.type
    autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)
    # the estimate sizes a GPU: on the CPU, autocast follows CUDA's float32 rule (module docstring)
    rule = cuda_autocast_rule() if device_type == "cpu" else contextlib.nullcontext()
    with rule, mode, meter.hooks(model):
        with autocast:
            output = model(batch)
        loss, _ = model.loss(output, batch.targets)
    owners = {*model.branches.keys(), "fusion"}
    saved = {owner: meter.total(owner) for owner in owners}
    recompute: dict[str, int] = {}
    counted = exclude | set(meter.seen)
    for owner, module, args, kwargs in meter.segments:
        segment = _Meter(counted)
        hooks = torch.autograd.graph.saved_tensors_hooks(segment.pack, _unpack)
        rule = cuda_autocast_rule() if device_type == "cpu" else contextlib.nullcontext()
        with rule, _shapes_only(weights), autocast, hooks:
            module.forward(*args, **kwargs)
        recompute[owner] = max(recompute.get(owner, 0), segment.total())
    cached = sum(n for ptr, n in mode.casts.items() if ptr not in meter.seen)
    del output, loss
    return _Pass(saved=saved, recompute=recompute, inputs=sum(n for _, n in inputs), autocast_cache=cached)


@cache
def _shapes_only_class() -> type:
    """The dispatch mode class (built once: it closes over the aten ops it emulates)."""
    aten = torch.ops.aten
    # output shape of each product from its matrix operands' shapes (the bias of addmm/baddbmm broadcasts)
    products = {
        aten.mm.default: lambda a, b: (a[0], b[1]),
        aten.addmm.default: lambda a, b: (a[0], b[1]),
        aten.bmm.default: lambda a, b: (a[0], a[1], b[2]),
        aten.baddbmm.default: lambda a, b: (a[0], a[1], b[2]),
    }

    class ShapesOnly(TorchDispatchMode):
        """Matrix products return zeros of their (contiguous) output shape instead of computing.

        What autograd saves depends on shapes and dtypes only, so the counts are unchanged and the passes
        run several times faster (most of their time is matrix products, emulated bf16 ones above all).
        Copies of the weights (autocast's casts, which its cache keeps until the forward ends) are recorded
        in `casts`: storage pointer -> bytes.
        """

        def __init__(self, weights: set[int]) -> None:
            super().__init__()
            self.weights = weights
            self.casts: dict[int, int] = {}

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            shape = products.get(func)
            if shape is not None and not kwargs:
                a, b = args[-2:]  # addmm(bias, a, b), baddbmm(bias, a, b): the operands come last
                return torch.zeros(shape(a.shape, b.shape), dtype=a.dtype, device=a.device)
            out = func(*args, **(kwargs or {}))
            if func is aten._to_copy.default and _storage_key(args[0])[0] in self.weights:
                ptr, nbytes = _storage_key(out)
                self.casts[ptr] = nbytes
            return out

    return ShapesOnly


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in _LOW_PRECISION:
        return value.float()
    return value


@cache
def _cuda_autocast_class() -> type:
    """The torch-function mode behind `cuda_autocast_rule` (built once)."""

    class CudaAutocastRule(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
                args = tuple(_to_float32(a) for a in args)
                kwargs = {k: _to_float32(v) for k, v in kwargs.items()}
            return func(*args, **kwargs)

    return CudaAutocastRule


def cuda_autocast_rule() -> Any:
    """A context in which CPU autocast regions run CUDA_FP32_OPS in float32, as CUDA autocast does.

    Inside an enabled CPU autocast region, a call of one of those ops gets its bf16/fp16 tensor arguments cast
    to float32 first, so it computes (and autograd saves) what it would on a GPU; outside autocast, or where the
    model turns autocast off, nothing changes. tests/test_gpu_cuda.py compares the output dtypes with real CUDA
    autocast.
    """
    return _cuda_autocast_class()()


def _shapes_only(weights: set[int]) -> Any:
    """A fresh ShapesOnly dispatch mode (see `_shapes_only_class`) watching the casts of `weights`."""
    return _shapes_only_class()(weights)
