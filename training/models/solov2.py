"""The SOLOv2 network: uint8 images of any size in, raw head tensors out (padding and normalisation happen inside, as
in the graph contract of docs/architecture.md). Targets/losses live in ``targets.py``/``losses.py``; post-processing in
``postprocess.py``."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from training.config import ModelConfig
from training.data.batching import pad_to
from training.geometry import round_up
from training.models.backbone import ResNetFPN
from training.models.heads import InstanceHead, MaskFeatureBranch


class SOLOv2Output(NamedTuple):
    """Raw predictions before post-processing."""

    cate_logits: list[torch.Tensor]  # per level [B, C, S, S]
    kernels: list[torch.Tensor]  # per level [B, E, S, S] (1x1 dynamic kernels)
    mask_features: torch.Tensor  # [B, E, Hp/4, Wp/4], Hp x Wp the padded input size (pad_to_divisor)
    embeddings: tuple[torch.Tensor, ...] = ()  # per level [B, embedding_dim, S, S]; empty without an embedding head


def inside_images(sizes: torch.Tensor, padded: tuple[int, int] | torch.Size) -> torch.Tensor:
    """[B, 1, H, W] bool: True where a pixel belongs to its image, False in the padding."""
    rows = torch.arange(padded[0], device=sizes.device).view(1, -1, 1) < sizes[:, 0].view(-1, 1, 1)
    cols = torch.arange(padded[1], device=sizes.device).view(1, 1, -1) < sizes[:, 1].view(-1, 1, 1)
    return (rows & cols).unsqueeze(1)


def pad_to_divisor(images: torch.Tensor) -> torch.Tensor:
    """Zeros bottom/right up to the next multiples of ``SIZE_DIVISOR`` (``training.geometry.round_up``), as every
    caller pads its images: the FPN and the mask branch add features of neighbouring strides, which line up only on
    such sizes. A no-op on inputs already padded, so it changes nothing for them; it makes any H x W valid, in
    PyTorch and in an exported graph alike (where the pad amounts are computed from the input's shape)."""
    return pad_to(images, (round_up(images.shape[-2]), round_up(images.shape[-1])))


class SOLOv2(nn.Module):
    """ResNet-FPN backbone + instance head + unified mask-feature branch."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNetFPN(config.depth, config.fpn_channels, config.frozen_bn)
        self.head = InstanceHead(
            config.fpn_channels,
            config.num_classes,
            config.head_channels,
            config.head_convs,
            config.mask_channels,
            config.grids,
            config.embedding_dim,
        )
        self.mask_branch = MaskFeatureBranch(config.fpn_channels, config.mask_branch_channels, config.mask_channels)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-255 float) RGB -> zero-mean, unit-variance float."""
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> SOLOv2Output:
        """Images of any H x W; masks come back at the padded size / 4 (``pad_to_divisor``). ``sizes`` [B, 2]
        (height, width of each image before padding) matter only with ``pad_normalized``."""
        normalized = self.normalize(pad_to_divisor(images))
        if self.config.pad_normalized and sizes is not None:
            normalized = normalized * inside_images(sizes, normalized.shape[-2:]).to(normalized.dtype)
        pyramid = self.backbone(normalized)
        cate_logits, kernels, embeddings = self.head(pyramid)
        return SOLOv2Output(cate_logits, kernels, self.mask_branch(pyramid[:4]), tuple(embeddings))
