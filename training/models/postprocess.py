"""SOLOv2 inference on a whole batch with fixed shapes (docs/algorithms.md, "SOLOv2 inference"), producing the
graph contract (docs/architecture.md): ``num_dets`` [B], ``scores`` [B, K], ``labels`` [B, K], ``boxes``
[B, K, 4], ``masks`` [B, K, H/4, W/4] (binary uint8), zero-padded past ``num_dets``.

Everything is tensor algebra without data-dependent shapes, so the same code exports to ONNX for any batch size.
One deliberate difference from the reference: candidates are capped at ``nms_pre`` by category score *before* their
masks are computed (a fixed-size graph needs a fixed candidate count); the reference caps after maskness
re-scoring. The two agree whenever at most ``nms_pre`` (cell, class) pairs pass ``score_thr``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from training.config import InferenceConfig
from training.geometry import MASK_STRIDE
from training.models.solov2 import SOLOv2Output
from training.ops import matrix_nms
from training.ops.matrix_nms import MaskNms


class Detections(NamedTuple):
    """Fixed-K detections of a batch: the five graph-contract outputs, then ``cells``, which grid cell (index over
    all levels, in ``flatten_levels`` order) produced each detection, and ``soft_masks``, the probabilities the
    binary masks were thresholded from. Self-training reads the teacher's embeddings at ``cells``;
    ``InferenceConfig.resize_soft_masks`` resizes ``soft_masks``, which the exported graph of such a model returns as
    its ``masks`` (the graph contract's probability variant)."""

    num_dets: torch.Tensor  # int32 [B]
    scores: torch.Tensor  # float32 [B, K]
    labels: torch.Tensor  # int32 [B, K]
    boxes: torch.Tensor  # float32 [B, K, 4] x1, y1, x2, y2 in input pixels
    masks: torch.Tensor  # uint8 [B, K, H/4, W/4]
    cells: torch.Tensor  # int64 [B, K]
    soft_masks: torch.Tensor  # float32 [B, K, H/4, W/4]: the masks' probabilities, zero past num_dets


def point_nms(scores: torch.Tensor) -> torch.Tensor:
    """Keep a cell's score only where it is the max of its 2x2 neighbourhood (SOLO's "point NMS")."""
    pooled = F.max_pool2d(scores, kernel_size=2, stride=1, padding=1)[..., :-1, :-1]
    return scores * (pooled == scores).to(scores.dtype)


def flatten_levels(output: SOLOv2Output, strides: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(cell, class) scores [B, M*C], per-cell kernels [B, M, E] and per-cell strides [M] over all levels."""
    scores, kernels, cell_strides = [], [], []
    for logits, level_kernels, stride in zip(output.cate_logits, output.kernels, strides, strict=True):
        batch = logits.shape[0]
        scores.append(point_nms(logits.sigmoid()).permute(0, 2, 3, 1).reshape(batch, -1))
        kernels.append(level_kernels.permute(0, 2, 3, 1).reshape(batch, -1, level_kernels.shape[1]))
        cells = logits.shape[-2] * logits.shape[-1]
        cell_strides.append(torch.full((cells,), float(stride), device=logits.device))
    return torch.cat(scores, dim=1), torch.cat(kernels, dim=1), torch.cat(cell_strides)


def boxes_from_masks(masks: torch.Tensor, stride: int = MASK_STRIDE) -> torch.Tensor:
    """Tight x1, y1, x2, y2 boxes (input pixels) of binary masks [..., h, w]; empty masks give zeros."""
    height, width = masks.shape[-2:]
    cols = masks.amax(dim=-2) > 0
    rows = masks.amax(dim=-1) > 0
    col_index = torch.arange(width, device=masks.device, dtype=torch.float32)
    row_index = torch.arange(height, device=masks.device, dtype=torch.float32)
    # "No pixel" is +inf, not a number derived from the mask size: the exporter would freeze that at the example
    # input's size, and a dynamic-size graph would clip boxes of larger inputs. Empty masks are zeroed below.
    x1 = torch.where(cols, col_index, torch.inf).amin(dim=-1)
    x2 = torch.where(cols, col_index, -1.0).amax(dim=-1) + 1
    y1 = torch.where(rows, row_index, torch.inf).amin(dim=-1)
    y2 = torch.where(rows, row_index, -1.0).amax(dim=-1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=-1) * stride
    return torch.where(cols.any(dim=-1, keepdim=True), boxes, torch.zeros_like(boxes))


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, N, ...] indexed along dim 1 by index [B, K] -> [B, K, ...]."""
    expanded = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return torch.gather(values, 1, expanded)


def postprocess(
    output: SOLOv2Output, config: InferenceConfig, strides: list[int], nms: MaskNms = matrix_nms
) -> Detections:
    """Raw SOLOv2 outputs -> fixed-K detections. ``nms`` is swappable so the export can put its own node there."""
    scores, kernels, cell_strides = flatten_levels(output, strides)
    num_classes = output.cate_logits[0].shape[1]
    features = output.mask_features
    batch, _, height, width = features.shape

    num_candidates = min(config.nms_pre, scores.shape[1])
    cate_scores, flat_index = scores.topk(num_candidates, dim=1)
    cells = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index - cells * num_classes

    soft_masks = torch.bmm(gather_rows(kernels, cells), features.flatten(2)).sigmoid()
    binary = soft_masks > config.mask_thr
    binary_float = binary.to(soft_masks.dtype)
    areas = binary_float.sum(dim=-1)
    valid = (cate_scores > config.score_thr) & (areas > cell_strides[cells])
    maskness = (soft_masks * binary_float).sum(dim=-1) / areas.clamp(min=1.0)
    rescored = torch.where(valid, cate_scores * maskness, torch.zeros_like(cate_scores))

    rescored, order = rescored.sort(dim=1, descending=True)
    labels, binary_float, areas, valid, cells = (
        gather_rows(t, order) for t in (labels, binary_float, areas, valid, cells)
    )
    decayed = nms(
        binary_float.view(batch, num_candidates, height, width),
        labels,
        rescored,
        kernel=config.nms_kernel,
        sigma=config.nms_sigma,
        mask_area=areas,
    )
    keep = valid & (decayed >= config.update_thr)
    decayed = torch.where(keep, decayed, torch.zeros_like(decayed))

    top = min(config.max_per_img, num_candidates)
    final_scores, final_order = decayed.topk(top, dim=1)
    num_dets = keep.sum(dim=1).clamp(max=top)
    present = torch.arange(top, device=features.device).unsqueeze(0) < num_dets.unsqueeze(1)
    final_labels = torch.where(present, gather_rows(labels, final_order), torch.zeros_like(final_order))
    final_masks = gather_rows(binary_float, final_order).view(batch, top, height, width)
    final_masks = final_masks * present.view(batch, top, 1, 1).to(final_masks.dtype)
    final_scores = torch.where(present, final_scores, torch.zeros_like(final_scores))
    final_cells = torch.where(present, gather_rows(cells, final_order), torch.zeros_like(final_order))

    pad = config.max_per_img - top
    final_soft = gather_rows(soft_masks, gather_rows(order, final_order)).view(batch, top, height, width)
    final_soft = final_soft * present.view(batch, top, 1, 1).to(final_soft.dtype)
    return Detections(
        num_dets=num_dets.to(torch.int32),
        scores=F.pad(final_scores, (0, pad)),
        labels=F.pad(final_labels, (0, pad)).to(torch.int32),
        boxes=F.pad(boxes_from_masks(final_masks), (0, 0, 0, pad)),
        masks=F.pad(final_masks, (0, 0, 0, 0, 0, pad)).to(torch.uint8),
        cells=F.pad(final_cells, (0, pad)),
        soft_masks=F.pad(final_soft, (0, 0, 0, 0, 0, pad)),
    )


def cell_embeddings(output: SOLOv2Output, cells: torch.Tensor) -> torch.Tensor:
    """The embedding head's vectors [B, K, D] at the given flattened cell indices [B, K]."""
    flat = torch.cat([e.flatten(2) for e in output.embeddings], dim=2).transpose(1, 2)  # [B, M, D]
    return gather_rows(flat, cells)
