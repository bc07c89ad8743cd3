"""The memory model's arithmetic: what a run needs on the card, per branch, as a function of the micro-batch.

No torch here: the figures come from `isubg.memory.measure` (the built model, measured passes), and this module
adds them up. For a resolved config the peak allocated memory of a training step is modelled as

    weights + gradients + optimizer states + max(activations(B) + inputs(B) + recompute(B), optimizer transient)

and the card must hold that plus the allocator's overhead and the CUDA context:

    total(B) = allocated(B) x (1 + ALLOCATOR_OVERHEAD) + CUDA_CONTEXT_BYTES

- Weights, gradients (one per trainable parameter, kept for the whole accumulation group) and optimizer states
  (Adamax: exp_avg, exp_inf; AdamW: exp_avg, exp_avg_sq; both 2 x the trainable bytes, the `step` counters
  stay on the CPU) per branch; the optimizer family of each branch comes from `isubg.branches`.
- Activations and recompute per branch are `Linear` in the micro-batch, fitted from passes at B = 1 and 2.
- Optimizer transient: torch's foreach Adamax copies all gradients once (|g|) and foreach AdamW copies all
  exp_avg_sq once (sqrt); this happens after backward, when the activations are gone, hence the max().
- ALLOCATOR_OVERHEAD (10%) covers the caching allocator's block rounding and fragmentation; CUDA_CONTEXT_BYTES
  (500 MiB) is the CUDA context and kernels a process holds outside the allocator. Both are documented constants
  (docs/memory.md), not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from isubg.branches import BRANCHES
from isubg.config import RunConfig

if TYPE_CHECKING:
    from isubg.batch import DataSpec

__all__ = [
    "ALLOCATOR_OVERHEAD",
    "ANSWERS",
    "CUDA_CONTEXT_BYTES",
    "BranchMemory",
    "Geometry",
    "Linear",
    "MemoryEstimate",
    "WorstCase",
    "optimizer_name",
]

CUDA_CONTEXT_BYTES = 500 * 2**20  # CUDA context + kernel images held outside the caching allocator
ALLOCATOR_OVERHEAD = 0.10  # caching-allocator rounding and fragmentation on top of the allocated bytes
DEFAULT_NODES = 100  # scene-graph bound when no processed data is given: nodes per graph
DEFAULT_EDGES = 600  # ... and edges per graph, reverse edges included
ANSWERS = {"GQA": 1842, "VQA": 3129}  # answer vocabularies of the two datasets
NUM_WORDS = 20000  # question dictionary size assumed without processed data
NUM_GRAPH_TOKENS = 2578  # scene-graph token vocabulary assumed without processed data
FEATURE_DIM = 2048  # bottom-up box feature width


def optimizer_name(part: str) -> str:
    """ "AdamW" or "Adamax": the optimizer that trains a branch (isubg.step); the fusion weights train with Adamax."""
    spec = BRANCHES.get(part)
    return "AdamW" if spec is not None and spec.optimizer == "adamw" else "Adamax"


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
class Geometry:
    """How an optimizer step's samples are split: micro-batch x gradient_accumulation_steps x update_freq."""

    batch_size: int
    gradient_accumulation_steps: int
    update_freq: int

    @property
    def samples_per_update(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.update_freq


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

    def fitted_geometry(self, device_bytes: int, fraction: float | None = None) -> Geometry | None:
        """The largest micro-batch that fits, with the accumulation that keeps the samples per update exactly.

        Candidates divide the samples per optimizer step, batch_size x gradient_accumulation_steps x
        update_freq, so the effective batch never changes; the result may be smaller than train.batch_size (it
        does not fit) or larger (a large card: fewer, larger micro-batches launch fewer kernels). A micro-batch
        that divides batch_size x gradient_accumulation_steps keeps update_freq; a larger one that divides only
        the whole update folds update_freq into the accumulation (update_freq 1). None: not even 1 fits.
        """
        cfg = self.cfg
        per_group = self.batch_size * cfg.optim.gradient_accumulation_steps
        per_update = per_group * cfg.train.update_freq
        limit = self.largest_batch(device_bytes, fraction, max_batch=per_update)
        in_group = max((d for d in range(1, min(limit, per_group) + 1) if per_group % d == 0), default=0)
        in_update = max((d for d in range(1, limit + 1) if per_update % d == 0), default=0)
        if in_update == 0:
            return None
        if in_group >= in_update:
            return Geometry(in_group, per_group // in_group, cfg.train.update_freq)
        return Geometry(in_update, per_update // in_update, 1)

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
