"""Graph-contract outputs of one image -> the ensemble's compact per-image outputs (the postprocess step).

Masks go through ``training.results`` (numpy and pycocotools only, no torch), the code every runtime uses to turn
stride-4 masks into original-size masks, so served masks equal PyTorch's COCO results. As there, detections whose
mask is empty at the original size are dropped (the rest move to the front; ``num_dets`` counts them), and a box is
the tight box of the final mask (COCO's ``bbox`` as x1, y1, x2, y2): the graph's stride-4 boxes cannot be scaled
instead, because a mask may reach into the padding that the crop removes.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from training.results import ImageGeometry, encode_mask, masks_to_original


class OutputError(ValueError):
    """Model outputs that do not fit the graph contract; the message says which and how."""


def image_outputs(
    num_dets: int,
    scores: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    geometry: np.ndarray,
) -> dict[str, np.ndarray]:
    """One image's contract outputs (scores/labels [K], masks [K, h, w]) and its geometry [H, W, resized h,
    resized w] -> ``num_dets`` [1], ``scores``, ``labels``, ``boxes`` (x1, y1, x2, y2 in original pixels),
    ``masks_rle`` (object [K] of bytes, b"" past num_dets) and ``image_size`` [2]."""
    k = len(scores)
    if labels.shape != (k,) or masks.ndim != 3 or len(masks) != k:
        raise OutputError(f"model outputs disagree: scores {scores.shape}, labels {labels.shape}, masks {masks.shape}")
    height, width, resized_h, resized_w = (int(v) for v in geometry)
    mask_h, mask_w = masks.shape[1:]
    if min(height, width, resized_h, resized_w) < 1 or resized_h > mask_h * 4 or resized_w > mask_w * 4:
        raise OutputError(f"geometry {list(geometry)} does not fit masks of {mask_h}x{mask_w}")
    shape = ImageGeometry(height, width, resized_h, resized_w)
    out_scores = np.zeros(k, np.float32)
    out_labels = np.zeros(k, np.int32)
    out_boxes = np.zeros((k, 4), np.float32)
    rles = np.full(k, b"", dtype=object)
    kept = 0
    for index in range(min(max(int(num_dets), 0), k)):
        full = masks_to_original(masks[index : index + 1], shape)[0]  # one at a time: K full-size masks are large
        if not full.any():
            continue
        rle = encode_mask(full)
        x, y, w, h = mask_utils.toBbox(rle)
        out_scores[kept], out_labels[kept], out_boxes[kept] = scores[index], labels[index], (x, y, x + w, y + h)
        rles[kept] = rle["counts"].encode("ascii")
        kept += 1
    return {
        "num_dets": np.array([kept], np.int32),
        "scores": out_scores,
        "labels": out_labels,
        "boxes": out_boxes,
        "masks_rle": rles,
        "image_size": np.array([height, width], np.int32),
    }
