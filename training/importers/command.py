"""``freesolo import-weights``: a published checkpoint in, an ordinary FreeSOLO checkpoint (or, for backbone-only
inputs, a torchvision ResNet state dict) out. Nothing is downloaded: the user brings the file."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.checkpoint import save_checkpoint
from training.cli_args import Subcommands
from training.engine.trainer import new_metadata
from training.errors import UserError
from training.export_backbone import write_torchvision
from training.importers.coco_classes import COCO_CATEGORIES
from training.importers.core import ImportedModel
from training.importers.sources import FORMATS, MODEL_FORMATS, detect_format, import_backbone, import_model, read_source

MAX_CLASS_FILE_BYTES = 1 << 20

DESCRIPTION = """\
Convert published weights into this project's formats (the user downloads them; nothing is fetched here).

full models -> a FreeSOLO checkpoint (config, weights, class names, source) for eval, predict, export, parity,
serve and train --init:
  mmdet       mmdetection 3.x SOLOv2 / SOLOv2-light ({"meta", "state_dict"}, mask_head.*)
  solo        WXinlong/SOLO SOLOv2 (mmdetection 1.x: bbox_head.*, mask_feat_head.*)
  freesolo    NVlabs/FreeSOLO (detectron2 {"model"}: backbone.bottom_up.*, ins_head.*, mask_head.*)
backbones -> a torchvision ResNet state dict for train --init and freemask --backbone:
  densecl     torchvision-keyed ResNet (.pth, plain or under "state_dict")
  detectron2  detectron2-keyed ResNet (.pkl, read with an unpickler that only builds containers and arrays)

The architecture comes from the tensors; grids, scale ranges and the test resize from the upstream family the head
widths identify (SOLOv2: shorter side 800, longer at most 1333; SOLOv2-light: 448 and 768). Every tensor must map:
missing, unexpected or mis-shaped tensors and unsupported layers (deformable convolutions) are errors.
"""


def register(commands: Subcommands) -> None:
    parser = commands.add_parser(
        "import-weights",
        help="convert mmdetection / SOLO / FreeSOLO / DenseCL / detectron2 weights",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, metavar="SRC", help="the downloaded weights file")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT.pt", help="output file")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="source layout (default: from its keys)")
    parser.add_argument(
        "--classes",
        metavar="coco|FILE",
        help="class names: 'coco' (the 80 COCO categories with their COCO ids) or a text file with one name per "
        "line (default: the names the checkpoint records, else the class indices)",
    )
    parser.add_argument("--test-size", type=_positive, metavar="S", help="test-time shorter side (upstream's)")
    parser.add_argument("--max-size", type=_positive, metavar="M", help="test-time longer-side cap (upstream's)")
    parser.set_defaults(handler=run_import_weights)


def _positive(text: str) -> int:
    value = int(text)
    if not 0 < value <= 8192:
        raise argparse.ArgumentTypeError(f"must be in 1..8192, got {text}")
    return value


def run_import_weights(args: argparse.Namespace) -> int:
    payload = read_source(args.source)
    source = str(args.source)
    fmt = detect_format(payload, source) if args.format == "auto" else args.format
    if fmt in MODEL_FORMATS:
        imported = import_model(payload, fmt, source, args.test_size, args.max_size)
        category_ids, class_names = class_list(args.classes, imported)
        metadata = {**new_metadata(class_names, category_ids), "source": {"format": fmt, "file": args.source.name}}
        save_checkpoint(args.out, {"config": imported.config.to_dict(), "model": imported.state, "metadata": metadata})
        model = imported.config.model
        print(
            f"imported {imported.description} ResNet-{model.depth}, {model.num_classes} classes, "
            f"{len(imported.state)} tensors, test size {imported.config.input.test_size}/"
            f"{imported.config.input.max_size} -> {args.out}"
        )
        return 0
    if args.classes or args.test_size or args.max_size:
        raise UserError(f"--classes, --test-size and --max-size apply to full models, not to a {fmt} backbone")
    state, depth = import_backbone(payload, fmt, source)
    write_torchvision(args.out, state)
    print(f"imported {fmt} ResNet-{depth} backbone ({len(state)} tensors) as torchvision weights -> {args.out}")
    return 0


def class_list(choice: str | None, imported: ImportedModel) -> tuple[list[int], list[str]]:
    """(category ids, names) for the model's outputs, checked against its number of classes. COCO's names get
    COCO's category ids (not contiguous), so results evaluate against COCO annotation files directly."""
    count = imported.config.model.num_classes
    coco_names = [name for _, name in COCO_CATEGORIES]
    if choice == "coco" or (choice is None and imported.class_names == coco_names):
        ids, names = [c for c, _ in COCO_CATEGORIES], coco_names
    elif choice is not None:
        names = read_class_file(Path(choice))
        ids = list(range(1, len(names) + 1))
    elif imported.class_names is not None:
        names = imported.class_names
        ids = list(range(1, len(names) + 1))
    else:
        return list(range(1, count + 1)), [str(i) for i in range(count)]
    if len(names) != count:
        raise UserError(f"{len(names)} class names for a model with {count} classes ({choice or 'checkpoint meta'})")
    return ids, names


def read_class_file(path: Path) -> list[str]:
    """One class name per line; blank lines are ignored."""
    if not path.is_file():
        raise UserError(f"class-name file not found: {path} (or use --classes coco)")
    if path.stat().st_size > MAX_CLASS_FILE_BYTES:
        raise UserError(f"{path}: too large for a class-name file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    return [line.strip() for line in lines if line.strip()]
