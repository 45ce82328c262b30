"""Triton python model ``preprocess``: encoded image bytes -> the model's uint8 input, each image's size inside its
canvas (``image_sizes``, for a model that takes them) and each image's geometry, tagged for postprocess
(``serving.step_guard``). Decoding is ``serving.imaging``'s (guarded); the resize and padding
are ``training.geometry``'s, as everywhere.

A fixed-size model gets every image on its H x W canvas. A dynamic one (dims -1) gets each image on its own canvas
(multiples of 32), like ``freesolo predict``; the images of one request must share one input tensor, so they are
padded to the largest canvas among them (which changes their detections: the client library sends one image per
request to a dynamic model)."""

from __future__ import annotations

import json
from dataclasses import astuple
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from export.graph_contract import SIZES_NAME
from serving.contract import GEOMETRY, GEOMETRY_TAG, INPUT
from serving.imaging import ImageError, decode_image
from serving.python_models import Arrays, RequestError, input_array, input_policy, respond_each
from serving.step_guard import geometry_tag, read_key
from training.geometry import pad_array, padded_shape, prepare_image


class TritonPythonModel:
    """One request = a batch of encoded images; one bad image fails its request with a message naming it."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        height, width = (int(d) for d in pb_utils.get_output_config_by_name(config, "images")["dims"][1:])
        self.policy = input_policy(config, height, width)
        self.key = read_key(Path(args["model_repository"]))

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(pb_utils, "preprocess", requests, self.handle)

    def handle(self, request: Any) -> Arrays:
        encoded = input_array(pb_utils, request, INPUT, np.object_, (1,))
        inputs, geometries = [], []
        for index, data in enumerate(encoded[:, 0]):
            where = f"image {index} of {len(encoded)}" if len(encoded) > 1 else "image"
            if not isinstance(data, bytes):
                raise RequestError(f"{where}: expected bytes, got {type(data).__name__}")
            try:
                image, geometry = prepare_image(decode_image(data), self.policy)
            except ImageError as error:
                raise RequestError(f"{where}: {error}") from None
            inputs.append(image)
            geometries.append(astuple(geometry))
        canvas = padded_shape([image.shape[1:] for image in inputs], divisor=1)  # the one canvas of a fixed model
        geometry_array = np.array(geometries, dtype=np.int32)
        return {
            "images": np.stack([pad_array(image, canvas) for image in inputs]),
            GEOMETRY: geometry_array,
            GEOMETRY_TAG: np.stack([geometry_tag(self.key, row) for row in geometry_array]),
            SIZES_NAME: np.ascontiguousarray(geometry_array[:, 2:]),  # resized h, w: inside the canvas
        }
