"""FreeSOLO's weak mask losses: learning masks from coarse masks m* that are trusted for extent, not shape.

A coarse mask (from Free Mask) is too noisy to be a per-pixel target, so it only supervises what it gets roughly
right: the mask's extent along each axis (projection losses) and the box it occupies, inside which the shape is
left to a colour-affinity prior (the BoxInst pairwise term). All functions are batched over the P positive
masks and differentiable in the predicted logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.models.losses import dice_loss

# (dy, dx) of the 8 neighbours on a 3x3 grid, row-major, in units of the dilation. Shared by
# neighbour_similarity and pairwise_loss so their neighbour axes line up.
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))

SIMILARITY_SCALE = 0.5  # exp(-||dLab|| * 0.5), as in BoxInst / FreeSOLO

# sRGB (linear) -> XYZ and the D65 2-degree white point, the values scikit-image uses.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)


def projection_losses(mask_logits: torch.Tensor, coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(l_max, l_avg)``, each [P]: Dice between the axis projections of p = sigmoid(logits) and of m*.

    ``l_max = dice(max_x p, max_x m*) + dice(max_y p, max_y m*)``; ``l_avg`` the same with means. Max projections
    pin down which rows and columns the object spans (what a box or coarse mask gets right) while leaving its shape
    free; mean projections add a softer hint of how much of each row/column is filled.
    """
    probs = mask_logits.sigmoid()
    coarse = coarse.to(probs.dtype)
    l_max = dice_loss(probs.amax(dim=2), coarse.amax(dim=2)) + dice_loss(probs.amax(dim=1), coarse.amax(dim=1))
    l_avg = dice_loss(probs.mean(dim=2), coarse.mean(dim=2)) + dice_loss(probs.mean(dim=1), coarse.mean(dim=1))
    return l_max, l_avg


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """sRGB (D65) in [0, 255], [B, 3, H, W] -> CIE Lab. Lab distances track perceived colour differences, which
    is what the colour-affinity prior needs."""
    rgb = images / 255.0
    linear = torch.where(rgb > 0.04045, ((rgb.clamp(min=0.04045) + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    matrix = torch.tensor(_XYZ_FROM_RGB, dtype=images.dtype, device=images.device)
    white = torch.tensor(_D65_WHITE, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / white
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856).pow(1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def neighbour_values(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """[..., h, w] -> [..., 8, h, w]: each pixel's neighbours at NEIGHBOUR_OFFSETS * dilation (0 outside)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (dilation, dilation, dilation, dilation))
    starts = [((1 + dy) * dilation, (1 + dx) * dilation) for dy, dx in NEIGHBOUR_OFFSETS]
    return torch.stack([padded[..., top : top + h, left : left + w] for top, left in starts], dim=-3)


def _inside_image(h: int, w: int, dilation: int, device: torch.device) -> torch.Tensor:
    """[8, h, w] bool: whether each pixel's neighbour lies inside the image."""
    return neighbour_values(torch.ones(h, w, device=device), dilation) > 0


def neighbour_similarity(images_uint8: torch.Tensor, stride: int = 4, dilation: int = 2) -> torch.Tensor:
    """[B, 3, H, W] uint8 RGB -> [B, 8, H/stride, W/stride] colour similarity ``exp(-||Lab_i - Lab_j|| * 0.5)``.

    The image is average-pooled to the mask resolution (stride 4) first, so each similarity compares the pixels
    the mask logits actually predict. Neighbours outside the image get 0, so they never count as edges.
    """
    pooled = F.avg_pool2d(images_uint8.float(), kernel_size=stride, stride=stride)
    lab = rgb_to_lab(pooled)
    distance = torch.linalg.vector_norm(lab.unsqueeze(2) - neighbour_values(lab, dilation), dim=1)
    similarity = torch.exp(-distance * SIMILARITY_SCALE)
    return similarity * _inside_image(*lab.shape[-2:], dilation, lab.device)


def box_fill(masks: torch.Tensor) -> torch.Tensor:
    """[P, h, w] -> [P, h, w]: 1 inside the tight box of each mask's pixels >= 0.5, else 0 (empty -> zeros).

    The box is the only part of a coarse mask's shape the pairwise term trusts: it says where to look."""
    foreground = masks >= 0.5
    rows, cols = foreground.any(dim=2), foreground.any(dim=1)
    return (_between_first_and_last(rows)[:, :, None] & _between_first_and_last(cols)[:, None, :]).to(masks.dtype)


def _between_first_and_last(flags: torch.Tensor) -> torch.Tensor:
    """[P, n] bool -> [P, n] bool: True from each row's first True to its last True."""
    seen_before = flags.int().cumsum(dim=1) > 0
    seen_after = flags.flip(1).int().cumsum(dim=1).flip(1) > 0
    return seen_before & seen_after


def pairwise_loss(
    mask_logits: torch.Tensor,
    similarity: torch.Tensor,
    boxes: torch.Tensor,
    color_thr: float = 0.3,
    dilation: int = 2,
) -> torch.Tensor:
    """[P] BoxInst pairwise term: neighbouring pixels of similar colour likely share a label.

    For pixel i and each neighbour j (NEIGHBOUR_OFFSETS * dilation) the probability that they agree is
    ``p_i p_j + (1 - p_i)(1 - p_j)``; its negative log, computed from logits as
    ``-logsumexp(logsig(a_i) + logsig(a_j), logsig(-a_i) + logsig(-a_j))`` so it stays finite when saturated,
    is averaged over the counted edges: ``similarity >= color_thr`` and pixel i inside the filled box.
    """
    h, w = mask_logits.shape[-2:]
    neighbours = neighbour_values(mask_logits, dilation)
    logits = mask_logits.unsqueeze(1)
    log_same = torch.logaddexp(
        F.logsigmoid(logits) + F.logsigmoid(neighbours), F.logsigmoid(-logits) + F.logsigmoid(-neighbours)
    )
    counted = (similarity >= color_thr) & (boxes >= 0.5).unsqueeze(1) & _inside_image(h, w, dilation, logits.device)
    weights = counted.to(log_same.dtype)
    return -(log_same * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp(min=1.0)


def embedding_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[P, D] x [P, D] -> [P]: ``1 - cos(q, q*)``. Only the direction of an embedding matters, so un-normalised
    targets are fine."""
    return 1.0 - F.cosine_similarity(predicted, target.to(predicted.dtype), dim=1)


def warmup_factor(iteration: int, warmup_iters: int) -> float:
    """Linear 0 -> 1 over ``warmup_iters`` (1 when there is no warm-up): the pairwise term only makes sense once
    the masks are roughly right, so it is ramped in."""
    if warmup_iters <= 0:
        return 1.0
    return min(max(iteration / warmup_iters, 0.0), 1.0)
