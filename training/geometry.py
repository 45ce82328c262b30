"""Image geometry, defined once for every runtime: how an image of any size becomes a network input and how the
network's stride-4 masks map back onto it.

One policy, three steps (docs/architecture.md, "Image geometry"):

1. the test resize: shorter side to ``test_size``, longer side at most ``max_size`` (``resized_shape``);
2. a fixed-size graph (``InputPolicy.dynamic`` False) scales that down until it fits its ``height`` x ``width``
   (``fit_within``); a dynamic graph, PyTorch and training keep it;
3. padding bottom/right with zeros to the canvas: the fixed graph's ``height`` x ``width``, or the next multiples of
   ``SIZE_DIVISOR`` (``padded_shape``). The network pads to those multiples itself as well (``round_up`` in
   ``SOLOv2.forward``, inside exported graphs too), so any H x W is a valid input; its masks then cover the padded
   size.

Padding is part of the prediction, not a detail: GroupNorm statistics and the SOLO grids cover the whole canvas, so
an image padded to a larger canvas gets different detections. Every entry point (``freesolo predict``, evaluation,
ONNX Runtime, Triton) therefore gives each image its own canvas; batches hold images of one canvas only.

Torch-free (numpy and Pillow): the serving side imports it too. ``ImageGeometry`` records what the mapping back needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from training.data.opencv_resize import opencv_bilinear
from training.errors import UserError

SIZE_DIVISOR = 32  # the network pads every input side to a multiple of this (the coarsest FPN stride)
MASK_STRIDE = 4  # the mask features' and the graph contract's masks' stride
T = TypeVar("T")
# How a policy may resize: the pixel filter and the rounding of the resized size. The defaults are this project's;
# imported upstream weights name the ones their test pipeline used (InputConfig.resize_filter / resize_rounding):
# "antialias" (torch's antialiased bilinear), "opencv" (cv2.resize bilinear, as mmcv resizes for mmdetection and
# WXinlong/SOLO), "pil" (Pillow's bilinear, as detectron2 resizes for FreeSOLO); sizes rounded half to even (Python's
# round) or half up (int(x + 0.5), mmcv's and detectron2's).
RESIZE_FILTERS = ("antialias", "opencv", "pil")
SIZE_ROUNDINGS = ("half_even", "half_up")


@dataclass(frozen=True)
class ImageGeometry:
    """How one image became a network input: original size, and the resized size before padding."""

    original_height: int
    original_width: int
    resized_height: int
    resized_width: int


def round_size(value: float, rounding: str) -> int:
    """A resized side length, rounded as the policy says."""
    if rounding == "half_up":
        return int(value + 0.5)
    if rounding == "half_even":
        return round(value)
    raise UserError(f"unknown size rounding {rounding!r} (known: {', '.join(SIZE_ROUNDINGS)})")


def resized_shape(
    height: int, width: int, short_side: int, max_size: int, rounding: str = "half_even"
) -> tuple[int, int]:
    """Scale so the shorter side is ``short_side`` unless the longer side would exceed ``max_size``."""
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round_size(height * scale, rounding)), max(1, round_size(width * scale, rounding))


def fit_within(height: int, width: int, max_height: int, max_width: int) -> tuple[int, int]:
    """Scale a resized image down, keeping its aspect, until it fits a fixed-size graph's H x W."""
    scale = min(1.0, max_height / height, max_width / width)
    if scale == 1.0:
        return height, width
    return max(1, min(max_height, round(height * scale))), max(1, min(max_width, round(width * scale)))


def round_up(value: int, divisor: int = SIZE_DIVISOR) -> int:
    """The smallest multiple of ``divisor`` >= ``value``. Integer arithmetic only, so that it also computes a
    symbolic size while a graph is exported (the padded size of ``SOLOv2.forward``)."""
    return (value + divisor - 1) // divisor * divisor


def padded_shape(sizes: list[tuple[int, int]], divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """Smallest (H, W) that holds every size and is a multiple of ``divisor``."""
    return round_up(max(h for h, _ in sizes), divisor), round_up(max(w for _, w in sizes), divisor)


def fixed_canvas(height: int | None, width: int | None) -> tuple[int, int] | None:
    """``--height/--width`` as a fixed canvas (both or neither; positive multiples of ``SIZE_DIVISOR``)."""
    if height is None and width is None:
        return None
    if height is None or width is None:
        raise UserError("give both --height and --width, or neither")
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % SIZE_DIVISOR:
            raise UserError(f"--{name} must be a positive multiple of {SIZE_DIVISOR}, got {value}")
    return height, width


@dataclass(frozen=True)
class InputPolicy:
    """How an image becomes a network input: the test resize (``test_size``, ``max_size``), then, for a fixed-size
    graph, fitted into ``height`` x ``width`` and padded to it; for a dynamic one (and PyTorch), padded to multiples of
    ``SIZE_DIVISOR``."""

    height: int
    width: int
    dynamic: bool
    test_size: int
    max_size: int
    resize_filter: str = "antialias"
    resize_rounding: str = "half_even"

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> InputPolicy:
        """The policy an exported model records in its ``freesolo.input_size`` metadata."""
        if "freesolo.input_size" not in props:
            raise UserError("the ONNX model has no freesolo.input_size metadata (not exported by freesolo?)")
        size = json.loads(props["freesolo.input_size"])
        return cls(
            size["height"],
            size["width"],
            bool(size["dynamic"]),
            size["test_size"],
            size["max_size"],
            size.get("resize_filter", "antialias"),  # absent from the metadata of older exports
            size.get("resize_rounding", "half_even"),
        )

    def geometry(self, height: int, width: int) -> ImageGeometry:
        """An image's geometry under this policy: its original size and the size it is resized to."""
        size = resized_shape(height, width, self.test_size, self.max_size, self.resize_rounding)
        if not self.dynamic:
            size = fit_within(*size, self.height, self.width)
        return ImageGeometry(height, width, *size)

    def canvas(self, geometry: ImageGeometry) -> tuple[int, int]:
        """The padded input size of an image with this geometry."""
        if not self.dynamic:
            return self.height, self.width
        return padded_shape([(geometry.resized_height, geometry.resized_width)])


def resample_weights(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D antialiased bilinear resampling as it is stored: output ``i`` reads inputs ``first[i]`` to ``last[i] - 1``
    with ``weights[i, :last[i] - first[i]]`` (zeros past that). A triangle filter widened by the downscale factor,
    half-pixel centres, weights renormalised at the borders (what torch computes with ``antialias=True``)."""
    scale = in_size / out_size
    support = max(scale, 1.0)  # the triangle's half-width in input pixels
    centres = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((centres - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centres + support + 0.5).astype(np.int64), in_size)
    columns = first[:, None] + np.arange(int((last - first).max()))[None, :]
    inside = columns < last[:, None]
    weights = np.clip(1.0 - np.abs((columns - centres[:, None] + 0.5) / support), 0.0, None) * inside
    return first, last, weights / weights.sum(axis=1, keepdims=True)


RESIZE_BLOCK = 8  # outputs per matrix product: small blocks skip most of the zero weights, larger ones call BLAS less


def banded_blocks(out_size: int, in_size: int) -> list[tuple[slice, slice, np.ndarray]]:
    """The resampling as matrix blocks of ``RESIZE_BLOCK`` outputs, each with the input range its weights touch:
    (outputs, inputs, float32 [outputs, inputs] weights). The triangle is narrow, so a block reads a few input lines,
    never all of them."""
    first, last, weights = resample_weights(out_size, in_size)
    blocks = []
    for start in range(0, out_size, RESIZE_BLOCK):
        outputs = slice(start, min(start + RESIZE_BLOCK, out_size))
        inputs = slice(int(first[outputs].min()), int(last[outputs].max()))
        block = np.zeros((outputs.stop - start, inputs.stop - inputs.start), dtype=np.float32)
        rows, taps = np.nonzero(np.arange(weights.shape[1])[None, :] < (last - first)[outputs, None])
        block[rows, first[start + rows] + taps - inputs.start] = weights[start + rows, taps]
        blocks.append((outputs, inputs, block))
    return blocks


def resize_rgb(image: np.ndarray, size: tuple[int, int], resize_filter: str = "antialias") -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3] uint8: the one image resize of every runtime. ``antialias``: bilinear widened by
    the downscale factor in float32, rounded half to even (what torch computes with ``antialias=True``); rows first,
    block by block (``banded_blocks``): each block converts only the input rows it reads to float, so a 40-megapixel
    photograph never exists as a float copy and costs O(H x W) work, not the O(H x W x w) of one dense matrix
    product. ``opencv`` / ``pil``: the filters upstream weights were tested with."""
    if image.shape[:2] == tuple(size):
        return image
    if resize_filter == "opencv":
        return opencv_bilinear(image, *size)
    if resize_filter == "pil":
        return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size[1], size[0]), Image.BILINEAR))
    if resize_filter != "antialias":
        raise UserError(f"unknown resize filter {resize_filter!r} (known: {', '.join(RESIZE_FILTERS)})")
    height, width = image.shape[:2]
    flat = np.ascontiguousarray(image).reshape(height, width * 3)
    columns = np.empty((width, 3, size[0]), dtype=np.float32)  # the rows pass's output, ready for the columns pass
    for outputs, inputs, weights in banded_blocks(size[0], height):
        block = weights @ flat[inputs].astype(np.float32)
        columns[:, :, outputs] = block.reshape(-1, width, 3).transpose(1, 2, 0)
    columns = columns.reshape(width, 3 * size[0])
    resized = np.empty((size[1], 3 * size[0]), dtype=np.float32)
    for outputs, inputs, weights in banded_blocks(size[1], width):
        resized[outputs] = weights @ columns[inputs]
    resized = resized.reshape(size[1], 3, size[0]).transpose(2, 0, 1)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def prepare_image(image: np.ndarray, policy: InputPolicy) -> tuple[np.ndarray, ImageGeometry]:
    """[H, W, 3] uint8 RGB -> (uint8 [3, H', W'] network input on its canvas, the image's geometry)."""
    geometry = policy.geometry(*image.shape[:2])
    size = (geometry.resized_height, geometry.resized_width)
    padded = np.zeros((3, *policy.canvas(geometry)), dtype=np.uint8)
    padded[:, : size[0], : size[1]] = resize_rgb(image, size, policy.resize_filter).transpose(2, 0, 1)
    return padded, geometry


def pad_array(image: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
    """A [3, h, w] input padded bottom/right with zeros to ``canvas``."""
    if image.shape[1:] == tuple(canvas):
        return image
    padded = np.zeros((image.shape[0], *canvas), dtype=image.dtype)
    padded[:, : image.shape[1], : image.shape[2]] = image
    return padded


def same_canvas_batches(
    items: Iterable[T], canvas_of: Callable[[T], tuple[int, int]], batch_size: int
) -> Iterator[list[T]]:
    """Consecutive items in batches of at most ``batch_size`` that share one canvas, so that no image is padded
    further because of another one (its detections would change)."""
    batch: list[T] = []
    for item in items:
        if batch and (len(batch) == batch_size or canvas_of(batch[0]) != canvas_of(item)):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch
