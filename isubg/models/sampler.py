"""Differentiable exact-k node-subset samplers for batched scene graphs: I-MLE and straight-through Gumbel top-k.

Every graph of a batch chooses exactly `k` of its nodes (all of them when it has fewer than `k`). Scores
are a flat (N,) vector over the nodes of all graphs together, grouped by a (N,) graph index as in
torch_geometric batches, so graphs of different sizes are handled without padding: the reference padded
every graph to the largest one with score 0, and a padding slot could outrank real nodes, leaving small
graphs with fewer than k (even 0) nodes. Here the top-k is a sort by (graph, score), so it is exact.

Samplers (what the reference's samplers do: docs/deviations.md#reference-samplers):

- "imle" (implicit maximum-likelihood estimation, perturb-and-MAP). Training forward:
  z = topk(theta + tau * eps) with Sum-of-Gamma noise eps (the tuning guide's choice; the reference
  defined it but used Gumbel(0, 0.3)). Backward: the target scores theta' = alpha * theta - beta * dL/dz
  and the gradient dL/dtheta = z - topk(theta' + tau * eps) with the SAME noise (not divided by beta,
  as in the reference).
- "gumbel" (straight-through Gumbel top-k). Training forward: the hard k-hot topk(theta + g) with
  standard Gumbel noise g; backward: the gradient of the relaxed k-hot of k rounds of per-graph softmax
  with temperature tau (p_j = softmax(w_j / tau), w_{j+1} = w_j + log(1 - p_j), relaxed = sum_j p_j).
  The reference fixed that temperature at 0.1 and ignored `tau`.

`nb_samples` noise draws are made and their masks averaged (the reference crashed for more than one).
For imle the gradient is then the mean of the per-sample I-MLE gradients, every target built from the
gradient of the averaged mask, so `beta` means the same for any number of samples.
In eval mode there is no noise: the mask is the plain top-k of the scores, the same on every call.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn
from torch_geometric.utils import softmax as graph_softmax

__all__ = [
    "NodeSampler",
    "gumbel_noise",
    "imle_topk",
    "relaxed_topk",
    "straight_through_topk",
    "sum_of_gamma_noise",
    "topk_per_graph",
]

SamplerType = Literal["imle", "gumbel"]

# Keeps log(1 - p) finite in the relaxed top-k once a node has taken (almost) all of a round's mass.
_TINY = torch.finfo(torch.float32).tiny


def topk_per_graph(scores: torch.Tensor, index: torch.Tensor, num_graphs: int, k: int) -> torch.Tensor:
    """The exact top-k of every graph: True on the k highest-scoring nodes of each graph.

    A graph with fewer than k nodes keeps them all. Ties go to the lower node index (stable sorts), so
    the result is deterministic. No gradient flows through this function.

    Shapes:
        scores: (N,) float; index: (N,) int64 graph of each node in [0, num_graphs) -> (N,) bool.
    """
    n = scores.numel()
    # Descending by score, then a stable sort by graph keeps each graph's nodes in score order.
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    order = order[torch.sort(index[order], stable=True).indices]
    counts = graph_sizes(index, num_graphs)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=scores.device) - starts[index[order]]
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    keep[order] = rank < k
    return keep


def graph_sizes(index: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """(num_graphs,) int64 node count per graph. index_add_, not bincount: bincount's output size depends on the
    data, which costs a host-device sync on CUDA.

    Shapes:
        index: (N,) int64 in [0, num_graphs) -> (num_graphs,).
    """
    return torch.zeros(num_graphs, dtype=index.dtype, device=index.device).index_add_(0, index, torch.ones_like(index))


def sum_of_gamma_noise(
    shape: tuple[int, ...], k: int, *, iterations: int = 10, device: Any = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Sum-of-Gamma perturbations for top-k MAP (I-MLE): eps = (sum_{i=1..s} Gamma(1/k, rate=i/k) - log s) / k.

    Its sum over k nodes is distributed like a Gumbel variable, the right noise for exactly-k subsets.

    Shapes:
        -> `shape`.
    """
    concentration = torch.full(shape, 1.0 / k, device=device, dtype=dtype or torch.get_default_dtype())
    total = torch.zeros_like(concentration)
    for i in range(1, iterations + 1):
        # Gamma(a, rate r) = standard Gamma(a) / r.
        # validate_args=False: checking the (constant, valid) parameters costs a host-device sync per draw on CUDA.
        rate = torch.full_like(concentration, i / k)
        total = total + torch.distributions.Gamma(concentration, rate, validate_args=False).sample()
    return (total - math.log(iterations)) / k


def gumbel_noise(shape: tuple[int, ...], *, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise, -log(E) with E ~ Exponential(1).

    Shapes:
        -> `shape`.
    """
    exp = torch.empty(shape, device=device, dtype=dtype or torch.get_default_dtype()).exponential_()
    return -exp.log()


class _IMLETopK(torch.autograd.Function):
    """mean_s topk(theta + noise_s) forward; mean_s [z_s - topk(alpha * theta - beta * dL/dz + noise_s)] backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        theta: torch.Tensor,
        noise: torch.Tensor,
        index: torch.Tensor,
        num_graphs: int,
        k: int,
        alpha: float,
        beta: float,
    ) -> torch.Tensor:
        z = torch.stack([topk_per_graph(theta + row, index, num_graphs, k) for row in noise]).to(theta.dtype)
        ctx.save_for_backward(theta, noise, index, z)
        ctx.settings = (num_graphs, k, alpha, beta)
        return z.mean(0)

    @staticmethod
    def backward(ctx: Any, grad_z: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        theta, noise, index, z = ctx.saved_tensors
        num_graphs, k, alpha, beta = ctx.settings
        # The target distribution moves theta toward lower loss; the same noise keeps the two MAPs comparable.
        target = alpha * theta - beta * grad_z
        z_target = torch.stack([topk_per_graph(target + row, index, num_graphs, k) for row in noise])
        return (z - z_target.to(theta.dtype)).mean(0), None, None, None, None, None, None


def imle_topk(
    theta: torch.Tensor,
    noise: torch.Tensor,
    index: torch.Tensor,
    num_graphs: int,
    k: int,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """I-MLE: the mean of the k-hot masks z_s = topk(theta + noise_s), with the I-MLE gradient.

    dL/dtheta = mean_s [z_s - topk(theta' + noise_s)], theta' = alpha * theta - beta * dL/dmask: the
    target uses the gradient of the averaged mask, so beta means the same for any number of samples.

    Shapes:
        theta: (N,) float; noise: (S, N) float; index: (N,) int64 -> (N,) float, a mean of S k-hot masks.
    """
    return _IMLETopK.apply(theta, noise, index, num_graphs, k, alpha, beta)


def relaxed_topk(logits: torch.Tensor, index: torch.Tensor, num_graphs: int, k: int, tau: float) -> torch.Tensor:
    """Relaxed k-hot: the sum of k rounds of per-graph softmax(w / tau), each round down-weighting the last.

    Nodes of a graph with at most k nodes are always all selected, so their relaxation is the constant 1
    (there is no choice to differentiate).

    Shapes:
        logits: (N,) float; index: (N,) int64 -> (N,) float in [0, 1] (approximately; sums to k per graph).
    """
    counts = graph_sizes(index, num_graphs)
    forced = counts[index] <= k
    w = logits
    relaxed = torch.zeros_like(logits)
    p = torch.zeros_like(logits)
    for _ in range(k):
        w = w + torch.log(torch.clamp(1.0 - p, min=_TINY))
        p = graph_softmax(w / tau, index, num_nodes=num_graphs)
        relaxed = relaxed + p
    return torch.where(forced, torch.ones_like(relaxed), relaxed)


def straight_through_topk(
    logits: torch.Tensor, index: torch.Tensor, num_graphs: int, k: int, tau: float
) -> torch.Tensor:
    """The hard k-hot of `logits` forward, the gradient of `relaxed_topk(logits, tau)` backward.

    Shapes:
        logits: (N,) float; index: (N,) int64 -> (N,) float, exactly 0/1 in value.
    """
    hard = topk_per_graph(logits, index, num_graphs, k).to(logits.dtype)
    soft = relaxed_topk(logits, index, num_graphs, k, tau)
    # (soft - soft.detach()) is exactly zero in value, so the forward is exactly the hard mask.
    return hard + (soft - soft.detach())


class NodeSampler(nn.Module):
    """Picks exactly `k` nodes per graph from node scores, differentiably (module docstring).

    Args:
        kind: "imle" or "gumbel".
        k: nodes kept per graph (`sample_k`).
        nb_samples: noise draws averaged in training (`nb_samples`).
        alpha: I-MLE target interpolation (imle only).
        beta: I-MLE target step size (imle only).
        tau: I-MLE noise scale; Gumbel relaxation temperature.
    """

    def __init__(self, kind: SamplerType, k: int, nb_samples: int, alpha: float, beta: float, tau: float) -> None:
        super().__init__()
        if kind not in ("imle", "gumbel"):
            raise ValueError(f"unknown sampler type {kind!r}; expected 'imle' or 'gumbel'")
        if k < 1 or nb_samples < 1 or tau <= 0:
            raise ValueError(f"need k >= 1, nb_samples >= 1 and tau > 0, got {k}, {nb_samples}, {tau}")
        self.kind, self.k, self.nb_samples = kind, k, nb_samples
        self.alpha, self.beta, self.tau = alpha, beta, tau

    def draw_noise(self, num_nodes: int, like: torch.Tensor) -> torch.Tensor:
        """Training noise for `nb_samples` draws: tau * Sum-of-Gamma (imle) or standard Gumbel (gumbel).

        Shapes:
            -> (nb_samples, num_nodes), on `like`'s device and dtype.
        """
        shape = (self.nb_samples, num_nodes)
        if self.kind == "imle":
            return self.tau * sum_of_gamma_noise(shape, self.k, device=like.device, dtype=like.dtype)
        return gumbel_noise(shape, device=like.device, dtype=like.dtype)

    def forward(
        self, scores: torch.Tensor, index: torch.Tensor, num_graphs: int, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The node mask, averaged over the samples.

        Args:
            scores: node scores theta.
            index: graph of each node.
            num_graphs: number of graphs B.
            noise: the perturbations to add, one row per sample (tests inject it); default: drawn in
                training, none in eval (a deterministic top-k).

        Shapes:
            scores: (N,); index: (N,) int64; noise: (S, N) -> (N,) float in [0, 1], exactly k-hot per graph
            for each sample (so a multiple of 1/S).
        """
        # Top-k and its noise run in float32 under autocast too: bf16 scores tie easily (8 mantissa bits),
        # which changes which nodes are kept, and CPU Gamma sampling has no bf16 kernel.
        scores = scores.float()
        if noise is None:
            noise = self.draw_noise(scores.numel(), scores) if self.training else scores.new_zeros(1, scores.numel())
        if self.kind == "imle":
            return imle_topk(scores, noise, index, num_graphs, self.k, self.alpha, self.beta)
        masks = [straight_through_topk(scores + row, index, num_graphs, self.k, self.tau) for row in noise]
        return torch.stack(masks).mean(0)

    def extra_repr(self) -> str:
        settings = (f"{name}={getattr(self, name)}" for name in ("kind", "k", "nb_samples", "alpha", "beta", "tau"))
        return ", ".join(settings)
