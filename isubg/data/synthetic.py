"""Random batches of chosen sizes: worst-case inputs for memory sizing, benchmark inputs, test fixtures.

The tensors follow the `Batch` contract exactly (masks, padding, graph batch), with every sample at the
given sizes unless a per-sample list is given, so a model cannot tell them from real batches by shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch_geometric.data import Batch as GraphBatch
from torch_geometric.data import Data

from isubg.batch import Batch, DataSpec

__all__ = ["random_batch", "random_graph"]


def _per_sample(value: int | Sequence[int], batch_size: int, name: str, minimum: int = 1) -> list[int]:
    values = [value] * batch_size if isinstance(value, int) else list(value)
    if len(values) != batch_size or min(values) < minimum:
        raise ValueError(f"{name}: need {batch_size} sizes >= {minimum}, got {values}")
    return values


def random_graph(nodes: int, edges: int, spec: DataSpec, generator: torch.Generator) -> Data:
    """A random scene graph with `nodes` nodes and `edges` edges (no self-loops when nodes > 1)."""
    tokens = torch.randint(2, max(3, spec.num_graph_tokens), (nodes, 1 + spec.max_attributes), generator=generator)
    source = torch.randint(0, nodes, (edges,), generator=generator)
    offset = torch.randint(1, max(2, nodes), (edges,), generator=generator)
    target = (source + offset) % nodes if nodes > 1 else source
    corner = torch.rand(nodes, 2, generator=generator) * 0.7
    box = torch.cat([corner, corner + 0.05 + torch.rand(nodes, 2, generator=generator) * 0.25], 1).clamp(max=1.0)
    return Data(
        x=tokens,
        edge_index=torch.stack([source, target]),
        edge_attr=torch.randint(2, max(3, spec.num_graph_tokens), (edges,), generator=generator),
        edge_reverse=torch.rand(edges, generator=generator) < 0.3,
        box=box,
        num_nodes=nodes,
    )


def random_batch(
    spec: DataSpec,
    batch_size: int,
    *,
    boxes: int | Sequence[int] = 50,
    question_len: int = 12,
    tokens: int | Sequence[int] | None = None,
    stat_words: int = 30,
    nodes: int | Sequence[int] = 30,
    edges: int | Sequence[int] = 170,
    answers_per_question: int = 3,
    seed: int = 0,
) -> Batch:
    """A Batch of random data at the given sizes (per-sample lists allowed for boxes, tokens, nodes, edges).

    Args:
        spec: vocabulary sizes and feature width.
        batch_size: B.
        boxes: real boxes per sample; the batch pads to the largest.
        question_len: L, the padded question length.
        tokens: real question tokens per sample (default: all L).
        stat_words: S (all real).
        nodes, edges: scene-graph sizes per sample.
        answers_per_question: answers with a positive soft score per target row.
        seed: makes the batch reproducible.
    """
    gen = torch.Generator().manual_seed(seed)
    box_counts = _per_sample(boxes, batch_size, "boxes")
    token_counts = _per_sample(question_len if tokens is None else tokens, batch_size, "tokens")
    node_counts, edge_counts = (
        _per_sample(nodes, batch_size, "nodes"),
        _per_sample(edges, batch_size, "edges", minimum=0),
    )
    width = max(box_counts)
    box_mask = torch.arange(width)[None] < torch.tensor(box_counts)[:, None]
    q_mask = torch.arange(question_len)[None] < torch.tensor(token_counts)[:, None]
    corner = torch.rand(batch_size, width, 2, generator=gen) * 0.7
    far = (corner + 0.05 + torch.rand(batch_size, width, 2, generator=gen) * 0.25).clamp(max=1.0)
    spatials = torch.cat([corner, far, far - corner], 2) * box_mask[..., None]
    q_tokens = torch.randint(2, max(3, spec.num_words), (batch_size, question_len), generator=gen) * q_mask
    targets = torch.zeros(batch_size, spec.num_answers)
    scores = ([1.0, 0.6] + [0.3] * max(0, answers_per_question - 2))[:answers_per_question]
    for row in range(batch_size):
        picks = torch.randperm(spec.num_answers, generator=gen)[: len(scores)]
        targets[row, picks] = torch.tensor(scores[: len(picks)])
    graphs = [random_graph(n, e, spec, gen) for n, e in zip(node_counts, edge_counts, strict=True)]
    return Batch(
        question_ids=[f"q{seed}-{i}" for i in range(batch_size)],
        image_ids=[f"i{seed}-{i}" for i in range(batch_size)],
        questions=["what is the thing on the left" for _ in range(batch_size)],
        q_tokens=q_tokens,
        q_mask=q_mask,
        entity_mask=q_mask & (torch.rand(batch_size, question_len, generator=gen) < 0.3),
        features=torch.rand(batch_size, width, spec.feature_dim, generator=gen) * box_mask[..., None],
        spatials=spatials,
        box_mask=box_mask,
        stat_tokens=torch.randint(2, max(3, spec.num_words), (batch_size, stat_words), generator=gen),
        stat_mask=torch.ones(batch_size, stat_words, dtype=torch.bool),
        graphs=GraphBatch.from_data_list(graphs),
        targets=targets,
        question_types=["query"] * batch_size,
    )
