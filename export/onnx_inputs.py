"""Images -> graph inputs of an exported model, and its outputs -> COCO results, with the input-size policy the model
records in its metadata (``freesolo.input_size``): so calibration, evaluation and parity feed an ONNX model exactly
what PyTorch sees (the project's test resize), and read its results with the same code as PyTorch's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.graph_contract import INPUT_NAME, OUTPUT_NAMES
from training.data.images import list_images, read_rgb
from training.errors import UserError
from training.geometry import InputPolicy, prepare_image, same_canvas_batches
from training.results import image_results


def session_options(threads: int = 0) -> ort.SessionOptions:
    """The ONNX Runtime options of every runtime here (serving, parity, evaluation, benchmarks): extended graph
    optimisations, ``threads`` intra-op threads (0: one per core). Not ORT_ENABLE_ALL: its NCHWc layout transforms
    reorder convolution sums enough to flip a stride-4 mask cell sitting at the 0.5 threshold (measured: a served
    detection at score 0.3622 where PyTorch gives 0.3600, mask IoU 0.987; EXTENDED gives PyTorch's 0.3600) and were
    no faster here (0.30 s vs 0.31 s for a batch of five 128 x 160 inputs, one thread)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.intra_op_num_threads = threads
    return options


def calibration_images(folder: Path, count: int, policy: InputPolicy) -> list[np.ndarray]:
    """``count`` images of a folder (spread evenly over its sorted files), each as a uint8 [1, 3, H, W] input."""
    if count < 1:
        raise UserError(f"the calibration image count must be at least 1, got {count}")
    files = list_images(Path(folder))
    picks = np.unique(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int))
    return [prepare_image(read_rgb(files[i]), policy)[0][None] for i in picks]


def check_images(images: np.ndarray, policy: InputPolicy) -> None:
    """One clear error line for an input the graph cannot take (ONNX Runtime's own is a multi-line traceback): the
    contract's uint8 [B, 3, H, W], at its fixed H x W for a fixed-size graph; a dynamic graph takes any H x W."""
    size_ok = policy.dynamic or images.shape[2:] == (policy.height, policy.width)
    if images.dtype == np.uint8 and images.ndim == 4 and images.shape[1] == 3 and size_ok:
        return
    if policy.dynamic:
        raise UserError(f"the model takes uint8 images [B, 3, H, W], got {images.dtype} {list(images.shape)}")
    raise UserError(
        f"the model was exported at a fixed {policy.height} x {policy.width}: it takes uint8 images "
        f"[B, 3, {policy.height}, {policy.width}], got {images.dtype} {list(images.shape)} (fit and pad images with "
        "training.geometry.prepare_image, or export with --dynamic for any size)"
    )


class OnnxModel:
    """An exported model in an ONNX Runtime session, with its input policy and category ids."""

    def __init__(self, path: Path, options: ort.SessionOptions | None = None) -> None:
        self.session = ort.InferenceSession(str(path), options or session_options(), providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        self.policy = InputPolicy.from_metadata(props)
        self.category_ids = [int(c) for c in json.loads(props["freesolo.category_ids"])]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [B, 3, H, W] -> the contract outputs by name."""
        check_images(images, self.policy)
        return dict(zip(OUTPUT_NAMES, self.session.run(None, {INPUT_NAME: images}), strict=True))

    def results(self, images: Sequence[tuple[Any, Path]], batch_size: int = 8) -> list[dict[str, Any]]:
        """COCO results (at the original sizes) of ``(image_id, file)`` pairs, in one flat list; a batch holds
        images of one canvas only (``training.geometry``)."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            items = [(image_id, *prepare_image(read_rgb(file), self.policy)) for image_id, file in chunk]
            for batch in same_canvas_batches(items, lambda item: item[1].shape[1:], batch_size):
                out = self.run(np.stack([inputs for _, inputs, _ in batch]))
                for row, (image_id, _, geometry) in enumerate(batch):
                    masks, scores, labels = out["masks"][row], out["scores"][row], out["labels"][row]
                    num = int(out["num_dets"][row])
                    results += image_results(num, scores, labels, masks, geometry, image_id, self.category_ids)
        return results
