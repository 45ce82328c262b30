"""Overlay pictures as they are seen: ground truth labelled by class name without a score, predictions with theirs,
label text at a readable size on a box of the object's colour; the pipeline's grid draws every ground-truth object."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from training.coarse_json import by_file_name
from training.report import PANEL, VIS_THR, Column, comparison_grid, shown
from training.visualize import PALETTE, draw_overlay, label_font, label_size, label_spot, overlaps, text_px

SIDE = 128  # the synthetic images' size


def square(left: int, top: int, side: int, **extra: object) -> dict[str, object]:
    """One object as a COCO annotation (or, with a score, a result) on a SIDE x SIDE image."""
    mask = np.zeros((SIDE, SIDE), np.uint8, order="F")
    mask[top : top + side, left : left + side] = 1
    rle = mask_utils.encode(mask)
    return {"category_id": 2, "bbox": [left, top, side, side], "segmentation": rle, **extra}


def label_box(picture: Image.Image, color: tuple[int, int, int], below_y: int) -> tuple[int, int]:
    """(height, width) of the filled label box of ``color`` that ends above the row ``below_y``."""
    pixels = np.asarray(picture)[:below_y]
    filled = (pixels == np.array(color, np.uint8)).all(axis=2)
    rows, columns = np.nonzero(filled)
    return int(rows.max() - rows.min() + 1), int(columns.max() - columns.min() + 1)


def text_width(text: str, size: int) -> int:
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=label_font(size))
    return right - left


def test_ground_truth_is_labelled_by_class_name_and_predictions_by_score() -> None:
    background = np.full((SIDE, SIDE, 3), 40, np.uint8)
    names = {1: "ellipse", 2: "rectangle"}
    scale = PANEL // SIDE
    truth = draw_overlay(background, [square(30, 60, 40)], names, min_side=PANEL)
    height, width = label_box(truth, PALETTE[0], 60 * scale)
    size = text_px(PANEL)
    assert width == text_width("rectangle", size) + 6  # the class name, not its id, and no "1.00"
    letters = (np.asarray(truth)[60 * scale - height : 60 * scale] > 200).all(axis=2)  # white on the box
    rows = np.nonzero(letters.any(axis=1))[0]
    assert rows.max() - rows.min() + 1 >= 10  # "t" to "g" of >= 12 px type, not 7 px shrunk into a panel

    predicted = draw_overlay(background, [square(30, 60, 40, score=0.87)], names, min_side=PANEL)
    _, width = label_box(predicted, PALETTE[0], 60 * scale)
    assert width == text_width("rectangle 0.87", size) + 6


def test_label_at_the_top_edge_stays_inside_the_picture() -> None:
    picture = draw_overlay(np.zeros((SIDE, SIDE, 3), np.uint8), [square(100, 0, 28)], {2: "rectangle"}, min_side=SIDE)
    pixels = (np.asarray(picture) == np.array(PALETTE[0], np.uint8)).all(axis=2)
    rows, columns = np.nonzero(pixels)
    assert rows.min() == 0 and columns.max() == SIDE - 1  # drawn inside the box's top, shifted left to fit
    assert text_width("rectangle", text_px(SIDE)) + 6 <= columns.max() - columns.min() + 1


def test_grid_draws_every_ground_truth_object_and_confident_predictions(synth_data: Path) -> None:
    ann = json.loads((synth_data / "val.json").read_text())
    images, annotations = ann["images"], ann["annotations"]
    assert shown(annotations) == annotations  # ground truth has no score: all of it is drawn
    low = [{**a, "score": VIS_THR / 2} for a in annotations]
    assert shown(low) == []
    files = [synth_data / "val" / images[0]["file_name"]]
    names = {category["id"]: category["name"] for category in ann["categories"]}
    grid = comparison_grid(files, [Column("ground truth", by_file_name(images, annotations), names)])
    assert grid.size[0] == 2 * PANEL  # the image and one column
    drawn = np.asarray(grid)[:, PANEL:]
    plain = np.asarray(grid)[:, :PANEL]
    assert (drawn != plain).any(axis=2).mean() > 0.05  # the objects are coloured in


def test_labels_of_neighbouring_objects_do_not_cover_each_other() -> None:
    size = label_size("rectangle", label_font(text_px(PANEL)))
    spots = [label_spot((60, 120, 140, 200), size, (PANEL, PANEL), [])]  # above the box
    spots.append(label_spot((72, 128, 132, 188), size, (PANEL, PANEL), spots))  # a box whose corner nearly meets it
    assert spots[0][3] == 120 and not overlaps(*spots) and spots[1][1] == 128  # the second moves inside its box's top
    crowded = [(0, 0, PANEL, PANEL)]  # no free spot: the label still goes above its box, inside the picture
    assert label_spot((60, 120, 140, 200), size, (PANEL, PANEL), crowded)[3] == 120
