"""SOLOv2 checkpoint -> one ONNX graph of the graph contract (docs/architecture.md), Matrix NMS inside as one
``freesolo::MatrixNMS`` node with a function body of standard ops.

The graph is ``images -> SOLOv2 -> postprocess`` with the NMS swapped for the torch custom op; the dynamo exporter
turns that op into the bare node and the body is attached afterwards (``triton_plugins.matrix_nms.onnx_function``
says why). Batch is always dynamic; H and W are fixed unless ``dynamic`` is set.

Precisions: fp32; int8 (``export.quantize``: static QDQ quantisation of the convolutions, calibrated on images);
bf16 is refused, because ONNX Runtime's CPU provider has no bfloat16 compute kernels (``BF16_UNSUPPORTED``).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.graph_contract import (
    CONTRACT_VERSION,
    DEFAULT_CALIB_COUNT,
    MASKS_KEY,
    OUTPUT_NAMES,
    PADDING_KEY,
    PRECISIONS,
    Variant,
    variant,
)
from export.onnx_inputs import calibration_images
from export.quantize import quantize_int8
from training.checkpoint import model_from_checkpoint
from training.config import Config, InferenceConfig, load_preset
from training.errors import UserError
from training.fileio import atomic_write, remove_stale_temporaries
from training.geometry import SIZE_DIVISOR, InputPolicy, round_up
from training.models import SOLOv2
from training.models.postprocess import postprocess
from training.ops.matrix_nms import KERNELS
from triton_plugins.matrix_nms import onnx_function
from triton_plugins.matrix_nms.torch_op import matrix_nms_node

# Measured with onnxruntime 1.31 (get_all_opkernel_def): the CPU provider registers bfloat16 only for data movement,
# casts and LayerNorm, none for Conv, MatMul, Gemm, Add, Mul, Relu or Sigmoid (a bf16 graph fails to load), and the
# one bf16 GEMM option (mlas.enable_gemm_fastmath_arm64_bfloat16) exists only in ARM64 builds.
BF16_UNSUPPORTED = (
    "--precision bf16 is not supported: ONNX Runtime's CPU provider has no bfloat16 kernels for Conv, MatMul or "
    "elementwise ops (its only bf16 GEMM path is ARM64-only), so a bf16 graph would not run; use fp32, or int8 "
    "(--calib-images) for a faster CPU model"
)
MAX_DYNAMIC_SIDE = 4096  # upper bound of dynamic H and W (the exporter needs one)
RESIZE_POLICY = (
    "resize: shorter side to test_size, longer side at most max_size, then scaled down further if needed to fit "
    "height x width; pad bottom/right with zeros to height x width (to a multiple of size_divisor when dynamic)"
)

Log = Callable[[str], None]


def graph_variant(config: Config) -> Variant:
    """The contract variant a model's config computes (``export.graph_contract.Variant``): probability masks for
    ``resize_soft_masks``, the ``image_sizes`` input for ``pad_normalized``."""
    return Variant(
        "probability" if config.inference.resize_soft_masks else "binary",
        "normalized" if config.model.pad_normalized else "input",
    )


class DeployableSOLOv2(nn.Module):
    """uint8 images [B, 3, H, W] (and, for a ``pad_normalized`` model, int32 image_sizes [B, 2]) -> the five contract
    outputs, with Matrix NMS as the ``freesolo::matrix_nms`` op. The sizes go to the model's own forward, so the graph
    pads as PyTorch does; a ``resize_soft_masks`` model returns the probabilities its binary masks come from."""

    def __init__(self, model: SOLOv2, inference: InferenceConfig, strides: list[int]) -> None:
        super().__init__()
        self.model = model
        self.inference = inference
        self.strides = list(strides)

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        output = self.model(images, image_sizes)
        dets = postprocess(output, self.inference, self.strides, nms=matrix_nms_node)
        masks = dets.soft_masks if self.inference.resize_soft_masks else dets.masks
        return dets.num_dets, dets.scores, dets.labels, dets.boxes, masks


@dataclass(frozen=True)
class InputSize:
    """The graph's input size: fixed ``height`` x ``width``, or dynamic (then height/width are the example size)."""

    height: int
    width: int
    dynamic: bool


def default_input_size(config: Config) -> tuple[int, int]:
    """The preset's test size, padded to a multiple of the size divisor: a square image after the test resize."""
    side = round_up(config.input.test_size, max(config.input.size_divisor, SIZE_DIVISOR))
    return side, side


def choose_input_size(config: Config, height: int | None, width: int | None, dynamic: bool) -> InputSize:
    """Validate --height/--width (both or neither, multiples of 32) against the config's default."""
    if (height is None) != (width is None):
        raise UserError("give both --height and --width, or neither (default: the preset's test size)")
    if height is None or width is None:
        height, width = default_input_size(config)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % SIZE_DIVISOR:
            raise UserError(f"--{name} must be a positive multiple of {SIZE_DIVISOR}, got {value}")
        if value > MAX_DYNAMIC_SIDE:
            raise UserError(f"--{name} must be at most {MAX_DYNAMIC_SIDE}, got {value}")
    return InputSize(height, width, dynamic)


def dynamic_shapes(size: InputSize, inputs: int = 1) -> tuple[dict[int, Any], ...]:
    """Batch always dynamic; H and W too when ``size.dynamic``, any size up to ``MAX_DYNAMIC_SIDE`` (the model pads
    to multiples of ``SIZE_DIVISOR`` itself: ``training.models.solov2.pad_to_divisor``). With ``inputs`` 2, the
    image sizes [B, 2] share the images' batch."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes: dict[int, Any] = {0: batch}
    if size.dynamic:
        shapes[2] = torch.export.Dim("height", min=1, max=MAX_DYNAMIC_SIDE)
        shapes[3] = torch.export.Dim("width", min=1, max=MAX_DYNAMIC_SIDE)
    return (shapes, {0: batch})[:inputs]


def model_metadata(config: Config, metadata: dict[str, Any], size: InputSize, checkpoint: Path | str) -> dict[str, str]:
    """The metadata_props of the graph contract (keys in ``export.graph_contract.METADATA_KEYS``) of the fp32 graph;
    ``checkpoint`` is the checkpoint file, or a description of where the weights came from."""
    inference = config.inference
    category_ids = metadata.get("category_ids") or list(range(1, config.model.num_classes + 1))
    class_names = metadata.get("class_names") or [str(c) for c in category_ids]
    input_size = {
        **asdict(size),
        "size_divisor": SIZE_DIVISOR,
        "test_size": config.input.test_size,
        "max_size": config.input.max_size,
        "resize_filter": config.input.resize_filter,
        "resize_rounding": config.input.resize_rounding,
        "resize": RESIZE_POLICY,
    }
    thresholds = {
        key: getattr(inference, key)
        for key in ("score_thr", "mask_thr", "update_thr", "nms_pre", "nms_kernel", "nms_sigma")
    }
    return {
        "freesolo.contract": CONTRACT_VERSION,
        "freesolo.preset": config.preset,
        "freesolo.input_size": json.dumps(input_size),
        "freesolo.inference": json.dumps(thresholds),
        "freesolo.max_per_img": str(inference.max_per_img),
        "freesolo.class_names": json.dumps(list(class_names)),
        "freesolo.category_ids": json.dumps([int(c) for c in category_ids]),
        "freesolo.run_id": str(metadata.get("run_id", "")),
        "freesolo.checkpoint": checkpoint.name if isinstance(checkpoint, Path) else checkpoint,
        "freesolo.precision": "fp32",  # export.quantize rewrites it
        MASKS_KEY: graph_variant(config).masks,
        PADDING_KEY: graph_variant(config).padding,
    }


def trace_to_onnx(
    module: DeployableSOLOv2, size: InputSize, simplify: bool, inputs: tuple[str, ...]
) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) with the MatrixNMS translation; the exporter's optimizer is the simplification.
    ``inputs``: the variant's input names (the images, and the image sizes of a ``pad_normalized`` model)."""
    example = torch.zeros(2, 3, size.height, size.width, dtype=torch.uint8)  # batch 2: 0/1 would be specialised
    sizes = torch.tensor([[size.height, size.width]] * 2, dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about its own internals; errors still raise
        program = torch.onnx.export(
            module,
            (example, sizes)[: len(inputs)],
            dynamo=True,
            opset_version=onnx_function.OPSET,
            input_names=list(inputs),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=dynamic_shapes(size, len(inputs)),
            custom_translation_table={torch.ops.freesolo.matrix_nms.default: onnx_function.translate},
            optimize=simplify,
            verbose=False,
        )
    return program.model_proto


def name_dynamic_dims(model: onnx.ModelProto) -> None:
    """Readable symbolic dims on the inputs and outputs: batch, height, width (the exporter writes s0, 32*s1...)."""
    images = model.graph.input[0].type.tensor_type.shape.dim
    names = {images[0].dim_param: "batch"}
    if images[2].dim_param:
        names[images[2].dim_param] = "height"
        names[images[3].dim_param] = "width"
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def check_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Full checker, shape inference, and the invariants the runtimes rely on: one MatrixNMS node with its body, the
    inputs and the masks dtype its metadata declares."""
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    nodes = [n for n in model.graph.node if (n.domain, n.op_type) == (onnx_function.DOMAIN, onnx_function.NAME)]
    if len(nodes) != 1:
        raise RuntimeError(f"expected one {onnx_function.DOMAIN}::{onnx_function.NAME} node, found {len(nodes)}")
    if [o.name for o in model.graph.output] != list(OUTPUT_NAMES):
        raise RuntimeError(f"outputs are {[o.name for o in model.graph.output]}, expected {list(OUTPUT_NAMES)}")
    declared = variant({p.key: p.value for p in model.metadata_props})
    if [i.name for i in model.graph.input] != list(declared.inputs):
        raise RuntimeError(f"inputs are {[i.name for i in model.graph.input]}, expected {list(declared.inputs)}")
    masks = model.graph.output[OUTPUT_NAMES.index("masks")].type.tensor_type.elem_type
    if onnx.helper.tensor_dtype_to_np_dtype(masks) != np.dtype(declared.mask_dtype):
        raise RuntimeError(f"masks are {onnx.helper.tensor_dtype_to_np_dtype(masks)}, expected {declared.mask_dtype}")
    return model


def build_onnx(
    model: SOLOv2,
    config: Config,
    metadata: dict[str, Any],
    size: InputSize,
    checkpoint: Path | str,
    simplify: bool = True,
) -> onnx.ModelProto:
    """The checked ONNX model of a SOLOv2 model (in memory)."""
    if config.inference.nms_kernel not in KERNELS:
        raise UserError(f"unknown Matrix NMS kernel '{config.inference.nms_kernel}' in the config (use {KERNELS})")
    module = DeployableSOLOv2(model.eval(), config.inference, config.model.strides).eval()
    proto = onnx_function.attach_function(trace_to_onnx(module, size, simplify, graph_variant(config).inputs))
    name_dynamic_dims(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**props, **model_metadata(config, metadata, size, checkpoint)})
    proto.doc_string = (
        "FreeSOLO SOLOv2 with Matrix NMS inside (freesolo::MatrixNMS); graph contract in docs/architecture.md"
    )
    return check_graph(proto)


def preset_model(name: str) -> tuple[SOLOv2, Config, dict[str, Any]]:
    """A preset's model with random weights (seeded, so exports repeat), for speed: it does not depend on the
    weights."""
    config = load_preset(name)  # an unknown name is a UserError listing the presets
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SOLOv2(config.model)
    return model.eval(), config, {}


def export_onnx(
    checkpoint: Path | None,
    out: Path,
    height: int | None = None,
    width: int | None = None,
    dynamic: bool = False,
    precision: str = "fp32",
    simplify: bool = True,
    log: Log = print,
    preset: str | None = None,
    calib_images: Path | None = None,
    calib_count: int = DEFAULT_CALIB_COUNT,
) -> onnx.ModelProto:
    """``freesolo export onnx``: a checkpoint (or a ``preset`` with random weights) -> checked ONNX file, written
    atomically; int8 is calibrated on ``calib_count`` images of ``calib_images``. Returns the model."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}' (use one of {', '.join(PRECISIONS)})")
    if precision == "bf16":
        raise UserError(BF16_UNSUPPORTED)
    if (checkpoint is None) == (preset is None):
        raise UserError("give exactly one of --checkpoint CKPT and --preset NAME")
    if precision == "int8" and calib_images is None:
        raise UserError("--precision int8 needs --calib-images DIR: a folder of typical input images to calibrate on")
    if precision != "int8" and calib_images is not None:
        raise UserError(f"--calib-images is for --precision int8 only (got --precision {precision})")
    if calib_count < 1:
        raise UserError(f"--calib-count must be at least 1, got {calib_count}")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        model, config, metadata = model_from_checkpoint(checkpoint)
        source: Path | str = checkpoint
    else:
        model, config, metadata = preset_model(str(preset))
        source = f"(random weights of preset {preset})"
    size = choose_input_size(config, height, width, dynamic)
    calibration: list[np.ndarray] = []
    if precision == "int8":
        sizes = config.input
        policy = InputPolicy(
            size.height,
            size.width,
            dynamic,
            sizes.test_size,
            sizes.max_size,
            sizes.resize_filter,
            sizes.resize_rounding,
        )
        try:
            calibration = calibration_images(Path(str(calib_images)), calib_count, policy)
        except UserError as error:
            raise UserError(f"--calib-images: {error}") from None
    shape = "dynamic H x W" if dynamic else f"{size.height} x {size.width}"
    k = config.inference.max_per_img
    log(f"exporting {source} (preset {config.preset}, {shape}, dynamic batch, {precision}, K={k})")
    start = time.perf_counter()
    proto = build_onnx(model, config, metadata, size, source, simplify)
    log(f"traced, checked{' and simplified' if simplify else ''} in {time.perf_counter() - start:.1f} s")
    if precision == "int8":
        start = time.perf_counter()
        proto = check_graph(quantize_int8(proto, calibration))
        seconds = time.perf_counter() - start
        log(f"quantised to int8 (QDQ, convolutions only), calibrated on {len(calibration)} images, in {seconds:.1f} s")
    remove_stale_temporaries(Path(out))  # what an export of the same file killed mid-write left behind
    atomic_write(Path(out), lambda tmp: onnx.save_model(proto, str(tmp)))
    size_mb = Path(out).stat().st_size / 1e6
    log(f"wrote {out} ({size_mb:.1f} MB, {len(proto.graph.node)} nodes, one freesolo::MatrixNMS)")
    return proto
