"""The training-memory model: what one run needs on the card, per branch, before it is launched.

- `estimate`: the arithmetic (MemoryEstimate: weights, gradients, optimizer states, activations, transients,
  allocator overhead, CUDA context, and what fits); no torch.
- `inputs`: the worst-case input (the largest graph of a processed folder, a full-size Batch).
- `measure`: builds the model and counts what autograd saves (the only module on private torch APIs).
- `advice`: what to change when a run does not fit, each change re-estimated.
- `cuda`: the real peak of the trainer's own step on a GPU (`profile-memory --measure`).

docs/memory.md explains the model and how it compares with measurements.
"""

from isubg.memory.advice import suggestions
from isubg.memory.cuda import measure_peak_cuda, require_cuda
from isubg.memory.estimate import (
    ALLOCATOR_OVERHEAD,
    CUDA_CONTEXT_BYTES,
    BranchMemory,
    Linear,
    MemoryEstimate,
    WorstCase,
)
from isubg.memory.inputs import batch_tensors, largest_graph, synthetic_spec, worst_case_batch
from isubg.memory.measure import estimate

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
    "suggestions",
    "synthetic_spec",
    "worst_case_batch",
]
