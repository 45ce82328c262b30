"""Our SOLOv2's tensor names, as rules an importer fills in with its own names. Every upstream SOLOv2 has the same
modules (ResNet, FPN lateral/output convs, two towers of conv + GroupNorm, two predictors, the mask-feature branch's
per-level conv + GroupNorm blocks and its 1x1 projection); only their names differ."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from training.importers.core import Rule

Namer = Callable[..., str]


@dataclass(frozen=True)
class SourceNames:
    """How a source names each module (functions of indices; ``part`` is ``weight`` or ``bias``).

    ``backbone(name)`` gets a torchvision ResNet name; ``lateral(i, part)``/``output(i, part)`` the FPN convs of C(i+2);
    ``tower_conv(tower, i)``/``tower_norm(tower, i, part)`` with tower ``kernel`` or ``cate``; ``predictor(kind,
    part)`` with kind ``kernel``, ``cate`` or ``embed``; ``mask_conv(level, j)``/``mask_norm(level, j, part)`` the
    j-th conv of a mask-branch level; ``project_conv()``/``project_norm(part)`` its final 1x1 conv."""

    backbone: Namer
    lateral: Namer
    output: Namer
    tower_conv: Namer
    tower_norm: Namer
    predictor: Namer
    mask_conv: Namer
    mask_norm: Namer
    project_conv: Namer
    project_norm: Namer


def solov2_rules(names: SourceNames) -> list[Rule]:
    """Rules from every tensor name of ``training.models.SOLOv2`` to the source's. In our mask branch a level's
    Sequential alternates conv blocks and upsamplings, so its child 2j is the level's j-th conv."""
    rule = Rule
    return [
        rule(r"backbone\.body\.(.+)", lambda m: names.backbone(m[1])),
        rule(r"backbone\.fpn\.inner_blocks\.(\d+)\.0\.(weight|bias)", lambda m: names.lateral(int(m[1]), m[2])),
        rule(r"backbone\.fpn\.layer_blocks\.(\d+)\.0\.(weight|bias)", lambda m: names.output(int(m[1]), m[2])),
        rule(r"head\.(kernel|cate)_tower\.(\d+)\.0\.weight", lambda m: names.tower_conv(m[1], int(m[2]))),
        rule(r"head\.(kernel|cate)_tower\.(\d+)\.1\.(weight|bias)", lambda m: names.tower_norm(m[1], int(m[2]), m[3])),
        rule(r"head\.(kernel|cate|embed)_pred\.(weight|bias)", lambda m: names.predictor(m[1], m[2])),
        rule(r"mask_branch\.levels\.(\d+)\.(\d+)\.0\.weight", lambda m: names.mask_conv(int(m[1]), int(m[2]) // 2)),
        rule(
            r"mask_branch\.levels\.(\d+)\.(\d+)\.1\.(weight|bias)",
            lambda m: names.mask_norm(int(m[1]), int(m[2]) // 2, m[3]),
        ),
        rule(r"mask_branch\.project\.0\.weight", lambda m: names.project_conv()),
        rule(r"mask_branch\.project\.1\.(weight|bias)", lambda m: names.project_norm(m[1])),
    ]
