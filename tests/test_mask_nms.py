"""Greedy mask NMS and Soft-NMS: hand-computed cases, and their use in place of Matrix NMS in post-processing."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import InferenceConfig
from training.models.postprocess import postprocess
from training.models.solov2 import SOLOv2Output
from training.ops import greedy_mask_nms, matrix_nms, soft_mask_nms

E = math.exp


def strips(*spans: tuple[int, int], width: int = 12) -> torch.Tensor:
    """One-row masks [N, 1, width] covering columns [start, stop)."""
    masks = torch.zeros(len(spans), 1, width)
    for index, (start, stop) in enumerate(spans):
        masks[index, 0, start:stop] = 1.0
    return masks


# A = [0, 6), B = [2, 8), C = [6, 12): IoU(A, B) = 4/8 = 0.5, IoU(B, C) = 2/10 = 0.2, IoU(A, C) = 0.
CHAIN = strips((0, 6), (2, 8), (6, 12))
CHAIN_SCORES = torch.tensor([0.9, 0.85, 0.6])
SAME = torch.zeros(3, dtype=torch.long)


def check(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=0, atol=1e-6)


def test_identical_masks() -> None:
    masks = strips((0, 5), (0, 5), (0, 5))
    scores = torch.tensor([0.9, 0.8, 0.7])
    check(greedy_mask_nms(masks, SAME, scores), [0.9, 0.0, 0.0])
    # Soft-NMS: the first pick decays both by e^-2, the second pick decays the third once more.
    check(soft_mask_nms(masks, SAME, scores), [0.9, 0.8 * E(-2), 0.7 * E(-4)])
    check(soft_mask_nms(masks, SAME, scores, kernel="linear"), [0.9, 0.0, 0.0])
    # Matrix NMS, for contrast, compensates: the third mask decays once, as if only the first mask existed.
    check(matrix_nms(masks, SAME, scores), [0.9, 0.8 * E(-2), 0.7 * E(-2)])


@pytest.mark.parametrize("nms", [greedy_mask_nms, soft_mask_nms])
def test_disjoint_masks_and_other_labels_keep_their_scores(nms) -> None:
    scores = torch.tensor([0.9, 0.5, 0.4])
    check(nms(strips((0, 4), (4, 8), (8, 12)), SAME, scores), [0.9, 0.5, 0.4])
    identical = strips((0, 5), (0, 5), (0, 5))
    check(nms(identical, torch.tensor([0, 1, 2]), scores), [0.9, 0.5, 0.4])


def test_greedy_threshold_is_strict_and_suppressed_masks_suppress_nothing() -> None:
    check(greedy_mask_nms(CHAIN, SAME, CHAIN_SCORES), [0.9, 0.85, 0.6])  # IoU(A, B) = 0.5 is not > 0.5
    check(greedy_mask_nms(CHAIN, SAME, CHAIN_SCORES, iou_threshold=0.4), [0.9, 0.0, 0.6])
    # B overlaps C by 0.2 > 0.1, but B is suppressed by A first, so C stays.
    check(greedy_mask_nms(CHAIN, SAME, CHAIN_SCORES, iou_threshold=0.1), [0.9, 0.0, 0.6])


def test_soft_nms_resorts_after_each_pick() -> None:
    """After A, B decays to 0.85 e^-0.5 = 0.516 < C = 0.6, so C is picked before B and decays B by e^(-2 * 0.04);
    a walk in input order would decay C instead."""
    check(soft_mask_nms(CHAIN, SAME, CHAIN_SCORES), [0.9, 0.85 * E(-0.5 - 0.08), 0.6])
    # linear: only IoU > 0.3 counts; A decays B by 1 - 0.5, then C (0.6 > 0.425) is picked and 0.2 does not count.
    check(soft_mask_nms(CHAIN, SAME, CHAIN_SCORES, kernel="linear", iou_threshold=0.3), [0.9, 0.425, 0.6])


@pytest.mark.parametrize("nms", [greedy_mask_nms, soft_mask_nms])
def test_empty_and_batched_inputs(nms) -> None:
    empty = nms(torch.zeros(0, 4, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert empty.shape == (0,)
    batched = nms(
        torch.stack([CHAIN, CHAIN]), torch.stack([SAME, torch.tensor([0, 1, 2])]), torch.stack([CHAIN_SCORES] * 2)
    )
    torch.testing.assert_close(batched[0], nms(CHAIN, SAME, CHAIN_SCORES))
    check(batched[1], [0.9, 0.85, 0.6])
    assert nms(torch.zeros(2, 0, 4, 4), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0)).shape == (2, 0)


def test_soft_nms_rejects_unknown_kernel() -> None:
    with pytest.raises(ValueError, match="unknown Soft-NMS kernel"):
        soft_mask_nms(CHAIN, SAME, CHAIN_SCORES, kernel="box")


def test_postprocess_with_greedy_nms_keeps_one_of_two_duplicates() -> None:
    """Two grid cells with the same kernel predict the same square; greedy NMS keeps the higher-scored one only,
    Matrix NMS keeps both (the second decayed by e^-2 to about 0.12, above update_thr)."""
    features = torch.full((1, 1, 8, 8), -0.5)
    features[..., 2:6, 2:6] = 0.5
    logits = torch.full((1, 1, 3, 3), -10.0)
    logits[0, 0, 0, 0], logits[0, 0, 2, 2] = 3.0, 2.0  # not 2x2 neighbours: both survive point NMS
    kernels = torch.full((1, 1, 3, 3), 20.0)  # every cell's mask: sigmoid(20 * feature) -> the square
    output = SOLOv2Output(cate_logits=[logits], kernels=[kernels], mask_features=features)
    config = InferenceConfig(max_per_img=4)
    greedy = postprocess(output, config, [4], nms=greedy_mask_nms)
    matrix = postprocess(output, config, [4])
    assert int(greedy.num_dets[0]) == 1
    assert int(matrix.num_dets[0]) == 2
    torch.testing.assert_close(greedy.scores[0, 0], matrix.scores[0, 0])
    torch.testing.assert_close(greedy.masks[0, 0], matrix.masks[0, 0])
