"""Overlay pictures: coloured masks, outlines, boxes and labels on the image. A result with a ``score`` (a
prediction) is labelled "class score"; one without (ground truth) by its class name alone."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from training.fileio import atomic_write

# Tableau-like palette: distinct, readable on photographs.
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
]
MIN_SIDE = 384  # small images are enlarged (nearest) so labels stay legible
MIN_TEXT_PX = 14  # label height at the least; larger pictures get larger text (a 24th of the shorter side)

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@lru_cache(maxsize=8)
def label_font(size: int) -> Font:
    """Pillow's bundled TrueType font at ``size`` px; Pillow < 10.1 has only its fixed ~10 px bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def text_px(side: int) -> int:
    """Label size for a picture whose shorter side is ``side`` px."""
    return max(MIN_TEXT_PX, side // 24)


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a binary mask that touch the background (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def label_text(result: dict[str, Any], class_names: dict[int, str]) -> str:
    """ "name score" for a prediction, "name" for ground truth (a result without a score)."""
    name = class_names.get(result["category_id"], str(result["category_id"]))
    return f"{name} {result['score']:.2f}" if "score" in result else name


def drawing_order(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predictions from the lowest score up (the best end on top); ground truth from the largest object down (small
    objects stay visible on top of the large ones)."""
    return sorted(results, key=lambda r: r["score"] if "score" in r else -r["bbox"][2] * r["bbox"][3])


Box = tuple[float, float, float, float]  # left, top, right, bottom


def overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_spot(box: Box, size: tuple[int, int], picture: tuple[int, int], taken: list[Box]) -> Box:
    """Where a label of ``size`` goes for an object's ``box``: above the box, else inside its top, below it, inside
    its bottom; the first of these inside the picture that covers no label placed before (else the first inside)."""
    (width, height), (picture_width, picture_height) = size, picture
    x = min(max(0.0, box[0]), max(0.0, picture_width - width))
    tops = [top for top in (box[1] - height, box[1], box[3], box[3] - height) if 0 <= top <= picture_height - height]
    tops = tops or [0.0]
    spots = [(x, top, x + width, top + height) for top in tops]
    return next((spot for spot in spots if not any(overlaps(spot, other) for other in taken)), spots[0])


def label_size(text: str, font: Font) -> tuple[int, int]:
    """(width, height) of a label: the text and a margin of 3 px across, 2 px down."""
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return right - left + 6, bottom - top + 4


def draw_label(picture: Image.Image, spot: Box, text: str, color: tuple[int, ...], font: Font) -> None:
    """White text on a box of the object's colour at ``spot``."""
    draw = ImageDraw.Draw(picture)
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.rectangle([spot[0], spot[1], spot[2] - 1, spot[3] - 1], fill=color)
    draw.text((spot[0] + 3 - left, spot[1] + 2 - top), text, fill=(255, 255, 255), font=font)


def draw_overlay(
    image: np.ndarray,
    results: list[dict[str, Any]],
    class_names: dict[int, str],
    alpha: float = 0.45,
    min_side: int = MIN_SIDE,
) -> Image.Image:
    """Image [H, W, 3] uint8 with every result's mask, outline, box and label drawn; enlarged (nearest, a whole
    factor) until its shorter side reaches ``min_side``, so the text is drawn at the size it is seen."""
    canvas = image.astype(np.float32)
    ordered = drawing_order(results)
    for index, result in enumerate(ordered):
        mask = mask_utils.decode(result["segmentation"]).astype(bool)
        color = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color
        canvas[outline(mask)] = color
    scale = max(1, int(np.ceil(min_side / min(image.shape[:2]))))
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    font = label_font(text_px(min(picture.size)))
    for index, result in enumerate(ordered):
        color = PALETTE[index % len(PALETTE)]
        x, y, w, h = (v * scale for v in result["bbox"])
        draw.rectangle([x, y, x + w, y + h], outline=color, width=2)
    # Labels after every box (no box line crosses one); placed from the top of the order down, so the best (or the
    # smallest) object's label gets the first free spot, and drawn bottom up, so it stays on top where none is free.
    texts = [label_text(result, class_names) for result in ordered]
    spots: list[Box] = []
    for result, text in zip(reversed(ordered), reversed(texts), strict=True):
        x, y, w, h = (v * scale for v in result["bbox"])
        spots.append(label_spot((x, y, x + w, y + h), label_size(text, font), picture.size, spots))
    for index, (text, spot) in enumerate(zip(texts, reversed(spots), strict=True)):
        draw_label(picture, spot, text, PALETTE[index % len(PALETTE)], font)
    return picture


def save_overlay(path: Path, image: np.ndarray, results: list[dict[str, Any]], class_names: dict[int, str]) -> None:
    """Write the overlay as a PNG, atomically: a viewer never opens a half-written picture."""
    picture = draw_overlay(image, results, class_names)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
