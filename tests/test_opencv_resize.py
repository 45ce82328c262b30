"""The resize imported upstream models are tested with: the OpenCV-compatible filter must equal
``cv2.resize(INTER_LINEAR)`` bit for bit (OpenCV comes with the dev extra, through mmengine), down and up, at odd
sizes, and half-up size rounding must give mmcv's sizes."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from training.data.opencv_resize import opencv_bilinear
from training.data.transforms import resize_image
from training.geometry import ImageGeometry, InputPolicy, prepare_image, resized_shape

cv2 = pytest.importorskip("cv2")


def test_equals_opencv_on_photographs_and_random_sizes() -> None:
    rng = np.random.default_rng(0)
    cases = [(skimage.data.chelsea(), 100, 150), (skimage.data.rocket(), 333, 500), (skimage.data.coffee(), 801, 1201)]
    for _ in range(60):
        height, width, out_height, out_width = (int(v) for v in rng.integers(1, 200, 4))
        cases.append((rng.integers(0, 256, (height, width, 3), dtype=np.uint8), out_height, out_width))
    for image, height, width in cases:
        expected = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(opencv_bilinear(image, height, width), expected), (image.shape, height, width)


def test_resize_image_uses_the_configured_filter() -> None:
    image = skimage.data.astronaut()
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    opencv = resize_image(tensor, (101, 101), "opencv").permute(1, 2, 0).numpy()
    antialiased = resize_image(tensor, (101, 101)).permute(1, 2, 0).numpy()
    assert np.array_equal(opencv, cv2.resize(image, (101, 101), interpolation=cv2.INTER_LINEAR))
    assert not np.array_equal(opencv, antialiased)


def test_served_preprocessing_resizes_with_the_models_filter() -> None:
    """The Triton preprocess step (numpy only) resizes an imported model's inputs as `freesolo predict` does."""
    image = skimage.data.chelsea()  # 300 x 451 -> 100 x 150, padded into 128 x 160
    padded, geometry = prepare_image(image, InputPolicy(128, 160, False, 100, 160, "opencv", "half_up"))
    assert geometry == ImageGeometry(300, 451, 100, 150)
    assert np.array_equal(padded[:, :100, :150].transpose(1, 2, 0), cv2.resize(image, (150, 100)))
    expected = resize_image(torch.from_numpy(image).permute(2, 0, 1).contiguous(), (100, 150), "opencv")
    assert np.array_equal(padded[:, :100, :150], expected.numpy()) and not padded[:, 100:].any()


def test_half_up_sizes_equal_mmcvs_rescale() -> None:
    """mmdetection's keep-ratio Resize sizes (mmcv.rescale_size: int(x + 0.5)), ties included (200 x 301 at 100:
    150.5 -> 151, where round-half-even gives 150)."""
    mmcv = pytest.importorskip("mmcv")
    rng = np.random.default_rng(3)
    shapes = [(200, 301), (1600, 2401), *(tuple(int(v) for v in rng.integers(20, 3000, 2)) for _ in range(300))]
    for height, width in shapes:
        for short_side, max_size in ((100, 160), (448, 768), (800, 1333)):
            new_width, new_height = mmcv.rescale_size((width, height), (max_size, short_side))
            assert resized_shape(height, width, short_side, max_size, "half_up") == (new_height, new_width)
    assert resized_shape(200, 301, 100, 160) == (100, 150)  # this project's own rounding stays as it was
