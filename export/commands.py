"""The export package's subcommands: ``freesolo export onnx`` (``export trt`` and others join the same group)."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.cli_args import Subcommands

ONNX_DESCRIPTION = """\
Export a SOLOv2 checkpoint as one ONNX graph of the graph contract (docs/architecture.md):
  input   images    uint8 [B, 3, H, W] RGB (normalisation and padding to multiples of 32 are inside)
  outputs num_dets  int32 [B]; scores float32 [B, K]; labels int32 [B, K];
          boxes float32 [B, K, 4] (x1, y1, x2, y2); masks uint8 [B, K, Hp/4, Wp/4]   (K = max_per_img;
          Hp, Wp: H and W rounded up to multiples of 32)
Matrix NMS is one freesolo::MatrixNMS node whose body of standard ops is in the file, so ONNX Runtime runs the
model without any custom-op library. Batch is always dynamic; H and W are fixed (--height/--width, default the
preset's test size) unless --dynamic. Thresholds, K, class names and the input-size policy are in the metadata.
--precision int8 quantises the convolutions (static QDQ, calibrated on --calib-images); post-processing and Matrix
NMS stay float. bf16 is refused: ONNX Runtime's CPU provider has no bf16 compute kernels. --preset NAME exports
random weights of a preset instead of a checkpoint (for speed tests)."""


def register(commands: Subcommands) -> None:
    """Add ``export`` and its formats to the ``freesolo`` parser."""
    export = commands.add_parser(
        "export", help="deployable graphs: ONNX with Matrix NMS inside", description="Export a trained model."
    )
    formats = export.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    _register_onnx(formats)
    _register_trt(formats)
    _register_parity(commands)


def _register_onnx(formats: Subcommands) -> None:
    from export.graph_contract import DEFAULT_CALIB_COUNT, PRECISIONS

    onnx = formats.add_parser(
        "onnx",
        help="one ONNX graph: images in, fixed-K detections out, Matrix NMS inside",
        description=ONNX_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    weights = onnx.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", type=Path, metavar="CKPT", help="a SOLOv2 checkpoint (model.pt)")
    weights.add_argument("--preset", metavar="NAME", help="random weights of a preset (tiny, r50, r101), for speed")
    onnx.add_argument("--out", type=Path, required=True, metavar="model.onnx", help="output file")
    onnx.add_argument("--dynamic", action="store_true", help="dynamic H and W (any size) as well as batch")
    onnx.add_argument("--height", type=int, metavar="H", help="input height, a multiple of 32 (default: preset)")
    onnx.add_argument("--width", type=int, metavar="W", help="input width, a multiple of 32 (default: preset)")
    onnx.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="fp32 (default); int8: static QDQ; bf16: refused"
    )
    onnx.add_argument("--calib-images", type=Path, metavar="DIR", help="int8: folder of images to calibrate on")
    onnx.add_argument(
        "--calib-count", type=int, default=DEFAULT_CALIB_COUNT, metavar="N", help="int8: images used (default 32)"
    )
    onnx.add_argument(
        "--no-simplify", action="store_true", help="skip the graph optimizer (constant folding, dead code removal)"
    )
    onnx.set_defaults(handler=run_export_onnx)


def run_export_onnx(args: argparse.Namespace) -> int:
    from export.onnx_export import export_onnx

    export_onnx(
        args.checkpoint,
        args.out,
        height=args.height,
        width=args.width,
        dynamic=args.dynamic,
        precision=args.precision,
        simplify=not args.no_simplify,
        preset=args.preset,
        calib_images=args.calib_images,
        calib_count=args.calib_count,
    )
    return 0


TRT_DESCRIPTION = """\
Build a TensorRT engine (a serialized plan) from an exported ONNX model. GPU hosts with TensorRT only.
Load the MatrixNMS plugin with --plugin-lib (build it with CMake: triton_plugins/matrix_nms/README.md) to run
Matrix NMS as the fused kernel; without it TensorRT runs the node's ONNX function body (same numbers).
One optimisation profile for 'images': batch from --min/--opt/--max-batch (default 1/1/8); H x W from the model
when it is fixed-size, else from --min/--opt/--max-size (default 32x32, the preset's test size, its max size)."""


def _size(text: str) -> tuple[int, int]:
    """argparse type for HxW options: a bad value is a usage error (exit 2) naming the option."""
    from export.tensorrt_build import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _register_trt(formats: Subcommands) -> None:
    trt = formats.add_parser(
        "trt",
        help="TensorRT engine from the ONNX model (GPU hosts with TensorRT)",
        description=TRT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    trt.add_argument("--onnx", type=Path, required=True, metavar="model.onnx", help="from `freesolo export onnx`")
    trt.add_argument("--out", type=Path, required=True, metavar="model.plan", help="output engine file")
    trt.add_argument("--fp16", action="store_true", help="allow FP16 kernels (the MatrixNMS plugin stays fp32)")
    trt.add_argument("--plugin-lib", type=Path, metavar="PATH", help="libfreesolo_matrix_nms_plugin.so")
    for bound in ("min", "opt", "max"):
        trt.add_argument(f"--{bound}-batch", type=int, metavar="N", help=f"{bound} batch of the profile")
    for bound in ("min", "opt", "max"):
        trt.add_argument(f"--{bound}-size", type=_size, metavar="HxW", help=f"{bound} H x W (dynamic models)")
    trt.add_argument("--workspace-gb", type=float, metavar="GB", help="workspace limit (default: TensorRT's)")
    trt.set_defaults(handler=run_export_trt)


def run_export_trt(args: argparse.Namespace) -> int:
    from export.tensorrt_build import build_engine

    build_engine(
        args.onnx,
        args.out,
        fp16=args.fp16,
        plugin_lib=args.plugin_lib,
        batch=(args.min_batch, args.opt_batch, args.max_batch),
        sizes=(args.min_size, args.opt_size, args.max_size),
        workspace_gb=args.workspace_gb,
    )
    return 0


PARITY_DESCRIPTION = """\
Compare an exported model with its checkpoint on your images: PyTorch vs ONNX Runtime (and vs a TensorRT engine
with --trt). Images are resized and padded by the model's input-size policy, as serving does. Compared per image:
raw head tensors before any threshold (category logits, kernels, mask features; ONNX Runtime only) and the final
detections as sets (count, matched-mask IoU, scores, boxes). Exit code 0 when all pass, 1 when any fails."""


def _register_parity(commands: Subcommands) -> None:
    parity = commands.add_parser(
        "parity",
        help="PyTorch vs ONNX Runtime (vs TensorRT) on images: raw heads and detections",
        description=PARITY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parity.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files or folders of images")
    parity.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT", help="the checkpoint exported")
    parity.add_argument("--onnx", type=Path, required=True, metavar="model.onnx", help="the exported model")
    parity.add_argument("--trt", type=Path, metavar="model.plan", help="also compare this TensorRT engine (GPU)")
    parity.add_argument("--plugin-lib", type=Path, metavar="PATH", help="MatrixNMS plugin library for --trt")
    parity.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per run (default 1)")
    parity.add_argument("--atol", type=float, default=1e-3, help="heads: absolute tolerance (default 1e-3)")
    parity.add_argument("--rtol", type=float, default=1e-3, help="heads: relative tolerance (default 1e-3)")
    parity.add_argument("--score-tol", type=float, default=1e-3, help="detections: score difference (default 1e-3)")
    parity.add_argument("--min-iou", type=float, default=0.98, help="detections: matched mask IoU (default 0.98)")
    parity.add_argument(
        "--count-tol", type=int, default=1, help="detections: num_dets difference and unmatched per side (default 1)"
    )
    parity.set_defaults(handler=run_parity_command)


def run_parity_command(args: argparse.Namespace) -> int:
    from export.parity_cli import exit_code, parity_rows, tolerance_from_args

    rows = parity_rows(
        args.checkpoint,
        args.onnx,
        args.images,
        trt_plan=args.trt,
        plugin_lib=args.plugin_lib,
        batch_size=args.batch_size,
        tolerance=tolerance_from_args(args),
    )
    return exit_code(rows)
