"""Resize and flip of torch images that keep masks aligned with their image (the sizes come from
``training.geometry``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training.geometry import resize_rgb


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] uint8."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def resize_image(image: torch.Tensor, size: tuple[int, int], resize_filter: str = "antialias") -> torch.Tensor:
    """Resize of a [3, H, W] uint8 image: ``training.geometry.resize_rgb``, the one image resize of every runtime
    (served inputs equal PyTorch's to the pixel), with the policy's filter (``InputConfig.resize_filter``)."""
    if tuple(image.shape[-2:]) == size:
        return image
    resized = resize_rgb(image.permute(1, 2, 0).numpy(), size, resize_filter)
    return torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).contiguous()


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
