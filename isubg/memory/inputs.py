"""The worst-case input a run can see, and the sizes of data not yet prepared.

`WorstCase` (isubg.memory.estimate) is sized from the config and, where a processed folder is given, from its
largest scene graph (`largest_graph`); `worst_case_batch` builds a real Batch of that size for the measurement
passes, and `synthetic_spec` stands in for a DataSpec when there is no processed data.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isubg.batch import Batch, DataSpec
from isubg.config import RunConfig
from isubg.data.scene_graphs import GraphVocab
from isubg.data.synthetic import random_batch
from isubg.data.tables import GraphTable
from isubg.errors import DataError
from isubg.memory.estimate import WorstCase

__all__ = ["batch_tensors", "largest_graph", "synthetic_spec", "worst_case_batch"]

TFIDF_PER_ROW = 8  # tf-idf entries per word of the synthetic matrix


def largest_graph(folder: Path) -> tuple[int, int]:
    """(most nodes, most edges) over the scene graphs of a processed folder: graphs_gt and graphs_detected.

    Both tables count whatever data.scene_graphs picks, so the bound holds for every mode and split. Edges count
    the reverse edges the dataset adds (isubg.data.scene_graphs.to_pyg), as the model sees them.

    Raises:
        DataError: a graph table is missing or malformed, or neither holds a graph.
    """
    most_nodes = most_edges = found = 0
    vocab = GraphVocab.load(Path(folder) / "graph_vocab.json")
    for kind in ("gt", "detected"):
        table = GraphTable(Path(folder) / f"graphs_{kind}", vocab)
        if not len(table):
            continue
        found += len(table)
        nodes, edges = table.sizes()
        most_nodes = max(most_nodes, int(nodes.max()))
        most_edges = max(most_edges, int((edges + _added_reverse_edges(table, edges)).max()))
    if not found:
        raise DataError(f"{folder}: graphs_gt and graphs_detected hold no scene graph")
    return max(most_nodes, 1), most_edges


def _added_reverse_edges(table: GraphTable, per_image: np.ndarray) -> np.ndarray:
    """Per image, the reverse edges `to_pyg` adds: distinct (t, s) of its edges (s, t) that are not edges.

    `per_image` is the table's relation edges per image (`GraphTable.sizes`).
    """
    image = np.repeat(np.arange(len(table), dtype=np.int64), per_image)
    pairs = np.asarray(table.a["edges"], dtype=np.int64).reshape(-1, 2)
    width = int(pairs.max()) + 1 if pairs.size else 1
    forward = (image * width + pairs[:, 0]) * width + pairs[:, 1]
    backward = np.unique((image * width + pairs[:, 1]) * width + pairs[:, 0])
    added = backward[~np.isin(backward, forward)]
    return np.bincount(added // (width * width), minlength=len(table))


@cache
def _synthetic_tfidf(words: int, per_row: int = TFIDF_PER_ROW) -> tuple[Any, Any, Any, tuple[int, int]]:
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


def batch_tensors(batch: Batch) -> list[torch.Tensor]:
    """Every tensor a Batch holds on the device, the scene-graph tensors included."""
    out = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    graphs = batch.graphs
    out += [graphs[key] for key in graphs.keys() if isinstance(graphs[key], torch.Tensor)]  # noqa: SIM118
    return out
