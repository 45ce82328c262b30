"""The coarse-mask json shared by Free Mask and self-training pseudo-labels.

It is a COCO *instances* file (images, annotations, one "object" category), so it trains directly with
``freesolo train --mode weak``; every annotation also carries ``score`` and ``embedding``, so its annotation list is a
valid COCO *results* list for pycocotools' ``loadRes`` and for evaluation against ground truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from training.results import encode_mask

CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def annotation(mask: np.ndarray, score: float, embedding: np.ndarray | None) -> dict[str, Any]:
    """One coarse instance: RLE, pixel area, x,y,w,h box computed from the mask itself, score, embedding."""
    rle = encode_mask(mask)
    entry: dict[str, Any] = {
        "category_id": CATEGORY["id"],
        "segmentation": rle,
        "area": int(mask.sum()),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
        "score": round(float(score), 5),
    }
    if embedding is not None:
        entry["embedding"] = [round(float(v), 5) for v in embedding]
    return entry


def image_record(file_name: str, height: int, width: int, annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """One image's entry before ids are assigned."""
    return {"file_name": file_name, "height": height, "width": width, "annotations": annotations}


def merge(records: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Records (in image order) -> a COCO instances dict with image ids 1..N and annotation ids 1..M."""
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        images.append(
            {"id": image_id, "file_name": record["file_name"], "width": record["width"], "height": record["height"]}
        )
        for ann in record["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    return {"info": info, "images": images, "annotations": annotations, "categories": [CATEGORY]}


def by_file_name(images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """COCO annotations (or results) grouped by their image's file name: the key that stays when image ids differ
    between jsons of the same images. Images without annotations are left out."""
    names = {image["id"]: image["file_name"] for image in images}
    grouped: dict[str, list[dict[str, Any]]] = {}
    for ann in annotations:
        grouped.setdefault(names[ann["image_id"]], []).append(ann)
    return grouped
