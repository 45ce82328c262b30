"""``torch.ops.freesolo.matrix_nms``: Matrix NMS as one opaque torch operator, so the ONNX exporter sees a single
call it can turn into one ``freesolo::MatrixNMS`` node (instead of tracing the reference's dozen ops).

CPU runs the reference (``training.ops.matrix_nms``); CUDA runs the Triton kernel, imported only when a CUDA tensor
arrives so that CPU-only hosts never need ``triton``. The arguments follow the ONNX node's contract (README of this
folder): masks float [B, N, H, W], labels int32 [B, N], scores float [B, N] sorted descending, areas float [B, N].
"""

from __future__ import annotations

import torch

from training.ops import matrix_nms as reference_matrix_nms
from training.ops.matrix_nms import DEFAULT_KERNEL, DEFAULT_SIGMA


@torch.library.custom_op("freesolo::matrix_nms", mutates_args=(), device_types="cpu")
def matrix_nms(
    masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, areas: torch.Tensor, kernel: str, sigma: float
) -> torch.Tensor:
    """Decayed scores [B, N] (the reference implementation)."""
    return reference_matrix_nms(masks, labels, scores, kernel=kernel, sigma=sigma, mask_area=areas)


@matrix_nms.register_kernel("cuda")
def _matrix_nms_cuda(
    masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, areas: torch.Tensor, kernel: str, sigma: float
) -> torch.Tensor:
    from triton_plugins.matrix_nms.kernel import matrix_nms_triton

    return matrix_nms_triton(masks, labels, scores, areas, kernel, sigma)


@matrix_nms.register_fake
def _matrix_nms_fake(
    masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, areas: torch.Tensor, kernel: str, sigma: float
) -> torch.Tensor:
    """Shape and dtype only (what export traces with): one decayed score per input score."""
    return torch.empty_like(scores)


def matrix_nms_node(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    kernel: str = DEFAULT_KERNEL,
    sigma: float = DEFAULT_SIGMA,
    mask_area: torch.Tensor | None = None,
) -> torch.Tensor:
    """``postprocess``'s NMS signature on top of the op: labels become int32 and areas are computed when missing,
    as the node's contract wants."""
    masks = masks.to(scores.dtype)
    areas = masks.flatten(-2).sum(-1) if mask_area is None else mask_area.to(scores.dtype)
    return matrix_nms(masks, labels.to(torch.int32), scores, areas, kernel, sigma)
