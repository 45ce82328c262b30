"""What a client sends for each image: encoded JPEG or PNG bytes, the only formats the server decodes.

Torch-free (the client side of serving must not need torch). Files in other formats PIL reads (BMP, WebP, TIFF, ...)
and numpy arrays are encoded as PNG here, so the server never sees them; bytes go as they are, and the server checks
them. Inputs over the server's byte limit fail here, before they cross the wire, and a file's size is checked
before it is read (a huge file or a device never fills the client's memory).
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.contract import IMAGE_FORMATS, MAX_IMAGE_BYTES

ImageInput = str | Path | bytes | bytearray | memoryview | np.ndarray
PNG_LEVEL = 1  # fast PNG compression: the wire is loopback or a LAN, encoding time matters more than size


class ImageInputError(ValueError):
    """An input the client cannot send (missing file, unreadable image, wrong array); names the input."""

    def __init__(self, where: str, reason: str, index: int) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason
        self.index = index


def png_bytes(image: np.ndarray) -> bytes:
    """[H, W, 3] uint8 RGB -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def array_bytes(image: np.ndarray) -> bytes:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an H x W x 3 uint8 RGB array, got {image.dtype} {list(image.shape)}")
    return png_bytes(np.ascontiguousarray(image))


def read_bounded(path: Path) -> bytes:
    """A regular file's bytes, refused from its size before it is read (and read no further than the limit)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file")
    if info.st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"{info.st_size} bytes, more than the server's limit of {MAX_IMAGE_BYTES} (send JPEG or PNG)")
    with path.open("rb") as handle:
        data = handle.read(MAX_IMAGE_BYTES + 1)  # the file may have grown since the stat
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"more than the server's limit of {MAX_IMAGE_BYTES} bytes (the file grew while read)")
    return data


def file_bytes(path: Path) -> bytes:
    """A JPEG or PNG file's own bytes; any other image PIL reads, as PNG."""
    try:
        data = read_bounded(path)
    except FileNotFoundError:
        raise ValueError("image not found") from None
    except OSError as error:
        raise ValueError(f"cannot read file ({error.strerror or error})") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
    except UnidentifiedImageError:
        raise ValueError("not an image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image ({error})") from None
    if image_format in IMAGE_FORMATS:
        return data
    # The one decoder `predict` reads files with, so a 16-bit TIFF is sent as the pixels `predict` sees. Imported
    # here: the client module itself imports nothing of `training` (tests/test_serving_client.py).
    from training.data.decode import FILE_LIMITS, ImageError, decode_rgb

    try:
        return png_bytes(decode_rgb(data, FILE_LIMITS))
    except ImageError as error:
        raise ValueError(str(error)) from None


def encode_image(image: ImageInput, index: int) -> bytes:
    """One input -> the bytes to send; ImageInputError naming input ``index`` when it cannot be sent."""
    where = f"image {index} ({image})" if isinstance(image, (str, Path)) else f"image {index}"
    try:
        if isinstance(image, (str, Path)):
            data = file_bytes(Path(image))
        elif isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        elif isinstance(image, np.ndarray):
            data = array_bytes(image)
        else:
            raise ValueError(f"expected a path, bytes or a numpy array, got {type(image).__name__}")
    except ValueError as error:
        raise ImageInputError(where, str(error), index) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageInputError(where, f"{len(data)} bytes, more than the server's limit of {MAX_IMAGE_BYTES}", index)
    return data
