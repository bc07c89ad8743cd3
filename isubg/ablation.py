"""Input ablations: does a trained model use an input? Shuffle it across the batch (or zero it) and score again.

A model that reads an input loses accuracy when each question is shown another image's version of it; a model
that learned question priors does not. `isubg eval --ablate KIND` and `benchmarks/bench_quality.py` apply these
to every evaluation batch. Kinds:

- `boxes`: box features, spatials and box mask (and images, for the X-VLM image encoder) shuffled across the batch;
- `zero`: box features and spatials set to zero (the box mask is kept, so every box is still "there");
- `graphs`: scene graphs shuffled across the batch;
- `stats`: stat words (the image's label words) shuffled across the batch;
- `image`: all of boxes, graphs and stat words shuffled together: only the question is left.

A shuffle is a permutation of the batch rows in which every row gets another image's inputs wherever the batch
allows it (questions about one image often sit side by side), drawn from a seed, so a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch_geometric.data import Batch as GraphBatch

from isubg.batch import Batch

__all__ = ["ABLATIONS", "ablate", "ablated", "shuffle_index"]

ABLATIONS: tuple[str, ...] = ("boxes", "zero", "graphs", "stats", "image")


def shuffle_index(image_ids: Sequence[str], seed: int) -> torch.Tensor:
    """A permutation of range(len(image_ids)) that sends each row to a row of another image where it can.

    A seeded random permutation, then every row still paired with its own image swaps its partner with a row
    for which the swap pairs both with other images. A batch of one image keeps its own rows (nothing to swap).

    Returns:
        (B,) int64: row i of the ablated batch reads row perm[i] of the original.
    """
    n = len(image_ids)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    for i in range(n):
        if image_ids[perm[i]] != image_ids[i]:
            continue
        for j in range(n):
            if image_ids[perm[j]] != image_ids[i] and image_ids[perm[i]] != image_ids[j]:
                perm[i], perm[j] = perm[j], perm[i]
                break
    return torch.tensor(perm, dtype=torch.long)


def ablate(batch: Batch, kind: str, seed: int = 0) -> Batch:
    """A copy of `batch` with one input shuffled across its rows or zeroed (see the module docstring).

    Shapes are unchanged: features (B, K, D), spatials (B, K, 6), box_mask (B, K), stat_tokens / stat_mask (B, S),
    graphs B graphs; questions, targets and ids stay in place.

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in ABLATIONS:
        raise ValueError(f"unknown ablation {kind!r}; expected one of {', '.join(ABLATIONS)}")
    perm = shuffle_index(batch.image_ids, seed)
    changes: dict[str, Any] = {}
    if kind in ("boxes", "image"):
        changes.update(features=batch.features[perm], spatials=batch.spatials[perm], box_mask=batch.box_mask[perm])
        if batch.images is not None:
            changes["images"] = batch.images[perm]
    if kind == "zero":
        changes.update(features=torch.zeros_like(batch.features), spatials=torch.zeros_like(batch.spatials))
    if kind in ("graphs", "image"):
        graphs = batch.graphs.to_data_list()
        changes["graphs"] = GraphBatch.from_data_list([graphs[int(i)] for i in perm])
    if kind in ("stats", "image"):
        changes.update(stat_tokens=batch.stat_tokens[perm], stat_mask=batch.stat_mask[perm])
    return replace(batch, **changes)


def ablated(batches: Iterable[Batch], kind: str | None, seed: int = 0) -> Iterator[Batch]:
    """Each batch ablated by `kind` (batch i with seed `seed + i`), or unchanged when kind is None."""
    for i, batch in enumerate(batches):
        yield batch if kind is None else ablate(batch, kind, seed=seed + i)
