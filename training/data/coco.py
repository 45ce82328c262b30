"""COCO-format instance datasets (RLE or polygon masks) and folders of unlabeled images.

The annotation json is validated up front, so a bad file fails in one line that names it and the offending entry,
before any training time is spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from training.data.batching import Sample
from training.data.images import list_images, read_rgb
from training.data.transforms import hflip, resize_image, resize_masks, to_tensor_image
from training.errors import UserError
from training.geometry import ImageGeometry, fit_within, resized_shape


@dataclass(frozen=True)
class ResizePolicy:
    """Shorter side to one of ``sizes`` (chosen at random when training), longer side at most ``max_size``; with a
    ``canvas`` (a fixed-size graph's H x W, at test time), then fitted into it; ``resize_filter`` and
    ``resize_rounding`` as in ``InputConfig`` (``training.geometry``)."""

    sizes: tuple[int, ...]
    max_size: int
    hflip: bool = False
    resize_filter: str = "antialias"
    resize_rounding: str = "half_even"
    canvas: tuple[int, int] | None = None


def load_annotation_file(path: Path) -> dict[str, Any]:
    """Parse and validate a COCO instances json; every problem is a UserError naming the file."""
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid json ({error})") from None
    validate_coco(data, path)
    return data


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise UserError(f"{path}: {message}")


def validate_coco(data: Any, path: Path) -> None:
    """Check the parts of the COCO schema this project reads, every entry of the file: training samples images at
    random, so a bad entry found only when its image comes up would stop a run mid-way."""
    _require(isinstance(data, dict), path, "top level must be an object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        _require(isinstance(data.get(key), list), path, f"'{key}' must be a list")
    _require(len(data["images"]) > 0, path, "no images (empty dataset)")
    _require(len(data["categories"]) > 0, path, "no categories")
    for index, image in enumerate(data["images"]):
        _require(isinstance(image, dict), path, f"images[{index}] must be an object")
        for key in ("id", "file_name", "width", "height"):
            _require(key in image, path, f"images[{index}] has no '{key}'")
        for key in ("width", "height"):
            _require(
                _is_count(image[key]) and image[key] > 0,
                path,
                f"images[{index}] {key} must be a positive integer, got {image[key]!r}",
            )
    for index, category in enumerate(data["categories"]):
        _require(isinstance(category, dict) and "id" in category, path, f"categories[{index}] has no 'id'")
    images = {image["id"]: image for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    for index, ann in enumerate(data["annotations"]):
        _require(isinstance(ann, dict), path, f"annotations[{index}] must be an object")
        for key in ("image_id", "category_id", "segmentation"):
            _require(key in ann, path, f"annotations[{index}] has no '{key}'")
        _require(ann["image_id"] in images, path, f"annotations[{index}] refers to unknown image {ann['image_id']}")
        _require(
            ann["category_id"] in category_ids,
            path,
            f"annotations[{index}] refers to unknown category {ann['category_id']}",
        )
        problem = _segmentation_problem(ann["segmentation"], images[ann["image_id"]])
        _require(problem is None, path, f"annotations[{index}] segmentation {problem}")


def _is_count(value: Any) -> bool:
    """An int that is not a bool (json's true would otherwise count as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _segmentation_problem(segmentation: Any, image: dict[str, Any]) -> str | None:
    """What makes a segmentation unreadable for pycocotools, or None: polygons are lists of at least three x, y
    pairs; an RLE has ``size`` [height, width] of its image and ``counts`` (a string, or a list of run lengths)."""
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                return "polygons must be lists of numbers"
            if len(polygon) < 6 or len(polygon) % 2:
                return f"polygon of {len(polygon)} numbers: needs x, y pairs of at least 3 points"
        return None
    if not isinstance(segmentation, dict) or not {"size", "counts"} <= segmentation.keys():
        return "is neither RLE nor polygons"
    size, counts = segmentation["size"], segmentation["counts"]
    if not isinstance(size, list) or len(size) != 2 or not all(_is_count(v) for v in size):
        return f"RLE size must be [height, width], got {size!r}"
    if size != [image["height"], image["width"]]:
        return f"RLE size {size} differs from its image's [height, width] [{image['height']}, {image['width']}]"
    if isinstance(counts, list):
        if not all(_is_count(v) and v >= 0 for v in counts) or sum(counts) != size[0] * size[1]:
            return "RLE counts must be non-negative run lengths adding up to height x width"
    elif not isinstance(counts, str):
        return "RLE counts must be a string or a list of run lengths"
    return None


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """RLE (compressed or not) or polygons -> binary [H, W] uint8."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles) if rles else mask_utils.encode(np.zeros((height, width), np.uint8, order="F"))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class CocoInstances(Dataset):
    """Images and instance masks of a COCO json. Items are addressed as ``(index, seed)`` or a plain index;
    the seed drives this sample's augmentation, so results do not depend on workers or on resuming.

    ``class_agnostic`` merges every category into one "object" class (label 0, category id 1): the matched
    upper bound for class-agnostic segmentation, where a per-class model would spend capacity telling classes apart
    and emit cross-class duplicates that class-agnostic evaluation counts as false positives."""

    def __init__(self, image_dir: Path, ann_file: Path, policy: ResizePolicy, class_agnostic: bool = False) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.policy = policy
        data = load_annotation_file(self.ann_file)
        if not self.image_dir.is_dir():
            raise UserError(f"image folder not found: {self.image_dir}")
        self.images = sorted(data["images"], key=lambda image: image["id"])
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        if class_agnostic:
            self.category_ids, self.class_names = [1], ["object"]
            self._label_of = {c["id"]: 0 for c in self.categories}
        else:
            self.category_ids = [c["id"] for c in self.categories]
            self.class_names = [str(c.get("name", c["id"])) for c in self.categories]
            self._label_of = {cid: label for label, cid in enumerate(self.category_ids)}
        self._annotations: dict[Any, list[dict[str, Any]]] = {image["id"]: [] for image in self.images}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                self._annotations[ann["image_id"]].append(ann)
        missing = [image["file_name"] for image in self.images if not (self.image_dir / image["file_name"]).is_file()]
        if missing:
            raise UserError(
                f"{self.ann_file}: {len(missing)} image file(s) missing in {self.image_dir}, "
                f"e.g. {self.image_dir / missing[0]}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        index, seed = item if isinstance(item, tuple) else (item, None)
        info = self.images[index]
        image = read_rgb(self.image_dir / info["file_name"])
        height, width = image.shape[:2]
        anns = self._annotations[info["id"]]
        masks = (
            np.stack([decode_segmentation(a["segmentation"], height, width) for a in anns])
            if anns
            else np.zeros((0, height, width), np.uint8)
        )
        labels = torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        sample = transform_sample(
            to_tensor_image(image), torch.from_numpy(masks), labels, info["id"], self.policy, seed
        )
        sample.embeddings = annotation_embeddings(anns)
        return sample


class ImageFolder(Dataset):
    """Unlabeled images: a folder, or an explicit list of files."""

    def __init__(self, files: list[Path], policy: ResizePolicy) -> None:
        if not files:
            raise UserError("no images given")
        self.files = [Path(f) for f in files]
        self.policy = policy

    @classmethod
    def from_folder(cls, folder: Path, policy: ResizePolicy) -> ImageFolder:
        return cls(list_images(Path(folder)), policy)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = to_tensor_image(read_rgb(self.files[index]))
        empty = torch.zeros((0, *image.shape[-2:]), dtype=torch.uint8)
        return transform_sample(image, empty, torch.zeros(0, dtype=torch.int64), index, self.policy, seed)


def annotation_embeddings(annotations: list[dict[str, Any]]) -> torch.Tensor | None:
    """[N, D] embeddings when every annotation has one (Free Mask and self-training json), else None."""
    if not annotations or not all("embedding" in a for a in annotations):
        return None
    return torch.tensor([a["embedding"] for a in annotations], dtype=torch.float32)


def transform_sample(
    image: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    image_id: int,
    policy: ResizePolicy,
    seed: int | None,
) -> Sample:
    """Resize (random size and flip when ``seed`` is given, first size otherwise) keeping masks aligned."""
    height, width = image.shape[-2:]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    short_side = policy.sizes[0]
    if generator is not None and len(policy.sizes) > 1:
        short_side = policy.sizes[int(torch.randint(len(policy.sizes), (1,), generator=generator))]
    size = resized_shape(height, width, short_side, policy.max_size, policy.resize_rounding)
    if policy.canvas is not None:
        size = fit_within(*size, *policy.canvas)
    image, masks = resize_image(image, size, policy.resize_filter), resize_masks(masks, size)
    if generator is not None and policy.hflip and torch.rand((), generator=generator) < 0.5:
        image, masks = hflip(image, masks)
    return Sample(image, masks, labels, image_id, ImageGeometry(height, width, size[0], size[1]))
