"""Encoded image bytes -> RGB pixels, without torch (the first half of the preprocess step; the second,
``training.geometry.prepare_image``, is the one every runtime uses).

Decoding is guarded: the format and the pixel count are checked from the header before any pixel is decoded
(decompression bombs), and corrupt, empty or truncated data raise ``ImageError`` with a message a client can act on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.contract import IMAGE_FORMATS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE

# PIL's own bomb guard (an error above twice the limit, in Image.open) stops the largest headers even earlier.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageError(ValueError):
    """Bytes that are not an acceptable image; the message says why."""


def decode_image(data: bytes) -> np.ndarray:
    """JPEG or PNG bytes -> [H, W, 3] uint8 RGB (as ``training.data.images.read_rgb``, no EXIF rotation)."""
    if not data:
        raise ImageError("empty image (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image is {len(data)} bytes, more than the limit of {MAX_IMAGE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_header says it better
            with Image.open(io.BytesIO(data)) as image:
                check_header(image.format, *image.size)
                image.load()  # raises on truncated or corrupt data
                return np.asarray(image.convert("RGB"))
    except ImageError:
        raise
    except Image.DecompressionBombError:  # PIL's own guard: more than twice MAX_IMAGE_PIXELS
        raise ImageError(f"image has more than {MAX_IMAGE_PIXELS} pixels (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError(f"not a {' or '.join(IMAGE_FORMATS)} image (unrecognised data)") from None
    except Exception as error:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        raise ImageError(f"cannot decode image ({type(error).__name__}: {error})") from None


def check_header(image_format: str | None, width: int, height: int) -> None:
    """Refuse unsupported formats and oversized images before decoding any pixel."""
    if image_format not in IMAGE_FORMATS:
        raise ImageError(f"unsupported image format {image_format}; send {' or '.join(IMAGE_FORMATS)}")
    if width < 1 or height < 1 or max(width, height) > MAX_IMAGE_SIDE:
        raise ImageError(f"image is {width}x{height}; each side must be 1 to {MAX_IMAGE_SIDE} pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"image is {width}x{height}: more than {MAX_IMAGE_PIXELS} pixels (decompression-bomb guard)")
