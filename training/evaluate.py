"""COCO mask and box AP/AR with pycocotools (never a home-made AP), class-agnostic (``useCats=0``) or per class."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("segm", "bbox")


def _quiet(function, *args):  # pycocotools prints progress to stdout; keep our output readable
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def load_ground_truth(ann_file: Path) -> COCO:
    return _quiet(COCO, str(ann_file))


def ground_truth_from(dataset: dict[str, Any]) -> COCO:
    """A ground truth from an in-memory COCO dict (e.g. a subset of a loaded one)."""
    ground_truth = COCO()
    ground_truth.dataset = dataset
    _quiet(ground_truth.createIndex)
    return ground_truth


def coco_metrics(ground_truth: COCO, results: list[dict[str, Any]], class_agnostic: bool) -> dict[str, Any]:
    """{"segm": {AP, AP50, ...}, "bbox": {...}} as fractions in [0, 1]; a metric pycocotools cannot define
    (no GT of that size, reported as -1) is None. Per-class AP is added under "per_class" when not agnostic."""
    metrics: dict[str, Any] = {}
    for iou_type in IOU_TYPES:
        if not results:
            metrics[iou_type] = dict.fromkeys(STAT_NAMES, 0.0)
            continue
        detections = _quiet(ground_truth.loadRes, [dict(r) for r in results])
        evaluator = COCOeval(ground_truth, detections, iou_type)
        evaluator.params.useCats = 0 if class_agnostic else 1
        for step in (evaluator.evaluate, evaluator.accumulate, evaluator.summarize):
            _quiet(step)
        metrics[iou_type] = {
            name: (None if value < 0 else float(value)) for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)
        }
        if not class_agnostic:
            metrics[iou_type]["per_class"] = per_class_ap(evaluator, ground_truth)
    return metrics


def per_class_ap(evaluator: COCOeval, ground_truth: COCO) -> dict[str, float | None]:
    """AP over IoU 0.5:0.95, all areas, 100 detections, for each category."""
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    table = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        table[ground_truth.cats[category_id].get("name", str(category_id))] = (
            float(np.mean(values)) if values.size else None
        )
    return table


def format_table(metrics: dict[str, Any], title: str) -> str:
    """A markdown table of the headline metrics, in percent."""
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    lines = [f"### {title}", "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for iou_type in IOU_TYPES:
        values = metrics[iou_type]
        cells = ["-" if values.get(n) is None else f"{100 * values[n]:.1f}" for n in names]
        lines.append(f"| {'mask' if iou_type == 'segm' else 'box'} | " + " | ".join(cells) + " |")
    per_class = metrics["segm"].get("per_class")
    if per_class:
        lines += ["", "| class | mask AP |", "|---|---|"]
        lines += [f"| {name} | {'-' if ap is None else f'{100 * ap:.1f}'} |" for name, ap in per_class.items()]
    return "\n".join(lines)
