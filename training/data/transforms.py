"""Resize and flip that keep masks aligned with their image, plus the resize policy shared by training,
evaluation, prediction and serving (shorter side to a target, longer side capped)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training.data.resize_modes import RESIZE_FILTERS, resize_upstream, round_size
from training.errors import UserError


def resized_shape(
    height: int, width: int, short_side: int, max_size: int, rounding: str = "half_even"
) -> tuple[int, int]:
    """Scale so the shorter side is ``short_side`` unless the longer side would exceed ``max_size``; sizes rounded
    as ``InputConfig.resize_rounding`` says."""
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round_size(height * scale, rounding)), max(1, round_size(width * scale, rounding))


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] uint8."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def resize_image(image: torch.Tensor, size: tuple[int, int], resize_filter: str = "antialias") -> torch.Tensor:
    """Bilinear resize of a [3, H, W] uint8 image: antialiased, or the filter upstream-trained weights were tested
    with (``InputConfig.resize_filter``: OpenCV's or Pillow's)."""
    if tuple(image.shape[-2:]) == size:
        return image
    if resize_filter in ("opencv", "pil"):
        resized = resize_upstream(image.permute(1, 2, 0).numpy(), size, resize_filter)
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()
    if resize_filter != "antialias":
        raise UserError(f"unknown resize filter '{resize_filter}' (use one of {', '.join(RESIZE_FILTERS)})")
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize binary [N, H, W] masks by bilinear interpolation and a 0.5 threshold (smoother than nearest)."""
    if tuple(masks.shape[-2:]) == size:
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    resized = F.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=False)
    return (resized[0] >= 0.5).to(masks.dtype)


def hflip(image: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return image.flip(-1), masks.flip(-1)
