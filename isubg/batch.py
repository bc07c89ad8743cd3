"""The one data <-> model contract: a collated mini-batch, every tensor's shape and meaning documented.

Data code builds `Batch` objects (isubg.data.dataset.collate); model code reads them. Neither side
imports the other, so this dataclass is the whole interface between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch_geometric.data import Batch as GraphBatch

__all__ = ["Batch", "DataSpec"]


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its data before seeing a batch (sizes and optional embeddings).

    Attributes:
        num_words: question dictionary size (ids 0 = <pad>, 1 = <unk>).
        num_answers: answer vocabulary size A.
        num_graph_tokens: scene-graph token vocabulary size (node names, attributes, relations).
        feature_dim: box feature width D.
        max_attributes: attribute slots per graph node (x has 1 + max_attributes columns).
        glove: (num_words, 300) float32 GloVe rows from the processed folder, or None.
        tfidf: the tf-idf weights as (rows, cols, values, shape) numpy arrays, or None.
        graph_words: (num_graph_tokens, W) int64 question-dictionary ids of each scene-graph token's words
            ("in front of" -> 3 ids), 0-padded; all 0 for special tokens and tokens with no known word. None:
            not known (a hand-made spec).
    """

    num_words: int
    num_answers: int
    num_graph_tokens: int
    feature_dim: int
    max_attributes: int = 3
    glove: Any = None
    tfidf: Any = None
    graph_words: Any = None


@dataclass
class Batch:
    """A mini-batch of B questions.

    Shapes: B questions; K the largest box count in the batch (<= data.max_boxes); D the box feature
    width; L = data.question_len; S = data.num_stat_word; A answers in the vocabulary; N and E the
    nodes and edges of all scene graphs together. Padding is always id 0 / zeros and always masked:
    every padded tensor has a boolean mask that is True on real entries.

    Attributes:
        question_ids: B question ids (strings, as in the source files).
        image_ids: B image ids (strings).
        questions: B raw question texts (for the X-VLM tokenizer).
        q_tokens: (B, L) int64 word ids of the question, 0 = <pad>, 1 = <unk>.
        q_mask: (B, L) bool, True on real tokens.
        entity_mask: (B, L) bool, True on question tokens that name an object (entity words).
        features: (B, K, D) float32 box features, zero rows past each image's box count.
        spatials: (B, K, 6) float32 normalised x1, y1, x2, y2, w, h.
        box_mask: (B, K) bool, True on real boxes.
        stat_tokens: (B, S) int64 statistical (image label) word ids, 0 = <pad>.
        stat_mask: (B, S) bool.
        graphs: a torch_geometric Batch of B scene graphs: `x` (N, 1 + attrs) int64 node tokens,
            `edge_index` (2, E), `edge_attr` (E,) relation tokens, `edge_reverse` (E,) bool,
            `box` (N, 4) normalised boxes, `batch` (N,) graph index.
        targets: (B, A) float32 soft scores in [0, 1], or None for splits without answers.
        question_types: B question types for per-type metrics (GQA structural type, VQA answer type).
        images: (B, 3, R, R) float32 image pixels for the X-VLM Swin/ViT encoder, R = model.xvlm.image_res,
            resized and normalised with X-VLM's CLIP mean/std (isubg.data.images); None when the dataset has no
            data.image_root.
    """

    question_ids: list[str]
    image_ids: list[str]
    questions: list[str]
    q_tokens: torch.Tensor
    q_mask: torch.Tensor
    entity_mask: torch.Tensor
    features: torch.Tensor
    spatials: torch.Tensor
    box_mask: torch.Tensor
    stat_tokens: torch.Tensor
    stat_mask: torch.Tensor
    graphs: GraphBatch
    targets: torch.Tensor | None
    question_types: list[str]
    images: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.question_ids)

    def _map(self, fn: Callable[[Any], Any]) -> Batch:
        """A copy with `fn` applied to every tensor and to the graph batch; None fields (targets, images) stay None."""
        changed = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, GraphBatch)):
                changed[f.name] = fn(value)
        return replace(self, **changed)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor (and the graph batch) on `device`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Pinned copies of the tensors, so `to(cuda, non_blocking=True)` overlaps with compute.

        DataLoader(pin_memory=True) calls this on custom batch types.
        """
        return self._map(lambda t: t.pin_memory())
