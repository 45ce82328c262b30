"""Stage reports of the unsupervised pipeline: class-agnostic metrics per stage (pycocotools), a markdown table and
overlay pictures of the ground truth, the coarse masks and each stage's predictions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

from training.data.coco import CocoInstances
from training.data.images import read_rgb
from training.evaluate import coco_metrics
from training.fileio import atomic_write, atomic_write_text
from training.inference import Predictor
from training.visualize import draw_overlay, label_font, text_px

STAGE_KEYS = ("AP", "AP50", "AP75", "AR100")
VIS_THR = 0.3
PANEL = 256
CAPTION = 22  # px of the caption bar above each panel
AGNOSTIC = {1: "object"}  # the one class of coarse masks and of class-agnostic models


class Column(NamedTuple):
    """One column of the comparison grid: its caption, results by file name, and their class names."""

    title: str
    by_file: dict[str, list[dict[str, Any]]]
    class_names: dict[int, str]


def coarse_on_ground_truth(coarse: dict[str, Any], ground_truth: COCO) -> list[dict[str, Any]]:
    """Coarse annotations as results with the ground truth's image ids (matched by file name)."""
    gt_ids = {image["file_name"]: image["id"] for image in ground_truth.dataset["images"]}
    coarse_to_gt = {image["id"]: gt_ids.get(image["file_name"]) for image in coarse["images"]}
    return [
        {**ann, "image_id": coarse_to_gt[ann["image_id"]]}
        for ann in coarse["annotations"]
        if coarse_to_gt[ann["image_id"]] is not None
    ]


def model_results(
    checkpoint: Path, images: Path, ann: Path, progress: bool, cache: Path | None = None
) -> list[dict[str, Any]]:
    """A checkpoint's COCO results on a labelled image folder. With ``cache`` (a folder), results are kept there
    under a hash of the checkpoint's and the ground truth's bytes and the image folder, so a report run again after
    one more training evaluates only what changed."""
    if cache is not None:
        digest = hashlib.sha256(checkpoint.read_bytes() + ann.read_bytes() + str(images).encode()).hexdigest()
        stored = cache / f"{digest[:24]}.json"
        if stored.is_file():
            return json.loads(stored.read_text())
    predictor = Predictor.from_checkpoint(checkpoint)
    results = predictor.dataset_results(CocoInstances(images, ann, predictor.test_policy), progress=progress)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stored, json.dumps(results))
    return results


def stage_row(name: str, ground_truth: COCO, results: list[dict[str, Any]]) -> dict[str, Any]:
    """{"name", "AP", "AP50", "AP75", "AR100"}: class-agnostic mask metrics as fractions."""
    segm = coco_metrics(ground_truth, results, class_agnostic=True)["segm"]
    return {"name": name, **{key: segm[key] for key in STAGE_KEYS}}


def stage_table(stages: list[dict[str, Any]], keys: tuple[str, ...] = STAGE_KEYS, digits: int = 1) -> str:
    """A markdown table of stage rows (metrics as fractions) in percent with ``digits`` decimals."""
    header = ["mask AP" if key == "AP" else key for key in keys]
    lines = ["| stage | " + " | ".join(header) + " |", "|---" * (len(keys) + 1) + "|"]
    for stage in stages:
        cells = ["-" if stage[key] is None else f"{100 * stage[key]:.{digits}f}" for key in keys]
        lines.append(f"| {stage['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def titled(picture: Image.Image, title: str) -> Image.Image:
    """A panel of fixed size with a caption bar."""
    panel = Image.new("RGB", (PANEL, PANEL + CAPTION), "white")
    panel.paste(picture.resize((PANEL, PANEL)), (0, CAPTION))
    ImageDraw.Draw(panel).text((4, 3), title, fill=(0, 0, 0), font=label_font(text_px(PANEL)))
    return panel


def shown(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a panel draws: predictions scoring at least VIS_THR, and all of the ground truth (it has no score)."""
    return [r for r in results if r.get("score", VIS_THR) >= VIS_THR]


def comparison_grid(image_files: list[Path], columns: list[Column]) -> Image.Image:
    """Rows of images; each column draws one stage's results (keyed by file name) on the image, at panel size so
    that its labels are drawn at the size they are seen."""
    rows = []
    for file in image_files:
        image = read_rgb(file)
        panels = [titled(Image.fromarray(image), file.name)]
        for column in columns:
            found = shown(column.by_file.get(file.name, []))
            panels.append(titled(draw_overlay(image, found, column.class_names, min_side=PANEL), column.title))
        rows.append(np.concatenate([np.asarray(p) for p in panels], axis=1))
    return Image.fromarray(np.concatenate(rows, axis=0))


def write_report(out: Path, stages: list[dict[str, Any]], grid: Image.Image, title: str) -> None:
    """RUN/report.json, RUN/report.md and RUN/overlays.png."""
    atomic_write_text(out / "report.json", json.dumps({"stages": stages}, indent=2) + "\n")
    atomic_write(out / "overlays.png", lambda tmp: grid.save(tmp, format="png"))
    text = f"# {title}\n\nClass-agnostic mask metrics (pycocotools, `useCats=0`) on the evaluation set.\n\n"
    caption = f"ground truth, coarse masks and each stage's predictions (score >= {VIS_THR})"
    text += stage_table(stages) + f"\n\n![{caption}](overlays.png)\n"
    atomic_write_text(out / "report.md", text)
