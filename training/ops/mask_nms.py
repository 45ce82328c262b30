"""Greedy mask NMS and Soft-NMS on mask IoU: the sequential baselines Matrix NMS replaces (SOLOv2, Table 4.6).

Both have ``training.ops.matrix_nms``'s call (masks sorted by score, label-aware, decayed scores returned in input
order), so ``postprocess(..., nms=greedy_mask_nms)`` swaps them in. Both take the IoU matrix first, with the same
``masks_iou`` as Matrix NMS, then walk the masks one pick at a time: the walk is the sequential part Matrix
NMS does away with, and ``greedy_nms_decay`` / ``soft_nms_decay`` expose it alone so that benchmarks can time it
against ``matrix_nms_decay``. The walk runs in numpy on the host: one small step per mask, where torch's per-call
overhead would dominate.

Meaning of ``sigma`` in Soft-NMS: as in Matrix NMS, sigma *multiplies* IoU^2 (factor exp(-sigma * IoU^2)); the
Soft-NMS paper writes exp(-IoU^2 / sigma) with sigma = 0.5, which is this module's default sigma = 2.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from training.ops.matrix_nms import DEFAULT_KERNEL, DEFAULT_SIGMA, KERNELS, masks_iou

IOU_THRESHOLD = 0.5


def _per_image(
    walk: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    iou: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
) -> torch.Tensor:
    """Runs ``walk(iou [N, N], labels [N], scores [N]) -> scores [N]`` on every image of the leading dims."""
    if scores.numel() == 0:
        return scores.clone()
    n = scores.shape[-1]
    flat_iou = iou.detach().reshape(-1, n, n).cpu().numpy()
    flat_labels = labels.detach().reshape(-1, n).cpu().numpy()
    flat_scores = scores.detach().reshape(-1, n).cpu().numpy()
    out = np.array([walk(*image) for image in zip(flat_iou, flat_labels, flat_scores, strict=True)])
    return torch.from_numpy(out.reshape(flat_scores.shape)).reshape(scores.shape).to(scores.device, scores.dtype)


def greedy_nms_decay(
    iou: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, *, iou_threshold: float = IOU_THRESHOLD
) -> torch.Tensor:
    """Greedy NMS from the IoU matrix [..., N, N] of score-sorted masks: walking down the scores, each kept mask
    zeroes the lower same-label masks it overlaps by IoU > ``iou_threshold``; suppressed masks suppress nothing."""

    def walk(image_iou: np.ndarray, image_labels: np.ndarray, image_scores: np.ndarray) -> np.ndarray:
        same_label = image_labels[:, None] == image_labels[None, :]
        suppresses = np.triu((image_iou > iou_threshold) & same_label, k=1)
        alive = np.ones(len(image_scores), dtype=bool)
        for i in range(len(image_scores)):
            if alive[i]:
                alive &= ~suppresses[i]
        return np.where(alive, image_scores, 0.0)

    return _per_image(walk, iou, labels, scores)


def soft_nms_decay(
    iou: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    kernel: str = DEFAULT_KERNEL,
    sigma: float = DEFAULT_SIGMA,
    iou_threshold: float = IOU_THRESHOLD,
) -> torch.Tensor:
    """Soft-NMS from the IoU matrix [..., N, N]: repeatedly pick the unpicked mask of highest *current* score and
    multiply every unpicked same-label mask's score by exp(-sigma * IoU^2) ("gaussian"), or by 1 - IoU where
    IoU > ``iou_threshold`` ("linear"). Picked scores are final."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown Soft-NMS kernel '{kernel}' (use one of {KERNELS})")

    def walk(image_iou: np.ndarray, image_labels: np.ndarray, image_scores: np.ndarray) -> np.ndarray:
        if kernel == "gaussian":
            factor = np.exp(-sigma * np.square(image_iou))
        else:
            factor = np.where(image_iou > iou_threshold, 1.0 - image_iou, 1.0)
        factor = np.where(image_labels[:, None] == image_labels[None, :], factor, 1.0).astype(image_scores.dtype)
        current = image_scores.copy()
        unpicked = np.ones(len(current), dtype=bool)
        for _ in range(len(current)):
            pick = int(np.where(unpicked, current, -np.inf).argmax())
            unpicked[pick] = False
            np.multiply(current, factor[pick], out=current, where=unpicked)
        return current

    return _per_image(walk, iou, labels, scores)


def greedy_mask_nms(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    kernel: str = DEFAULT_KERNEL,
    sigma: float = DEFAULT_SIGMA,
    mask_area: torch.Tensor | None = None,
    iou_threshold: float = IOU_THRESHOLD,
) -> torch.Tensor:
    """Greedy ("hard") mask NMS with ``matrix_nms``'s arguments: kept masks keep their score, suppressed ones get 0.
    ``kernel`` and ``sigma`` are accepted so that ``postprocess`` can call it like Matrix NMS; hard NMS has no
    decay kernel and ignores them."""
    return greedy_nms_decay(masks_iou(masks, mask_area, scores.dtype), labels, scores, iou_threshold=iou_threshold)


def soft_mask_nms(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    kernel: str = DEFAULT_KERNEL,
    sigma: float = DEFAULT_SIGMA,
    mask_area: torch.Tensor | None = None,
    iou_threshold: float = IOU_THRESHOLD,
) -> torch.Tensor:
    """Soft-NMS on mask IoU with ``matrix_nms``'s arguments (``soft_nms_decay`` says how scores decay)."""
    iou = masks_iou(masks, mask_area, scores.dtype)
    return soft_nms_decay(iou, labels, scores, kernel=kernel, sigma=sigma, iou_threshold=iou_threshold)
