"""COCO loading (compressed RLE, uncompressed RLE, polygons), aligned transforms, padding to 32, validation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from training.data.batching import collate
from training.data.coco import CocoInstances, ImageFolder, ResizePolicy, validate_coco
from training.data.images import read_rgb
from training.errors import UserError


def write_dataset(root: Path, height: int = 60, width: int = 90) -> Path:
    """One image with a bright square (compressed RLE), a polygon triangle and an uncompressed-RLE bar."""
    (root / "images").mkdir(parents=True)
    image = np.zeros((height, width, 3), np.uint8)
    image[10:30, 10:30] = 255
    Image.fromarray(image).save(root / "images" / "a.png")
    square = np.zeros((height, width), np.uint8, order="F")
    square[10:30, 10:30] = 1
    rle = mask_utils.encode(square)
    rle["counts"] = rle["counts"].decode()
    bar = np.zeros((height, width), np.uint8)
    bar[50:55, 0:80] = 1
    flat = bar.flatten(order="F")  # uncompressed RLE counts alternate zeros and ones, column-major
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    data = {
        "images": [{"id": 5, "file_name": "a.png", "width": width, "height": height}],
        "categories": [{"id": 3, "name": "thing"}, {"id": 9, "name": "other"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 3, "segmentation": rle, "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 9, "segmentation": [[40, 10, 80, 10, 60, 40]], "iscrowd": 0},
            {"id": 3, "image_id": 5, "category_id": 3, "segmentation": {"size": [height, width], "counts": counts}},
        ],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return root


def test_all_mask_encodings_decode(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    sample = CocoInstances(root / "images", root / "ann.json", ResizePolicy((60,), 1000))[0]
    assert sample.image.shape == (3, 60, 90) and sample.masks.shape == (3, 60, 90)
    assert sample.labels.tolist() == [0, 1, 0]  # category ids 3, 9, 3 -> contiguous labels
    assert sample.masks[0].sum() == 400 and sample.masks[0, 10:30, 10:30].all()
    assert 500 < sample.masks[1].sum() < 700  # triangle of base 40 and height 30
    assert sample.masks[2].sum() == 400 and sample.masks[2, 50:55, 0:80].all()
    assert sample.image_id == 5


def test_class_agnostic_merges_categories(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    dataset = CocoInstances(root / "images", root / "ann.json", ResizePolicy((60,), 1000), class_agnostic=True)
    assert dataset.category_ids == [1] and dataset.class_names == ["object"]
    assert dataset[0].labels.tolist() == [0, 0, 0]


def test_resize_and_flip_keep_masks_on_their_pixels(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    dataset = CocoInstances(root / "images", root / "ann.json", ResizePolicy((120,), 1000, hflip=True))
    for seed in range(6):  # both flip outcomes occur
        sample = dataset[(0, seed)]
        assert sample.image.shape == (3, 120, 180)
        bright = sample.image[0] > 128
        square = sample.masks[0].bool()
        assert (bright & square).sum() / square.sum() > 0.97 and (bright & ~square).sum() < 0.03 * square.sum()
        assert sample.geometry.resized_height == 120 and sample.geometry.original_width == 90


def test_collate_pads_to_a_multiple_of_32(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    dataset = CocoInstances(root / "images", root / "ann.json", ResizePolicy((60,), 1000))
    batch = collate([dataset[0], dataset[0]])
    assert batch.images.shape == (2, 3, 64, 96) and batch.masks[0].shape == (3, 64, 96)
    assert batch.images[:, :, 60:].sum() == 0 and batch.images[:, :, :, 90:].sum() == 0
    assert torch.equal(batch.masks[0][:, :60, :90], dataset[0].masks)


def test_image_folder_reads_unlabeled_images(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    sample = ImageFolder.from_folder(root / "images", ResizePolicy((30,), 1000))[0]
    assert sample.image.shape == (3, 30, 45) and sample.masks.shape == (0, 30, 45)


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, "GIF")
    return buffer.getvalue()


def test_read_rgb_converts_every_mode_to_8_bit_rgb(tmp_path: Path) -> None:
    """The one decoder on files: palette, greyscale+alpha, RGBA and CMYK become RGB as PIL converts them; a 16-bit
    TIFF keeps its high byte (PIL's convert("RGB") would make every value above 255 white)."""
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    picture = Image.fromarray(rgb)
    for mode, suffix in (("P", "png"), ("LA", "png"), ("RGBA", "webp"), ("CMYK", "tiff"), ("L", "bmp")):
        converted = picture.convert(mode)
        converted.save(tmp_path / f"{mode}.{suffix}", **({"lossless": True} if suffix == "webp" else {}))
        assert np.array_equal(read_rgb(tmp_path / f"{mode}.{suffix}"), np.asarray(converted.convert("RGB"))), mode
    deep = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 109).astype(np.uint16)  # 0 .. 65291
    Image.fromarray(deep).save(tmp_path / "deep.tiff")
    assert np.array_equal(read_rgb(tmp_path / "deep.tiff"), np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, 2))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "image not found"),
        (b"", "empty image"),
        (gif_bytes(), "unsupported image format GIF"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "cannot read image"),
    ],
)
def test_read_rgb_errors_name_the_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "picture.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        read_rgb(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("annotations"), "'annotations' must be a list"),
        (lambda d: d["images"][0].pop("file_name"), "images[0] has no 'file_name'"),
        (lambda d: d["annotations"][0].update(image_id=77), "refers to unknown image 77"),
        (lambda d: d["annotations"][0].update(category_id=4), "refers to unknown category 4"),
        (lambda d: d["annotations"][1].update(segmentation="x"), "neither RLE nor polygons"),
        (lambda d: d.update(images=[]), "no images"),
        (lambda d: d["annotations"][1].update(segmentation=[[1, 2]]), "polygon of 2 numbers"),
        (lambda d: d["annotations"][1].update(segmentation=[[1, 2, 3, 4, 5, 6, 7]]), "polygon of 7 numbers"),
        (lambda d: d["annotations"][1].update(segmentation=[[1, 2, "3", 4, 5, 6]]), "lists of numbers"),
        (lambda d: d["annotations"][0]["segmentation"].update(size=[5]), "RLE size must be [height, width]"),
        (lambda d: d["annotations"][0]["segmentation"].update(size=[90, 60]), "differs from its image's"),
        (lambda d: d["annotations"][2]["segmentation"]["counts"].append(1), "adding up to height x width"),
        (lambda d: d["annotations"][0]["segmentation"].update(counts=None), "string or a list of run lengths"),
        (lambda d: d["images"][0].update(width=-5), "width must be a positive integer, got -5"),
        (lambda d: d["images"][0].update(height="x"), "height must be a positive integer, got 'x'"),
        (lambda d: d["images"][0].update(height=True), "height must be a positive integer, got True"),
    ],
)
def test_schema_problems_name_the_entry(tmp_path: Path, mutate, message: str) -> None:
    data = json.loads((write_dataset(tmp_path) / "ann.json").read_text())
    mutate(data)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_coco(data, tmp_path / "ann.json")
