"""The graph contract (docs/architecture.md) as data: input and output names, dtypes and shapes, and the metadata keys.

One contract for ONNX, TensorRT and Triton, so serving and its client import it from here. It needs neither torch nor
onnx (the client side of serving must not need torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from training.errors import UserError

INPUT_NAME = "images"
INPUT_DTYPE = "uint8"  # [B, 3, H, W] RGB, normalised inside; a fixed-size graph takes its H x W only, a dynamic one
# any H x W, padded bottom/right with zeros inside the graph to Hp x Wp, the next multiples of
# training.geometry.SIZE_DIVISOR (what every entry point here pads to before calling anyway).
SIZES_NAME = "image_sizes"
SIZES_DTYPE = "int32"  # [B, 2]: each image's height, width inside its canvas (its resized size, before padding);
# only a graph whose freesolo.padding is "normalized" takes it (an imported upstream model: ModelConfig.pad_normalized)


class OutputSpec(NamedTuple):
    """One output: its name, numpy dtype name and symbolic shape (B batch, K max_per_img, Hp/Wp the padded input
    size: H and W rounded up to multiples of SIZE_DIVISOR, so masks are [B, K, ceil(H/32)*8, ceil(W/32)*8])."""

    name: str
    dtype: str
    shape: tuple[str, ...]


OUTPUTS = (
    OutputSpec("num_dets", "int32", ("B",)),
    OutputSpec("scores", "float32", ("B", "K")),
    OutputSpec("labels", "int32", ("B", "K")),
    OutputSpec("boxes", "float32", ("B", "K", "4")),  # x1, y1, x2, y2 in input pixels
    # stride 4, over the padded input: binary uint8, or float32 probabilities (freesolo.masks, MASK_DTYPES)
    OutputSpec("masks", "uint8", ("B", "K", "Hp/4", "Wp/4")),
)
OUTPUT_NAMES = tuple(spec.name for spec in OUTPUTS)

# How a model computes two things upstream computes differently, each a metadata key with a closed set of values (the
# first is the default: older exports lack the key). Metadata is untrusted input: every reader goes through
# ``variant``, which refuses any other value.
MASKS_KEY = "freesolo.masks"
# what the masks output carries -> its dtype: "binary" masks (thresholded at mask_thr at stride 4), or the
# "probability" each binary mask was thresholded from, for a model that resizes probabilities to the image and
# thresholds there (InferenceConfig.resize_soft_masks; training.results.masks_to_original takes either)
MASK_DTYPES = {"binary": "uint8", "probability": "float32"}
PADDING_KEY = "freesolo.padding"
# where the canvas padding is zero -> the graph's inputs: in the uint8 "input" (black pixels, normalised with the
# image), or after normalisation ("normalized": the mean colour, as mmdetection and detectron2 pad), for which the
# graph needs each image's size (ModelConfig.pad_normalized; SOLOv2.forward(images, sizes))
PADDING_INPUTS = {"input": (INPUT_NAME,), "normalized": (INPUT_NAME, SIZES_NAME)}

# metadata_props keys every exported model carries (values are strings; lists and mappings are json).
METADATA_KEYS = (
    "freesolo.contract",  # version of this contract
    "freesolo.preset",
    # json: {"height", "width", "dynamic", "size_divisor", "test_size", "max_size", "resize_filter",
    # "resize_rounding", "resize"}
    "freesolo.input_size",
    "freesolo.inference",  # json: score_thr, mask_thr, update_thr, nms_pre, nms_kernel, nms_sigma
    "freesolo.max_per_img",  # K
    "freesolo.class_names",  # json list, index = label
    "freesolo.category_ids",  # json list, index = label
    "freesolo.run_id",
    "freesolo.checkpoint",  # file name of the checkpoint the graph came from ("(random weights ...)" for --preset)
    "freesolo.precision",  # fp32 or int8
    MASKS_KEY,  # a key of MASK_DTYPES
    PADDING_KEY,  # a key of PADDING_INPUTS
)
CONTRACT_VERSION = "1"
PRECISIONS = ("fp32", "bf16", "int8")  # --precision of `freesolo export onnx`
DEFAULT_CALIB_COUNT = 32  # int8 calibration images


class Variant(NamedTuple):
    """What a model's metadata says about its masks output and its inputs (``MASKS_KEY``, ``PADDING_KEY``)."""

    masks: str = "binary"
    padding: str = "input"

    @property
    def mask_dtype(self) -> str:
        """The numpy dtype name of the ``masks`` output."""
        return MASK_DTYPES[self.masks]

    @property
    def inputs(self) -> tuple[str, ...]:
        """The graph's input names, in order."""
        return PADDING_INPUTS[self.padding]


DEFAULT_VARIANT = Variant()  # a model without the two keys (exported before them): binary masks, no image sizes


def metadata_choice(props: Mapping[str, str], key: str, choices: Mapping[str, object], where: str) -> str:
    """Metadata ``key`` if it names one of ``choices`` (the first when absent), else one UserError line."""
    value = props.get(key, next(iter(choices)))
    if value not in choices:
        known = ", ".join(choices)
        raise UserError(f"{where}: metadata {key} is {value[:80]!r}, not one of {known}; refusing this model")
    return value


def variant(props: Mapping[str, str], where: str = "the model") -> Variant:
    """The checked ``Variant`` of a model's metadata_props; ``where`` names the model in the error."""
    return Variant(
        metadata_choice(props, MASKS_KEY, MASK_DTYPES, where),
        metadata_choice(props, PADDING_KEY, PADDING_INPUTS, where),
    )
