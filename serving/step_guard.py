"""Keeps the internal steps to what the ensemble sends them.

Triton lets any client call ``preprocess``, ``model`` and ``postprocess`` directly. ``model`` takes a fixed-size
tensor (or, served dynamic, one bounded by ``max_side``) and ``preprocess`` the ensemble's own input, so calling
them costs no more than calling the ensemble. But
``postprocess`` upsamples every mask to the image size that ``geometry`` states: a client sending it K full masks
and a made-up size could make it allocate and encode gigabytes. So postprocess accepts only a geometry that
preprocess produced: preprocess tags each geometry with an HMAC under a key that ``serve prepare`` writes beside
the model folders (``KEY_FILE``, readable by the server's user only, never in a config a client can read), and
postprocess checks the bounds and the tag before it allocates anything.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import numpy as np

from serving.contract import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from training.fileio import atomic_write_text
from training.geometry import InputPolicy

KEY_FILE = "step_key"  # in the model repository, beside the model folders (Triton loads only the folders)
TAG_BYTES = 16  # the geometry tag's length: uint8 [TAG_BYTES] per image


class GeometryError(ValueError):
    """A geometry that preprocess could not have produced; the message says why."""


def write_key(repo: Path) -> None:
    """A fresh random key for the repository's steps (a new one each ``serve prepare``)."""
    atomic_write_text(repo / KEY_FILE, secrets.token_hex(32))  # a temporary file's mode: owner only


def read_key(model_folder: Path) -> bytes:
    """The key of the repository holding ``model_folder`` (what a python model gets as ``model_repository``)."""
    path = Path(model_folder).parent / KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as error:
        raise RuntimeError(f"{path}: no step key ({error}); run `freesolo serve prepare` again") from None


def geometry_tag(key: bytes, geometry: np.ndarray) -> np.ndarray:
    """uint8 [TAG_BYTES]: the HMAC of an int32 [4] geometry."""
    digest = hmac.new(key, np.asarray(geometry, dtype="<i4").tobytes(), hashlib.sha256).digest()
    return np.frombuffer(digest[:TAG_BYTES], dtype=np.uint8).copy()


def check_geometry(geometry: np.ndarray, tag: np.ndarray, policy: InputPolicy, key: bytes) -> None:
    """GeometryError unless ``geometry`` [H, W, resized h, resized w] is one preprocess produced: sizes within the
    image limits, the resize the input policy gives for H x W, and a valid tag. Only integer arithmetic: nothing is
    allocated before the geometry passed."""
    height, width, resized_h, resized_w = (int(v) for v in geometry)
    if not (0 < height <= MAX_IMAGE_SIDE and 0 < width <= MAX_IMAGE_SIDE and height * width <= MAX_IMAGE_PIXELS):
        raise GeometryError(
            f"geometry {[height, width]}: each side must be 1 to {MAX_IMAGE_SIDE} and at most {MAX_IMAGE_PIXELS} "
            "pixels in all"
        )
    resized = policy.geometry(height, width)
    expected = (resized.resized_height, resized.resized_width)
    if (resized_h, resized_w) != expected:
        raise GeometryError(f"geometry {list(map(int, geometry))}: a {height}x{width} image is resized to {expected}")
    if not hmac.compare_digest(bytes(tag), bytes(geometry_tag(key, geometry))):
        raise GeometryError("geometry_tag does not match: only the ensemble's preprocess step feeds postprocess")
