"""Free Mask: coarse instance masks from a self-supervised backbone, without labels (docs/algorithms.md, "Free Mask").

For each image, res5 features I are compared with themselves: queries are I bilinearly downsampled by each of the
pyramid scales, keys are I; the cosine score map of every query, min-max normalised, is a soft mask. Masks are scored
by maskness, de-duplicated by class-agnostic Matrix NMS (the ``training.ops`` reference), the best ``top_k`` are
upsampled to the image, re-thresholded and filtered. Each mask carries its query vector, linearly resampled to
``embedding_dim`` and L2-normalised, as a semantic embedding (FreeSOLO's embedding targets).

With ``low_level_weight`` > 0 (not in the paper; the tiny preset's 0.8) the features compared are res5 mixed with
hand-made per-cell Lab colour statistics (``mix_features``); at 1 they are the colour statistics alone, a baseline that
needs no training.

Two defects of the reference code are done right here: boxes are written as COCO x, y, w, h (computed from the
final masks), and every annotation carries its embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.config import FreeMaskConfig
from training.models.weak_losses import rgb_to_lab
from training.ops import matrix_nms

EPS = 1e-6


@dataclass
class CoarseMask:
    """One Free Mask result at the original image size."""

    mask: np.ndarray  # bool [H, W]
    score: float  # maskness after Matrix NMS decay
    embedding: np.ndarray  # float32 [embedding_dim], unit length


def backbone_stride(dilate_res5: bool) -> int:
    return 16 if dilate_res5 else 32


def c5_features(backbone: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """res5 features [B, C, h, w] of a torchvision ResNet for uint8 images [B, 3, H, W]."""
    x = (images.float() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    return backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(x))))


def lab_cell_statistics(images: torch.Tensor, stride: int) -> torch.Tensor:
    """Hand-made per-cell features [B, 6, H/stride, W/stride] of uint8 images [B, 3, H, W]: the mean and the standard
    deviation of CIE Lab colour over each stride x stride cell (the grid of the res5 features). Where objects differ
    from their surroundings mainly in colour and texture, these group pixels without any training."""
    lab = rgb_to_lab(images.float())
    mean = F.avg_pool2d(lab, stride, stride)
    variance = (F.avg_pool2d(lab * lab, stride, stride) - mean * mean).clamp(min=0)
    return torch.cat([mean, variance.sqrt()], dim=1)


def unit_scaled(features: torch.Tensor) -> torch.Tensor:
    """[C, h, w] features with the image's mean feature subtracted, scaled so that the mean cell has unit length.
    One scale per image, not per cell: a cell close to the mean (plain background) stays short instead of getting a
    noisy direction blown up to full weight."""
    centred = features - features.mean(dim=(1, 2), keepdim=True)
    return centred / torch.linalg.vector_norm(centred, dim=0).mean().clamp(min=EPS)


def mix_features(learned: torch.Tensor | None, low_level: torch.Tensor, weight: float) -> torch.Tensor:
    """One image's learned [C, h, w] and low-level [6, h, w] cell features as one map: each centred and scaled by
    ``unit_scaled``, weighted by ``sqrt(1 - weight)`` and ``sqrt(weight)`` and stacked, so that dot products are
    ``(1 - weight) * learned + weight * low-level``; ``learned`` is only read when ``weight < 1``."""
    if weight >= 1 or learned is None:
        return unit_scaled(low_level)
    return torch.cat([(1 - weight) ** 0.5 * unit_scaled(learned), weight**0.5 * unit_scaled(low_level)])


def pyramid_queries(features: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """Query vectors [C, Q]: the feature map downsampled by each scale, flattened and concatenated."""
    _, height, width = features.shape
    queries = []
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        resized = (
            features
            if size == (height, width)
            else F.interpolate(features[None], size=size, mode="bilinear", align_corners=False)[0]
        )
        queries.append(resized.flatten(1))
    return torch.cat(queries, dim=1)


def soft_masks(features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Cosine score maps of every query against every key location, min-max normalised per query: [Q, h*w]."""
    keys = F.normalize(features.flatten(1), dim=0)
    scores = F.normalize(queries, dim=0).t() @ keys
    low = scores.amin(dim=1, keepdim=True)
    high = scores.amax(dim=1, keepdim=True)
    return (scores - low) / (high - low).clamp(min=EPS)


def resample_embedding(query: torch.Tensor, dim: int) -> torch.Tensor:
    """A C-d query linearly resampled to ``dim`` values and L2-normalised (the reference's 2048 -> 128)."""
    resampled = F.interpolate(query.view(1, 1, -1), size=dim, mode="linear", align_corners=False).view(-1)
    return F.normalize(resampled, dim=0)


def passes_filters(mask: np.ndarray, config: FreeMaskConfig) -> bool:
    """Drop empty masks, masks covering less than ``min_area_fraction`` of the image (a few feature cells: mostly
    fragments of background or of an object's edge), boxes wider or taller than ``max_box_fraction`` of the image
    (the reference checks only the width; a mask spanning the full height is background just as often), and (when
    enabled) masks centred in the top ``drop_top_fraction`` of the image (the reference's COCO sky/ceiling prior)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return False
    height, width = mask.shape
    if mask.sum() < config.min_area_fraction * height * width:
        return False
    if (cols[-1] + 1 - cols[0]) > config.max_box_fraction * width:
        return False
    if (rows[-1] + 1 - rows[0]) > config.max_box_fraction * height:
        return False
    center_y = (rows[0] + rows[-1] + 1) / 2
    return not (config.drop_top_fraction > 0 and center_y < config.drop_top_fraction * height)


def coarse_masks(features: torch.Tensor, image_size: tuple[int, int], config: FreeMaskConfig) -> list[CoarseMask]:
    """Free Mask on one image's res5 features [C, h, w]; masks come back at ``image_size`` (H, W)."""
    _, height, width = features.shape
    if config.center_features:
        features = features - features.mean(dim=(1, 2), keepdim=True)
    queries = pyramid_queries(features, config.query_scales)
    soft = soft_masks(features, queries)
    binary = soft >= config.mask_thr
    areas = binary.sum(dim=1).float()
    keep = torch.nonzero(areas > 1).flatten()
    if keep.numel() == 0:
        return []
    soft, binary, areas, queries = soft[keep], binary[keep], areas[keep], queries[:, keep]
    maskness = (soft * binary).sum(dim=1) / areas
    maskness, order = maskness.sort(descending=True)
    soft, binary, areas, queries = soft[order], binary[order], areas[order], queries[:, order]
    decayed = matrix_nms(
        binary.view(-1, height, width),
        torch.zeros(len(order), dtype=torch.long),
        maskness,
        kernel="gaussian",
        sigma=config.nms_sigma,
        mask_area=areas,
    )
    decayed, best = decayed.sort(descending=True)
    best = best[: config.top_k]
    decayed = decayed[: config.top_k]
    upsampled = F.interpolate(
        soft[best].view(-1, 1, height, width), size=image_size, mode="bilinear", align_corners=False
    )[:, 0]
    results = []
    for index in range(len(best)):
        if decayed[index] < config.score_thr:
            continue
        mask = (upsampled[index] >= config.mask_thr).numpy()
        if passes_filters(mask, config):
            embedding = resample_embedding(queries[:, best[index]], config.embedding_dim).numpy()
            results.append(CoarseMask(mask, float(decayed[index]), embedding.astype(np.float32)))
    return results
