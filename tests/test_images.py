"""Image input for the X-VLM Swin/ViT encoder: finding files (GQA and COCO names), X-VLM's preprocessing, errors,
and the dataset/collate path to `Batch.images`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from processed import question_records

from isubg.data.dataset import VQADataset, collate
from isubg.data.images import CLIP_MEAN, CLIP_STD, ImageLoader, preprocess
from isubg.errors import DataError

RES = 16


def _write(path: Path, color: tuple[int, int, int] = (255, 0, 128), size: tuple[int, int] = (40, 30)) -> Path:
    """A solid-colour image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_gqa_names_jpg_then_png(tmp_path: Path) -> None:
    jpg = _write(tmp_path / "2354786.jpg")
    png = _write(tmp_path / "n161313.png")
    loader = ImageLoader(tmp_path, RES, "gqa")
    assert loader.find("2354786") == jpg and loader.find("n161313") == png


def test_coco_names_in_split_subfolders_and_plain_names(tmp_path: Path) -> None:
    train = _write(tmp_path / "train2014" / "COCO_train2014_000000262148.jpg")
    val = _write(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    test = _write(tmp_path / "COCO_test2015_000000000001.png")
    plain = _write(tmp_path / "77.jpg")
    _write(tmp_path / "val2014" / "notes.jpg")  # not a COCO name: ignored by the index
    loader = ImageLoader(tmp_path, RES, "VQA")
    assert loader.find("262148") == train and loader.find("42") == val and loader.find("1") == test
    assert loader.find("77") == plain
    # The folder is indexed once: a file added later under a COCO name is not seen, plain names still are.
    _write(tmp_path / "train2014" / "COCO_train2014_000000000005.jpg")
    with pytest.raises(DataError):
        loader.find("5")


def test_pixels_are_resized_and_normalised_as_xvlm_does(tmp_path: Path) -> None:
    path = _write(tmp_path / "1.png", color=(255, 0, 128), size=(40, 30))
    pixels = ImageLoader(tmp_path, RES, "GQA").load("1")
    assert pixels.shape == (3, RES, RES) and pixels.dtype == np.float32
    # X-VLM normalises with CLIP's constants (reference doc 3.10), not ImageNet's.
    np.testing.assert_allclose(CLIP_MEAN, [0.48145466, 0.4578275, 0.40821073])
    np.testing.assert_allclose(CLIP_STD, [0.26862954, 0.26130258, 0.27577711])
    expected = (np.array([255, 0, 128], dtype=np.float32) / 255 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(pixels.mean(axis=(1, 2)), expected, atol=1e-5)
    assert np.allclose(pixels, expected[:, None, None], atol=1e-5)
    # Channel-first layout and orientation: a left-black / right-white image keeps its halves.
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))
    image.save(path)
    halves = preprocess(path, RES)
    assert (halves[:, :, : RES // 2 - 1] < 0).all() and (halves[:, :, RES // 2 + 1 :] > 0).all()
    assert not np.allclose(halves, pixels)


def test_missing_image_names_id_root_and_names_tried(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'262148'.*image_root=.*COCO_<split>_000000262148\.jpg.*262148\.png"):
        ImageLoader(tmp_path, RES, "VQA").find("262148")
    with pytest.raises(DataError, match=r"GQA image id 'n1'.*tried n1\.jpg, n1\.png"):
        ImageLoader(tmp_path, RES, "GQA").load("n1")


def test_bad_root_bad_dataset_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        ImageLoader(tmp_path / "absent", RES, "GQA")
    with pytest.raises(DataError, match="GQA or VQA"):
        ImageLoader(tmp_path, RES, "COCO")
    (tmp_path / "3.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"3\.jpg cannot be read as an image"):
        ImageLoader(tmp_path, RES, "GQA").load("3")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo (GQA and VQA processed folders) with an image per image id: GQA names in images/gqa, COCO names
    in images/coco/train2014."""
    from isubg.data.embedded import build_demo

    root = tmp_path_factory.mktemp("demo")
    build = build_demo(root, size="tiny", seed=0)
    rng = np.random.default_rng(0)
    for dataset in ("gqa", "vqa"):
        folder = build.processed(dataset)
        ids = {r["image_id"] for r in question_records(folder, "train")}
        for image_id in ids:
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            name = f"{image_id}.jpg" if dataset == "gqa" else f"train2014/COCO_train2014_{int(image_id):012d}.jpg"
            _write(root / "images" / dataset / name, color, size=(24, 18))
    return root


@pytest.mark.parametrize("dataset", ["gqa", "vqa"])
def test_dataset_with_image_root_gives_batch_images(demo: Path, dataset: str) -> None:
    folder = demo / "processed" / dataset
    kwargs = {"question_len": 12, "max_boxes": 36, "num_stat_word": 10}
    data = VQADataset(folder, "train", **kwargs, image_root=demo / "images" / dataset, image_res=32)
    batch = collate([data[i] for i in range(4)], data.num_answers)
    assert batch.images is not None and batch.images.shape == (4, 3, 32, 32) and batch.images.dtype == torch.float32
    first = data.images.load(batch.image_ids[0]) if data.images is not None else None
    assert first is not None and torch.equal(batch.images[0], torch.from_numpy(first))
    moved = batch.to("cpu")
    assert moved.images is not None and torch.equal(moved.images, batch.images)

    plain = VQADataset(folder, "train", **kwargs)
    plain_batch = collate([plain[i] for i in range(4)], plain.num_answers)
    assert plain[0].image is None and plain_batch.images is None and plain_batch.to("cpu").images is None
    with pytest.raises(ValueError, match="with and without images"):
        collate([data[0], plain[1]], data.num_answers)


def test_dataset_name_overrides_the_manifest(demo: Path) -> None:
    kwargs = {"question_len": 12, "max_boxes": 36, "num_stat_word": 10}
    folder = demo / "processed" / "vqa"
    data = VQADataset(folder, "train", **kwargs, image_root=demo / "images" / "vqa", image_res=32, dataset_name="GQA")
    with pytest.raises(DataError, match=r"GQA image id .* tried"):
        data[0]  # GQA names (<id>.jpg) are not in the COCO-named folder
