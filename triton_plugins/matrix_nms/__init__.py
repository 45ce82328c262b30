"""The MatrixNMS plugin: one node contract, three implementations of the same math.

- ``kernel.py``: OpenAI Triton kernels (``matrix_nms_triton``), for torch on the GPU and CPU tests in interpret mode.
- ``cuda/``: the CUDA kernels of the TensorRT plugin, with a host build of the same thread code for tests.
- ``plugin/``: the TensorRT IPluginV3 ``MatrixNMS`` and its CMake build (``libfreesolo_matrix_nms_plugin.so``).
- ``onnx_function.py`` / ``torch_op.py``: the ``freesolo::MatrixNMS`` ONNX node with its function body, and the torch
  operator the exporter turns into that node.

The reference they all equal is ``training.ops.matrix_nms`` (called with ``mask_area=areas``). The contract:
inputs ``masks`` float32 [B, N, H, W], ``labels`` int32 [B, N], ``scores`` float32 [B, N], ``areas`` float32 [B, N];
output ``decayed_scores`` float32 [B, N]; attributes ``kernel`` ("gaussian" | "linear") and ``sigma`` (float,
default ``DEFAULT_SIGMA`` = 2.0, the reference's).

``matrix_nms_triton`` is imported lazily so that reading the contract constants does not import triton.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.ops.matrix_nms import DEFAULT_KERNEL, DEFAULT_SIGMA

if TYPE_CHECKING:
    from .kernel import matrix_nms_triton

ONNX_DOMAIN = "freesolo"
ONNX_OP_TYPE = "MatrixNMS"
ONNX_OPSET_VERSION = 1
PLUGIN_NAME = "MatrixNMS"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
INPUT_NAMES = ("masks", "labels", "scores", "areas")
OUTPUT_NAMES = ("decayed_scores",)
LIBRARY_NAME = "libfreesolo_matrix_nms_plugin.so"
SOURCE_DIR = Path(__file__).resolve().parent  # holds cuda/ and plugin/ (build with plugin/CMakeLists.txt)

__all__ = [
    "DEFAULT_KERNEL",
    "DEFAULT_SIGMA",
    "INPUT_NAMES",
    "LIBRARY_NAME",
    "ONNX_DOMAIN",
    "ONNX_OPSET_VERSION",
    "ONNX_OP_TYPE",
    "OUTPUT_NAMES",
    "PLUGIN_NAME",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "SOURCE_DIR",
    "matrix_nms_triton",
]


def __getattr__(name: str) -> Any:
    """Imports the Triton kernel on first use: triton must see TRITON_INTERPRET before it defines kernels."""
    if name == "matrix_nms_triton":
        from .kernel import matrix_nms_triton

        return matrix_nms_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
