"""``freesolo export-backbone``: the learned ResNet as a pretrained backbone for other people's models
(the backbone is a product of this project: docs/architecture.md), in torchvision or detectron2 format."""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from training.cli_args import Subcommands
from training.fileio import atomic_write

FORMATS = ("torchvision", "detectron2")
DESCRIPTION = """\
Write the ResNet backbone of a checkpoint as pretrained weights for other code.

CKPT is a SOLOv2 checkpoint (freesolo train: the backbone.body.* weights), a DenseCL checkpoint (freesolo pretrain:
the query encoder; the momentum encoder is not exported) or a torchvision ResNet state dict. ResNet-18/34/50/101;
the depth comes from the checkpoint.

formats:
  torchvision  torch.save of a state dict with torchvision's ResNet names (conv1, bn1, layerN.i.*; no fc):
                 model = torchvision.models.resnet50()
                 model.load_state_dict(torch.load(FILE, weights_only=True), strict=False)  # misses only fc.*
               or initialise a SOLOv2 from it: freesolo train --init FILE ...
  detectron2   a pickle {"model": {name: float32 numpy array}, "__author__", "matching_heuristics": True} with
               detectron2's ResNet names (stem.conv1, res2..res5, convK.norm, shortcut). Name it *.pkl (detectron2
               reads pickles only from .pkl files) and train with
                 MODEL.WEIGHTS FILE MODEL.RESNETS.DEPTH 50 MODEL.RESNETS.STRIDE_IN_1X1 False INPUT.FORMAT RGB
                 MODEL.PIXEL_MEAN "[123.675, 116.28, 103.53]" MODEL.PIXEL_STD "[58.395, 57.12, 57.375]"
               (the weights expect RGB 0-255 input normalised like torchvision's, and torchvision's stride in the
               3x3 conv); ResNet-18/34 also need MODEL.RESNETS.RES2_OUT_CHANNELS 64.
"""


def register(commands: Subcommands) -> None:
    """Add ``export-backbone`` to the ``freesolo`` parser."""
    parser = commands.add_parser(
        "export-backbone",
        help="write a checkpoint's ResNet backbone in torchvision or detectron2 format",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        metavar="CKPT",
        help="a SOLOv2 or DenseCL checkpoint, or a torchvision ResNet state dict",
    )
    parser.add_argument("--format", choices=FORMATS, required=True, help="output format (see above)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="output file (.pth / .pkl)")
    parser.set_defaults(handler=run_export_backbone)


def run_export_backbone(args: argparse.Namespace) -> int:
    from training.backbone_io import backbone_state_dict, to_detectron2

    state, depth = backbone_state_dict(args.checkpoint)
    if args.format == "torchvision":
        write_torchvision(args.out, state)
        count = len(state)
    else:
        weights = to_detectron2(state, depth)
        write_detectron2(args.out, weights)
        count = len(weights)
        if args.out.suffix != ".pkl":
            print(f"note: detectron2 reads pickles only from files ending in .pkl; rename {args.out}", file=sys.stderr)
    print(f"exported {args.format} ResNet-{depth} backbone ({count} tensors) from {args.checkpoint} -> {args.out}")
    return 0


def write_torchvision(path: Path, state: dict[str, Tensor]) -> None:
    """Plain tensors only, so ``torch.load(weights_only=True)`` reads the file."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def write_detectron2(path: Path, weights: dict[str, np.ndarray]) -> None:
    """detectron2's pickle: ``matching_heuristics`` lets it match our names under its ``backbone.bottom_up.``."""
    payload = {"model": weights, "__author__": "FreeSOLO-Deploy", "matching_heuristics": True}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            PortablePickler(file).dump(payload)

    atomic_write(path, write)


class PortablePickler(pickle.Pickler):
    """Pickles arrays as ``numpy.ndarray(shape, dtype, buffer)``: numpy 2 would name ``numpy._core``, which
    numpy before 1.26 (common in detectron2 installs) cannot import."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            array = np.ascontiguousarray(obj)
            return np.ndarray, (array.shape, array.dtype.str, bytearray(array.tobytes()))
        return NotImplemented
