"""The training-memory model: what one run needs on the card, per branch, before it is launched.

For a resolved config the peak allocated memory of a training step is modelled as

    weights + gradients + optimizer states + max(activations(B) + inputs(B) + recompute(B), optimizer transient)

and the card must hold that plus the allocator's overhead and the CUDA context:

    total(B) = allocated(B) x (1 + ALLOCATOR_OVERHEAD) + CUDA_CONTEXT_BYTES

- Weights: every parameter and buffer of each branch (cfrf, isubg, xvlm) and of the fusion weights, counted
  exactly from the built model. Gradients: one fp32 tensor per trainable parameter (kept during the whole
  accumulation group). Optimizer states: Adamax (exp_avg, exp_inf) for every non-X-VLM parameter and AdamW
  (exp_avg, exp_avg_sq) for the X-VLM branch, both 2 x the trainable bytes (the `step` counters stay on the CPU).
- Activations: the bytes autograd saves for backward during forward + loss, measured, not derived from a formula:
  the real model runs the worst-case batch (`WorstCase`: data.max_boxes boxes, question_len tokens, num_stat_word
  stat words, the largest scene graph) at B = 1 and B = 2 under `saved_tensors_hooks`, each storage counted once,
  and the difference gives bytes per sample and the intercept the fixed bytes (autocast's low-precision weight
  copies are fixed bytes). Saved tensors are attributed to the branch whose forward saved them; the loss and
  the fusion's own to "fusion". With memory.mixed_precision the passes run under bf16 autocast (fp16 saves the
  same bytes); with memory.memory_efficient_attention the model takes its checkpointed / SDPA / chunked code
  paths, so what checkpointing keeps (segment inputs) is what gets counted.
- Inputs: the worst-case batch's own tensors on the device.
- Recompute: with checkpointing, backward re-runs one segment at a time and holds its saved tensors for the
  moment; the largest segment (measured by re-running each checkpointed module outside the checkpoint) is added.
- Optimizer transient: torch's foreach Adamax copies all gradients once (|g|) and foreach AdamW copies all
  exp_avg_sq once (sqrt); this happens after backward, when the activations are gone, hence the max().
- ALLOCATOR_OVERHEAD (10%) covers the caching allocator's block rounding and fragmentation; CUDA_CONTEXT_BYTES
  (500 MiB) is the CUDA context and kernels a process holds outside the allocator. Both are documented constants
  (docs/memory.md), not measurements.

The measurement runs on the CPU with real tensors at B = 1 and 2 (one model build per estimate); matrix
products return zeros of the right shape instead of computing (saved bytes depend on shapes, not values; a test
checks the counts equal a fully computed run). CPU autocast keeps a few ops in a different precision than CUDA
autocast, and CUDA kernels (cuDNN GRU, flash attention) save slightly different buffers; `measure_peak_cuda`
measures the real peak on a GPU for comparison.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isubg.batch import DataSpec
from isubg.config import RunConfig
from isubg.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from isubg.batch import Batch

__all__ = [
    "ALLOCATOR_OVERHEAD",
    "CUDA_CONTEXT_BYTES",
    "BranchMemory",
    "Linear",
    "MemoryEstimate",
    "WorstCase",
    "batch_tensors",
    "estimate",
    "largest_graph",
    "measure_peak_cuda",
    "require_cuda",
    "synthetic_spec",
    "worst_case_batch",
]

CUDA_CONTEXT_BYTES = 500 * 2**20  # CUDA context + kernel images held outside the caching allocator
ALLOCATOR_OVERHEAD = 0.10  # caching-allocator rounding and fragmentation on top of the allocated bytes
DEFAULT_NODES = 100  # scene-graph bound when no processed data is given: nodes per graph
DEFAULT_EDGES = 600  # ... and edges per graph, reverse edges included
ANSWERS = {"GQA": 1842, "VQA": 3129}  # answer vocabularies of the two datasets
NUM_WORDS = 20000  # question dictionary size assumed without processed data
NUM_GRAPH_TOKENS = 2578  # scene-graph token vocabulary assumed without processed data
FEATURE_DIM = 2048  # bottom-up box feature width
TFIDF_PER_ROW = 8  # tf-idf entries per word of the synthetic matrix
SMALLER_PRESET = "memory-optimized"  # the preset suggested when the model itself is too large
FEWER_BOXES = 36  # the suggested data.max_boxes (the fixed-36 bottom-up features)
_OPTIMIZERS = {"xvlm": "AdamW"}  # every other branch and the fusion weights train with Adamax


# --------------------------------------------------------------------------------------------------
# The worst-case input


@dataclass(frozen=True)
class WorstCase:
    """The largest input a run can see: every sample at the maximum size.

    Attributes:
        boxes: K, data.max_boxes.
        question_len: L, data.question_len (every token real).
        stat_words: S, data.num_stat_word.
        nodes, edges: the largest scene graph (edges with the reverse edges the dataset adds).
        num_answers, num_words, num_graph_tokens, feature_dim: data sizes (DataSpec).
        graph_source: where nodes/edges come from ("bound" or the processed folder's graph files).
    """

    boxes: int
    question_len: int
    stat_words: int
    nodes: int = DEFAULT_NODES
    edges: int = DEFAULT_EDGES
    num_answers: int = ANSWERS["GQA"]
    num_words: int = NUM_WORDS
    num_graph_tokens: int = NUM_GRAPH_TOKENS
    feature_dim: int = FEATURE_DIM
    graph_source: str = "bound"

    @classmethod
    def for_config(
        cls, cfg: RunConfig, spec: DataSpec | None = None, graph: tuple[int, int] | None = None, source: str = "bound"
    ) -> WorstCase:
        """The worst case of `cfg`'s data settings, with `spec`'s sizes (else the dataset's defaults).

        Args:
            graph: (nodes, edges) of the largest graph, e.g. from `largest_graph`; None: the default bound.
        """
        d = cfg.data
        nodes, edges = graph if graph is not None else (DEFAULT_NODES, DEFAULT_EDGES)
        sizes: dict[str, int] = {"num_answers": ANSWERS[d.dataset]}
        if spec is not None:
            sizes = {
                "num_answers": spec.num_answers,
                "num_words": spec.num_words,
                "num_graph_tokens": spec.num_graph_tokens,
                "feature_dim": spec.feature_dim,
            }
        return cls(d.max_boxes, d.question_len, d.num_stat_word, nodes, edges, graph_source=source, **sizes)


def largest_graph(folder: Path) -> tuple[int, int]:
    """(most nodes, most edges) over the scene graphs of a processed folder: graphs_gt.json and graphs_detected.json.

    Both files count whatever data.scene_graphs picks, so the bound holds for every mode and split. Edges count
    the reverse edges the dataset adds (isubg.data.scene_graphs.to_pyg), as the model sees them.

    Raises:
        DataError: a graph file is missing or malformed, or neither holds a graph.
    """
    from isubg.data.files import read_json
    from isubg.errors import DataError

    most_nodes = most_edges = found = 0
    for name in ("graphs_gt.json", "graphs_detected.json"):
        path = Path(folder) / name
        graphs = read_json(path)
        if not isinstance(graphs, dict):
            raise DataError(f"{path}: expected an object of image id -> scene graph")
        found += len(graphs)
        for image_id, graph in graphs.items():
            try:
                pairs = [(int(s), int(t)) for s, t in graph["edges"]]
                nodes = len(graph["names"])
            except (KeyError, TypeError, ValueError):
                why = "a scene graph needs 'names' and 'edges' [[source, target], ...]"
                raise DataError(f"{path}: image {image_id}: {why}") from None
            added = {(t, s) for s, t in pairs} - set(pairs)
            most_nodes, most_edges = max(most_nodes, nodes), max(most_edges, len(pairs) + len(added))
    if not found:
        raise DataError(f"{folder}: graphs_gt.json and graphs_detected.json hold no scene graph")
    return max(most_nodes, 1), most_edges


@cache
def _synthetic_tfidf(words: int, per_row: int = TFIDF_PER_ROW) -> tuple[Any, Any, Any, tuple[int, int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(words), per_row)
    cols = rng.integers(0, words, words * per_row)
    return rows, cols, np.full(words * per_row, 1.0 / per_row, np.float32), (words, words)


def synthetic_spec(cfg: RunConfig, worst: WorstCase) -> DataSpec:
    """A DataSpec of `worst`'s sizes with a random tf-idf matrix (TFIDF_PER_ROW entries a word) when data.tfidf."""
    tfidf = _synthetic_tfidf(worst.num_words) if cfg.data.tfidf else None
    return DataSpec(worst.num_words, worst.num_answers, worst.num_graph_tokens, worst.feature_dim, tfidf=tfidf)


def worst_case_batch(
    spec: DataSpec, worst: WorstCase, batch_size: int, *, image_res: int | None = None, seed: int = 0
) -> Batch:
    """A Batch of `batch_size` samples, each at the worst case's full size (CPU tensors).

    Questions are long enough to fill any X-VLM tokenizer's max_tokens; `image_res` adds (B, 3, R, R) images
    for an X-VLM Swin/ViT encoder.
    """
    import torch

    from isubg.data.synthetic import random_batch

    batch = random_batch(
        spec,
        batch_size,
        boxes=worst.boxes,
        question_len=worst.question_len,
        stat_words=worst.stat_words,
        nodes=worst.nodes,
        edges=worst.edges,
        seed=seed,
    )
    words = " ".join(["what"] * max(worst.question_len, 64))
    images = None
    if image_res is not None:
        images = torch.rand(batch_size, 3, image_res, image_res, generator=torch.Generator().manual_seed(seed))
    return replace(batch, questions=[words] * batch_size, images=images)


# --------------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class Linear:
    """bytes(B) = fixed + per_sample x B, fitted from measurements at B = 1 and B = 2."""

    fixed: float = 0.0
    per_sample: float = 0.0

    @classmethod
    def fit(cls, at_1: int, at_2: int) -> Linear:
        per_sample = max(0.0, float(at_2 - at_1))
        return cls(float(at_1) - per_sample, per_sample)

    def __call__(self, batch: int) -> int:
        return max(0, round(self.fixed + self.per_sample * batch))


@dataclass(frozen=True)
class BranchMemory:
    """One branch's (or the fusion weights') share.

    Attributes:
        name: cfrf, isubg, xvlm or fusion (the fusion weights, the fused output and the loss).
        weights: parameter + buffer bytes; trainable: bytes of the parameters that get gradients.
        optimizer: Adamax or AdamW.
        activations: saved-for-backward bytes as a function of the micro-batch.
        recompute: the largest checkpointed segment's saved bytes (0 without memory-efficient attention).
    """

    name: str
    weights: int
    trainable: int
    optimizer: str
    activations: Linear
    recompute: Linear = field(default_factory=Linear)

    @property
    def gradients(self) -> int:
        return self.trainable

    @property
    def optimizer_states(self) -> int:
        return 2 * self.trainable  # Adamax: exp_avg + exp_inf; AdamW: exp_avg + exp_avg_sq

    def static(self) -> int:
        """Weights + gradients + optimizer states: what does not depend on the batch."""
        return self.weights + self.gradients + self.optimizer_states


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory model of one config (module docstring); every figure in bytes.

    Attributes:
        cfg, spec, worst: what was estimated (kept to re-estimate variants in `suggestions`).
        branches: per-branch figures, in model order, the fusion last.
        inputs: the worst-case batch's tensors.
        autocast_cache: weight copies autocast keeps until the forward ends that backward does not keep (with
            checkpointing; without it autograd saves them and they are in the activations).
        precision: "bf16 autocast" or "fp32"; memory_efficient: memory.memory_efficient_attention.
    """

    cfg: RunConfig
    spec: DataSpec
    worst: WorstCase
    branches: tuple[BranchMemory, ...]
    inputs: Linear
    autocast_cache: int
    precision: str
    memory_efficient: bool
    cuda_context: int = CUDA_CONTEXT_BYTES
    allocator_overhead: float = ALLOCATOR_OVERHEAD

    @property
    def batch_size(self) -> int:
        return self.cfg.train.batch_size

    @property
    def static(self) -> int:
        return sum(b.static() for b in self.branches)

    @property
    def optimizer_transient(self) -> int:
        """foreach Adamax copies every main gradient once; foreach AdamW copies every exp_avg_sq once."""
        adamw = sum(b.trainable for b in self.branches if b.optimizer == "AdamW")
        adamax = sum(b.trainable for b in self.branches if b.optimizer == "Adamax")
        return max(adamw, adamax)

    def activations(self, batch: int) -> int:
        return sum(b.activations(batch) for b in self.branches)

    def recompute(self, batch: int) -> int:
        """Backward recomputes one checkpointed segment at a time: the largest over all branches."""
        return max((b.recompute(batch) for b in self.branches), default=0)

    def transient(self, batch: int) -> int:
        """What comes on top of the stored activations and inputs at the peak: autocast's weight cache at the end
        of the forward, a recomputed segment in backward, or the optimizer step's copy (activations freed)."""
        stored = self.activations(batch) + self.inputs(batch)
        extra = max(self.autocast_cache, self.recompute(batch))
        return max(stored + extra, self.optimizer_transient) - stored

    def allocated(self, batch: int) -> int:
        """Peak bytes the caching allocator hands out (compare with torch.cuda.max_memory_allocated)."""
        return self.static + self.activations(batch) + self.inputs(batch) + self.transient(batch)

    def total(self, batch: int) -> int:
        """Peak device memory of the process: allocated + allocator overhead + CUDA context."""
        return math.ceil(self.allocated(batch) * (1 + self.allocator_overhead)) + self.cuda_context

    def budget(self, device_bytes: int, fraction: float | None = None) -> int:
        """The bytes a run may use: memory.max_memory_usage (or `fraction`) of the device."""
        return int(device_bytes * (self.cfg.memory.max_memory_usage if fraction is None else fraction))

    def fits(self, device_bytes: int, fraction: float | None = None, batch: int | None = None) -> bool:
        """Whether the micro-batch (train.batch_size unless given) fits within the budget."""
        return self.total(self.batch_size if batch is None else batch) <= self.budget(device_bytes, fraction)

    def largest_batch(self, device_bytes: int, fraction: float | None = None, max_batch: int | None = None) -> int:
        """The largest micro-batch <= max_batch (default train.batch_size) that fits; 0 when even 1 does not."""
        budget, high = self.budget(device_bytes, fraction), self.batch_size if max_batch is None else max_batch
        low = 0  # total() grows with the batch, so bisect on the last batch that fits
        while low < high:
            mid = (low + high + 1) // 2
            if self.total(mid) <= budget:
                low = mid
            else:
                high = mid - 1
        return low

    def largest_exact_batch(self, device_bytes: int, fraction: float | None = None) -> int:
        """The largest micro-batch that fits and divides batch_size x gradient_accumulation_steps, so that
        `accumulation_for` keeps the effective batch exactly; 0 when even 1 does not fit."""
        per_update = self.batch_size * self.cfg.optim.gradient_accumulation_steps
        limit = self.largest_batch(device_bytes, fraction, max_batch=per_update)
        return max((d for d in range(1, limit + 1) if per_update % d == 0), default=0)

    def accumulation_for(self, batch: int) -> int:
        """gradient_accumulation_steps at micro-batch `batch` that keeps (at least) the effective batch."""
        if batch < 1:
            raise ValueError(f"micro-batch must be >= 1, got {batch}")
        return math.ceil(self.batch_size * self.cfg.optim.gradient_accumulation_steps / batch)

    def effective_batch(self, batch: int) -> int:
        """Samples per optimizer step at micro-batch `batch` with `accumulation_for(batch)`."""
        return batch * self.accumulation_for(batch) * self.cfg.train.update_freq

    def breakdown(self, batch: int | None = None) -> list[dict[str, Any]]:
        """Table rows at micro-batch `batch` (default train.batch_size): one per branch, then the shared parts.

        Each row: {"part", "params", "grads", "optimizer", "activations", "total"} in bytes (None where a
        column does not apply); the last row is the "total" of `total(batch)`.
        """
        batch = self.batch_size if batch is None else batch
        rows = [
            {
                "part": f"{b.name} ({b.optimizer})",
                "params": b.weights,
                "grads": b.gradients,
                "optimizer": b.optimizer_states,
                "activations": b.activations(batch),
                "total": b.static() + b.activations(batch),
            }
            for b in self.branches
        ]
        allocated = self.allocated(batch)
        shared = [
            ("input batch", self.inputs(batch)),
            ("peak transient (recompute / optimizer step)", self.transient(batch)),
            (f"allocator overhead ({self.allocator_overhead:.0%})", self.total(batch) - self.cuda_context - allocated),
            ("CUDA context", self.cuda_context),
        ]
        empty = {"params": None, "grads": None, "optimizer": None, "activations": None}
        rows += [{"part": name, **empty, "total": value} for name, value in shared]
        sums = {key: sum(b[key] for b in rows[: len(self.branches)]) for key in ("params", "grads", "optimizer")}
        rows.append({"part": "total", **sums, "activations": self.activations(batch), "total": self.total(batch)})
        return rows

    def suggestions(self, device_bytes: int, fraction: float | None = None) -> list[str]:
        """Changes that make the run fit, each quantified by re-estimating with it (empty when it fits)."""
        if self.fits(device_bytes, fraction):
            return []
        budget = self.budget(device_bytes, fraction)
        out = []
        for label, variant in _variants(self):
            batch = variant.batch_size
            largest = variant.largest_batch(device_bytes, fraction, max_batch=batch)
            verdict = "fits" if largest >= batch else "still too large"
            if 0 < largest < batch:
                verdict += (
                    f"; micro-batch {largest} fits (gradient_accumulation_steps {variant.accumulation_for(largest)})"
                )
            out.append(
                f"{label}: {_size(variant.total(batch))} at micro-batch {batch} "
                f"({_size(variant.total(batch) - self.total(self.batch_size), sign=True)}; budget {_size(budget)}), "
                f"{verdict}"
            )
        return out


def _size(value: float, sign: bool = False) -> str:
    """Bytes as GiB from 1 GiB up, else MiB ("7.34 GiB", "+12.5 MiB")."""
    plus = "+" if sign else ""
    return f"{value / 2**30:{plus}.2f} GiB" if abs(value) >= 2**30 else f"{value / 2**20:{plus}.1f} MiB"


def _variants(est: MemoryEstimate) -> Iterator[tuple[str, MemoryEstimate]]:
    """(label, estimate) for each memory-saving change that applies to `est`'s config.

    Changes that leave the model as it is (precision, box count) share one build of it.
    """
    cfg = est.cfg
    changes: list[tuple[str, RunConfig, WorstCase]] = []
    if not cfg.memory.mixed_precision:
        changes.append(("memory.mixed_precision=true", _changed(cfg, "memory", mixed_precision=True), est.worst))
    if not cfg.memory.memory_efficient_attention:
        efficient = _changed(cfg, "memory", memory_efficient_attention=True)
        changes.append(("memory.memory_efficient_attention=true", efficient, est.worst))
        if not cfg.memory.mixed_precision:
            both = _changed(efficient, "memory", mixed_precision=True)
            changes.append(("both mixed_precision and memory_efficient_attention", both, est.worst))
    if cfg.data.max_boxes > FEWER_BOXES:
        fewer = replace(est.worst, boxes=FEWER_BOXES)
        changes.append((f"data.max_boxes={FEWER_BOXES}", _changed(cfg, "data", max_boxes=FEWER_BOXES), fewer))
    smaller = _smaller_preset(cfg)
    if smaller is not None:
        changes.append((f"--preset {SMALLER_PRESET}", smaller, est.worst))
    built: tuple[str, Any] = ("", None)
    order = {key: i for i, key in reversed(list(enumerate(_model_key(c) for _, c, _ in changes)))}
    for label, changed, worst in sorted(changes, key=lambda change: order[_model_key(change[1])]):
        key = _model_key(changed)
        if key != built[0]:
            built = ("", None)  # free the previous model before building the next
            built = (key, _build(changed, est.spec))
        yield label, _estimate_with(built[1], changed, est.spec, worst)


def _model_key(cfg: RunConfig) -> str:
    """What the built model depends on: the model section, memory-efficient attention and tf-idf words."""
    return repr((cfg.model.model_dump(mode="json"), cfg.memory.memory_efficient_attention, cfg.data.tfidf))


def _changed(cfg: RunConfig, section: str, **values: Any) -> RunConfig:
    out = cfg.model_copy(deep=True)
    for key, value in values.items():
        setattr(getattr(out, section), key, value)
    return out


def _smaller_preset(cfg: RunConfig) -> RunConfig | None:
    """SMALLER_PRESET with this run's data settings and branches, when its model is smaller than this one's:
    no integer size of model.cfrf / isubg / xvlm larger and at least one smaller. Else None."""
    from isubg.resolve import resolve_config

    preset = resolve_config(SMALLER_PRESET).config
    pairs = [  # (the preset's size, this config's size)
        (value, getattr(getattr(cfg.model, section), key))
        for section in ("cfrf", "isubg", "xvlm")
        for key, value in getattr(preset.model, section).model_dump().items()
        if isinstance(value, int) and not isinstance(value, bool)
    ]
    if any(theirs > ours for theirs, ours in pairs) or all(theirs == ours for theirs, ours in pairs):
        return None
    out = preset.model_copy(deep=True)
    out.data = cfg.data.model_copy(deep=True)
    out.model.branches = list(cfg.model.branches)
    return out


def estimate(
    cfg: RunConfig, spec: DataSpec | None = None, worst: WorstCase | None = None, *, device: str = "cpu"
) -> MemoryEstimate:
    """The memory model of `cfg` (module docstring): builds the model once and measures two small passes.

    Args:
        spec: the real data's sizes (VQADataset.spec()); None: synthetic sizes for cfg.data.dataset.
        worst: the worst-case input; None: `WorstCase.for_config(cfg, spec)` (the default graph bound).
        device: where the measurement passes run ("cpu"; a CUDA device measures CUDA's own kernels).

    Raises:
        ConfigError / DataError: the model cannot be built for this config and data.
    """
    worst = worst if worst is not None else WorstCase.for_config(cfg, spec)
    spec = spec if spec is not None else synthetic_spec(cfg, worst)
    return _estimate_with(_build(cfg, spec, device), cfg, spec, worst)


def _build(cfg: RunConfig, spec: DataSpec, device: str = "cpu") -> nn.Module:
    """The model of `cfg` in training mode on `device`, its weights zero (only its shapes matter here)."""
    import torch

    from isubg.models import build_model

    with torch.random.fork_rng(devices=[]), _zero_init_class()():
        torch.manual_seed(0)
        return build_model(cfg, spec).to(device).train()


_RANDOM_INITS = frozenset(
    {"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_"}
)


@cache
def _zero_init_class() -> type:
    """A torch-function mode that turns random weight initialisation into zeros, for `_build`.

    Drawing the random numbers took most of a full-size build (about 4 of 6 s for the default preset); the
    memory measurement reads shapes, never weight values, and zeros keep every op finite.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    class ZeroInit(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") in _RANDOM_INITS:
                tensor = args[0] if args else kwargs["tensor"]
                with torch.no_grad():
                    return tensor.zero_()
            return func(*args, **kwargs)

    return ZeroInit


def _estimate_with(model: nn.Module, cfg: RunConfig, spec: DataSpec, worst: WorstCase) -> MemoryEstimate:
    """`estimate` with the model already built for `cfg` (precision and input sizes may differ from its build)."""
    import torch

    device = next(model.parameters()).device
    xvlm = model.branches["xvlm"] if "xvlm" in model.branches else None  # noqa: SIM401 (ModuleDict)
    image_res = getattr(xvlm, "image_res", None)
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
                optimizer=_OPTIMIZERS.get(name, "Adamax"),
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
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# One measured pass


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


def batch_tensors(batch: Batch) -> list[torch.Tensor]:
    """Every tensor a Batch holds on the device, the scene-graph tensors included."""
    import torch

    out = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    graphs = batch.graphs
    out += [graphs[key] for key in graphs.keys() if isinstance(graphs[key], torch.Tensor)]  # noqa: SIM118
    return out


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
        import torch

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
        import torch

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
    import torch

    inputs = {_storage_key(t) for t in batch_tensors(batch)}
    exclude = {_storage_key(t)[0] for t in [*model.parameters(), *model.buffers()]} | {p for p, _ in inputs}
    weights = {_storage_key(t)[0] for t in model.parameters()}
    meter, mode = _Meter(exclude), _shapes_only(weights)
    device_type = batch.features.device.type
    autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)
    with mode, meter.hooks(model):
        with autocast:
            output = model(batch)
        loss, _ = model.loss(output, batch.targets)
    owners = {*model.branches.keys(), "fusion"}
    saved = {owner: meter.total(owner) for owner in owners}
    recompute: dict[str, int] = {}
    counted = exclude | set(meter.seen)
    for owner, module, args, kwargs in meter.segments:
        segment = _Meter(counted)
        with _shapes_only(weights), autocast, torch.autograd.graph.saved_tensors_hooks(segment.pack, _unpack):
            module.forward(*args, **kwargs)
        recompute[owner] = max(recompute.get(owner, 0), segment.total())
    cached = sum(n for ptr, n in mode.casts.items() if ptr not in meter.seen)
    del output, loss
    return _Pass(saved=saved, recompute=recompute, inputs=sum(n for _, n in inputs), autocast_cache=cached)


@cache
def _shapes_only_class() -> type:
    """The dispatch mode class, defined on first use so that importing this module does not import torch."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

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


def _shapes_only(weights: set[int]) -> Any:
    """A fresh ShapesOnly dispatch mode (see `_shapes_only_class`) watching the casts of `weights`."""
    return _shapes_only_class()(weights)


# --------------------------------------------------------------------------------------------------
# Real peak on a GPU


def require_cuda() -> None:
    """Raise ConfigError unless torch sees a CUDA device (what `--measure` needs)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "--measure runs real training steps on a GPU, but this torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); drop --measure for the estimate"
        )


def measure_peak_cuda(
    cfg: RunConfig,
    spec: DataSpec | None,
    batch: int,
    steps: int = 2,
    *,
    worst: WorstCase | None = None,
    device: str = "cuda",
) -> int:
    """torch.cuda.max_memory_allocated over `steps` real optimizer steps on the worst-case batch of size `batch`.

    Each step runs two micro-batches when the config accumulates (update_freq x gradient_accumulation_steps > 1),
    so the second forward runs with the gradients held, as in training; Adamax + AdamW, clipping and precision
    as `isubg train`. Compare the result with `MemoryEstimate.allocated(batch)`.

    Raises:
        ConfigError: this machine has no CUDA device.
    """
    import torch

    require_cuda()
    from isubg.device import pick_precision
    from isubg.models import build_model

    worst = worst if worst is not None else WorstCase.for_config(cfg, spec)
    spec = spec if spec is not None else synthetic_spec(cfg, worst)
    dev = torch.device(device)
    precision = pick_precision(dev, cfg.memory.mixed_precision)
    torch.manual_seed(0)
    model = build_model(cfg, spec).to(dev)
    model.train()
    xvlm = model.branches["xvlm"] if "xvlm" in model.branches else None  # noqa: SIM401 (ModuleDict)
    inputs = worst_case_batch(spec, worst, batch, image_res=getattr(xvlm, "image_res", None))
    optimizers = _optimizers(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=precision.scaler)
    micro = 2 if cfg.train.update_freq * cfg.optim.gradient_accumulation_steps > 1 else 1
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(steps):
        for _ in range(micro):
            on_device = inputs.to(dev)
            with precision.autocast(dev):
                output = model(on_device)
            loss, _ = model.loss(output, on_device.targets)
            scaler.scale(loss / micro).backward()
            del output, loss, on_device
        for opt in optimizers:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev))


def _optimizers(cfg: RunConfig, model: nn.Module) -> list[torch.optim.Optimizer]:
    """Adamax for every non-X-VLM parameter and AdamW for the X-VLM branch, as isubg.train builds them."""
    import torch

    xvlm = model.branches["xvlm"] if "xvlm" in model.branches else None  # noqa: SIM401 (ModuleDict)
    xvlm_ids = {id(p) for p in xvlm.parameters()} if xvlm is not None else set()
    main = [p for p in model.parameters() if id(p) not in xvlm_ids and p.requires_grad]
    out: list[torch.optim.Optimizer] = [torch.optim.Adamax(main, lr=cfg.train.lr)]
    if xvlm is not None:
        params = [p for p in xvlm.parameters() if p.requires_grad]
        out.append(torch.optim.AdamW(params, lr=cfg.train.xvlm_lr, weight_decay=cfg.optim.xvlm_weight_decay))
    return out
