"""Overlay pictures: coloured masks, outlines, boxes and "class score" labels on the image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
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


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a binary mask that touch the background (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def draw_overlay(
    image: np.ndarray, results: list[dict[str, Any]], class_names: dict[int, str], alpha: float = 0.45
) -> Image.Image:
    """Image [H, W, 3] uint8 with every result's mask, outline, box and label drawn, best scores on top."""
    canvas = image.astype(np.float32)
    ordered = sorted(results, key=lambda r: r["score"])
    for index, result in enumerate(ordered):
        mask = mask_utils.decode(result["segmentation"]).astype(bool)
        color = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color
        canvas[outline(mask)] = color
    scale = max(1, int(np.ceil(MIN_SIDE / min(image.shape[:2]))))
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    for index, result in enumerate(ordered):
        color = PALETTE[index % len(PALETTE)]
        x, y, w, h = (v * scale for v in result["bbox"])
        draw.rectangle([x, y, x + w, y + h], outline=color, width=2)
        label = f"{class_names.get(result['category_id'], result['category_id'])} {result['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), label)
        text_y = max(0, y - (bottom - top) - 4)
        draw.rectangle([x, text_y, x + (right - left) + 4, text_y + (bottom - top) + 4], fill=color)
        draw.text((x + 2, text_y + 1), label, fill=(255, 255, 255))
    return picture


def save_overlay(path: Path, image: np.ndarray, results: list[dict[str, Any]], class_names: dict[int, str]) -> None:
    """Write the overlay as a PNG, atomically: a viewer never opens a half-written picture."""
    picture = draw_overlay(image, results, class_names)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
