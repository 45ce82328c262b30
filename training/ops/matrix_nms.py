"""Matrix NMS (SOLOv2): every mask's score decays by how much higher-scored masks of its class overlap it.

This is the single source of truth: the ONNX function body and the GPU plugin kernel are tested against it.

Meaning of ``sigma``: as in the SOLOv2 code, sigma *multiplies* IoU^2 (decay = exp(-sigma * IoU^2)); the paper writes
exp(-IoU^2 / sigma). With the default sigma = 2 the code's meaning is what the published models use.

Linear-kernel guard: three identical same-label masks make the reference formula 0/0 (IoU = 1 over compensation
1 - 1 = 0). The compensation denominator is clamped to ``EPS``, so a fully covered mask decays to 0, never NaN.
"""

from __future__ import annotations

from typing import Protocol

import torch

EPS = 1e-6
KERNELS = ("gaussian", "linear")
# The defaults of every Matrix NMS in the project (config, ONNX node, Triton kernel, TensorRT plugin: the plugin's
# C++ copy in cuda/matrix_nms_math.h is asserted equal by tests/test_matrix_nms_plugin.py).
DEFAULT_KERNEL = "gaussian"
DEFAULT_SIGMA = 2.0


class MaskNms(Protocol):
    """The signature every mask NMS here shares (``matrix_nms``, ``greedy_mask_nms``, ``soft_mask_nms`` and the
    exported node ``triton_plugins.matrix_nms.torch_op.matrix_nms_node``), so ``postprocess`` takes any of them:
    masks [..., N, H, W], labels [..., N] and score-sorted scores [..., N] -> decayed scores [..., N]."""

    def __call__(
        self,
        masks: torch.Tensor,
        labels: torch.Tensor,
        scores: torch.Tensor,
        *,
        kernel: str = DEFAULT_KERNEL,
        sigma: float = DEFAULT_SIGMA,
        mask_area: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def pairwise_mask_iou(masks: torch.Tensor, areas: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of every pair of masks: [..., N, P] float -> [..., N, N]; pairs with an empty union get 0."""
    intersection = masks @ masks.transpose(-1, -2)
    if areas is None:
        areas = masks.sum(-1)
    union = areas.unsqueeze(-1) + areas.unsqueeze(-2) - intersection
    return torch.where(union > 0, intersection / union.clamp(min=EPS), torch.zeros_like(intersection))


def masks_iou(masks: torch.Tensor, mask_area: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The IoU matrix [..., N, N] of [..., N, H, W] masks in the scores' dtype, from their areas when known: the
    first step of every mask NMS here."""
    area = None if mask_area is None else mask_area.to(dtype)
    return pairwise_mask_iou(masks.flatten(-2).to(dtype), area)


def matrix_nms(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    kernel: str = DEFAULT_KERNEL,
    sigma: float = DEFAULT_SIGMA,
    mask_area: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decayed scores of masks sorted by score, descending.

    Args:
        masks: [..., N, H, W] binary masks (bool or float 0/1); leading dims are independent batches.
        labels: [..., N] integer labels; only same-label pairs suppress each other (pass equal labels for
            class-agnostic NMS).
        scores: [..., N] scores, sorted descending along the last dim.
        kernel: "gaussian" (exp(-sigma * IoU^2)) or "linear" (1 - IoU).
        sigma: gaussian strength.
        mask_area: optional precomputed [..., N] mask areas.

    Returns:
        [..., N] decayed scores; the top mask keeps its score and scores never increase.
    """
    iou = masks_iou(masks, mask_area, scores.dtype)
    return matrix_nms_decay(iou, labels, scores, kernel=kernel, sigma=sigma)


def matrix_nms_decay(
    iou: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    kernel: str = DEFAULT_KERNEL,
    sigma: float = DEFAULT_SIGMA,
) -> torch.Tensor:
    """The decay step alone, from the IoU matrix [..., N, N] of score-sorted masks: the part the SOLOv2 paper times
    (500 masks in < 1 ms, IoU matrix excluded), split out so that benchmarks can time it on its own."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown Matrix NMS kernel '{kernel}' (use one of {KERNELS})")
    n = scores.shape[-1]
    if n == 0:
        return scores.clone()
    same_label = labels.unsqueeze(-1) == labels.unsqueeze(-2)
    upper = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(diagonal=1)
    # decay_iou[i, j]: overlap of mask j (lower score) with mask i (higher score), same label only.
    decay_iou = torch.where(same_label & upper, iou, torch.zeros_like(iou))
    # compensation[i]: how much mask i was itself overlapped by any higher-scored mask.
    compensation = decay_iou.amax(dim=-2).unsqueeze(-1)

    if kernel == "gaussian":
        ratio = torch.exp(-sigma * (decay_iou.square() - compensation.square()))
    else:
        ratio = (1.0 - decay_iou) / (1.0 - compensation).clamp(min=EPS)
    # Entries with i >= j carry IoU 0 and a ratio >= 1; row i = 0 has compensation 0, so the minimum is
    # at most 1 and equals the minimum over i < j for every j > 0 (and exactly 1 for the top mask).
    decay = ratio.amin(dim=-2)
    return scores * decay
