"""Encoded image bytes -> the fixed-size uint8 input of the served model, without torch (the preprocess step).

Decoding is guarded: the format and the pixel count are checked from the header before any pixel is decoded
(decompression bombs), and corrupt, empty or truncated data raise ``ImageError`` with a message a client can act on.
The resize is the project's test policy (shorter side to ``test_size``, longer at most ``max_size``, then fitted
into the model's H x W, padded bottom/right), with the filter ``training.data.transforms.resize_image`` uses for
the model (``InputConfig.resize_filter``, carried in the ONNX metadata): the antialiased bilinear one (torch's
``antialias=True``) or, for imported upstream weights, OpenCV's; so served inputs match PyTorch's.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from export.graph_contract import fit_within
from serving.contract import IMAGE_FORMATS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from training.data.resize_modes import resize_upstream, round_size

# PIL's own bomb guard (an error above twice the limit, in Image.open) stops the largest headers even earlier.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageError(ValueError):
    """Bytes that are not an acceptable image; the message says why."""


@dataclass(frozen=True)
class InputPolicy:
    """The served model's input: fixed ``height`` x ``width`` and the test resize that fills it."""

    height: int
    width: int
    test_size: int
    max_size: int
    resize_filter: str = "antialias"  # InputConfig.resize_filter / resize_rounding (training.data.resize_modes)
    resize_rounding: str = "half_even"


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


def resized_shape(
    height: int, width: int, short_side: int, max_size: int, rounding: str = "half_even"
) -> tuple[int, int]:
    """Shorter side to ``short_side`` unless the longer would exceed ``max_size`` (training's test resize)."""
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round_size(height * scale, rounding)), max(1, round_size(width * scale, rounding))


def resample_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] weights of 1-D antialiased bilinear resampling: a triangle filter widened by the downscale factor,
    half-pixel centres, weights renormalised at the borders (what torch computes with ``antialias=True``)."""
    scale = in_size / out_size
    support = max(scale, 1.0)  # the triangle's half-width in input pixels
    centres = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((centres - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centres + support + 0.5).astype(np.int64), in_size)
    columns = np.arange(in_size)
    inside = (columns[None, :] >= first[:, None]) & (columns[None, :] < last[:, None])
    weights = np.clip(1.0 - np.abs((columns[None, :] - centres[:, None] + 0.5) / support), 0.0, None) * inside
    return weights / weights.sum(axis=1, keepdims=True)


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3] uint8, antialiased bilinear in float32, rounded half to even (as torch).

    One channel at a time, width first, so a large photograph never exists as a full float copy."""
    if image.shape[:2] == tuple(size):
        return image
    rows = resample_matrix(size[0], image.shape[0]).astype(np.float32)
    cols_t = resample_matrix(size[1], image.shape[1]).astype(np.float32).T
    out = np.empty((*size, 3), dtype=np.uint8)
    for channel in range(3):
        plane = rows @ (image[:, :, channel].astype(np.float32) @ cols_t)
        out[:, :, channel] = np.clip(np.rint(plane), 0, 255)
    return out


def prepare_image(image: np.ndarray, policy: InputPolicy) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] uint8 RGB -> (uint8 [3, height, width] model input, int32 geometry [H, W, resized h, resized w])."""
    height, width = image.shape[:2]
    shape = resized_shape(height, width, policy.test_size, policy.max_size, policy.resize_rounding)
    size = fit_within(*shape, policy.height, policy.width)
    padded = np.zeros((3, policy.height, policy.width), dtype=np.uint8)
    if policy.resize_filter != "antialias" and image.shape[:2] != tuple(size):
        resized = resize_upstream(image, size, policy.resize_filter)
    else:
        resized = resize_rgb(image, size)
    padded[:, : size[0], : size[1]] = resized.transpose(2, 0, 1)
    return padded, np.array([height, width, *size], dtype=np.int32)
