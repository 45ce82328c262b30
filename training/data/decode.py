"""The one image decoder: encoded bytes -> [H, W, 3] uint8 RGB, for every entry point (serving's preprocess,
``freesolo predict``, evaluation, training). One decoder means one answer: a served image and the same file given
to ``predict`` become the same pixels, so they get the same detections.

Decoding is guarded by ``DecodeLimits``: the byte count, the format and the pixel count are checked from the header
before any pixel is decoded (decompression bombs), and empty, corrupt or truncated data raise ``ImageError`` with a
message a user can act on. Served bytes get the server's limits (``serving.imaging``), files get ``FILE_LIMITS``.

What the pixels become:

- greyscale, palette, RGBA, LA and CMYK images are converted to RGB by PIL (alpha is dropped, not composited);
- 16-bit images keep their high byte (``value >> 8``). PIL reads 16-bit RGB and RGBA PNGs exactly that way (it keeps
  the high byte of each sample), so a 16-bit greyscale image becomes what the same picture saved as 16-bit RGB does;
  ``round(value * 255 / 65535)`` would differ from it by one level in places. PIL's own ``convert("RGB")`` of a
  16-bit greyscale image clips instead (every value above 255 becomes white). PIL's 32-bit integer mode ``I`` (which
  some readers use for 16-bit data) is read as 16-bit values, clipped to 0..65535;
- an MPO (what many cameras write: a JPEG followed by more JPEG frames, e.g. a stereo pair or a preview) is a JPEG:
  its first frame is read;
- no EXIF rotation: pixels are taken as stored, by every entry point alike.

Torch-free (numpy and PIL only): the serving side imports it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# PIL format names that are another format's container: an MPO is read as the JPEG of its first frame.
SAME_FORMAT = {"MPO": "JPEG"}
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL modes of 16-bit (and 32-bit integer) greyscale


class ImageError(ValueError):
    """Bytes that are not an acceptable image; the message says why."""


@dataclass(frozen=True)
class DecodeLimits:
    """What a decoder accepts: PIL format names (an ``SAME_FORMAT`` alias counts as its format) and sizes, all
    checked before decoding."""

    formats: tuple[str, ...]
    max_bytes: int
    max_side: int
    max_pixels: int


# Files read by predict, evaluation and training: every format of ``training.data.images.IMAGE_SUFFIXES``, and a
# 100-megapixel ceiling far above any photograph this project sees (a 100-megapixel BMP is 300 MB).
FILE_LIMITS = DecodeLimits(("JPEG", "PNG", "BMP", "WEBP", "TIFF"), 512 * 1024 * 1024, 65_535, 100_000_000)

# PIL's own bomb guard (an error above twice this, in Image.open) stops the largest headers even earlier; the limits
# above are checked explicitly, so it is set once, to the largest of them.
Image.MAX_IMAGE_PIXELS = FILE_LIMITS.max_pixels


def decode_rgb(data: bytes, limits: DecodeLimits) -> np.ndarray:
    """Encoded image bytes -> [H, W, 3] uint8 RGB; ``ImageError`` for anything ``limits`` refuse or PIL cannot
    decode."""
    if not data:
        raise ImageError("empty image (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, more than the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_header says it better
            with Image.open(io.BytesIO(data)) as image:
                check_header(image.format, *image.size, limits)
                image.load()  # raises on truncated or corrupt data; an MPO loads its first frame
                return rgb_pixels(image)
    except ImageError:
        raise
    except Image.DecompressionBombError:  # PIL's own guard: more than twice Image.MAX_IMAGE_PIXELS
        raise ImageError(f"image has more than {limits.max_pixels} pixels (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError(f"not a {' or '.join(limits.formats)} image (unrecognised data)") from None
    except Exception as error:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        raise ImageError(f"cannot decode image ({type(error).__name__}: {error})") from None


def check_header(image_format: str | None, width: int, height: int, limits: DecodeLimits) -> None:
    """Refuse unsupported formats and oversized images before decoding any pixel."""
    if SAME_FORMAT.get(image_format or "", image_format) not in limits.formats:
        raise ImageError(f"unsupported image format {image_format}; send {' or '.join(limits.formats)}")
    if width < 1 or height < 1 or max(width, height) > limits.max_side:
        raise ImageError(f"image is {width}x{height}; each side must be 1 to {limits.max_side} pixels")
    if width * height > limits.max_pixels:
        raise ImageError(f"image is {width}x{height}: more than {limits.max_pixels} pixels (decompression-bomb guard)")


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """A loaded PIL image -> [H, W, 3] uint8 RGB; 16-bit greyscale keeps its high byte (see the module's docstring)."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = (np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # convert would copy an RGB image
