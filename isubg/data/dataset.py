"""Join a processed split's questions with their box features, scene graphs and stat words; collate to Batch.

`VQADataset` reads a folder written by `isubg data prepare` (or `isubg data demo`). Each item is a
`Sample` of numpy arrays and one PyG graph; `collate` pads them into the `Batch` contract with masks.
Its `scene_graphs` mode (data.scene_graphs) picks per image between the folder's ground-truth and detector
graphs and stat words (isubg.data.prepare.graph_sources); `graph_sources` says which were used.
`isubg.data.loaders` opens a split as the config says and turns it into an epoch's batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_geometric.data import Batch as GraphBatch
from torch_geometric.data import Data

from isubg.batch import Batch, DataSpec
from isubg.data.answers import AnswerVocab
from isubg.data.features import open_features, recorded_paths
from isubg.data.files import read_json
from isubg.data.images import ImageLoader
from isubg.data.prepare import SceneGraphMode, graph_sources, read_manifest
from isubg.data.scene_graphs import GraphVocab, SceneGraph
from isubg.data.tables import GraphTable, QuestionTable
from isubg.data.text import PAD, Dictionary, tokenize
from isubg.errors import DataError

__all__ = ["Sample", "VQADataset", "collate", "graph_token_words"]

MAX_ATTRIBUTES = 3  # attribute slots per scene-graph node
GRAPH_KINDS = ("gt", "detected")  # the graph tables of a processed folder, in the order "auto" looks


@dataclass
class Sample:
    """One question, ready to collate. L = question_len, S = num_stat_word, n = this image's boxes."""

    question_id: str
    image_id: str
    question: str
    qtype: str
    q_tokens: np.ndarray  # (L,) int64, 0-padded
    q_len: int
    entity: np.ndarray  # (L,) bool
    features: np.ndarray  # (n, D) float32
    spatials: np.ndarray  # (n, 6) float32
    stat_tokens: np.ndarray  # (S,) int64, 0-padded
    stat_len: int
    graph: Data
    labels: np.ndarray | None  # (m,) int64 answer ids with a positive score
    scores: np.ndarray | None  # (m,) float32
    image: np.ndarray | None = None  # (3, R, R) float32 pixels (isubg.data.images) when the dataset has an image root


MAX_TOKEN_WORDS = 4  # words of a scene-graph token kept for its shared word embedding ("to the left of")


def graph_token_words(vocab: GraphVocab, dictionary: Dictionary) -> np.ndarray:
    """(len(vocab), MAX_TOKEN_WORDS) int64: the question-dictionary ids of each graph token's words, 0-padded.

    Words the questions never use (and the special tokens) get 0, so they add nothing: a graph token then
    relies on its own embedding alone.
    """
    out = np.zeros((len(vocab), MAX_TOKEN_WORDS), dtype=np.int64)
    for i, token in enumerate(vocab.tokens):
        if token.startswith("<") and token.endswith(">"):
            continue
        ids = [dictionary.word_to_id(w) for w in tokenize(token) if w != PAD and w in dictionary][:MAX_TOKEN_WORDS]
        out[i, : len(ids)] = ids
    return out


def _pad(values: Sequence[int] | np.ndarray, length: int) -> tuple[np.ndarray, int]:
    kept = np.asarray(values, dtype=np.int64)[:length]
    out = np.zeros(length, dtype=np.int64)
    out[: len(kept)] = kept
    return out, len(kept)


class VQADataset(Dataset[Sample]):
    """The questions of one split of a processed folder.

    Args:
        folder: a processed data folder (has manifest.json).
        split: a split name listed in the manifest.
        question_len: tokens kept per question (truncated, then 0-padded).
        max_boxes: boxes kept per image (see FeatureStore's rule).
        num_stat_word: stat words per image.
        features: the HDF5 features, one file or several (shards, see FeatureShards); None: the file(s) recorded
            in the manifest. Relative paths are taken from `folder`.
        in_memory: read the features into RAM.
        image_root: data.image_root; when set each Sample carries its image's pixels (`Sample.image`,
            `Batch.images`) for the X-VLM Swin/ViT encoder. None: no pixels.
        image_res: image side R (model.xvlm.image_res).
        dataset_name: "GQA" or "VQA", the image file-name rule; None: the manifest's dataset.
        scene_graphs: data.scene_graphs. "auto": an image's ground-truth graph when it has one, else its
            detector graph; detector stat words. "gt": ground-truth graphs and stat words. "detected": detector
            graphs and stat words. Only the files the split needs are read.

    Attributes:
        graph_sources: {"graphs": ..., "stat_words": ...}, where this split's inputs come from, in words
            (isubg.data.prepare.graph_sources), e.g. {"graphs": "ground truth", "stat_words": "detector"}.

    Raises:
        DataError: not a processed folder (or one of an older processed format), unknown or empty split,
            missing features, an image root that is not a folder, or scene_graphs "gt" for a split whose images
            lack ground-truth graphs. A missing image file is a DataError when its sample is read.
    """

    def __init__(
        self,
        folder: Path,
        split: str,
        *,
        question_len: int,
        max_boxes: int,
        num_stat_word: int,
        features: Path | Sequence[Path] | None = None,
        in_memory: bool = False,
        image_root: Path | None = None,
        image_res: int = 480,
        dataset_name: str | None = None,
        scene_graphs: SceneGraphMode = "auto",
    ) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.folder}: no split '{split}'; it has {', '.join(self.manifest['splits'])}")
        self.split, self.scene_graphs = split, scene_graphs
        self.graph_sources = graph_sources(self.manifest, split, scene_graphs, self.folder)
        self.records = QuestionTable(self.folder / f"questions_{split}")
        if not len(self.records):
            raise DataError(f"{self.folder}: split '{split}' holds no questions")
        self.question_len, self.num_stat_word = question_len, num_stat_word
        self.answers = AnswerVocab.from_json(read_json(self.folder / "answers.json"))
        self.graph_vocab = GraphVocab.load(self.folder / "graph_vocab.json")
        self._tables = {kind: GraphTable(self.folder / f"graphs_{kind}", self.graph_vocab) for kind in GRAPH_KINDS}
        # Where `graph` looks, in order; stat words: the ground truth's only under "gt", else (also under "auto")
        # the detector's, as at test time.
        self._graph_kinds = {"gt": ("gt",), "detected": ("detected",), "auto": GRAPH_KINDS}[scene_graphs]
        self._stats_kind = "gt" if scene_graphs == "gt" else "detected"
        given = recorded_paths(self.manifest["features"]) if features is None else features
        paths = [Path(p) for p in ([given] if isinstance(given, (str, Path)) else given)]
        paths = [p if p.is_absolute() else self.folder / p for p in paths]
        self.features = open_features(paths, max_boxes=max_boxes, in_memory=in_memory)
        self.has_targets = self.records.answered(0)
        self.images: ImageLoader | None = None
        if image_root is not None:
            name = dataset_name if dataset_name is not None else str(self.manifest.get("dataset", ""))
            self.images = ImageLoader(Path(image_root), image_res, name)

    def spec(self) -> DataSpec:
        """Sizes and embeddings a model is built for (GloVe rows only when prepare was given GloVe)."""
        glove_path, tfidf_path = self.folder / "glove.npz", self.folder / "tfidf.npz"
        glove = np.load(glove_path)["vectors"] if glove_path.exists() else None
        tfidf = None
        if tfidf_path.exists():
            with np.load(tfidf_path) as stored:
                tfidf = (stored["rows"], stored["cols"], stored["values"], tuple(int(v) for v in stored["shape"]))
        dictionary = Dictionary.load(self.folder / "dictionary.json")
        return DataSpec(
            num_words=len(dictionary),
            num_answers=self.num_answers,
            num_graph_tokens=len(self.graph_vocab),
            feature_dim=self.feature_dim,
            max_attributes=MAX_ATTRIBUTES,
            glove=glove,
            tfidf=tfidf,
            graph_words=graph_token_words(self.graph_vocab, dictionary),
        )

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    @property
    def feature_dim(self) -> int:
        return self.features.feature_dim

    def close_files(self) -> None:
        """Close this process's open data files (reopened on the next read); call before forking workers."""
        self.features.close()

    def __len__(self) -> int:
        return len(self.records)

    def _no_graph(self, image_id: str) -> DataError:
        files = " or ".join(f"graphs_{kind}" for kind in self._graph_kinds)
        return DataError(f"{self.folder}: no scene graph for image {image_id} in {files}")

    def graph(self, image_id: str) -> SceneGraph:
        """The scene graph of an image, the one the model is fed under this dataset's `scene_graphs` mode."""
        for kind in self._graph_kinds:
            table = self._tables[kind]
            if image_id in table:
                return table.graph(table.rows[image_id])
        raise self._no_graph(image_id)

    def _graph_and_stats(self, index: int) -> tuple[Data, np.ndarray]:
        """Item `index`'s encoded scene graph under the mode and its image's stat-word ids, by the stored rows."""
        rows = dict(zip(GRAPH_KINDS, self.records.graph_rows(index), strict=True))
        kind = next((k for k in self._graph_kinds if rows[k] >= 0), None)
        if kind is None:
            raise self._no_graph(self.records.text("image_id", index))
        stats_row = rows[self._stats_kind]
        stats = self._tables[self._stats_kind].stat(stats_row) if stats_row >= 0 else np.zeros(0, np.int32)
        return self._tables[kind].pyg(rows[kind], MAX_ATTRIBUTES), stats

    def __getitem__(self, index: int) -> Sample:
        table = self.records
        image_id = table.text("image_id", index)
        boxes = self.features.get(image_id)
        tokens, entity = table.tokens(index)
        q_tokens, q_len = _pad(tokens, self.question_len)
        entity, _ = _pad(entity, self.question_len)
        graph, stats = self._graph_and_stats(index)
        stat_tokens, stat_len = _pad(stats, self.num_stat_word)
        targets = table.targets(index)
        return Sample(
            question_id=table.text("question_id", index),
            image_id=image_id,
            question=table.text("question", index),
            qtype=table.text("qtype", index),
            q_tokens=q_tokens,
            q_len=q_len,
            entity=entity.astype(bool),
            features=boxes.features,
            spatials=boxes.spatials,
            stat_tokens=stat_tokens,
            stat_len=stat_len,
            graph=graph,
            labels=None if targets is None else targets[0].astype(np.int64),
            scores=None if targets is None else targets[1].astype(np.float32),
            image=None if self.images is None else self.images.load(image_id),
        )


def _lengths_mask(lengths: Sequence[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.as_tensor(list(lengths))[:, None]


def collate(samples: Sequence[Sample], num_answers: int) -> Batch:
    """Pad samples into one Batch (shapes in isubg.batch.Batch).

    Boxes are padded to the largest count in this batch, so a batch of small images stays small.

    Raises:
        ValueError: an empty list, or samples with and without targets (or images) mixed.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    size, dim = max(s.features.shape[0] for s in samples), samples[0].features.shape[1]
    features = torch.zeros(len(samples), size, dim)
    spatials = torch.zeros(len(samples), size, 6)
    for i, s in enumerate(samples):
        features[i, : s.features.shape[0]] = torch.from_numpy(s.features)
        spatials[i, : s.spatials.shape[0]] = torch.from_numpy(s.spatials)
    labelled = {s.labels is not None for s in samples}
    if len(labelled) > 1:
        raise ValueError("a batch mixes samples with and without answers")
    targets = None
    if labelled == {True}:
        targets = torch.zeros(len(samples), num_answers)
        for i, s in enumerate(samples):
            targets[i, torch.from_numpy(s.labels)] = torch.from_numpy(s.scores)
    q_tokens = torch.from_numpy(np.stack([s.q_tokens for s in samples]))
    stat_tokens = torch.from_numpy(np.stack([s.stat_tokens for s in samples]))
    with_images = {s.image is not None for s in samples}
    if len(with_images) > 1:
        raise ValueError("a batch mixes samples with and without images")
    images = torch.from_numpy(np.stack([s.image for s in samples])) if with_images == {True} else None
    return Batch(
        question_ids=[s.question_id for s in samples],
        image_ids=[s.image_id for s in samples],
        questions=[s.question for s in samples],
        q_tokens=q_tokens,
        q_mask=_lengths_mask([s.q_len for s in samples], q_tokens.shape[1]),
        entity_mask=torch.from_numpy(np.stack([s.entity for s in samples])),
        features=features,
        spatials=spatials,
        box_mask=_lengths_mask([s.features.shape[0] for s in samples], size),
        stat_tokens=stat_tokens,
        stat_mask=_lengths_mask([s.stat_len for s in samples], stat_tokens.shape[1]),
        graphs=GraphBatch.from_data_list([s.graph for s in samples]),
        targets=targets,
        question_types=[s.qtype for s in samples],
        images=images,
    )
