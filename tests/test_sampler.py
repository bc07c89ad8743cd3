"""The exact-k node-subset samplers: per-graph top-k in mixed batches, the I-MLE gradient as defined, the
straight-through Gumbel estimator, noise, sample averaging and determinism in eval."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from isubg.models.sampler import NodeSampler, graph_sizes, sum_of_gamma_noise, topk_per_graph


def _index(sizes: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def _topk_by_hand(scores: torch.Tensor, sizes: list[int], k: int) -> torch.Tensor:
    """Per-graph top-k with Python lists: highest first, ties to the lower index."""
    keep, start = [], 0
    for n in sizes:
        local = scores[start : start + n].tolist()
        best = sorted(range(n), key=lambda i: (-local[i], i))[:k]
        keep += [i in best for i in range(n)]
        start += n
    return torch.tensor(keep)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_topk_keeps_exactly_k_per_graph_in_a_mixed_batch(k: int) -> None:
    sizes = [1, 2, 7, 3, 12, 4]
    torch.manual_seed(k)
    scores = torch.randn(sum(sizes))
    keep = topk_per_graph(scores, _index(sizes), len(sizes), k)
    counts = torch.zeros(len(sizes), dtype=torch.long).index_add_(0, _index(sizes), keep.long())
    assert counts.tolist() == [min(k, n) for n in sizes]
    assert torch.equal(keep, _topk_by_hand(scores, sizes, k))


def test_topk_breaks_ties_by_node_order_and_ignores_other_graphs() -> None:
    # Graph 1's scores are far higher than graph 0's: a global top-k (or a padded one) would starve graph 0.
    scores = torch.tensor([0.0, -1.0, 0.0, 0.0, 50.0, 60.0, 70.0])
    keep = topk_per_graph(scores, _index([4, 3]), 2, 2)
    assert keep.tolist() == [True, False, True, False, False, True, True]


# theta and the fixed noise of the hand case: graphs {0, 1, 2} and {3, 4}, k = 1.
THETA = [0.5, 0.2, 0.1, 0.3, 0.9]
NOISE = [0.0, 0.35, 0.0, 0.0, 0.0]
DL_DZ = [0.0, 0.02, 0.0, 0.05, 0.1]  # the loss is sum(DL_DZ * z)
Z = [0.0, 1.0, 0.0, 0.0, 1.0]  # topk(theta + noise) = argmax of [0.5, 0.55, 0.1] and of [0.3, 0.9]
# (alpha, beta, z(theta')) with theta' + noise = alpha * theta - beta * DL_DZ + noise, worked out by hand:
TARGETS = [
    (1.0, 10.0, [1.0, 0.0, 0.0, 0.0, 1.0]),  # [0.5, 0.35, 0.1 | -0.2, -0.1]
    (1.0, 1.0, [0.0, 1.0, 0.0, 0.0, 1.0]),  # [0.5, 0.53, 0.1 | 0.25, 0.8]
    (1.0, 5.0, [1.0, 0.0, 0.0, 0.0, 1.0]),  # [0.5, 0.45, 0.1 | 0.05, 0.4]
    (0.5, 5.0, [0.0, 1.0, 0.0, 0.0, 1.0]),  # [0.25, 0.35, 0.05 | -0.1, -0.05]
]


@pytest.mark.parametrize(("alpha", "beta", "z_target"), TARGETS)
def test_imle_gradient_is_z_minus_z_of_the_target_scores(alpha: float, beta: float, z_target: list[float]) -> None:
    sampler = NodeSampler("imle", k=1, nb_samples=1, alpha=alpha, beta=beta, tau=1.0)
    theta = torch.tensor(THETA, requires_grad=True)
    z = sampler(theta, _index([3, 2]), 2, noise=torch.tensor([NOISE]))
    assert z.tolist() == Z
    (torch.tensor(DL_DZ) * z).sum().backward()
    assert theta.grad is not None
    torch.testing.assert_close(theta.grad, torch.tensor(Z) - torch.tensor(z_target), rtol=0, atol=0)


def test_imle_averages_samples_and_their_gradients() -> None:
    sampler = NodeSampler("imle", k=1, nb_samples=2, alpha=1.0, beta=10.0, tau=1.0)
    theta = torch.tensor(THETA, requires_grad=True)
    # Sample 2's noise makes node 2 win graph 0 and node 3 win graph 1, in the forward and in the target.
    noise = torch.tensor([NOISE, [0.0, 0.0, 1.0, 1.0, 0.0]])
    mask = sampler(theta, _index([3, 2]), 2, noise=noise)
    assert mask.tolist() == [0.0, 0.5, 0.5, 0.5, 0.5]
    (torch.tensor(DL_DZ) * mask).sum().backward()
    # The target uses dL/d(mask): theta' = theta - 10 * DL_DZ = [0.5, 0.0, 0.1 | -0.2, -0.1]. Sample 1 flips
    # graph 0 as in the hand case; sample 2's theta' + noise = [0.5, 0.0, 1.1 | 0.8, -0.1] keeps its z, so
    # its gradient is 0. The gradient is the mean over the samples.
    assert theta.grad is not None
    torch.testing.assert_close(theta.grad, torch.tensor([-0.5, 0.5, 0.0, 0.0, 0.0]), rtol=0, atol=0)


def _relaxed_by_hand(logits: torch.Tensor, sizes: list[int], k: int, tau: float) -> torch.Tensor:
    """k rounds of softmax(w / tau) per graph, w += log(1 - p) between rounds; graphs with <= k nodes: 1."""
    parts, start = [], 0
    for n in sizes:
        w = logits[start : start + n]
        if n <= k:
            parts.append(torch.ones(n))
        else:
            total, p = torch.zeros(n), torch.zeros(n)
            for _ in range(k):
                w = w + torch.log(1 - p)
                p = torch.softmax(w / tau, 0)
                total = total + p
            parts.append(total)
        start += n
    return torch.cat(parts)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_gumbel_is_straight_through(tau: float) -> None:
    sizes, k = [4, 1, 3], 2
    sampler = NodeSampler("gumbel", k=k, nb_samples=1, alpha=1.0, beta=10.0, tau=tau)
    theta = torch.tensor([0.3, -0.2, 1.0, 0.1, 0.4, 0.0, 0.5, -0.5], requires_grad=True)
    noise = torch.tensor([[0.2, 0.9, -0.3, 0.0, 0.1, 0.7, 0.0, 0.4]])
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0, -1.0, 2.0, 0.5])
    mask = sampler(theta, _index(sizes), 3, noise=noise)
    # Forward: exactly the hard k-hot of theta + noise = [0.5, 0.7, 0.7, 0.1 | 0.5 | 0.7, 0.5, -0.1].
    assert mask.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    (weights * mask).sum().backward()
    reference = theta.detach().clone().requires_grad_(True)
    (weights * _relaxed_by_hand(reference + noise[0], sizes, k, tau)).sum().backward()
    assert theta.grad is not None and reference.grad is not None
    torch.testing.assert_close(theta.grad, reference.grad, rtol=1e-6, atol=1e-7)
    assert theta.grad[4] == 0  # a one-node graph has no choice to make


def test_gumbel_gradient_depends_on_tau() -> None:
    grads = []
    for tau in (0.5, 2.0):
        theta = torch.tensor([0.3, -0.2, 1.0, 0.1], requires_grad=True)
        mask = NodeSampler("gumbel", 2, 1, 1.0, 10.0, tau)(theta, _index([4]), 1, noise=torch.zeros(1, 4))
        (torch.arange(4.0) * mask).sum().backward()
        grads.append(theta.grad)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("kind", ["imle", "gumbel"])
def test_eval_is_a_deterministic_plain_top_k(kind: str) -> None:
    sizes = [5, 2, 9]
    torch.manual_seed(0)
    scores = torch.randn(sum(sizes))
    sampler = NodeSampler(kind, k=3, nb_samples=3, alpha=1.0, beta=10.0, tau=2.0).eval()
    first, second = sampler(scores, _index(sizes), 3), sampler(scores, _index(sizes), 3)
    assert torch.equal(first, second)
    assert torch.equal(first, topk_per_graph(scores, _index(sizes), 3, 3).float())


@pytest.mark.parametrize("kind", ["imle", "gumbel"])
def test_training_samples_are_noisy_k_hot_averages(kind: str) -> None:
    sizes, k, samples = [6, 2, 8], 2, 3
    scores = torch.zeros(sum(sizes))  # all ties: only the noise decides
    sampler = NodeSampler(kind, k=k, nb_samples=samples, alpha=1.0, beta=10.0, tau=1.0).train()
    torch.manual_seed(0)
    mask = sampler(scores, _index(sizes), 3)
    counts = torch.zeros(3).index_add_(0, _index(sizes), mask)
    torch.testing.assert_close(counts, torch.tensor([2.0, 2.0, 2.0]))
    assert torch.allclose(mask * samples, (mask * samples).round())  # a mean of 0/1 masks
    assert not torch.equal(mask, topk_per_graph(scores, _index(sizes), 3, k).float())  # noise acted
    assert ((mask > 0) & (mask < 1)).any()  # the samples disagree somewhere, so they are averaged


def test_imle_noise_scales_with_tau() -> None:
    masks = []
    for tau in (0.01, 10.0):
        torch.manual_seed(3)
        sampler = NodeSampler("imle", k=2, nb_samples=1, alpha=1.0, beta=10.0, tau=tau).train()
        masks.append(sampler(torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0]), _index([6]), 1))
    assert masks[0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # tiny noise: the scores decide
    assert not torch.equal(masks[0], masks[1])


def test_sum_of_gamma_noise_has_its_mean() -> None:
    torch.manual_seed(0)
    k, s = 2, 10
    noise = sum_of_gamma_noise((20000,), k, iterations=s)
    # E[Gamma(1/k, rate i/k)] = 1/i, so E[eps] = (H_s - log s) / k.
    expected = (sum(1 / i for i in range(1, s + 1)) - math.log(s)) / k
    assert noise.shape == (20000,) and abs(noise.mean().item() - expected) < 0.03


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="sampler type"):
        NodeSampler("simple", 2, 1, 1.0, 10.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k >= 1"):
        NodeSampler("imle", 0, 1, 1.0, 10.0, 1.0)


@pytest.mark.parametrize("kind", ["imle", "gumbel"])
def test_sampling_issues_no_host_device_sync(kind: str) -> None:
    # Counted on the CPU: the ops that make a CUDA host wait (.item(), bincount, nonzero, ...). The sampler
    # ran one per Gamma draw (argument validation) and a bincount per call before.
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    syncing = {aten._local_scalar_dense.default, aten.bincount.default, aten.nonzero.default, aten._unique2.default}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            Count.n += func in syncing
            return func(*args, **(kwargs or {}))

    sampler = NodeSampler(kind, k=2, nb_samples=2, alpha=1.0, beta=10.0, tau=1.0).train()
    theta = torch.randn(9, requires_grad=True)
    index = _index([4, 3, 2])
    with Count():
        sampler(theta, index, 3).sum().backward()
    assert Count.n == 0
    assert graph_sizes(index, 4).tolist() == torch.bincount(index, minlength=4).tolist()
