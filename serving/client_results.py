"""The ensemble's per-image outputs -> detections in the COCO results format that ``freesolo predict`` writes.

Torch-free. A detection is a dict: ``score``, ``category_id`` and ``label`` (its class name), ``bbox`` as COCO's
[x, y, width, height] in original-image pixels (the tight box of the mask), and ``segmentation`` as COCO compressed
RLE {"size": [height, width], "counts": str} at the original size. Add ``image_id`` and it is a COCO result.
The class names and category ids come from the ensemble's config parameters (``serve prepare`` writes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.contract import OUTPUT_NAMES

Detection = dict[str, Any]


@dataclass(frozen=True)
class ModelInfo:
    """What a client needs to know about the served ensemble."""

    max_batch_size: int
    class_names: list[str]
    category_ids: list[int]
    dynamic_input: bool = False  # each image on its own canvas: one image per request keeps it so

    def category(self, label: int) -> tuple[int, str]:
        """(category id, class name) of a model label; label + 1 when the model carries no ids."""
        category_id = self.category_ids[label] if 0 <= label < len(self.category_ids) else label + 1
        name = self.class_names[label] if 0 <= label < len(self.class_names) else str(category_id)
        return int(category_id), name


def model_info(config: dict[str, Any]) -> ModelInfo:
    """From ``get_model_config(..., as_json=True)`` (the reply, or its ``config``)."""
    config = config.get("config", config)
    parameters = config.get("parameters", {})

    def listed(key: str) -> list[Any]:
        text = parameters.get(key, {}).get("string_value", "[]")
        try:
            value = json.loads(text)
        except ValueError:
            return []
        return value if isinstance(value, list) else []

    names = [str(name) for name in listed("class_names")]
    ids = [int(value) for value in listed("category_ids")]
    dynamic = parameters.get("dynamic_input", {}).get("string_value") == "true"
    return ModelInfo(int(config.get("max_batch_size", 0)), names, ids, dynamic)


def image_detections(outputs: dict[str, np.ndarray], item: int, info: ModelInfo) -> list[Detection]:
    """Detections of batch item ``item`` of one response's outputs (arrays keyed by ``OUTPUT_NAMES``)."""
    count = int(outputs["num_dets"][item].reshape(-1)[0])
    height, width = (int(v) for v in outputs["image_size"][item])
    detections = []
    for index in range(count):
        x1, y1, x2, y2 = (float(v) for v in outputs["boxes"][item][index])
        counts = outputs["masks_rle"][item][index]
        category_id, name = info.category(int(outputs["labels"][item][index]))
        detections.append(
            {
                "category_id": category_id,
                "label": name,
                "score": float(outputs["scores"][item][index]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "segmentation": {
                    "size": [height, width],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts),
                },
            }
        )
    return detections


def response_detections(outputs: dict[str, np.ndarray], info: ModelInfo) -> list[list[Detection]]:
    """Every batch item's detections."""
    missing = [name for name in OUTPUT_NAMES if name not in outputs]
    if missing:
        raise ValueError(f"the response lacks outputs {missing}")
    return [image_detections(outputs, item, info) for item in range(len(outputs["num_dets"]))]
