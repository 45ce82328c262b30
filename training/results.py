"""Graph-contract detections -> COCO results at the original image size (numpy + pycocotools only, no torch,
so every runtime (PyTorch, ONNX Runtime, TensorRT, Triton) turns its outputs into results with the same code).

The reference upsamples a stride-4 mask x4 to the padded input, crops the image region and resizes that to the
original size, then thresholds at 0.5. Both resizes are bilinear (half-pixel centres, like torch's
``align_corners=False``) and linear, so they compose into one matrix per axis: ``mask_full = Ry @ mask @ Rx.T``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from training.geometry import MASK_STRIDE, ImageGeometry


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] matrix of 1-D bilinear resizing with half-pixel centres (torch ``align_corners=False``)."""
    scale = in_size / out_size
    source = np.clip((np.arange(out_size) + 0.5) * scale - 0.5, 0.0, None)
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    weight_upper = source - lower
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - weight_upper)
    np.add.at(matrix, (rows, upper), weight_upper)
    return matrix


def original_size_resizer(mask_size: int, resized: int, original: int) -> np.ndarray:
    """[original, mask_size] matrix: upsample x4 to the padded input, crop to ``resized``, resize to ``original``."""
    upsample = bilinear_matrix(mask_size * MASK_STRIDE, mask_size)[:resized]
    return bilinear_matrix(original, resized) @ upsample


def masks_to_original(masks: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Stride-4 masks [K, h, w], binary (the graph contract) or probabilities (``resize_soft_masks``) -> binary
    masks [K, H0, W0] at the original image size."""
    _, height, width = masks.shape
    resize_y = original_size_resizer(height, geometry.resized_height, geometry.original_height)
    resize_x = original_size_resizer(width, geometry.resized_width, geometry.original_width)
    full = resize_y @ masks.astype(np.float64) @ resize_x.T
    return full >= 0.5


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Binary [H, W] -> COCO compressed RLE with a str ``counts`` (json-able)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def image_results(
    num_dets: int,
    scores: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    geometry: ImageGeometry,
    image_id: int | str,
    category_ids: list[int],
    embeddings: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """COCO result dicts of one image from its contract outputs; empty final masks are dropped. With
    ``embeddings`` [K, D], each result also carries its detection's embedding."""
    count = int(num_dets)
    if count == 0:
        return []
    full_masks = masks_to_original(np.asarray(masks[:count]), geometry)
    results = []
    for index in range(count):
        if not full_masks[index].any():
            continue
        rle = encode_mask(full_masks[index])
        results.append(
            {
                "image_id": image_id,
                "category_id": int(category_ids[int(labels[index])]),
                "segmentation": rle,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "score": float(scores[index]),
            }
        )
        if embeddings is not None:
            results[-1]["embedding"] = [round(float(v), 5) for v in embeddings[index]]
    return results
