"""The training package's subcommands: ``data synth``, ``pretrain`` (``training.pretrain``), ``train``, ``freemask``,
``selftrain``, ``pipeline``, ``eval``, ``predict`` and ``export-backbone`` (``training.export_backbone``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from training.cli_args import Subcommands, add_config_arguments, config_from_arguments, positive_int
from training.config import apply_overrides, config_from_dict
from training.data.coco import CocoInstances, ImageFolder
from training.data.images import IMAGE_SUFFIXES, expand_images, list_images, read_rgb
from training.errors import UserError
from training.export_backbone import register as register_export_backbone
from training.fileio import atomic_write_text
from training.importers.command import register as register_import_weights
from training.pretrain import register as register_pretrain


def register(commands: Subcommands) -> None:
    """Add this package's subcommands to the ``freesolo`` parser."""
    _register_data(commands)
    register_pretrain(commands)
    _register_train(commands)
    _register_freemask(commands)
    _register_selftrain(commands)
    _register_pipeline(commands)
    _register_eval(commands)
    _register_predict(commands)
    register_export_backbone(commands)
    register_import_weights(commands)


def _register_freemask(commands: Subcommands) -> None:
    freemask = commands.add_parser(
        "freemask",
        help="coarse instance masks without labels (Free Mask)",
        description="Free Mask: coarse masks from a self-supervised backbone's res5 features (pyramid queries, "
        "cosine score maps, maskness, class-agnostic Matrix NMS), each with an embedding. Writes a COCO instances "
        "json (RLE masks, x,y,w,h boxes, score, embedding) that trains with `freesolo train --mode weak`. "
        "Resumable (finished images are skipped) and sharded over processes under torchrun.",
    )
    freemask.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder of unlabeled images")
    freemask.add_argument(
        "--backbone",
        type=Path,
        metavar="CKPT",
        help="a `freesolo pretrain` run's model.pt, a FreeSOLO checkpoint or a torchvision ResNet state dict "
        "(not needed with --set freemask.low_level_weight=1: colour statistics alone)",
    )
    freemask.add_argument("--out", type=Path, required=True, metavar="coarse.json", help="output json")
    add_config_arguments(freemask)
    freemask.add_argument("--no-progress", action="store_true", help="no progress bar")
    freemask.set_defaults(handler=run_freemask_command)


def run_freemask_command(args: argparse.Namespace) -> int:
    from training.engine.distributed import is_main_process
    from training.freemask_run import run_freemask

    files = list_images(args.images)
    count = run_freemask(files, args.images, args.backbone, args.out, config_from_arguments(args), not args.no_progress)
    if is_main_process():
        print(f"{count} coarse masks for {len(files)} images -> {args.out}")
    return 0


def _register_data(commands: Subcommands) -> None:
    data = commands.add_parser(
        "data", help="datasets: generate the synthetic default set", description="Dataset tools."
    )
    kinds = data.add_subparsers(dest="data_command", metavar="KIND", required=True)
    synth = kinds.add_parser(
        "synth",
        help="write the labelled synthetic COCO set (GT is used for evaluation only)",
        description="Procedurally generated scenes (textured shapes occluding each other on textured backgrounds) "
        "with COCO instance json (RLE). Writes DIR/train/, DIR/train.json, DIR/val/, DIR/val.json. "
        "Deterministic by seed.",
    )
    synth.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    synth.add_argument("--train", type=int, default=1000, metavar="N", help="training images (default 1000)")
    synth.add_argument("--val", type=int, default=200, metavar="N", help="validation images (default 200)")
    synth.add_argument("--size", type=int, default=128, metavar="PX", help="image side in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    synth.set_defaults(handler=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from training.data.synth import write_synthetic_dataset

    counts = write_synthetic_dataset(args.out, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    return 0


def _register_train(commands: Subcommands) -> None:
    train = commands.add_parser(
        "train",
        help="train SOLOv2 on a COCO-format set",
        description="Train SOLOv2. Writes RUN/config.yaml, RUN/checkpoint.pt (latest, for --resume), RUN/model.pt "
        "(final weights), RUN/log.jsonl and RUN/loss_curve.png. Runs under torchrun for DDP "
        "(torchrun --standalone --nproc_per_node 2 -m training.cli train ...).",
    )
    train.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder of the training images")
    train.add_argument("--ann", type=Path, required=True, metavar="ANN.json", help="COCO instances json")
    train.add_argument("--out", type=Path, required=True, metavar="RUN", help="run directory")
    train.add_argument(
        "--mode",
        choices=["supervised", "weak"],
        default="supervised",
        help="supervised: full GT masks (default); weak: FreeSOLO's self-supervised SOLO on coarse masks "
        "(a `freesolo freemask` json), one 'object' class",
    )
    add_config_arguments(train)
    train.add_argument("--iters", type=positive_int, metavar="N", help="override the preset's number of iterations")
    train.add_argument("--batch-size", type=positive_int, metavar="N", help="override the preset's batch size")
    train.add_argument("--lr", type=float, metavar="LR", help="override the preset's base learning rate")
    train.add_argument("--seed", type=int, metavar="S", help="override the random seed")
    train.add_argument("--workers", type=int, metavar="N", help="override the number of data-loading processes")
    train.add_argument(
        "--class-agnostic",
        action="store_true",
        help="merge all categories into one 'object' class (the upper bound for class-agnostic AP)",
    )
    train.add_argument(
        "--init",
        type=Path,
        metavar="CKPT",
        help="initial weights: a FreeSOLO checkpoint or a torchvision ResNet state dict",
    )
    train.add_argument("--resume", action="store_true", help="continue RUN from its checkpoint.pt")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from training.engine.trainer import RunPaths, requested_state
    from training.solo_training import train_solo, with_solver_overrides

    run = RunPaths(args.out)
    state = requested_state(run, args.resume)
    config = apply_overrides(config_from_dict(state["config"]), args.set) if state else config_from_arguments(args)
    metadata = state["metadata"] if state else {}
    mode = metadata.get("mode", args.mode)
    solver_overrides = {
        key: value
        for key, value in (
            ("iters", args.iters),
            ("batch_size", args.batch_size),
            ("base_lr", args.lr),
            ("num_workers", args.workers),
        )
        if value is not None
    }
    config = with_solver_overrides(config, mode, solver_overrides)
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    train_solo(
        args.images,
        args.ann,
        run,
        config,
        state,
        mode=mode,
        class_agnostic=metadata.get("class_agnostic", args.class_agnostic),
        init=args.init,
        progress=not args.no_progress,
    )
    return 0


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every command that runs a trained model shares."""
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT", help="model.pt or checkpoint.pt")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="images per batch (default 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _register_selftrain(commands: Subcommands) -> None:
    selftrain = commands.add_parser(
        "selftrain",
        help="self-training: retrain on the model's own confident predictions",
        description="Self-training (FreeSOLO): predict on the unlabeled images, keep detections with score >= "
        "weak.selftrain_score_thr (0.3; at most weak.selftrain_max_per_img = 20 per image) as coarse masks with the "
        "teacher's embeddings, plus (with --coarse and weak.selftrain_keep_coarse, the default) the coarse masks no "
        "pseudo-label covers, and train a weak-mode model on them, initialised from the teacher. Writes "
        "RUN/round<r>/ (pseudo.json and a run directory) for each round and RUN/model.pt (the last round's model). "
        "Finished steps are skipped, so an interrupted run resumes.",
    )
    selftrain.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT", help="the teacher (weak model)")
    selftrain.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder of unlabeled images")
    selftrain.add_argument("--out", type=Path, required=True, metavar="RUN", help="output folder")
    selftrain.add_argument(
        "--coarse", type=Path, metavar="JSON", help="the coarse masks the teacher trained on (Free Mask's json)"
    )
    selftrain.add_argument("--rounds", type=positive_int, default=1, metavar="N", help="rounds (default 1)")
    selftrain.add_argument("--iters", type=positive_int, metavar="N", help="training iterations of each round")
    selftrain.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one value of the teacher's config"
    )
    selftrain.add_argument("--no-progress", action="store_true", help="no progress bar")
    selftrain.set_defaults(handler=run_selftrain)


def run_selftrain(args: argparse.Namespace) -> int:
    from training.selftrain import self_train

    overrides = args.set + ([f"weak.selftrain_iters={args.iters}"] if args.iters else [])
    if args.coarse is not None and not args.coarse.is_file():
        raise UserError(f"coarse json not found: {args.coarse}")
    model = self_train(
        args.checkpoint, args.images, args.out, args.rounds, overrides, not args.no_progress, args.coarse
    )
    print(f"model: {model}")
    return 0


def _register_pipeline(commands: Subcommands) -> None:
    pipeline = commands.add_parser(
        "pipeline",
        help="every unsupervised stage: pretrain -> freemask -> weak training -> self-training (resumable)",
        description="FreeSOLO end to end on unlabeled images: DenseCL pre-training, backbone export, Free Mask, "
        "self-supervised SOLO, self-training. Each stage is skipped when its output exists, so a crashed run "
        "resumes. With --eval-images/--eval-ann (ground truth, used only to measure) it writes RUN/report.json, "
        "RUN/report.md and RUN/overlays.png with class-agnostic mask AP per stage. --set applies to every stage "
        "(e.g. --set pretrain.solver.iters=200 --set weak.solver.iters=300).",
    )
    pipeline.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder of unlabeled images")
    pipeline.add_argument("--out", type=Path, required=True, metavar="RUN", help="output folder")
    add_config_arguments(pipeline)
    pipeline.add_argument("--rounds", type=positive_int, default=1, metavar="N", help="self-training rounds (1)")
    pipeline.add_argument("--eval-images", type=Path, metavar="DIR", help="images of the evaluation set")
    pipeline.add_argument("--eval-ann", type=Path, metavar="GT.json", help="ground truth of the evaluation set")
    pipeline.add_argument("--no-progress", action="store_true", help="no progress bar")
    pipeline.set_defaults(handler=run_pipeline_command)


def run_pipeline_command(args: argparse.Namespace) -> int:
    from training.pipeline import run_pipeline

    if (args.eval_images is None) != (args.eval_ann is None):
        raise UserError("--eval-images and --eval-ann go together")
    table = run_pipeline(
        args.images,
        args.out,
        config_from_arguments(args),
        args.set,
        args.rounds,
        args.eval_images,
        args.eval_ann,
        not args.no_progress,
    )
    if table:
        print(f"\n{table}\n\nreport: {args.out / 'report.md'}")
    return 0


def _register_eval(commands: Subcommands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="COCO mask and box AP/AR with pycocotools",
        description="Evaluate a checkpoint on a COCO-format set with pycocotools: mask (segm) and box AP/AR, "
        "per class or class-agnostic (useCats=0).",
    )
    add_inference_arguments(evaluate)
    evaluate.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder of the images")
    evaluate.add_argument("--ann", type=Path, required=True, metavar="GT.json", help="ground-truth COCO json")
    evaluate.add_argument("--class-agnostic", action="store_true", help="ignore categories (useCats=0)")
    evaluate.add_argument("--json", type=Path, metavar="OUT", help="write the metrics as json (fractions in [0, 1])")
    evaluate.add_argument("--results", type=Path, metavar="OUT", help="also write the COCO results json")
    evaluate.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from training.evaluate import coco_metrics, format_table, load_ground_truth
    from training.inference import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint)
    dataset = CocoInstances(args.images, args.ann, predictor.test_policy)
    results = predictor.dataset_results(dataset, args.batch_size, not args.no_progress)
    metrics = coco_metrics(load_ground_truth(args.ann), results, args.class_agnostic)
    mode = "class-agnostic" if args.class_agnostic else "per class"
    print(format_table(metrics, f"{args.checkpoint} on {args.ann} ({mode}, {len(dataset)} images)"))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
    if args.results:
        atomic_write_text(args.results, json.dumps(results) + "\n")
    return 0


def _register_predict(commands: Subcommands) -> None:
    predict = commands.add_parser(
        "predict",
        help="segment images; COCO results json and overlay pictures",
        description="Segment images with a checkpoint. Writes COCO results (RLE masks at the original size, xywh "
        "boxes, scores; image_id is the index in the given order and file_name names the image).",
    )
    add_inference_arguments(predict)
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files or folders of images")
    predict.add_argument("--out", type=Path, required=True, metavar="preds.json", help="COCO results json")
    predict.add_argument("--vis", type=Path, metavar="DIR", help="write overlay PNGs here")
    predict.add_argument(
        "--vis-thr", type=float, default=0.3, metavar="T", help="draw detections with score >= T (default 0.3)"
    )
    predict.add_argument("--height", type=int, metavar="H", help="predict as a fixed-size export of H x W does")
    predict.add_argument(
        "--width",
        type=int,
        metavar="W",
        help="(with --height) fit each image into H x W and pad it to that canvas, as `export onnx --height H "
        "--width W` and its server do; default: each image on its own canvas (multiples of 32), as a --dynamic "
        "export does",
    )
    predict.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from training.geometry import fixed_canvas
    from training.inference import Predictor
    from training.visualize import save_overlay

    files = expand_images(args.images)
    for file in files:
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"not an image file (by its suffix): {file}")
    predictor = Predictor.from_checkpoint(args.checkpoint, fixed_canvas(args.height, args.width))
    dataset = ImageFolder(files, predictor.test_policy)
    results: list[dict[str, Any]] = []
    for batch, batch_results in predictor.iterate(dataset, args.batch_size, not args.no_progress):
        for index, image_results in zip(batch.image_ids, batch_results, strict=True):
            for result in image_results:
                result["file_name"] = str(files[index])
            results += image_results
            if args.vis:
                shown = [r for r in image_results if r["score"] >= args.vis_thr]
                save_overlay(
                    args.vis / f"{index:04d}_{files[index].stem}.png",
                    read_rgb(files[index]),
                    shown,
                    predictor.names_by_category,
                )
    atomic_write_text(args.out, json.dumps(results) + "\n")
    print(
        f"{len(results)} detections in {len(files)} images -> {args.out}"
        + (f"; overlays in {args.vis}" if args.vis else "")
    )
    return 0
