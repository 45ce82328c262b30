"""Served image bytes -> RGB pixels, without torch (the first half of the preprocess step; the second,
``training.geometry.prepare_image``, is the one every runtime uses).

The decoder is ``training.data.decode``'s, the one ``freesolo predict`` reads files with, under the server's limits
(``serving.contract``): the byte count, the format and the pixel count are checked before any pixel is decoded, and
corrupt, empty or truncated data raise ``ImageError`` with a message a client can act on.
"""

from __future__ import annotations

import numpy as np

from serving.contract import IMAGE_FORMATS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from training.data.decode import DecodeLimits, ImageError, decode_rgb

SERVED_LIMITS = DecodeLimits(IMAGE_FORMATS, MAX_IMAGE_BYTES, MAX_IMAGE_SIDE, MAX_IMAGE_PIXELS)

__all__ = ["SERVED_LIMITS", "ImageError", "decode_image"]


def decode_image(data: bytes) -> np.ndarray:
    """JPEG (MPO: its first frame) or PNG bytes -> [H, W, 3] uint8 RGB, as ``training.data.images.read_rgb`` reads
    the same file."""
    return decode_rgb(data, SERVED_LIMITS)
