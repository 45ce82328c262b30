"""Images -> graph inputs of an exported model, and its outputs -> COCO results, with the input-size policy the model
records in its metadata (``freesolo.input_size``): so calibration, evaluation and parity feed an ONNX model exactly
what PyTorch sees (the project's test resize), and read its results with the same code as PyTorch's. Every caller
passes each image's size inside its canvas; ``run_session`` feeds it to a graph that takes it (``image_sizes``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.graph_contract import INPUT_NAME, OUTPUT_NAMES, SIZES_NAME, variant
from training.data.images import list_images, read_rgb
from training.errors import UserError
from training.geometry import ImageGeometry, InputPolicy, prepare_image, same_canvas_batches
from training.results import image_results

Feeds = dict[str, np.ndarray]  # graph input name -> array


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


def image_sizes(geometries: Sequence[ImageGeometry]) -> np.ndarray:
    """int32 [B, 2]: each image's resized height and width, its size inside its canvas (the ``image_sizes`` input)."""
    return np.array([[g.resized_height, g.resized_width] for g in geometries], dtype=np.int32).reshape(-1, 2)


def calibration_images(folder: Path, count: int, policy: InputPolicy) -> list[Feeds]:
    """``count`` images of a folder (spread evenly over its sorted files), each as the feeds of one batch: uint8
    [1, 3, H, W] ``images`` and int32 [1, 2] ``image_sizes``."""
    if count < 1:
        raise UserError(f"the calibration image count must be at least 1, got {count}")
    files = list_images(Path(folder))
    picks = np.unique(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int))
    prepared = [prepare_image(read_rgb(files[i]), policy) for i in picks]
    return [{INPUT_NAME: inputs[None], SIZES_NAME: image_sizes([geometry])} for inputs, geometry in prepared]


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


def check_image_sizes(sizes: np.ndarray, images: np.ndarray) -> np.ndarray:
    """``sizes`` as the int32 [B, 2] ``image_sizes`` input of ``images`` [B, 3, H, W], or one UserError line: each
    image's height and width must lie inside the canvas (1 to H, 1 to W)."""
    sizes = np.asarray(sizes)
    if sizes.shape != (len(images), 2) or not np.issubdtype(sizes.dtype, np.integer):
        raise UserError(f"{SIZES_NAME} must be integers [{len(images)}, 2], got {sizes.dtype} {list(sizes.shape)}")
    canvas = np.array(images.shape[2:])
    if (sizes < 1).any() or (sizes > canvas).any():
        raise UserError(f"{SIZES_NAME} {sizes.tolist()} do not lie inside the {canvas[0]} x {canvas[1]} canvas")
    return np.ascontiguousarray(sizes, dtype=np.int32)


def graph_feeds(session: ort.InferenceSession, images: np.ndarray, sizes: np.ndarray) -> Feeds:
    """The feeds of uint8 ``images`` [B, 3, H, W] whose images fill ``sizes`` [B, 2] of their canvas: the sizes are
    checked and fed only to a graph that takes them (``freesolo.padding`` normalized)."""
    feeds = {INPUT_NAME: images}
    if any(value.name == SIZES_NAME for value in session.get_inputs()):
        feeds[SIZES_NAME] = check_image_sizes(sizes, images)
    return feeds


def run_session(session: ort.InferenceSession, images: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """The contract outputs by name (``graph_feeds`` says what goes in)."""
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), graph_feeds(session, images, sizes)), strict=True))


def check_inputs(session: ort.InferenceSession, inputs: tuple[str, ...], where: Path) -> None:
    """One UserError line unless the graph's inputs are the ones its metadata's variant declares."""
    found = [value.name for value in session.get_inputs()]
    if found != list(inputs):
        raise UserError(f"{where}: the graph's inputs {found} are not the {list(inputs)} its metadata declares")


class OnnxModel:
    """An exported model in an ONNX Runtime session, with its input policy, variant and category ids."""

    def __init__(self, path: Path, options: ort.SessionOptions | None = None) -> None:
        self.session = ort.InferenceSession(str(path), options or session_options(), providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        self.policy = InputPolicy.from_metadata(props)
        self.variant = variant(props, str(path))
        check_inputs(self.session, self.variant.inputs, path)
        self.category_ids = [int(c) for c in json.loads(props["freesolo.category_ids"])]

    def run(self, images: np.ndarray, sizes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """uint8 [B, 3, H, W] whose images fill ``sizes`` [B, 2] of the canvas (None: all of it) -> the contract
        outputs by name."""
        check_images(images, self.policy)
        if sizes is None:
            sizes = np.tile(np.array(images.shape[2:], np.int32), (len(images), 1))
        return run_session(self.session, images, sizes)

    def results(self, images: Sequence[tuple[Any, Path]], batch_size: int = 8) -> list[dict[str, Any]]:
        """COCO results (at the original sizes) of ``(image_id, file)`` pairs, in one flat list; a batch holds
        images of one canvas only (``training.geometry``)."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            items = [(image_id, *prepare_image(read_rgb(file), self.policy)) for image_id, file in chunk]
            for batch in same_canvas_batches(items, lambda item: item[1].shape[1:], batch_size):
                sizes = image_sizes([geometry for _, _, geometry in batch])
                out = self.run(np.stack([inputs for _, inputs, _ in batch]), sizes)
                for row, (image_id, _, geometry) in enumerate(batch):
                    masks, scores, labels = out["masks"][row], out["scores"][row], out["labels"][row]
                    num = int(out["num_dets"][row])
                    results += image_results(num, scores, labels, masks, geometry, image_id, self.category_ids)
        return results
