"""Images -> graph inputs of an exported model, and its outputs -> COCO results, with the input-size policy the model
records in its metadata (``freesolo.input_size``): so calibration, evaluation and parity feed an ONNX model exactly
what PyTorch sees (the project's test resize), and read its results with the same code as PyTorch's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export.graph_contract import INPUT_NAME, OUTPUT_NAMES, SIZE_DIVISOR, fit_within
from training.data.batching import pad_to
from training.data.images import list_images, read_rgb
from training.data.transforms import resize_image, resized_shape, to_tensor_image
from training.errors import UserError
from training.results import ImageGeometry, image_results


@dataclass(frozen=True)
class InputPolicy:
    """How an image becomes a graph input: the test resize (shorter side to ``test_size``, longer at most
    ``max_size``), fitted into ``height`` x ``width`` and padded to it (a dynamic graph: padded to multiples of 32)."""

    height: int
    width: int
    dynamic: bool
    test_size: int
    max_size: int
    resize_filter: str = "antialias"  # InputConfig.resize_filter and resize_rounding; absent from the metadata
    resize_rounding: str = "half_even"  # of older exports

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> InputPolicy:
        """The policy of an exported model (its ``freesolo.input_size`` metadata)."""
        if "freesolo.input_size" not in props:
            raise UserError("the ONNX model has no freesolo.input_size metadata (not exported by freesolo?)")
        size = json.loads(props["freesolo.input_size"])
        return cls(
            size["height"],
            size["width"],
            bool(size["dynamic"]),
            size["test_size"],
            size["max_size"],
            size.get("resize_filter", "antialias"),
            size.get("resize_rounding", "half_even"),
        )


def prepare_image(image: np.ndarray, policy: InputPolicy) -> tuple[torch.Tensor, ImageGeometry]:
    """[H, W, 3] uint8 RGB -> (uint8 [3, H', W'] graph input, geometry for mapping masks back to the image)."""
    height, width = image.shape[:2]
    size = resized_shape(height, width, policy.test_size, policy.max_size, policy.resize_rounding)
    if policy.dynamic:
        target = tuple(-(-side // SIZE_DIVISOR) * SIZE_DIVISOR for side in size)
    else:
        size, target = fit_within(*size, policy.height, policy.width), (policy.height, policy.width)
    resized = resize_image(to_tensor_image(image), size, policy.resize_filter)
    return pad_to(resized, target), ImageGeometry(height, width, *size)


def calibration_images(folder: Path, count: int, policy: InputPolicy) -> list[np.ndarray]:
    """``count`` images of a folder (spread evenly over its sorted files), each as a uint8 [1, 3, H, W] input."""
    if count < 1:
        raise UserError(f"the calibration image count must be at least 1, got {count}")
    files = list_images(Path(folder))
    picks = np.unique(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int))
    return [prepare_image(read_rgb(files[i]), policy)[0].numpy()[None] for i in picks]


class OnnxModel:
    """An exported model in an ONNX Runtime session, with its input policy and category ids."""

    def __init__(self, path: Path, options: ort.SessionOptions | None = None) -> None:
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        self.policy = InputPolicy.from_metadata(props)
        self.category_ids = [int(c) for c in json.loads(props["freesolo.category_ids"])]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [B, 3, H, W] -> the contract outputs by name."""
        return dict(zip(OUTPUT_NAMES, self.session.run(None, {INPUT_NAME: images}), strict=True))

    def results(self, images: Sequence[tuple[Any, Path]], batch_size: int = 8) -> list[dict[str, Any]]:
        """COCO results (at the original sizes) of ``(image_id, file)`` pairs, in one flat list."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            prepared = [prepare_image(read_rgb(file), self.policy) for _, file in chunk]
            if self.policy.dynamic:  # one input size per batch: pad to the largest
                size = (max(t.shape[1] for t, _ in prepared), max(t.shape[2] for t, _ in prepared))
                prepared = [(pad_to(t, size), g) for t, g in prepared]
            out = self.run(torch.stack([t for t, _ in prepared]).numpy())
            for i, ((image_id, _), (_, geometry)) in enumerate(zip(chunk, prepared, strict=True)):
                masks, scores, labels = out["masks"][i], out["scores"][i], out["labels"][i]
                num = int(out["num_dets"][i])
                results += image_results(num, scores, labels, masks, geometry, image_id, self.category_ids)
        return results
