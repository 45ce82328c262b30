"""SOLOv2 post-processing on crafted head outputs whose correct detections are known by construction."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import InferenceConfig
from training.models.postprocess import boxes_from_masks, point_nms, postprocess
from training.models.solov2 import SOLOv2Output

STRIDES = [8, 8, 16, 32, 32]
GRIDS = [4, 4, 2, 2, 1]
FEATURE = 16  # mask features 16x16 = a 64x64 input
LOGIT = 8.0  # mask-feature magnitude: sigmoid(8) = 0.99966 inside a region


def logit(p: float) -> float:
    return math.log(p / (1 - p))


REGIONS = {  # stride-4 cell boxes (top, left, bottom, right), exclusive ends
    "A": (2, 2, 8, 8),  # 36 cells
    "B": (9, 8, 15, 14),  # 36 cells
    "C": (10, 0, 15, 5),  # 25 cells, disjoint from A and B
    "tiny": (0, 14, 1, 16),  # 2 cells: not more than the level stride (8) -> dropped
}


def crafted_output(cells: list[tuple[int, int, int, str, float]], batch: int = 1) -> SOLOv2Output:
    """cells: (level, row, col, region, score) for class 0 unless region is "B" (class 1); one feature channel
    per region, and each listed cell's kernel selects its region's channel."""
    channels = list(REGIONS)
    features = torch.full((batch, len(channels), FEATURE, FEATURE), -LOGIT)
    for index, name in enumerate(channels):
        top, left, bottom, right = REGIONS[name]
        features[:, index, top:bottom, left:right] = LOGIT
    cate = [torch.full((batch, 2, g, g), -10.0) for g in GRIDS]
    kernels = [torch.zeros(batch, len(channels), g, g) for g in GRIDS]
    for level, row, col, region, score in cells:
        label = 1 if region == "B" else 0
        cate[level][:, label, row, col] = logit(score)
        kernels[level][:, channels.index(region), row, col] = 1.0
    return SOLOv2Output(cate, kernels, features)


def run(output: SOLOv2Output, **overrides) -> dict:
    config = InferenceConfig(**{"max_per_img": 10, **overrides})
    return {k: v for k, v in postprocess(output, config, STRIDES)._asdict().items()}


def maskness() -> float:
    return torch.sigmoid(torch.tensor(LOGIT)).item()


def region_mask(name: str) -> torch.Tensor:
    mask = torch.zeros(FEATURE, FEATURE, dtype=torch.uint8)
    top, left, bottom, right = REGIONS[name]
    mask[top:bottom, left:right] = 1
    return mask


def test_two_objects_are_found_with_labels_scores_masks_boxes() -> None:
    dets = run(crafted_output([(0, 0, 0, "A", 0.9), (1, 2, 2, "B", 0.8)]))
    assert dets["num_dets"].tolist() == [2]
    assert dets["labels"][0, :2].tolist() == [0, 1]
    assert dets["scores"][0, :2].tolist() == pytest.approx([0.9 * maskness(), 0.8 * maskness()], abs=1e-5)
    assert torch.equal(dets["masks"][0, 0], region_mask("A"))
    assert torch.equal(dets["masks"][0, 1], region_mask("B"))
    assert dets["boxes"][0, 0].tolist() == [8.0, 8.0, 32.0, 32.0]  # columns/rows 2..7 at stride 4
    assert dets["boxes"][0, 1].tolist() == [32.0, 36.0, 56.0, 60.0]


def test_outputs_follow_the_graph_contract() -> None:
    dets = run(crafted_output([(0, 0, 0, "A", 0.9)], batch=3))
    assert dets["num_dets"].dtype == torch.int32 and dets["num_dets"].shape == (3,)
    assert dets["scores"].dtype == torch.float32 and dets["scores"].shape == (3, 10)
    assert dets["labels"].dtype == torch.int32 and dets["labels"].shape == (3, 10)
    assert dets["boxes"].shape == (3, 10, 4)
    assert dets["masks"].dtype == torch.uint8 and dets["masks"].shape == (3, 10, FEATURE, FEATURE)
    # zero padding past num_dets
    assert not dets["scores"][:, 1:].any() and not dets["masks"][:, 1:].any() and not dets["boxes"][:, 1:].any()


def test_duplicate_is_decayed_by_matrix_nms() -> None:
    dets = run(crafted_output([(0, 0, 0, "A", 0.9), (0, 3, 3, "A", 0.7)]))
    assert dets["num_dets"].tolist() == [2]
    assert dets["scores"][0, 1].item() == pytest.approx(0.7 * maskness() * math.exp(-2.0), abs=1e-5)


def test_duplicate_below_update_threshold_is_removed() -> None:
    dets = run(crafted_output([(0, 0, 0, "A", 0.9), (0, 3, 3, "A", 0.3)]))  # 0.3 * e^-2 = 0.04 < 0.05
    assert dets["num_dets"].tolist() == [1]


def test_point_nms_suppresses_a_weaker_neighbour() -> None:
    scores = torch.tensor([[[0.9, 0.85], [0.1, 0.1]]])
    assert point_nms(scores).flatten().tolist() == pytest.approx([0.9, 0.0, 0.0, 0.0])
    # C at (0, 1) sits right of the stronger A at (0, 0) in the same class map: dropped before its mask exists.
    assert run(crafted_output([(0, 0, 0, "A", 0.9), (0, 0, 1, "C", 0.85)]))["num_dets"].tolist() == [1]
    # The same cell two columns away is its own local maximum.
    assert run(crafted_output([(0, 0, 0, "A", 0.9), (0, 0, 2, "C", 0.85)]))["num_dets"].tolist() == [2]


def test_score_threshold_and_small_masks_are_dropped() -> None:
    dets = run(crafted_output([(0, 0, 0, "A", 0.09), (0, 2, 2, "tiny", 0.9)]))
    assert dets["num_dets"].tolist() == [0]
    assert not dets["masks"].any()


def test_no_objects_gives_zero_detections() -> None:
    dets = run(crafted_output([], batch=2))
    assert dets["num_dets"].tolist() == [0, 0]
    assert not dets["scores"].any()


def test_batch_equals_single_images() -> None:
    first = crafted_output([(0, 0, 0, "A", 0.9), (1, 2, 2, "B", 0.8)])
    second = crafted_output([(2, 1, 1, "B", 0.6)])
    both = SOLOv2Output(
        [torch.cat(p) for p in zip(first.cate_logits, second.cate_logits, strict=True)],
        [torch.cat(p) for p in zip(first.kernels, second.kernels, strict=True)],
        torch.cat([first.mask_features, second.mask_features]),
    )
    batched = run(both)
    for index, single in enumerate((run(first), run(second))):
        for key, value in single.items():
            assert torch.equal(batched[key][index], value[0]), key


def test_max_per_img_keeps_the_best() -> None:
    dets = run(crafted_output([(0, 0, 0, "A", 0.9), (1, 2, 2, "B", 0.8)]), max_per_img=1)
    assert dets["num_dets"].tolist() == [1] and dets["labels"].tolist() == [[0]]


def test_boxes_from_masks_of_empty_masks_are_zero() -> None:
    masks = torch.zeros(2, 8, 8)
    masks[1, 3, 5] = 1
    assert boxes_from_masks(masks).tolist() == [[0, 0, 0, 0], [20, 12, 24, 16]]


def test_cells_name_the_grid_cell_of_each_detection() -> None:
    # A at level 0 (4x4) cell (0, 0) -> 0; B at level 1 (4x4) cell (2, 2) -> 16 + 2 * 4 + 2 = 26.
    dets = run(crafted_output([(0, 0, 0, "A", 0.9), (1, 2, 2, "B", 0.8)]))
    assert dets["cells"][0, :2].tolist() == [0, 26]
