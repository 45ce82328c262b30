"""Center-sampling targets land in the expected levels and cells; the losses behave at their extremes."""

from __future__ import annotations

import torch

from training.config import LossConfig, load_preset
from training.models import SOLOv2
from training.models.losses import dice_loss, solo_losses
from training.models.targets import build_targets, downsample_masks, instance_geometry

GRIDS = [20, 16, 12, 8, 6]
RANGES = [[1, 24], [16, 48], [32, 80], [64, 160], [128, 512]]


def square_mask(top: int, left: int, side: int, size: int = 128) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[top : top + side, left : left + side] = 1
    return mask


def cells_of(targets, level: int) -> set[tuple[int, int]]:
    grid = GRIDS[level]
    return {(int(c) // grid, int(c) % grid) for c in targets.positive_cells[level]}


def test_geometry_of_a_square() -> None:
    sizes, centers, scales = instance_geometry(square_mask(44, 24, 40)[None])
    assert sizes.tolist() == [[40.0, 40.0]]
    assert centers.tolist() == [[44.0, 64.0]]  # x = 24 + 20, y = 44 + 20 (pixel centres at i + 0.5)
    assert scales.tolist() == [40.0]


def test_known_mask_lands_in_expected_levels_and_cells() -> None:
    # A 40 px square centred at (64, 64): scale 40 is in levels 1 ([16, 48]) and 2 ([32, 80]) only.
    targets = build_targets(square_mask(44, 44, 40)[None], torch.tensor([3]), 5, GRIDS, RANGES, sigma=0.2)
    # Level 1, S = 16: centre cell 64/128*16 = 8; the 0.2-sigma box spans (60..68)/128*16 = 7.5..8.5 -> 7..8.
    assert cells_of(targets, 1) == {(7, 7), (7, 8), (8, 7), (8, 8)}
    # Level 2, S = 12: centre cell 6; the box spans 5.6..6.4 -> 5..6.
    assert cells_of(targets, 2) == {(5, 5), (5, 6), (6, 5), (6, 6)}
    for level in (0, 3, 4):
        assert targets.positive_cells[level].numel() == 0
        assert (targets.cate_targets[level] == 5).all()
    assert int((targets.cate_targets[1] == 3).sum()) == 4
    assert targets.num_positives == 8
    assert targets.positive_instances[1].tolist() == [0, 0, 0, 0]


def test_positive_cells_are_at_most_3x3_around_the_centre() -> None:
    # A very large object: its 0.2-sigma box covers many cells, but positives stay within centre +- 1.
    targets = build_targets(square_mask(0, 0, 128)[None], torch.tensor([0]), 1, GRIDS, RANGES, sigma=1.0)
    for level in range(5):
        cells = cells_of(targets, level)
        if cells:
            rows = {r for r, _ in cells}
            cols = {c for _, c in cells}
            assert len(rows) <= 3 and len(cols) <= 3


def test_mask_targets_are_stride_4_coverage() -> None:
    mask = square_mask(40, 40, 10)
    down = downsample_masks(mask[None])
    assert down.shape == (1, 32, 32)
    assert down.sum().item() == mask.sum().item() / 16
    assert down[0, 10:12, 10:12].min().item() == 1.0  # fully covered cells (pixels 40..47)
    assert down[0, 12, 10].item() == 0.5  # pixels 48..49 of 48..51 are covered


def test_empty_image_has_only_background() -> None:
    targets = build_targets(
        torch.zeros(0, 64, 64, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), 2, GRIDS, RANGES, 0.2
    )
    assert targets.num_positives == 0
    assert all((t == 2).all() for t in targets.cate_targets)


def test_dice_of_identical_masks_is_zero_and_disjoint_is_one() -> None:
    mask = square_mask(10, 10, 30).float()[None]
    assert dice_loss(mask, mask).item() < 1e-4
    other = square_mask(80, 80, 30).float()[None]
    assert dice_loss(mask, other).item() > 0.999


def test_losses_fall_when_fitting_one_image() -> None:
    """The full SOLOv2 loss must be learnable: a few SGD steps on one image halve both terms. (The rate is the
    trainer's early warm-up range: without warm-up, lr 0.01 drives every mask logit negative in one step.)"""
    torch.manual_seed(0)
    config = load_preset("tiny")
    config.model.num_classes = 2
    model = SOLOv2(config.model)
    images = torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8)
    masks = torch.stack([square_mask(20, 20, 40), square_mask(70, 60, 30)])
    images[:, :, masks[0].bool()] = 255
    targets = [build_targets(masks, torch.tensor([0, 1]), 2, config.model.grids, config.model.scale_ranges, 0.2)] * 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    history = []
    for _ in range(15):
        losses = solo_losses(model(images), targets, LossConfig())
        history.append({k: v.item() for k, v in losses.items()})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert history[-1]["loss_cate"] < 0.5 * history[0]["loss_cate"]
    assert history[-1]["loss_mask"] < 0.5 * history[0]["loss_mask"]
