"""FreeSOLO's weak losses behave as their formulas promise on hand-built masks and images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from training.models.weak_losses import (
    NEIGHBOUR_OFFSETS,
    box_fill,
    embedding_loss,
    neighbour_similarity,
    pairwise_loss,
    projection_losses,
    rgb_to_lab,
    warmup_factor,
)

SATURATED = 20.0


def to_logits(mask: torch.Tensor) -> torch.Tensor:
    """Binary mask -> strongly saturated logits (+-20)."""
    return (mask * 2 - 1) * SATURATED


def square(top: int, left: int, side: int, size: int = 16) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[top : top + side, left : left + side] = 1
    return mask


def outline(top: int, left: int, side: int, size: int = 16) -> torch.Tensor:
    mask = square(top, left, side, size)
    mask[top + 1 : top + side - 1, left + 1 : left + side - 1] = 0
    return mask


def two_colour_image(size: int = 64) -> torch.Tensor:
    """[1, 3, size, size] uint8: black left half, white right half."""
    image = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    image[..., size // 2 :] = 255
    return image


# --- projections -----------------------------------------------------------------------------------------------


def test_projections_vanish_when_prediction_equals_coarse_mask() -> None:
    coarse = torch.stack([square(3, 4, 6), outline(2, 2, 10)])
    l_max, l_avg = projection_losses(to_logits(coarse), coarse)
    assert l_max.shape == l_avg.shape == (2,)
    assert l_max.max() < 1e-3
    # Mean projections are small (sum of squares ~1 here), so Dice's 2e-3 smoothing leaves a floor of ~1e-3 per axis.
    assert l_avg.max() < 5e-3


def test_outline_matches_max_projections_of_filled_square_but_not_means() -> None:
    coarse = square(3, 3, 8)[None]
    l_max, l_avg = projection_losses(to_logits(outline(3, 3, 8))[None], coarse)
    assert l_max.item() < 1e-3
    assert l_avg.item() > 0.05


def test_shifted_mask_is_penalised_by_both_projections() -> None:
    coarse = square(2, 2, 6)[None]
    l_max, l_avg = projection_losses(to_logits(square(8, 8, 6))[None], coarse)
    assert l_max.item() > 0.5 and l_avg.item() > 0.5


# --- colour -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rgb_to_lab_matches_skimage(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    colours = torch.rand(2, 3, 8, 8, generator=generator, dtype=torch.float64) * 255
    colours[0, :, 0, :4] = torch.tensor([0.0, 255.0, 1.0, 10.0])[None]  # black, white, the linear sRGB/Lab pieces
    expected = rgb2lab(colours.permute(0, 2, 3, 1).numpy() / 255.0)
    lab = rgb_to_lab(colours.to(dtype)).permute(0, 2, 3, 1).double().numpy()
    np.testing.assert_allclose(lab, expected, atol=1e-3)


def test_constant_image_is_fully_similar_inside_and_zero_across_the_border() -> None:
    image = torch.full((2, 3, 32, 48), 97, dtype=torch.uint8)
    similarity = neighbour_similarity(image, stride=4, dilation=2)
    assert similarity.shape == (2, 8, 8, 12)
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        rows = torch.arange(8)[:, None] + 2 * dy
        cols = torch.arange(12)[None, :] + 2 * dx
        inside = ((rows >= 0) & (rows < 8) & (cols >= 0) & (cols < 12)).float().expand(2, 8, 12)
        assert torch.allclose(similarity[:, k], inside, atol=1e-6), (dy, dx)


def test_similarity_is_low_across_a_colour_edge() -> None:
    similarity = neighbour_similarity(two_colour_image(64))[0]  # 16 x 16, edge between columns 7 and 8
    right = NEIGHBOUR_OFFSETS.index((0, 1))
    assert similarity[right, 5, 6].item() < 1e-6  # column 6 sees column 8 across the edge
    assert similarity[right, 5, 2].item() == pytest.approx(1.0)  # both black


# --- box fill -----------------------------------------------------------------------------------------------------


def test_box_fill_of_l_shape_is_its_bounding_rectangle_and_empty_stays_empty() -> None:
    l_shape = torch.zeros(10, 12)
    l_shape[2:8, 3] = 1.0
    l_shape[7, 3:9] = 0.7  # soft but above 0.5
    l_shape[0, 0] = 0.4  # below 0.5: not foreground
    expected = torch.zeros(10, 12)
    expected[2:8, 3:9] = 1.0
    filled = box_fill(torch.stack([l_shape, torch.zeros(10, 12)]))
    assert torch.equal(filled, torch.stack([expected, torch.zeros(10, 12)]))


# --- pairwise -----------------------------------------------------------------------------------------------------


def full_box(size: int = 16) -> torch.Tensor:
    return torch.ones(1, size, size)


def test_prediction_that_follows_the_colour_regions_costs_nothing() -> None:
    similarity = neighbour_similarity(two_colour_image(64))
    prediction = torch.zeros(1, 16, 16)
    prediction[..., :8] = 1.0  # the black half is the object
    loss = pairwise_loss(to_logits(prediction), similarity, full_box())
    assert loss.item() < 1e-6


def test_checkerboard_inside_a_uniform_region_is_expensive() -> None:
    similarity = neighbour_similarity(torch.full((1, 3, 64, 64), 128, dtype=torch.uint8))
    # 2x2 blocks: a 1-pixel checkerboard would agree with every neighbour at dilation 2.
    blocks = (torch.arange(16) // 2)[:, None] + (torch.arange(16) // 2)[None, :]
    loss = pairwise_loss(to_logits((blocks % 2).float()[None]), similarity, full_box())
    assert loss.item() > 5.0  # the 4 axis-aligned neighbours disagree at ~20 nats each


def test_undecided_prediction_costs_log_two_per_edge_and_no_edges_cost_nothing() -> None:
    similarity = neighbour_similarity(torch.full((2, 3, 64, 64), 128, dtype=torch.uint8))
    boxes = torch.stack([torch.ones(16, 16), torch.zeros(16, 16)])
    loss = pairwise_loss(torch.zeros(2, 16, 16), similarity, boxes)
    assert loss[0].item() == pytest.approx(math.log(2.0), abs=1e-5)
    assert loss[1].item() == 0.0


def test_edges_from_outside_the_box_do_not_count() -> None:
    similarity = neighbour_similarity(torch.full((1, 3, 64, 64), 128, dtype=torch.uint8))
    boxes = torch.zeros(1, 16, 16)
    boxes[:, 4:10, 4:10] = 1.0
    logits = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1)) * 5
    # Pixels further than the dilation (2) from the box are nobody's counted neighbour.
    far = torch.ones(16, 16, dtype=torch.bool)
    far[2:12, 2:12] = False
    changed = torch.where(far, -logits * 3 + 7, logits)
    before, after = pairwise_loss(logits, similarity, boxes), pairwise_loss(changed, similarity, boxes)
    assert torch.allclose(before, after)
    inside_changed = logits.clone()
    inside_changed[:, 6, 6] += 10.0
    assert not torch.allclose(before, pairwise_loss(inside_changed, similarity, boxes))


def test_pairwise_gradients_are_finite_for_extreme_logits() -> None:
    similarity = neighbour_similarity(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    signs = torch.randint(0, 2, (3, 8, 8), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
    logits = (signs * 100.0).requires_grad_()
    loss = pairwise_loss(logits, similarity, torch.ones(3, 8, 8), color_thr=0.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and loss.max() > 10.0
    assert torch.isfinite(logits.grad).all()


# --- embedding and warm-up ----------------------------------------------------------------------------------------


def test_embedding_loss_is_one_minus_cosine() -> None:
    q = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    target = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0], [0.0, 5.0, 0.0], [10.0, 20.0, 30.0]])
    assert torch.allclose(embedding_loss(q, target), torch.tensor([0.0, 2.0, 1.0, 0.0]), atol=1e-6)


def test_warmup_is_linear_then_flat() -> None:
    assert [warmup_factor(i, 1000) for i in (0, 250, 1000, 5000)] == [0.0, 0.25, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
