"""Self-training (docs/algorithms.md, "Self-training"): the model's own confident predictions become the next
round's coarse masks.

Round r predicts on the unlabeled images with the current teacher, keeps detections with score >= 0.3 (at most 20
per image) as pseudo-labels, each with the teacher's embedding at the detection's grid cell as its embedding target,
and trains a weak-mode model on them, initialised from the teacher, for ``weak.selftrain_iters`` steps (0: the
teacher's own schedule). With ``weak.selftrain_keep_coarse`` (default; not in the paper) the masks the teacher was
trained on (round 1: the Free Mask json given as ``coarse``; round r: round r-1's labels) stay where no pseudo-label
covers them (mask IoU < 0.5). Layout (every step skipped when done, so an
interrupted run resumes):

    RUN/round1/pseudo.json, RUN/round1/{config.yaml, checkpoint.pt, model.pt, log.jsonl, loss_curve.png}
    RUN/round2/...
    RUN/model.pt   (a copy of the last round's model)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from training.coarse_json import CATEGORY, by_file_name, image_record, merge
from training.config import Config, apply_overrides, config_from_dict
from training.data.coco import ImageFolder
from training.data.images import list_images
from training.engine.trainer import RunPaths, resumable_state
from training.fileio import atomic_write, atomic_write_text
from training.inference import Predictor
from training.solo_training import train_solo


def pseudo_annotation(result: dict[str, Any]) -> dict[str, Any]:
    """A prediction (COCO result with embedding) -> a coarse-json annotation (ids are assigned at the merge)."""
    entry = {key: result[key] for key in ("segmentation", "bbox", "score") if key in result}
    entry.update(category_id=CATEGORY["id"], area=int(mask_utils.area(result["segmentation"])), iscrowd=0)
    if "embedding" in result:
        entry["embedding"] = result["embedding"]
    return entry


COVERED_IOU = 0.5  # a teacher's training mask this close to a pseudo-label is replaced by it


def uncovered(previous: list[dict[str, Any]], pseudo: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The annotations of ``previous`` (one image's) that overlap no pseudo-label by mask IoU >= COVERED_IOU, without
    their ids (``merge`` assigns new ones)."""
    if not previous:
        return []
    kept = [{k: v for k, v in ann.items() if k not in ("id", "image_id")} for ann in previous]
    if not pseudo:
        return kept
    iou = mask_utils.iou([a["segmentation"] for a in kept], [p["segmentation"] for p in pseudo], [0] * len(pseudo))
    return [ann for ann, row in zip(kept, iou, strict=True) if row.max() < COVERED_IOU]


def write_pseudo_labels(
    teacher: Path, images: Path, out: Path, config: Config, progress: bool = True, previous: Path | None = None
) -> int:
    """Predict on every image of ``images`` and write the confident detections as a coarse json, with the uncovered
    annotations of the ``previous`` json (the teacher's training labels) when given; returns the count."""
    before = json.loads(previous.read_text()) if previous else {"images": [], "annotations": []}
    kept_before = by_file_name(before["images"], before["annotations"])
    predictor = Predictor.from_checkpoint(teacher)
    files = list_images(images)
    dataset = ImageFolder(files, predictor.test_policy)
    records = []
    for batch, results in predictor.iterate(dataset, 8, progress, "pseudo-labels", with_embeddings=True):
        for index, geometry, image_results in zip(batch.image_ids, batch.geometries, results, strict=True):
            confident = [r for r in image_results if r["score"] >= config.weak.selftrain_score_thr]
            confident = sorted(confident, key=lambda r: -r["score"])[: config.weak.selftrain_max_per_img]
            labels = [pseudo_annotation(r) for r in confident]
            labels += uncovered(kept_before.get(files[index].name, []), labels)
            records.append(image_record(files[index].name, geometry.original_height, geometry.original_width, labels))
    info = {
        "generator": "freesolo selftrain",
        "teacher": str(teacher),
        "score_thr": config.weak.selftrain_score_thr,
        "max_per_img": config.weak.selftrain_max_per_img,
        "kept_from": str(previous) if previous else None,
    }
    document = merge(records, info)
    atomic_write_text(out, json.dumps(document) + "\n")
    return len(document["annotations"])


def round_config(teacher: Path, overrides: list[str]) -> Config:
    """The teacher's own config (same model and schedule), with the user's overrides; ``weak.selftrain_iters``, when
    set, replaces the schedule's length."""
    from training.checkpoint import load_checkpoint

    config = apply_overrides(config_from_dict(load_checkpoint(teacher)["config"]), overrides)
    if config.weak.selftrain_iters > 0:
        config.weak.solver.iters = config.weak.selftrain_iters
    return config


def self_train(
    checkpoint: Path,
    images: Path,
    out: Path,
    rounds: int,
    overrides: list[str],
    progress: bool = True,
    coarse: Path | None = None,
) -> Path:
    """Run ``rounds`` rounds of self-training from ``checkpoint`` (trained on ``coarse``, when known); returns
    RUN/model.pt."""
    teacher, labels = Path(checkpoint), coarse
    for round_index in range(1, rounds + 1):
        run = RunPaths(out / f"round{round_index}")
        config = round_config(teacher, overrides)
        pseudo = run.root / "pseudo.json"
        if not run.model.exists():
            if not pseudo.exists():
                previous = labels if config.weak.selftrain_keep_coarse else None
                count = write_pseudo_labels(teacher, images, pseudo, config, progress, previous)
                print(f"round {round_index}: {count} labels from {teacher}" + (f" and {previous}" if previous else ""))
            state = resumable_state(run, resume=True)
            train_solo(images, pseudo, run, config, state, mode="weak", init=teacher, progress=progress)
        teacher, labels = run.model, pseudo
    final = out / "model.pt"
    atomic_write(final, lambda tmp: shutil.copyfile(teacher, tmp))
    return final
