"""The graph contract (docs/architecture.md) as data: input and output names, dtypes and shapes, and the metadata keys.

One contract for ONNX, TensorRT and Triton, so serving and its client import it from here. It needs neither torch nor
onnx (the client side of serving must not need torch).
"""

from __future__ import annotations

from typing import NamedTuple

INPUT_NAME = "images"
INPUT_DTYPE = "uint8"  # [B, 3, H, W] RGB, normalised inside; a fixed-size graph takes its H x W only, a dynamic one
# any H x W, padded bottom/right with zeros inside the graph to Hp x Wp, the next multiples of
# training.geometry.SIZE_DIVISOR (what every entry point here pads to before calling anyway).


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
    OutputSpec("masks", "uint8", ("B", "K", "Hp/4", "Wp/4")),  # binary, stride 4, over the padded input
)
OUTPUT_NAMES = tuple(spec.name for spec in OUTPUTS)

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
)
CONTRACT_VERSION = "1"
PRECISIONS = ("fp32", "bf16", "int8")  # --precision of `freesolo export onnx`
DEFAULT_CALIB_COUNT = 32  # int8 calibration images
