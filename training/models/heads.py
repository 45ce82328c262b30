"""SOLOv2 heads (docs/algorithms.md, "SOLOv2"): the instance head predicts, per grid cell, a category score and a
dynamic 1x1 kernel; the unified mask-feature branch predicts the stride-4 features those kernels are applied to."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PRIOR_PROB = 0.01


def conv_gn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3 (no bias) -> GroupNorm(32) -> ReLU, the building block of every SOLOv2 tower."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(min(32, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


def coordinate_channels(features: torch.Tensor) -> torch.Tensor:
    """Two CoordConv channels (x, y) in [-1, 1], computed from the tensor's own shape (export-friendly)."""
    batch, _, height, width = features.shape
    xs = torch.arange(width, dtype=features.dtype, device=features.device) * (2.0 / max(width - 1, 1)) - 1.0
    ys = torch.arange(height, dtype=features.dtype, device=features.device) * (2.0 / max(height - 1, 1)) - 1.0
    grid_x = xs.view(1, 1, 1, width).expand(batch, 1, height, width)
    grid_y = ys.view(1, 1, height, 1).expand(batch, 1, height, width)
    return torch.cat([grid_x, grid_y], dim=1)


def init_normal(module: nn.Module, std: float = 0.01) -> None:
    """SOLOv2's head init: N(0, 0.01) conv weights, zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class InstanceHead(nn.Module):
    """Kernel and category branches, weights shared across the pyramid levels."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int,
        num_convs: int,
        kernel_dim: int,
        grids: list[int],
        embedding_dim: int = 0,
    ) -> None:
        super().__init__()
        self.grids = list(grids)
        self.kernel_tower = nn.Sequential(
            *[conv_gn_relu(in_channels + 2 if i == 0 else channels, channels) for i in range(num_convs)]
        )
        self.cate_tower = nn.Sequential(
            *[conv_gn_relu(in_channels if i == 0 else channels, channels) for i in range(num_convs)]
        )
        self.kernel_pred = nn.Conv2d(channels, kernel_dim, 3, padding=1)
        self.cate_pred = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.embed_pred = nn.Conv2d(channels, embedding_dim, 3, padding=1) if embedding_dim > 0 else None
        init_normal(self)
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    @staticmethod
    def level_features(pyramid: list[torch.Tensor]) -> list[torch.Tensor]:
        """P2..P6 -> the five head inputs: P2 halved to P3's size, P6 resized to P5's size (strides 8,8,16,32,32)."""
        p2, p3, p4, p5, p6 = pyramid
        return [
            F.interpolate(p2, size=p3.shape[-2:], mode="bilinear", align_corners=False),
            p3,
            p4,
            p5,
            F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False),
        ]

    def forward(self, pyramid: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
        """Per-level category logits [B, C, S, S], kernels [B, D, S, S] and, with an embedding head, embeddings
        [B, embedding_dim, S, S] (an empty list without one)."""
        cate_logits, kernels, embeddings = [], [], []
        for features, grid in zip(self.level_features(pyramid), self.grids, strict=True):
            with_coords = torch.cat([features, coordinate_channels(features)], dim=1)
            with_coords = F.interpolate(with_coords, size=(grid, grid), mode="bilinear", align_corners=False)
            kernels.append(self.kernel_pred(self.kernel_tower(with_coords)))
            category_features = self.cate_tower(with_coords[:, :-2])
            cate_logits.append(self.cate_pred(category_features))
            if self.embed_pred is not None:
                embeddings.append(self.embed_pred(category_features))
        return cate_logits, kernels, embeddings


class MaskFeatureBranch(nn.Module):
    """Unified stride-4 mask features from P2..P5 (CoordConv on P5 only), summed, then conv1x1 -> E."""

    def __init__(self, in_channels: int, channels: int, out_channels: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList()
        for level in range(4):
            blocks: list[nn.Module] = [conv_gn_relu(in_channels + (2 if level == 3 else 0), channels)]
            for step in range(level):
                if step > 0:
                    blocks.append(conv_gn_relu(channels, channels))
                blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.levels.append(nn.Sequential(*blocks))
        self.project = nn.Sequential(
            nn.Conv2d(channels, out_channels, 1, bias=False),
            nn.GroupNorm(min(32, out_channels), out_channels),
            nn.ReLU(inplace=True),
        )
        init_normal(self)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        total = self.levels[0](pyramid[0])
        for level in range(1, 4):
            features = pyramid[level]
            if level == 3:
                features = torch.cat([features, coordinate_channels(features)], dim=1)
            total = total + self.levels[level](features)
        return self.project(total)
