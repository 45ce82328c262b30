"""Samples and batches: images padded (bottom/right, zeros) to a common multiple of 32."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.geometry import SIZE_DIVISOR, ImageGeometry, padded_shape


@dataclass
class Sample:
    """One preprocessed image with its instances (masks/labels are empty for unlabeled images)."""

    image: torch.Tensor  # uint8 [3, H, W] after resize
    masks: torch.Tensor  # uint8 [N, H, W]
    labels: torch.Tensor  # int64 [N], contiguous labels in [0, C)
    image_id: int
    geometry: ImageGeometry
    embeddings: torch.Tensor | None = None  # float32 [N, D]: Free Mask / teacher embeddings, when the json has them


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, H, W], H and W multiples of the size divisor
    masks: list[torch.Tensor]  # per image uint8 [N_i, H, W] padded like the images
    labels: list[torch.Tensor]
    image_ids: list[int]
    geometries: list[ImageGeometry]
    embeddings: list[torch.Tensor | None]


def pad_to(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.pad(tensor, (0, size[1] - tensor.shape[-1], 0, size[0] - tensor.shape[-2]))


def collate(samples: list[Sample], size_divisor: int = SIZE_DIVISOR, canvas: tuple[int, int] | None = None) -> Batch:
    """One batch, padded to ``canvas`` when given (a fixed-size graph's), else to the smallest multiple of
    ``size_divisor`` that holds every image."""
    size = canvas or padded_shape([tuple(s.image.shape[-2:]) for s in samples], size_divisor)
    return Batch(
        images=torch.stack([pad_to(s.image, size) for s in samples]),
        masks=[pad_to(s.masks, size) for s in samples],
        labels=[s.labels for s in samples],
        image_ids=[s.image_id for s in samples],
        geometries=[s.geometry for s in samples],
        embeddings=[s.embeddings for s in samples],
    )
