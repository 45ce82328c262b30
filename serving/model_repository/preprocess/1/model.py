"""Triton python model ``preprocess``: encoded image bytes -> the model's fixed-size uint8 input and each image's
geometry. The logic (guarded decoding, the test resize) is in ``serving.imaging``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.contract import GEOMETRY, INPUT
from serving.imaging import ImageError, InputPolicy, decode_image, prepare_image
from serving.python_models import Arrays, RequestError, input_array, parameter, respond_each, stack_outputs


class TritonPythonModel:
    """One request = a batch of encoded images; one bad image fails its request with a message naming it."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        height, width = (int(d) for d in pb_utils.get_output_config_by_name(config, "images")["dims"][1:])
        sizes = (int(parameter(config, "test_size")), int(parameter(config, "max_size")))
        modes = (parameter(config, "resize_filter"), parameter(config, "resize_rounding"))
        self.policy = InputPolicy(height, width, *sizes, *modes)

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(pb_utils, "preprocess", requests, self.handle)

    def handle(self, request: Any) -> Arrays:
        encoded = input_array(pb_utils, request, INPUT, np.object_, (1,))
        items = []
        for index, data in enumerate(encoded[:, 0]):
            where = f"image {index} of {len(encoded)}" if len(encoded) > 1 else "image"
            if not isinstance(data, bytes):
                raise RequestError(f"{where}: expected bytes, got {type(data).__name__}")
            try:
                images, geometry = prepare_image(decode_image(data), self.policy)
            except ImageError as error:
                raise RequestError(f"{where}: {error}") from None
            items.append({"images": images, GEOMETRY: geometry})
        return stack_outputs(items)
