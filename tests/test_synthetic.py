"""random_batch follows the Batch contract at the sizes asked for."""

from __future__ import annotations

import torch

from isubg.batch import DataSpec
from isubg.data.synthetic import random_batch

SPEC = DataSpec(num_words=50, num_answers=20, num_graph_tokens=30, feature_dim=16)


def test_sizes_masks_and_padding() -> None:
    b = random_batch(SPEC, 3, boxes=[5, 9, 2], question_len=7, tokens=[7, 3, 1], stat_words=4, nodes=[4, 1, 6],
                     edges=[5, 0, 9], seed=1)  # fmt: skip
    assert b.features.shape == (3, 9, 16) and b.box_mask.sum(1).tolist() == [5, 9, 2]
    assert not b.features[2, 2:].any() and not b.spatials[0, 5:].any()
    assert b.q_mask.sum(1).tolist() == [7, 3, 1] and (b.q_tokens[~b.q_mask] == 0).all()
    assert (b.q_tokens[b.q_mask] >= 2).all() and int(b.q_tokens.max()) < SPEC.num_words
    assert b.graphs.num_graphs == 3 and b.graphs.x.shape == (11, 4) and b.graphs.edge_index.shape == (2, 14)
    assert int(b.graphs.x.max()) < SPEC.num_graph_tokens
    assert b.targets is not None and b.targets.shape == (3, 20) and (b.targets > 0).sum(1).tolist() == [3, 3, 3]
    assert not (b.entity_mask & ~b.q_mask).any()


def test_seeded() -> None:
    a, b = random_batch(SPEC, 2, seed=5), random_batch(SPEC, 2, seed=5)
    assert torch.equal(a.features, b.features) and torch.equal(a.graphs.edge_index, b.graphs.edge_index)
    assert not torch.equal(a.features, random_batch(SPEC, 2, seed=6).features)
