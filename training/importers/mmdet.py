"""mmdetection 3.x SOLOv2 checkpoints (``{"meta", "state_dict"}``) and, sharing its backbone and neck names,
WXinlong/SOLO's mmdetection 1.x layout (``bbox_head.*`` and ``mask_feat_head.*``).

mmdetection's SOLOv2 computes what ours does: ResNet (torchvision's stride placement, ``style='pytorch'``), FPN with
nearest top-down upsampling and P6 = max-pool(P5, kernel 1, stride 2), P2 halved and P6 resized to P5 bilinearly
(align_corners False) for the head, coordinates appended before the bilinear resize to the grid, the category tower
fed the resized features without them, and CoordConv on P5 only in the mask branch. Only the names differ."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from training.backbone_io import infer_depth
from training.importers.architecture import Widths
from training.importers.core import count_blocks, require
from training.importers.solov2_layout import SourceNames

MMDET_HEAD = "mask_head."
MMDET_MASK_BRANCH = "mask_head.mask_feature_head."
SOLO_HEAD = "bbox_head."
SOLO_MASK_BRANCH = "mask_feat_head."


def backbone_name(name: str) -> str:
    return f"backbone.{name}"


def lateral_name(index: int, part: str) -> str:
    return f"neck.lateral_convs.{index}.conv.{part}"


def output_name(index: int, part: str) -> str:
    return f"neck.fpn_convs.{index}.conv.{part}"


def _mask_names(prefix: str, project: str) -> dict[str, Any]:
    """The mask-feature branch of both generations: ``convs_all_levels.{level}.conv{j}`` ConvModules (conv + gn)."""
    return {
        "mask_conv": lambda level, j: f"{prefix}convs_all_levels.{level}.conv{j}.conv.weight",
        "mask_norm": lambda level, j, part: f"{prefix}convs_all_levels.{level}.conv{j}.gn.{part}",
        "project_conv": lambda: f"{prefix}{project}.conv.weight",
        "project_norm": lambda part: f"{prefix}{project}.gn.{part}",
    }


MMDET_TOWERS = {"kernel": "kernel_convs", "cate": "cls_convs"}
MMDET_PREDICTORS = {"kernel": "conv_kernel", "cate": "conv_cls"}  # mmdetection SOLOv2 has no embedding head

MMDET3_NAMES = SourceNames(
    backbone=backbone_name,
    lateral=lateral_name,
    output=output_name,
    tower_conv=lambda tower, i: f"{MMDET_HEAD}{MMDET_TOWERS[tower]}.{i}.conv.weight",
    tower_norm=lambda tower, i, part: f"{MMDET_HEAD}{MMDET_TOWERS[tower]}.{i}.gn.{part}",
    predictor=lambda kind, part: f"{MMDET_HEAD}{MMDET_PREDICTORS[kind]}.{part}",
    **_mask_names(MMDET_MASK_BRANCH, "conv_pred"),
)

SOLO_NAMES = SourceNames(
    backbone=backbone_name,
    lateral=lateral_name,
    output=output_name,
    tower_conv=lambda tower, i: f"{SOLO_HEAD}{tower}_convs.{i}.conv.weight",
    tower_norm=lambda tower, i, part: f"{SOLO_HEAD}{tower}_convs.{i}.gn.{part}",
    predictor=lambda kind, part: f"{SOLO_HEAD}solo_{kind}.{part}",
    **_mask_names(SOLO_MASK_BRANCH, "conv_pred.0"),
)


def mmdet_widths(state: Mapping[str, Tensor], source: str) -> Widths:
    return _widths(state, source, MMDET3_NAMES, f"{MMDET_HEAD}cls_convs.")


def solo_widths(state: Mapping[str, Tensor], source: str) -> Widths:
    return _widths(state, source, SOLO_NAMES, f"{SOLO_HEAD}cate_convs.")


def _widths(state: Mapping[str, Tensor], source: str, names: SourceNames, cate_tower: str) -> Widths:
    """Depth from the backbone's block layout; widths from the first conv of each module."""
    backbone = {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}
    return Widths(
        depth=infer_depth(backbone, source),
        fpn_channels=require(state, names.lateral(0, "weight"), source).shape[0],
        head_channels=require(state, names.tower_conv("cate", 0), source).shape[0],
        head_convs=count_blocks(state, cate_tower),
        mask_branch_channels=require(state, names.mask_conv(0, 0), source).shape[0],
        mask_channels=require(state, names.project_conv(), source).shape[0],
        num_classes=require(state, names.predictor("cate", "weight"), source).shape[0],
    )


def mmdet_class_names(meta: Any) -> list[str] | None:
    """Class names an mmdetection checkpoint records (3.x ``dataset_meta.classes``, 1.x/2.x ``CLASSES``), if any."""
    if not isinstance(meta, Mapping):
        return None
    dataset_meta = meta.get("dataset_meta")
    names = dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else meta.get("CLASSES")
    if isinstance(names, list | tuple) and names and all(isinstance(name, str) for name in names):
        return list(names)
    return None
