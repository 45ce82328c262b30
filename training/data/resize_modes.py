"""How an input policy may resize (numpy and Pillow only, so serving's preprocessing uses the same code): the pixel
filter and the rounding of the resized size. The defaults are this project's; imported upstream weights name the
ones their test pipeline used (``InputConfig.resize_filter`` / ``resize_rounding``):

- filters: ``antialias`` (torch's antialiased bilinear), ``opencv`` (``cv2.resize`` bilinear, as mmcv resizes for
  mmdetection and WXinlong/SOLO), ``pil`` (Pillow's bilinear, as detectron2 resizes uint8 images for FreeSOLO);
- rounding: ``half_even`` (Python's ``round``) or ``half_up`` (``int(x + 0.5)``, mmcv's and detectron2's).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.data.opencv_resize import opencv_bilinear

RESIZE_FILTERS = ("antialias", "opencv", "pil")
SIZE_ROUNDINGS = ("half_even", "half_up")


def round_size(value: float, rounding: str) -> int:
    """A resized side length, rounded as the policy says."""
    if rounding == "half_up":
        return int(value + 0.5)
    if rounding == "half_even":
        return round(value)
    raise ValueError(f"unknown size rounding {rounding!r} (known: {', '.join(SIZE_ROUNDINGS)})")


def resize_upstream(image: np.ndarray, size: tuple[int, int], resize_filter: str) -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3] uint8 with an upstream pipeline's filter (``opencv`` or ``pil``)."""
    if resize_filter == "opencv":
        return opencv_bilinear(image, *size)
    if resize_filter == "pil":
        return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size[1], size[0]), Image.BILINEAR))
    raise ValueError(f"not an upstream resize filter: {resize_filter!r} (known: {', '.join(RESIZE_FILTERS)})")
