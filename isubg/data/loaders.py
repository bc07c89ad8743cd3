"""The batches training, evaluation and the tests read: a processed split opened as the config says, and one
epoch of it on one process.

`open_split` builds the `VQADataset` of a split from `cfg.data` (pixels only when the xvlm branch encodes
images); `make_batches` wraps it in a DataLoader whose order is an `EpochOrder`, so it depends only on
(train.seed, epoch, rank, world size) and can resume after `skip` samples. Training (`isubg.train`),
`isubg eval` and the quality checks all take their batches from here, so they see the same ones.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from isubg.config import RunConfig
from isubg.data.dataset import VQADataset, collate
from isubg.data.order import EpochOrder
from isubg.models.xvlm_config import image_input

__all__ = ["make_batches", "open_split"]


def open_split(cfg: RunConfig, folder: Path, split: str, limit: int | None) -> VQADataset:
    """One processed split, cut to its first `limit` questions when a limit is set."""
    d = cfg.data
    image_root, image_res = image_input(cfg)  # pixels only when the xvlm branch encodes images
    dataset = VQADataset(
        folder,
        split,
        question_len=d.question_len,
        max_boxes=d.max_boxes,
        num_stat_word=d.num_stat_word,
        features=d.features,
        in_memory=d.in_memory,
        image_root=image_root,
        image_res=image_res,
        scene_graphs=d.scene_graphs,
    )
    if limit is not None:
        dataset.records = dataset.records[:limit]
    return dataset


def make_batches(
    dataset: VQADataset,
    cfg: RunConfig,
    *,
    rank: int = 0,
    world: int = 1,
    epoch: int,
    train: bool,
    skip: int = 0,
) -> DataLoader:
    """The epoch's batches on process `rank` of `world`, after `skip` samples already trained on.

    Training batches (`train=True`) are shuffled per (train.seed, epoch) and padded so every rank gets as many;
    evaluation batches keep the split's order, at eval.batch_size (unset: twice train.batch_size).
    """
    batch_size = cfg.train.batch_size if train else (cfg.eval.batch_size or 2 * cfg.train.batch_size)
    order = EpochOrder(
        len(dataset), seed=cfg.train.seed, epoch=epoch, shuffle=train, rank=rank, world=world, pad=train, skip=skip
    )
    if cfg.data.num_workers > 0:
        # Workers fork from this process: an HDF5 handle it opened (validation, an earlier epoch without
        # workers) must not be inherited, as HDF5 is not fork-safe; each worker opens its own.
        dataset.close_files()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        num_workers=cfg.data.num_workers,
        collate_fn=partial(collate, num_answers=dataset.num_answers),
        # A private generator: the loader's worker seeding must not draw from the global RNG, or a run resumed
        # mid-epoch would see different dropout and sampler noise than the uninterrupted run.
        generator=torch.Generator().manual_seed(cfg.train.seed),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
