"""Triton python model ``postprocess``: the model's padded-input detections -> compact detections at each image's
original size (COCO RLE masks and their boxes in original pixels). The logic is in ``serving.detections``; only
geometries preprocess produced are accepted (``serving.step_guard``), checked before anything is allocated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.contract import GEOMETRY, GEOMETRY_TAG
from serving.detections import OutputError, image_outputs
from serving.python_models import (
    Arrays,
    RequestError,
    input_array,
    input_policy,
    parameter,
    respond_each,
    stack_outputs,
)
from serving.step_guard import TAG_BYTES, GeometryError, check_geometry, read_key
from training.geometry import MASK_STRIDE


class TritonPythonModel:
    """Per request: check the batch is consistent, then one image at a time (mask upsampling dominates)."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        masks = pb_utils.get_input_config_by_name(config, "raw_masks")["dims"]
        self.k, self.mask_size = int(masks[0]), tuple(int(d) for d in masks[1:])  # -1: a dynamic model's
        # binary uint8 or float32 probabilities (freesolo.masks); masks_to_original thresholds either after resizing
        data_type = pb_utils.get_input_config_by_name(config, "raw_masks")["data_type"]
        self.mask_dtype = pb_utils.triton_string_to_numpy(data_type)
        self.max_mask_side = int(parameter(config, "max_side")) // MASK_STRIDE
        height, width = (size * MASK_STRIDE if size != -1 else -1 for size in self.mask_size)
        self.policy = input_policy(config, height, width)
        self.key = read_key(Path(args["model_repository"]))

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(pb_utils, "postprocess", requests, self.handle)

    def handle(self, request: Any) -> Arrays:
        k = self.k
        num_dets = input_array(pb_utils, request, "raw_num_dets", np.int32, (1,))
        scores = input_array(pb_utils, request, "raw_scores", np.float32, (k,))
        labels = input_array(pb_utils, request, "raw_labels", np.int32, (k,))
        masks = input_array(pb_utils, request, "raw_masks", self.mask_dtype, (k, *self.mask_size), self.max_mask_side)
        geometry = input_array(pb_utils, request, GEOMETRY, np.int32, (4,))
        tags = input_array(pb_utils, request, GEOMETRY_TAG, np.uint8, (TAG_BYTES,))
        batch = {len(a) for a in (num_dets, scores, labels, masks, geometry, tags)}
        if len(batch) != 1:
            raise RequestError(f"inputs have different batch sizes {sorted(batch)}")
        try:
            for index in range(len(geometry)):
                check_geometry(geometry[index], tags[index], self.policy, self.key)
        except GeometryError as error:
            raise RequestError(f"image {index}: {error}") from None
        try:
            items = [
                image_outputs(int(num_dets[i, 0]), scores[i], labels[i], masks[i], geometry[i])
                for i in range(len(num_dets))
            ]
        except OutputError as error:
            raise RequestError(str(error)) from None
        return stack_outputs(items)
