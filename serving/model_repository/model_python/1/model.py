"""Triton python model ``model``: the exported ONNX graph (model.onnx beside this file) in ONNX Runtime on the CPU.

All valid requests the dynamic batcher hands over run as one ONNX Runtime call per input size (a dynamic model's
requests may differ in H x W); a malformed request fails alone. A model that takes image sizes (``image_sizes``,
``freesolo.padding`` normalized) gets them from preprocess; each must lie inside its canvas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from export.graph_contract import INPUT_NAME, SIZES_NAME
from export.onnx_inputs import check_image_sizes, run_session, session_options
from serving.python_models import RequestError, error_response, input_array, log_error, parameter, response
from training.errors import UserError
from training.geometry import SIZE_DIVISOR

Batch = tuple[int, np.ndarray, np.ndarray]  # request index, images [b, 3, H, W], image sizes [b, 2]


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"model: {path} not found (run `freesolo serve prepare` again)")
        options = session_options(int(parameter(config, "intra_op_thread_count")))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.item_shape = tuple(int(d) for d in pb_utils.get_input_config_by_name(config, INPUT_NAME)["dims"])
        self.max_side = int(parameter(config, "max_side"))
        self.takes_sizes = any(value["name"] == SIZES_NAME for value in config["input"])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        by_size: dict[tuple[int, ...], list[Batch]] = {}
        for index, request in enumerate(requests):
            try:
                images = input_array(pb_utils, request, INPUT_NAME, np.uint8, self.item_shape, self.max_side)
                if any(side % SIZE_DIVISOR for side in images.shape[2:]):
                    raise RequestError(f"input images are {list(images.shape)}: H and W must be multiples of 32")
                by_size.setdefault(images.shape[1:], []).append((index, images, self.image_sizes(request, images)))
            except RequestError as error:
                responses[index] = error_response(pb_utils, f"model: {error}")
        for batches in by_size.values():
            self.run(batches, responses)
        return responses

    def image_sizes(self, request: Any, images: np.ndarray) -> np.ndarray:
        """The request's image sizes [b, 2], each inside its canvas; the whole canvas for a model without them."""
        if not self.takes_sizes:
            return np.tile(np.array(images.shape[2:], np.int32), (len(images), 1))
        sizes = input_array(pb_utils, request, SIZES_NAME, np.int32, (2,))
        try:
            return check_image_sizes(sizes, images)
        except UserError as error:
            raise RequestError(str(error)) from None

    def run(self, batches: list[Batch], responses: list[Any]) -> None:
        """One ONNX Runtime call for requests of one input size; fills their responses."""
        try:
            images = np.concatenate([images for _, images, _ in batches])
            sizes = np.concatenate([sizes for _, _, sizes in batches])
            outputs = run_session(self.session, images, sizes)
            outputs["num_dets"] = outputs["num_dets"].reshape(-1, 1)  # [B] in the graph, [B, 1] in Triton
            start = 0
            for index, chunk, _ in batches:
                stop = start + len(chunk)
                responses[index] = response(pb_utils, {n: a[start:stop] for n, a in outputs.items()})
                start = stop
        except Exception as error:
            log_error(pb_utils, f"model: {type(error).__name__}: {error}")
            for index, _, _ in batches:
                responses[index] = error_response(pb_utils, f"model: ONNX Runtime failed ({error})", "INTERNAL")
