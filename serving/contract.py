"""The Triton contract of the ``freesolo`` ensemble: tensor names, Triton dtypes and per-image shapes, and the limits
the server enforces. Client and server import these names from here, so they cannot drift apart.

Needs neither torch nor onnx (the client side of serving must not need torch).
"""

from __future__ import annotations

from typing import NamedTuple

ENSEMBLE = "freesolo"  # what clients call
PREPROCESS = "preprocess"
MODEL = "model"  # the model step, whatever its flavour (python / onnxruntime_onnx / tensorrt_plan)
POSTPROCESS = "postprocess"

INPUT = "image_bytes"  # TYPE_STRING [1] per batch item: one encoded JPEG or PNG


class TensorSpec(NamedTuple):
    """One tensor of the ensemble: name, Triton wire dtype (what tritonclient's ``InferInput`` takes; config.pbtxt
    spells it ``CONFIG_TYPES[dtype]``) and per-item dims without the batch dimension (``K`` = max_per_img)."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]


OUTPUTS = (
    TensorSpec("num_dets", "INT32", (1,)),  # detections with a non-empty mask at the original size
    TensorSpec("scores", "FP32", ("K",)),
    TensorSpec("labels", "INT32", ("K",)),  # index into the model's class names
    TensorSpec("boxes", "FP32", ("K", 4)),  # x1, y1, x2, y2 in original-image pixels: the tight box of the mask
    TensorSpec("masks_rle", "BYTES", ("K",)),  # COCO compressed RLE counts at the original size; b"" past num_dets
    TensorSpec("image_size", "INT32", (2,)),  # original height, width
)
OUTPUT_NAMES = tuple(spec.name for spec in OUTPUTS)
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32", "UINT8": "TYPE_UINT8"}

# Between the steps (inside the server only): what preprocess hands to the model and to postprocess.
GEOMETRY = "geometry"  # INT32 [4]: original height, width; resized height, width (before padding)
GEOMETRY_TAG = "geometry_tag"  # UINT8 [16]: preprocess's HMAC of the geometry, checked by postprocess (step_guard)
# and export.graph_contract.SIZES_NAME, INT32 [2]: resized height, width, to the model step of a model that takes them

# Limits on each image a request carries; larger ones get a per-request error, never a crash.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # width x height before decoding (decompression-bomb guard)
MAX_IMAGE_SIDE = 16_384
IMAGE_FORMATS = ("JPEG", "PNG")  # PIL format names accepted
# A gRPC message: the images of one request together (the client splits batches to stay under it) plus the request's
# own framing; the gate (serving.grpc_gate) refuses a larger message before tritonserver receives it.
MAX_REQUEST_IMAGE_BYTES = MAX_IMAGE_BYTES
MAX_MESSAGE_BYTES = MAX_REQUEST_IMAGE_BYTES + 1024 * 1024
