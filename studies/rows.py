"""Rows of the studies' tables: class-agnostic metrics of a model or of a coarse set on an evaluation set, a row of
dashes for what is not made yet (so a report can be written while trainings are still missing), and the same
metrics on disjoint folds of the set (how far AP moves between evaluation sets alone)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from training.evaluate import ground_truth_from
from training.report import STAGE_KEYS, coarse_on_ground_truth, model_results, stage_row

NOT_MADE = " (not made yet)"
Results = list[dict[str, Any]] | None  # COCO results, None when the model or coarse set does not exist yet


def coarse_results(coarse: Path, ground_truth: COCO) -> Results:
    """A Free Mask json's masks as results on ``ground_truth``'s images."""
    return coarse_on_ground_truth(json.loads(coarse.read_text()), ground_truth) if coarse.is_file() else None


def trained_results(model: Path, images: Path, ann: Path, cache: Path | None) -> Results:
    """A checkpoint's results on a labelled folder (cached, see ``model_results``)."""
    return model_results(model, images, ann, False, cache) if model.is_file() else None


def coco_subset(dataset: dict[str, Any], images: list[dict[str, Any]]) -> dict[str, Any]:
    """A COCO dict cut down to ``images`` and their annotations (other keys kept)."""
    kept = {image["id"] for image in images}
    return {**dataset, "images": images, "annotations": [a for a in dataset["annotations"] if a["image_id"] in kept]}


def folds(ground_truth: COCO, count: int) -> list[COCO]:
    """The evaluation set cut into ``count`` disjoint folds of consecutive images, each a ground truth of its own."""
    images = sorted(ground_truth.dataset["images"], key=lambda image: image["id"])
    size = -(-len(images) // count)
    parts = []
    for start in range(0, len(images), size):
        parts.append(ground_truth_from(coco_subset(ground_truth.dataset, images[start : start + size])))
    return parts


def measured_row(name: str, ground_truth: COCO, results: Results, parts: list[COCO] = ()) -> dict[str, Any]:
    """A stage row on the whole set, with the same metrics on each of ``parts`` under "folds"; dashes (None) and a
    marked name when there are no results yet."""
    if results is None:
        return {"name": name + NOT_MADE, **dict.fromkeys(STAGE_KEYS)}
    row = stage_row(name, ground_truth, results)
    if parts:
        row["folds"] = []
        for part in parts:
            kept = set(part.getImgIds())
            fold = stage_row(name, part, [r for r in results if r["image_id"] in kept])
            row["folds"].append({key: value for key, value in fold.items() if key != "name"})
    return row
