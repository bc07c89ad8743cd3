"""Image pixels for the X-VLM Swin/ViT encoder: find an image id's file under data.image_root and preprocess it.

File names tried for an image id:

- GQA: `<root>/<imageId>.jpg`, then `<root>/<imageId>.png` (the GQA release's `images/` folder).
- VQA v2 (COCO): `COCO_<split>_<12-digit id>.jpg|png` in `<root>` or one of its direct subfolders (`train2014/`,
  `val2014/`, `test2015/`, ... any name), found through an index of those folders built once, on first use; then
  the plain `<id>.jpg|png` in `<root>`.

Preprocessing is X-VLM's test transform (dataset/__init__.py::create_dataset): RGB, `Resize((R, R), BICUBIC)`
without keeping the aspect ratio or cropping, scale to [0, 1], then normalise with the CLIP mean and std X-VLM
uses. X-VLM's training augmentation (RandomResizedCrop, RandomAugment, careful horizontal flip) is not applied:
every split gets the deterministic test transform. Output is numpy, so this module needs no torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import numpy as np

from isubg.errors import DataError

__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageLoader", "preprocess"]

# X-VLM normalises with the CLIP constants, not the ImageNet ones.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

_EXTENSIONS = (".jpg", ".png")
# COCO_train2014_000000262148.jpg -> 262148 (split names vary: train2014, val2014, test2015, test-dev2015...).
_COCO_NAME = re.compile(r"^COCO_[A-Za-z0-9-]+_(\d{12})\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def preprocess(path: Path, image_res: int) -> np.ndarray:
    """One image file as X-VLM's test transform gives it.

    Returns:
        (3, image_res, image_res) float32, channels RGB, normalised with CLIP_MEAN / CLIP_STD.

    Raises:
        DataError: the file cannot be opened or decoded as an image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((image_res, image_res), Image.Resampling.BICUBIC)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"image {path} cannot be read as an image ({type(exc).__name__}: {exc})") from exc
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    return np.ascontiguousarray(((pixels - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))


class ImageLoader:
    """Finds and preprocesses the image of an image id under one root folder.

    Args:
        root: data.image_root.
        image_res: output side R (model.xvlm.image_res).
        dataset: "GQA" or "VQA" (case-insensitive); picks the file-name rule (module docstring).

    Raises:
        DataError: the root is not a folder, or the dataset is neither GQA nor VQA.
    """

    def __init__(self, root: Path, image_res: int, dataset: Literal["GQA", "VQA"] | str) -> None:
        self.root = Path(root)
        self.image_res = int(image_res)
        self.dataset = str(dataset).upper()
        if self.dataset not in ("GQA", "VQA"):
            raise DataError(f"image loader: dataset must be GQA or VQA, got {dataset!r}")
        if not self.root.is_dir():
            raise DataError(f"data.image_root={self.root} is not a folder (the images of the X-VLM Swin/ViT encoder)")
        self._coco_index: dict[int, Path] | None = None  # built on first VQA lookup; per DataLoader worker

    def _coco(self) -> dict[int, Path]:
        """COCO id -> file for every `COCO_*_<12 digits>` image in the root and its direct subfolders."""
        if self._coco_index is None:
            index: dict[int, Path] = {}
            folders = [self.root, *sorted(p for p in self.root.iterdir() if p.is_dir())]
            for folder in folders:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        match = _COCO_NAME.match(entry.name)
                        if match:
                            # First folder wins: an id found twice (a train and a val copy) is one image.
                            index.setdefault(int(match.group(1)), Path(entry.path))
            self._coco_index = index
        return self._coco_index

    def find(self, image_id: str) -> Path:
        """The file of an image id.

        Raises:
            DataError: no file under any of the names tried; the message lists them.
        """
        tried: list[str] = []
        if self.dataset == "VQA" and str(image_id).isdigit():
            found = self._coco().get(int(image_id))
            if found is not None:
                return found
            tried.append(f"COCO_<split>_{int(image_id):012d}.jpg/.png in the root and its subfolders")
        for ext in _EXTENSIONS:
            candidate = self.root / f"{image_id}{ext}"
            if candidate.is_file():
                return candidate
            tried.append(candidate.name)
        raise DataError(
            f"no image file for {self.dataset} image id {image_id!r} under data.image_root={self.root}; "
            f"tried {', '.join(tried)}"
        )

    def load(self, image_id: str) -> np.ndarray:
        """The preprocessed image of an image id: (3, R, R) float32 (see `preprocess`).

        Raises:
            DataError: no file for the id (see `find`), or the file is not a readable image.
        """
        return preprocess(self.find(image_id), self.image_res)
