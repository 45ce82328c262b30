"""pycocotools wiring: ground truth fed back as results scores AP 1, an empty result list scores 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.evaluate import coco_metrics, format_table, load_ground_truth


def ground_truth_as_results(ann_file: Path) -> list[dict]:
    data = json.loads(ann_file.read_text())
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "segmentation": a["segmentation"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in data["annotations"]
    ]


@pytest.mark.parametrize("class_agnostic", [True, False])
def test_perfect_results_score_ap_one(synth_data: Path, class_agnostic: bool) -> None:
    ann_file = synth_data / "val.json"
    metrics = coco_metrics(load_ground_truth(ann_file), ground_truth_as_results(ann_file), class_agnostic)
    for iou_type in ("segm", "bbox"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AR100"] == pytest.approx(1.0)
    assert ("per_class" in metrics["segm"]) is not class_agnostic
    assert "| mask | 100.0 |" in format_table(metrics, "perfect")


def test_wrong_category_matters_only_per_class(synth_data: Path) -> None:
    ann_file = synth_data / "val.json"
    results = ground_truth_as_results(ann_file)
    for result in results:
        result["category_id"] = 1 if result["category_id"] != 1 else 2
    ground_truth = load_ground_truth(ann_file)
    assert coco_metrics(ground_truth, results, class_agnostic=True)["segm"]["AP"] == pytest.approx(1.0)
    assert coco_metrics(ground_truth, results, class_agnostic=False)["segm"]["AP"] == pytest.approx(0.0)


def test_no_results_score_zero(synth_data: Path) -> None:
    metrics = coco_metrics(load_ground_truth(synth_data / "val.json"), [], class_agnostic=True)
    assert metrics["segm"]["AP"] == 0.0 and metrics["bbox"]["AR100"] == 0.0
