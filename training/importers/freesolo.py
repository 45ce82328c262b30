"""NVlabs/FreeSOLO checkpoints: detectron2 ``{"model": state_dict}`` of its SOLOv2 (``backbone.bottom_up.*`` ResNet
with frozen BatchNorm, ``backbone.fpn_lateral{2..5}``/``fpn_output{2..5}``, ``ins_head.*`` towers as Sequentials of
conv, GroupNorm, ReLU, the 128-d ``emb_pred`` on the category tower, ``mask_head.*``).

Its graph is ours: ``split_feats`` halves P2 and resizes P6 to P5 bilinearly (align_corners False), the towers resize
coordinates and features to the grid together, the mask branch has CoordConv on P5, and detectron2's FPN makes P6
by max-pooling P5 (kernel 1, stride 2) with nearest top-down upsampling."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from training.backbone_io import detectron2_name, infer_depth, torchvision_name
from training.importers.architecture import Widths
from training.importers.core import require
from training.importers.solov2_layout import SourceNames

BOTTOM_UP = "backbone.bottom_up."
# detectron2 counts FPN levels by the C-stage they read: lateral i of ours is fpn_lateral{i+2}.
FIRST_LEVEL = 2
CONVS_PER_TOWER_LAYER = 3  # conv, GroupNorm, ReLU: the n-th conv of a tower is child 3n, its norm 3n+1
PREDICTORS = {"kernel": "kernel_pred", "cate": "cate_pred", "embed": "emb_pred"}
# Not weights: the training-iteration counter the model registers as a buffer.
COUNTERS = ("_iter",)

FREESOLO_NAMES = SourceNames(
    backbone=lambda name: BOTTOM_UP + detectron2_name(name),
    lateral=lambda i, part: f"backbone.fpn_lateral{i + FIRST_LEVEL}.{part}",
    output=lambda i, part: f"backbone.fpn_output{i + FIRST_LEVEL}.{part}",
    tower_conv=lambda tower, i: f"ins_head.{tower}_tower.{CONVS_PER_TOWER_LAYER * i}.weight",
    tower_norm=lambda tower, i, part: f"ins_head.{tower}_tower.{CONVS_PER_TOWER_LAYER * i + 1}.{part}",
    predictor=lambda kind, part: f"ins_head.{PREDICTORS[kind]}.{part}",
    mask_conv=lambda level, j: f"mask_head.convs_all_levels.{level}.conv{j}.0.weight",
    mask_norm=lambda level, j, part: f"mask_head.convs_all_levels.{level}.conv{j}.1.{part}",
    project_conv=lambda: "mask_head.conv_pred.0.weight",
    project_norm=lambda part: f"mask_head.conv_pred.1.{part}",
)


def freesolo_widths(state: Mapping[str, Tensor], source: str) -> Widths:
    names = FREESOLO_NAMES
    tower_convs = [key for key in state if re.fullmatch(r"ins_head\.cate_tower\.\d+\.weight", key)]
    embed = names.predictor("embed", "weight")
    return Widths(
        depth=infer_depth(torchvision_backbone(state), source),
        fpn_channels=require(state, names.lateral(0, "weight"), source).shape[0],
        head_channels=require(state, names.tower_conv("cate", 0), source).shape[0],
        head_convs=sum(1 for key in tower_convs if state[key].dim() == 4),
        mask_branch_channels=require(state, names.mask_conv(0, 0), source).shape[0],
        mask_channels=require(state, names.project_conv(), source).shape[0],
        num_classes=require(state, names.predictor("cate", "weight"), source).shape[0],
        embedding_dim=state[embed].shape[0] if embed in state else 0,
    )


def torchvision_backbone(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``backbone.bottom_up.*`` ResNet tensors under torchvision names (for reading its depth)."""
    bottom_up = {key.removeprefix(BOTTOM_UP): value for key, value in state.items() if key.startswith(BOTTOM_UP)}
    renamed = {torchvision_name(key): value for key, value in bottom_up.items()}
    return {key: value for key, value in renamed.items() if key is not None}
