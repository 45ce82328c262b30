"""Reading images with errors that name the file, and finding images in a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.decode import FILE_LIMITS, ImageError, decode_rgb
from training.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # the formats of FILE_LIMITS


def read_rgb(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB by the one decoder (``training.data.decode``, the server's too) under ``FILE_LIMITS``; a
    missing, oversized or unreadable file raises UserError naming it."""
    try:
        size = path.stat().st_size
        if size > FILE_LIMITS.max_bytes:  # before reading it into memory
            raise ImageError(f"{size} bytes, more than the limit of {FILE_LIMITS.max_bytes}")
        return decode_rgb(path.read_bytes(), FILE_LIMITS)
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"not an image file (a folder): {path}") from None
    except OSError as error:
        raise UserError(f"cannot read image {path}: {error.strerror or error}") from None
    except ImageError as error:
        raise UserError(f"cannot read image {path}: {error}") from None


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; an empty or missing folder raises UserError."""
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no images in {folder} (looked for {' '.join(IMAGE_SUFFIXES)})")
    return files


def expand_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their images; a missing path is an error naming it."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += list_images(path)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"image not found: {path}")
    return files
