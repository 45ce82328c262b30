"""ResNet C2-C5 + FPN P2-P6 built from torchvision parts, keeping torchvision's key names (``body.*``, ``fpn.*``)
so backbone weights export as plain torchvision state_dicts."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from training.errors import UserError

RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
}
STAGES = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}


def build_resnet(depth: int, frozen_bn: bool = False) -> nn.Module:
    """A randomly initialised torchvision ResNet (no downloads here; users load their own weights)."""
    if depth not in RESNETS:
        raise UserError(f"unsupported ResNet depth {depth} (use one of {sorted(RESNETS)})")
    norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    return RESNETS[depth](weights=None, norm_layer=norm_layer)


def stage_channels(depth: int) -> list[int]:
    """Output channels of C2..C5."""
    widths = [64, 128, 256, 512]
    return widths if depth < 50 else [4 * w for w in widths]


class ResNetFPN(nn.Module):
    """Returns [P2, P3, P4, P5, P6]; P6 is P5 max-pooled with stride 2."""

    def __init__(self, depth: int, out_channels: int, frozen_bn: bool = False) -> None:
        super().__init__()
        self.body = IntermediateLayerGetter(build_resnet(depth, frozen_bn), return_layers=STAGES)
        self.fpn = FeaturePyramidNetwork(stage_channels(depth), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.fpn(self.body(images)).values())
