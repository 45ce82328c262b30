"""``freesolo infer``: segment images with a running server and write what ``freesolo predict`` writes (COCO results
json, optional overlay PNGs), so served and local predictions are interchangeable downstream.

``image_id`` is the image's index in the given order, as in ``predict``; with ``--ann GT.json`` it is the id of the
image of the same file name in that ground truth, so the results load and evaluate against it (pycocotools).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from serving.client import FreeSOLOClient, ImageInputError, ServingError
from training.errors import UserError

SERVE_HINT = "is the server running? (`freesolo serve start --repo DIR`, `freesolo serve status --repo DIR`)"


def ground_truth_ids(ann: Path, files: list[Path]) -> list[int]:
    """The id of each file's image in a COCO json, matched by file name; UserError for an absent or ambiguous one."""
    try:
        images = json.loads(ann.read_text())["images"]
        by_name: dict[str, list[int]] = {}
        for image in images:
            by_name.setdefault(Path(image["file_name"]).name, []).append(int(image["id"]))
    except FileNotFoundError:
        raise UserError(f"--ann {ann}: file not found") from None
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"--ann {ann}: not a COCO json with images (id, file_name): {error}") from None
    ids = []
    for file in files:
        found = by_name.get(file.name, [])
        if len(found) != 1:
            why = "no image" if not found else f"{len(found)} images"
            raise UserError(f"--ann {ann}: {why} named {file.name} (for {file})")
        ids.append(found[0])
    return ids


def served_detections(client: FreeSOLOClient, files: list[Path], batch: int) -> list[list[dict[str, Any]]]:
    """Detections of every file, ``batch`` images a request; failures as UserError naming the file."""
    detections: list[list[dict[str, Any]]] = []
    for start in range(0, len(files), batch):
        try:
            detections += client.predict(files[start : start + batch])
        except ImageInputError as error:
            raise UserError(f"cannot send {files[start + error.index]}: {error.reason}") from None
        except ServingError as error:
            if error.image_index is not None:
                refused = files[start + error.image_index]
                raise UserError(f"the server refused {refused}: {error.server_message}") from None
            raise UserError(f"{error}; {SERVE_HINT}" if error.status == "UNAVAILABLE" else str(error)) from None
    return detections


def run_infer(args: argparse.Namespace) -> int:
    from training.data.images import expand_images, read_rgb
    from training.fileio import atomic_write_text
    from training.visualize import save_overlay

    files = expand_images(args.images)
    image_ids = ground_truth_ids(args.ann, files) if args.ann else list(range(len(files)))
    try:
        client = FreeSOLOClient(
            args.url, timeout_s=args.timeout, retries=args.retries, use_shared_memory=args.shared_memory
        )
    except ValueError as error:
        raise UserError(f"--url/--timeout/--retries: {error}") from None
    with client:
        try:
            info = client.info()
        except ServingError as error:
            raise UserError(f"{error}; {SERVE_HINT}" if error.status == "UNAVAILABLE" else str(error)) from None
        batch = args.batch_size or max(info.max_batch_size, 1)
        if batch > max(info.max_batch_size, 1):
            raise UserError(f"--batch-size {batch} is more than the server's max_batch_size {info.max_batch_size}")
        detections = served_detections(client, files, batch)
    names = {category_id: name for category_id, name in zip(info.category_ids, info.class_names, strict=False)}
    results: list[dict[str, Any]] = []
    for index, (file, image_id, found) in enumerate(zip(files, image_ids, detections, strict=True)):
        for d in found:
            results.append(
                {
                    "image_id": image_id,
                    "category_id": d["category_id"],
                    "segmentation": d["segmentation"],
                    "bbox": d["bbox"],
                    "score": d["score"],
                    "file_name": str(file),
                }
            )
        if args.vis:
            shown = [d for d in found if d["score"] >= args.vis_thr]
            save_overlay(args.vis / f"{index:04d}_{file.stem}.png", read_rgb(file), shown, names)
    atomic_write_text(args.out, json.dumps(results) + "\n")
    print(
        f"{len(results)} detections in {len(files)} images from {args.url} -> {args.out}"
        + (f"; overlays in {args.vis}" if args.vis else "")
    )
    return 0
