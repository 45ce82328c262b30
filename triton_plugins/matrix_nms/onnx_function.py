"""The ONNX side of Matrix NMS: one ``freesolo::MatrixNMS`` node (version 1) whose meaning is a model-local function
of standard ONNX ops, so ONNX Runtime (or any runtime) runs it as is, while TensorRT can map the node to its plugin.

Contract (fixed; the TensorRT plugin is written against it):

| | name | type | shape |
|---|---|---|---|
| input | masks | float32 | [B, N, H, W], binary, sorted by score descending |
| input | labels | int32 | [B, N] |
| input | scores | float32 | [B, N], sorted descending |
| input | areas | float32 | [B, N] |
| output | decayed_scores | float32 | [B, N] |
| attribute | kernel | string | "gaussian" or "linear" |
| attribute | sigma | float | default ``DEFAULT_SIGMA`` (2.0) |

How it gets into a model: the exporter turns ``torch.ops.freesolo.matrix_nms`` into a bare node (``translate``), and
``attach_function`` adds the body afterwards. Adding the body during export would not survive it: the exporter's
opset conversion and optimizer inline every model-local function.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnx.defs import OpSchema
from onnxscript import FLOAT, INT32
from onnxscript import opset20 as op

from training.ops.matrix_nms import DEFAULT_KERNEL, DEFAULT_SIGMA, EPS, KERNELS
from triton_plugins.matrix_nms import INPUT_NAMES, OUTPUT_NAMES
from triton_plugins.matrix_nms import ONNX_DOMAIN as DOMAIN
from triton_plugins.matrix_nms import ONNX_OP_TYPE as NAME
from triton_plugins.matrix_nms import ONNX_OPSET_VERSION as VERSION

# The body compares the kernel attribute as a string tensor (Equal on strings needs opset >= 19), and the model
# must import the same ai.onnx version as its functions: the exporter targets this opset too.
OPSET = 20

freesolo_opset = onnxscript.values.Opset(DOMAIN, VERSION)


# onnxscript reads the default from the source, so it is a literal here: DEFAULT_SIGMA (the test of the function
# schema asserts they agree).
@onnxscript.script(freesolo_opset, default_opset=op)
def MatrixNMS(masks: FLOAT, labels: INT32, scores: FLOAT, areas: FLOAT, kernel: str, sigma: float = 2.0) -> FLOAT:
    """Decayed scores [B, N]; the same algebra as ``training.ops.matrix_nms`` (its docstring says why)."""
    eps = op.Constant(value_float=EPS)
    zero = op.Constant(value_float=0.0)
    one = op.Constant(value_float=1.0)
    # [B, N, H*W] from explicit dims: a -1 cannot be inferred when N = 0 (nothing survived the score threshold)
    pixels = op.ReduceProd(op.Shape(masks, start=2), keepdims=1)
    flat = op.Reshape(masks, op.Concat(op.Shape(masks, start=0, end=2), pixels, axis=0))
    intersection = op.MatMul(flat, op.Transpose(flat, perm=[0, 2, 1]))  # [B, N, N]
    union = op.Unsqueeze(areas, [-1]) + op.Unsqueeze(areas, [-2]) - intersection
    iou = op.Where(union > zero, intersection / op.Max(union, eps), zero)
    same_label = op.Equal(op.Unsqueeze(labels, [-1]), op.Unsqueeze(labels, [-2]))
    # decay_iou[i, j]: overlap of mask j with the higher-scored mask i (i < j: strict upper triangle), same label.
    decay_iou = op.Trilu(op.Where(same_label, iou, zero), op.Constant(value_int=1), upper=1)
    # compensation[i]: the largest overlap of mask i with any higher-scored mask (max over rows), as a column.
    compensation = op.Unsqueeze(op.ReduceMax(decay_iou, [-2], keepdims=0), [-1])
    sigma_value = op.Constant(value_float=sigma)
    gaussian = op.Exp(op.Neg(sigma_value) * (decay_iou * decay_iou - compensation * compensation))
    linear = (one - decay_iou) / op.Max(one - compensation, eps)
    is_gaussian = op.Equal(op.Constant(value_string=kernel), op.Constant(value_string="gaussian"))
    ratio = op.Where(is_gaussian, gaussian, linear)
    decayed_scores = scores * op.ReduceMin(ratio, [-2], keepdims=0)
    return decayed_scores


def _schema() -> OpSchema:
    """The node's signature, so the exporter can emit the node without knowing its body."""
    param = OpSchema.FormalParameter
    return OpSchema(
        NAME,
        DOMAIN,
        VERSION,
        inputs=[
            param("masks", "tensor(float)"),
            param("labels", "tensor(int32)"),
            param("scores", "tensor(float)"),
            param("areas", "tensor(float)"),
        ],
        outputs=[param("decayed_scores", "tensor(float)")],
        attributes=[
            OpSchema.Attribute("kernel", OpSchema.AttrType.STRING, "gaussian or linear", required=True),
            OpSchema.Attribute("sigma", onnx.helper.make_attribute("sigma", DEFAULT_SIGMA), "gaussian strength"),
        ],
    )


_node = onnxscript.values.Op(freesolo_opset, NAME, _schema())


def translate(masks: FLOAT, labels: INT32, scores: FLOAT, areas: FLOAT, kernel: str, sigma: float) -> FLOAT:
    """Translation of ``torch.ops.freesolo.matrix_nms`` for ``torch.onnx.export(custom_translation_table=...)``.
    The exporter reads the node's signature from these annotations: onnxscript tensor types (they name an ONNX
    dtype), so that it matches the node's inputs instead of warning that it could not infer a signature."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown Matrix NMS kernel '{kernel}' (use one of {KERNELS})")
    return _node(masks, labels, scores, areas, kernel=kernel, sigma=sigma)


def function_proto() -> onnx.FunctionProto:
    """The body of ``freesolo::MatrixNMS`` as a model-local function."""
    return MatrixNMS.to_function_proto()


def attach_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give ``model`` the MatrixNMS body (once) and the ``freesolo`` opset import; returns the same model."""
    ai_onnx = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if ai_onnx != OPSET:
        raise ValueError(f"MatrixNMS's body is written for opset {OPSET}, the model imports opset {ai_onnx}")
    if not any(f.domain == DOMAIN and f.name == NAME for f in model.functions):
        model.functions.append(function_proto())
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))
    return model


def standalone_model(
    num_masks: int | None = None, kernel: str = DEFAULT_KERNEL, sigma: float = DEFAULT_SIGMA
) -> onnx.ModelProto:
    """A model of one MatrixNMS node (dynamic B, N, H, W unless ``num_masks`` fixes N): tests and benchmarks run the
    function alone with it."""
    n = num_masks if num_masks is not None else "N"
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(NAME, list(INPUT_NAMES), list(OUTPUT_NAMES), domain=DOMAIN, kernel=kernel, sigma=sigma)],
        "matrix_nms",
        [
            tensor("masks", onnx.TensorProto.FLOAT, ["B", n, "H", "W"]),
            tensor("labels", onnx.TensorProto.INT32, ["B", n]),
            tensor("scores", onnx.TensorProto.FLOAT, ["B", n]),
            tensor("areas", onnx.TensorProto.FLOAT, ["B", n]),
        ],
        [tensor(OUTPUT_NAMES[0], onnx.TensorProto.FLOAT, ["B", n])],
    )
    opsets = [onnx.helper.make_opsetid("", OPSET), onnx.helper.make_opsetid(DOMAIN, VERSION)]
    # ir_version 10: onnx 1.23 would write 14, which onnxruntime 1.31 rejects.
    model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10, functions=[function_proto()])
    return model
