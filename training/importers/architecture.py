"""The SOLOv2 configs published weights were trained with. A checkpoint's tensors give depth and widths; the grids,
strides, scale ranges and test resize are not in any tensor, so they come from the family the widths identify
(the values of that family's upstream config)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from training.config import Config, InferenceConfig, InputConfig, ModelConfig
from training.errors import UserError

# This project's ModelConfig and InputConfig defaults are the paper's SOLOv2, which is what mmdetection, WXinlong/SOLO
# and FreeSOLO configure: grids [40, 36, 24, 16, 12], strides [8, 8, 16, 32, 32], RGB input normalised with the
# ImageNet mean and std (mmdetection: bgr_to_rgb with those values; FreeSOLO: INPUT.FORMAT RGB), test resize 800/1333.
PAPER_MODEL = ModelConfig()
PAPER_INPUT = InputConfig()


@dataclass(frozen=True)
class Family:
    """An upstream SOLOv2 variant: its head widths (what identifies it) and what its config adds."""

    name: str
    head_convs: int
    head_channels: int
    mask_channels: int
    scale_ranges: list[list[float]]
    test_size: int
    max_size: int


FAMILIES = (
    Family("SOLOv2", 4, 512, 256, PAPER_MODEL.scale_ranges, PAPER_INPUT.test_size, PAPER_INPUT.max_size),
    # mmdetection's solov2-light_* and WXinlong/SOLO's SOLOv2_LIGHT_448_*: test resize (768, 448).
    Family("SOLOv2-light", 2, 256, 128, [[1, 56], [28, 112], [56, 224], [112, 448], [224, 896]], 448, 768),
)


@dataclass(frozen=True)
class Widths:
    """What the tensors of a SOLOv2 checkpoint say about its architecture."""

    depth: int
    fpn_channels: int
    head_channels: int
    head_convs: int
    mask_branch_channels: int
    mask_channels: int
    num_classes: int
    embedding_dim: int = 0


def family_of(widths: Widths, source: str) -> Family:
    for family in FAMILIES:
        if (family.head_convs, family.head_channels, family.mask_channels) == (
            widths.head_convs,
            widths.head_channels,
            widths.mask_channels,
        ):
            return family
    known = "; ".join(f"{f.name}: {f.head_convs} x {f.head_channels} ch, E = {f.mask_channels}" for f in FAMILIES)
    raise UserError(
        f"{source}: unknown SOLOv2 variant (head {widths.head_convs} x {widths.head_channels} channels, "
        f"mask features {widths.mask_channels}); its grids and scale ranges are not in the weights (known: {known})"
    )


def imported_config(
    widths: Widths, source: str, resize_filter: str, test_size: int | None, max_size: int | None
) -> tuple[Config, str]:
    """This project's Config for the checkpoint, and the family name; ``resize_filter`` is the one upstream's test
    pipeline resizes with (``InputConfig.resize_filter``). Frozen BatchNorm, as upstream runs these backbones
    (mmdetection norm_eval, detectron2 FrozenBN): the same arithmetic as BatchNorm in eval mode, without the batch
    counters FreeSOLO's checkpoint does not have."""
    family = family_of(widths, source)
    model = replace(
        ModelConfig(),
        depth=widths.depth,
        frozen_bn=True,
        fpn_channels=widths.fpn_channels,
        head_channels=widths.head_channels,
        head_convs=widths.head_convs,
        mask_branch_channels=widths.mask_branch_channels,
        mask_channels=widths.mask_channels,
        num_classes=widths.num_classes,
        embedding_dim=widths.embedding_dim,
        scale_ranges=[list(r) for r in family.scale_ranges],
        pad_normalized=True,
    )
    sizes = replace(
        InputConfig(),
        test_size=test_size or family.test_size,
        max_size=max_size or family.max_size,
        resize_filter=resize_filter,
        resize_rounding="half_up",  # mmcv's rescale_size and detectron2's ResizeShortestEdge: int(x + 0.5)
    )
    # Upstream's test_cfg values are the InferenceConfig defaults; only the mask resize differs.
    inference = InferenceConfig(resize_soft_masks=True)
    return Config(preset=f"imported-{family.name}", model=model, input=sizes, inference=inference), family.name
