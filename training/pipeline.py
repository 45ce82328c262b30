"""`freesolo pipeline`: every unsupervised stage in order, each skipped when its output exists (resume after a crash).

RUN/pretrain/            DenseCL run directory (model.pt = DenseCL weights)
RUN/backbone.pth         its backbone as a torchvision ResNet state dict
RUN/freemask/train.json  Free Mask coarse masks of the training images (and eval.json of the evaluation images)
RUN/weak/                self-supervised SOLO trained on the coarse masks, initialised from the backbone
RUN/selftrain/           self-training rounds (round<r>/ and model.pt)
RUN/report.json, report.md, overlays.png   with --eval-images/--eval-ann
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO

from training.backbone_io import backbone_state_dict
from training.coarse_json import by_file_name
from training.config import Config
from training.data.images import list_images
from training.engine.trainer import RunPaths, resumable_state
from training.evaluate import load_ground_truth
from training.fileio import atomic_write
from training.freemask_run import run_freemask
from training.pretrain import train_densecl
from training.report import (
    AGNOSTIC,
    Column,
    coarse_on_ground_truth,
    comparison_grid,
    model_results,
    stage_row,
    stage_table,
    write_report,
)
from training.selftrain import self_train
from training.solo_training import train_solo

OVERLAY_IMAGES = 6


class PipelinePaths:
    """Where each stage writes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.pretrain = RunPaths(self.root / "pretrain")
        self.backbone = self.root / "backbone.pth"
        self.coarse_train = self.root / "freemask" / "train.json"
        self.coarse_eval = self.root / "freemask" / "eval.json"
        self.weak = RunPaths(self.root / "weak")
        self.selftrain = self.root / "selftrain"


def export_backbone(checkpoint: Path, out: Path) -> None:
    state, _ = backbone_state_dict(checkpoint)
    atomic_write(out, lambda tmp: torch.save(state, tmp))


def run_stages(
    images: Path,
    paths: PipelinePaths,
    config: Config,
    overrides: list[str],
    rounds: int,
    eval_images: Path | None,
    progress: bool,
) -> None:
    """Pre-training -> backbone export -> Free Mask -> weak training -> self-training, skipping finished stages."""
    if not paths.pretrain.model.exists():
        train_densecl(images, paths.pretrain, config, resumable_state(paths.pretrain, resume=True), progress)
    if not paths.backbone.exists():
        export_backbone(paths.pretrain.model, paths.backbone)
    for folder, out in ((images, paths.coarse_train), (eval_images, paths.coarse_eval)):
        if folder is not None and not out.exists():
            run_freemask(list_images(folder), folder, paths.pretrain.model, out, config, progress)
    if not paths.weak.model.exists():
        train_solo(
            images,
            paths.coarse_train,
            paths.weak,
            config,
            resumable_state(paths.weak, resume=True),
            mode="weak",
            init=paths.backbone,
            progress=progress,
        )
    self_train(paths.weak.model, images, paths.selftrain, rounds, overrides, progress, paths.coarse_train)


def stage_results(
    paths: PipelinePaths,
    rounds: int,
    coarse_file: Path,
    eval_images: Path,
    eval_ann: Path,
    ground_truth: COCO,
    progress: bool,
    cache: Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """COCO results of every stage on an evaluation set (eval_ann, loaded as ground_truth), keyed by stage name: the
    coarse masks of its images (coarse_file, a Free Mask json of eval_images), weak training and every self-training
    round; ``cache``: see ``model_results``."""
    results = {"freemask": coarse_on_ground_truth(json.loads(coarse_file.read_text()), ground_truth)}
    models = {"weak": paths.weak.model}
    models.update({f"selftrain{r}": paths.selftrain / f"round{r}" / "model.pt" for r in range(1, rounds + 1)})
    for name, model in models.items():
        results[name] = model_results(model, eval_images, eval_ann, progress, cache)
    return results


def evaluate_stages(
    paths: PipelinePaths, rounds: int, eval_images: Path, eval_ann: Path, progress: bool
) -> list[dict[str, Any]]:
    """The report: Free Mask, weak training and every self-training round, on the evaluation set."""
    ground_truth = load_ground_truth(eval_ann)
    results = stage_results(paths, rounds, paths.coarse_eval, eval_images, eval_ann, ground_truth, progress)
    stages = [stage_row(name, ground_truth, found) for name, found in results.items()]
    coarse = results.pop("freemask")
    final = list(results)[-1]
    files = sorted(eval_images / image["file_name"] for image in ground_truth.dataset["images"])[:OVERLAY_IMAGES]
    images = ground_truth.dataset["images"]
    categories = {category["id"]: category["name"] for category in ground_truth.dataset["categories"]}
    columns = [
        Column("ground truth (evaluation only)", by_file_name(images, ground_truth.dataset["annotations"]), categories),
        Column("Free Mask (coarse)", by_file_name(images, coarse), AGNOSTIC),
    ]
    for name, found in results.items():
        columns.append(Column(name if name != final else f"{name} (final)", by_file_name(images, found), AGNOSTIC))
    grid = comparison_grid(files, columns)
    write_report(paths.root, stages, grid, f"FreeSOLO pipeline: {paths.root}")
    return stages


def run_pipeline(
    images: Path,
    out: Path,
    config: Config,
    overrides: list[str],
    rounds: int = 1,
    eval_images: Path | None = None,
    eval_ann: Path | None = None,
    progress: bool = True,
) -> str | None:
    """Run every stage; with an evaluation set, write the report and return its stage table."""
    paths = PipelinePaths(out)
    run_stages(images, paths, config, overrides, rounds, eval_images, progress)
    if eval_images is None or eval_ann is None:
        return None
    return stage_table(evaluate_stages(paths, rounds, eval_images, eval_ann, progress))
