"""Contract outputs -> COCO results: the composed resize matrices equal torch's bilinear resizes, masks land at
the original size, and the json round-trips through pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from training.results import ImageGeometry, bilinear_matrix, image_results, masks_to_original


@pytest.mark.parametrize(("out_size", "in_size"), [(64, 16), (37, 16), (16, 64), (100, 33), (16, 16)])
def test_bilinear_matrix_equals_torch_interpolate(out_size: int, in_size: int) -> None:
    signal = torch.rand(1, 1, 1, in_size, dtype=torch.float64)
    expected = F.interpolate(signal, size=(1, out_size), mode="bilinear", align_corners=False)[0, 0, 0]
    np.testing.assert_allclose(
        bilinear_matrix(out_size, in_size) @ signal[0, 0, 0].numpy(), expected.numpy(), atol=1e-12
    )


def test_masks_to_original_equals_the_reference_two_step_resize() -> None:
    """Upsample x4 to the padded input, crop the image, resize to the original size, threshold
    (docs/algorithms.md, "SOLOv2 inference")."""
    rng = np.random.default_rng(0)
    masks = (rng.random((3, 8, 10)) > 0.5).astype(np.uint8)
    geometry = ImageGeometry(original_height=45, original_width=61, resized_height=29, resized_width=38)
    up = F.interpolate(torch.from_numpy(masks)[None].double(), scale_factor=4, mode="bilinear", align_corners=False)
    cropped = up[..., :29, :38]
    reference = F.interpolate(cropped, size=(45, 61), mode="bilinear", align_corners=False)[0] >= 0.5
    assert np.array_equal(masks_to_original(masks, geometry), reference.numpy())


def test_image_results_are_coco_results_at_original_size() -> None:
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 2:6, 2:6] = 1  # pixels 8..23 of a 32x32 input
    geometry = ImageGeometry(original_height=64, original_width=64, resized_height=32, resized_width=32)
    results = image_results(
        1, np.array([0.75, 0.0]), np.array([2, 0]), masks, geometry, image_id=7, category_ids=[10, 20, 30]
    )
    assert len(results) == 1
    result = results[0]
    assert result["image_id"] == 7 and result["category_id"] == 30 and result["score"] == 0.75
    decoded = mask_utils.decode(result["segmentation"])
    assert decoded.shape == (64, 64)
    assert decoded[20:44, 20:44].all() and decoded.sum() == pytest.approx(32 * 32, rel=0.1)
    assert result["bbox"] == [float(v) for v in mask_utils.toBbox(result["segmentation"])]
    assert isinstance(result["segmentation"]["counts"], str)


def test_no_detections_give_no_results() -> None:
    geometry = ImageGeometry(32, 32, 32, 32)
    assert image_results(0, np.zeros(3), np.zeros(3), np.zeros((3, 8, 8), np.uint8), geometry, 1, [1]) == []
