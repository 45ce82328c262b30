"""int8 static quantisation of an exported graph with ONNX Runtime (QDQ format), calibrated on real images.

Only convolutions are quantised: they are nearly all of the network's compute (backbone, FPN, heads, mask branch),
and ORT's CPU provider fuses each QDQ Conv into an int8 QLinearConv (VNNI on x86). A quantised conv input may
also feed a residual Add or an FPN Resize (they read the same rounded values); everything else stays float: the
dynamic-convolution MatMul (both inputs are activations), the score and mask thresholds, and the
``freesolo::MatrixNMS`` node with its function body, which must keep matching the TensorRT plugin's float contract.
``quantize_static`` leaves model-local functions alone, so the body needs no special handling (checked below).

Weights are int8 per output channel (their ranges differ widely between channels, more so with BatchNorm folded in;
per-tensor scales measured the same mask AP on the tiny synthetic model, per-channel is the safer default), activations
uint8 (asymmetric; the U8S8 pairing is the fast one on x86), ranges by min/max over the calibration images.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from triton_plugins.matrix_nms import onnx_function

QUANTIZED_OPS = ("Conv",)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class _Images(CalibrationDataReader):
    """Feeds the calibration inputs one at a time (ORT's reader protocol: None when exhausted), each with the feeds
    the graph takes (``image_sizes`` only where it has that input)."""

    def __init__(self, inputs: list[dict[str, np.ndarray]], names: list[str]) -> None:
        self._inputs = iter(inputs)
        self._names = names

    def get_next(self) -> dict[str, np.ndarray] | None:
        feeds = next(self._inputs, None)
        return None if feeds is None else {name: feeds[name] for name in self._names}


@contextmanager
def _without_preprocess_hint() -> Iterator[None]:
    """quantize_static logs (on the root logger) a hint to run its pre-processing; the exporter has already
    optimised and shape-inferred the graph, so the hint is noise in the CLI's output."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize_int8(
    model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]], per_channel: bool = True
) -> onnx.ModelProto:
    """The QDQ int8 version of a checked contract graph; ``calibration`` holds the feeds of batches of one
    (``export.onnx_inputs.calibration_images``: uint8 [1, 3, H, W] images and int32 [1, 2] image sizes)."""
    if not calibration:
        raise ValueError("no calibration inputs")
    work = onnx.ModelProto()
    work.CopyFrom(model)  # quantize_static moves a large model's weights to external data in place
    with tempfile.TemporaryDirectory(prefix="freesolo-int8-") as folder:
        out = Path(folder) / "int8.onnx"
        with _without_preprocess_hint():
            quantize_static(
                work,
                out,
                _Images(calibration, [value.name for value in model.graph.input]),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        quantized = onnx.load(str(out))
    check_float_post_processing(model, quantized)
    props = {p.key: p.value for p in quantized.metadata_props}
    onnx.helper.set_model_props(quantized, {**props, "freesolo.precision": "int8"})
    return quantized


def check_float_post_processing(original: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    """Quantisation may only add Q/DQ pairs around convolutions: every other node, the MatrixNMS node and its
    function body must be as they were (a runtime that maps the node to its plugin relies on that)."""

    def ops(model: onnx.ModelProto) -> list[str]:
        return sorted(f"{n.domain}::{n.op_type}" for n in model.graph.node if n.op_type not in QDQ_OPS)

    if ops(original) != ops(quantized):
        raise RuntimeError("quantisation changed nodes other than adding QuantizeLinear/DequantizeLinear")
    key = (onnx_function.DOMAIN, onnx_function.NAME)
    bodies = [f.SerializeToString() for f in quantized.functions if (f.domain, f.name) == key]
    if bodies != [onnx_function.function_proto().SerializeToString()]:
        raise RuntimeError(f"quantisation changed the {key[0]}::{key[1]} function body")
    producers = {output: node for node in quantized.graph.node for output in node.output}
    nms = next(n for n in quantized.graph.node if (n.domain, n.op_type) == key)
    if any(name in producers and producers[name].op_type in QDQ_OPS for name in nms.input):
        raise RuntimeError(f"{key[0]}::{key[1]} inputs were quantised")
