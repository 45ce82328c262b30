"""SOLOv2 training targets by center sampling (docs/algorithms.md, "SOLOv2", "Targets").

For every level an instance belongs to (by sqrt(w*h) in the level's scale range), the positive cells are the
cells of a box of half-size 0.5*sigma*(w, h) around the instance's mask centre of mass, clipped to the centre
cell +-1 (at most 3x3). Each positive cell learns the instance's label and its mask at stride 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.geometry import MASK_STRIDE


@dataclass
class ImageTargets:
    """Targets of one image; ``positive_cells[l]`` index the flattened S*S grid of level l."""

    cate_targets: list[torch.Tensor]  # per level [S, S] int64, background = num_classes
    positive_cells: list[torch.Tensor]  # per level [P] int64
    positive_instances: list[torch.Tensor]  # per level [P] int64 index into ``masks``
    masks: torch.Tensor  # [N, H/4, W/4] float, area-averaged (soft at the borders)

    @property
    def num_positives(self) -> int:
        return sum(int(cells.numel()) for cells in self.positive_cells)


def instance_geometry(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box sizes (w, h), centres of mass (x, y) in pixel units (pixel centres at i + 0.5), and sqrt(w*h)."""
    masks = masks.float()
    height, width = masks.shape[-2:]
    area = masks.sum(dim=(1, 2)).clamp(min=1.0)
    cols = torch.arange(width, dtype=torch.float32) + 0.5
    rows = torch.arange(height, dtype=torch.float32) + 0.5
    center_x = (masks.sum(dim=1) * cols).sum(dim=1) / area
    center_y = (masks.sum(dim=2) * rows).sum(dim=1) / area
    any_col = masks.amax(dim=1) > 0
    any_row = masks.amax(dim=2) > 0
    col_index = torch.arange(width).expand_as(any_col)
    row_index = torch.arange(height).expand_as(any_row)
    x1 = torch.where(any_col, col_index, width).amin(dim=1)
    x2 = torch.where(any_col, col_index, -1).amax(dim=1) + 1
    y1 = torch.where(any_row, row_index, height).amin(dim=1)
    y2 = torch.where(any_row, row_index, -1).amax(dim=1) + 1
    sizes = torch.stack([(x2 - x1).float(), (y2 - y1).float()], dim=1)
    return sizes, torch.stack([center_x, center_y], dim=1), sizes.prod(dim=1).sqrt()


def downsample_masks(masks: torch.Tensor, stride: int = MASK_STRIDE) -> torch.Tensor:
    """[N, H, W] binary -> [N, H/stride, W/stride] fraction of each cell covered."""
    if masks.numel() == 0:
        return masks.new_zeros((masks.shape[0], masks.shape[1] // stride, masks.shape[2] // stride), dtype=torch.float)
    return F.avg_pool2d(masks[:, None].float(), stride)[:, 0]


def level_assignment(
    sizes: torch.Tensor, centers: torch.Tensor, image_size: tuple[int, int], grid: int, sigma: float
) -> list[tuple[int, int, int, int]]:
    """Per instance: the inclusive cell box (top, bottom, left, right) of its positive cells on an SxS grid."""
    height, width = image_size
    boxes = []
    for (w, h), (cx, cy) in zip(sizes.tolist(), centers.tolist(), strict=True):
        half_w, half_h = 0.5 * sigma * w, 0.5 * sigma * h
        coord_x = min(max(int(cx / width * grid), 0), grid - 1)
        coord_y = min(max(int(cy / height * grid), 0), grid - 1)
        top_box = max(0, int((cy - half_h) / height * grid))
        bottom_box = min(grid - 1, int((cy + half_h) / height * grid))
        left_box = max(0, int((cx - half_w) / width * grid))
        right_box = min(grid - 1, int((cx + half_w) / width * grid))
        boxes.append(
            (
                max(top_box, coord_y - 1),
                min(bottom_box, coord_y + 1),
                max(left_box, coord_x - 1),
                min(right_box, coord_x + 1),
            )
        )
    return boxes


def build_targets(
    masks: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    grids: list[int],
    scale_ranges: list[list[float]],
    sigma: float,
) -> ImageTargets:
    """Targets of one image from its GT masks [N, H, W] (at the padded input size) and labels [N] in [0, C)."""
    height, width = masks.shape[-2:]
    keep = masks.flatten(1).amax(dim=1) > 0 if masks.numel() else torch.zeros(0, dtype=torch.bool)
    masks, labels = masks[keep], labels[keep]
    sizes, centers, scales = instance_geometry(masks)
    # Larger instances first, so a smaller instance sharing a cell overwrites it (it has fewer cells to win).
    order = torch.argsort(scales, descending=True)
    cate_targets, positive_cells, positive_instances = [], [], []
    for grid, (lower, upper) in zip(grids, scale_ranges, strict=True):
        owner = torch.full((grid, grid), -1, dtype=torch.long)
        members = [int(i) for i in order if lower <= scales[i] <= upper]
        boxes = level_assignment(sizes[members], centers[members], (height, width), grid, sigma)
        for index, (top, bottom, left, right) in zip(members, boxes, strict=True):
            owner[top : bottom + 1, left : right + 1] = index
        cells = torch.nonzero(owner.flatten() >= 0).flatten()
        instances = owner.flatten()[cells]
        target = torch.full((grid, grid), num_classes, dtype=torch.long)
        target.view(-1)[cells] = labels[instances].long()
        cate_targets.append(target)
        positive_cells.append(cells)
        positive_instances.append(instances)
    return ImageTargets(cate_targets, positive_cells, positive_instances, downsample_masks(masks))
