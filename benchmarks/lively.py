"""Random weights that detect things: what tests and the real-size benchmark export, compare and serve when no trained
model of a preset is at hand (speed does not depend on learned weights, but parity and served-equals-predicted checks
on empty outputs would prove nothing).

An untrained SOLOv2 scores every cell near the focal prior (about 0.01), below every threshold. Scaling the category
and kernel predictors' weights (x10, x5) gives confident, image-dependent scores and crisp masks, and a score threshold
of 0.3 leaves a few dozen detections per image on the tiny preset, fewer than K (``make_lively``, the tests' model).

At the paper's sizes that recipe alone does not transfer: with one class, r50 (seed 0) put 80-92 cells over the
threshold on three skimage photographs at 800 px (48-54 detections), r101 about 2300 (all K = 100 taken, so the top-K
cut among near-equal scores would decide what two runtimes return), and with r50's 80 classes every photograph filled
K. So ``lively_checkpoint`` makes a class-agnostic model (one class, "object", as FreeSOLO's) and then shifts its
category bias so that ``CANDIDATES`` cells of a given photograph score over the threshold: a few dozen detections
per photograph for any depth.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoint import save_checkpoint
from training.config import load_preset
from training.engine.trainer import new_metadata
from training.geometry import InputPolicy, prepare_image
from training.models import SOLOv2

CATE_SCALE = 10.0
KERNEL_SCALE = 5.0
SCORE_THR = 0.3
CANDIDATES = 60


def make_lively(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint payload (config, model, metadata) with its predictors sharpened and its score threshold raised
    (``payload`` itself is changed and returned)."""
    payload["model"]["head.cate_pred.weight"] *= CATE_SCALE
    payload["model"]["head.kernel_pred.weight"] *= KERNEL_SCALE
    payload["config"]["inference"]["score_thr"] = SCORE_THR
    return payload


def lively_checkpoint(preset: str, path: Path, photograph: np.ndarray, seed: int = 0) -> Path:
    """``path``: a class-agnostic model of ``preset`` with seeded random weights, made lively, its category bias set
    so that ``CANDIDATES`` cells of ``photograph`` (uint8 RGB, resized as the preset tests) score over the
    threshold."""
    config = load_preset(preset)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=1))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SOLOv2(config.model).eval()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    payload = make_lively({"config": config.to_dict(), "model": state, "metadata": new_metadata(["object"], [1])})
    model.load_state_dict(payload["model"])
    sizes = config.input
    policy = InputPolicy(0, 0, True, sizes.test_size, sizes.max_size, sizes.resize_filter, sizes.resize_rounding)
    with torch.inference_mode():
        output = model(torch.from_numpy(prepare_image(photograph, policy)[0][None]))
    logits = torch.cat([level.flatten() for level in output.cate_logits])
    first_out = float(logits.topk(CANDIDATES + 1).values[-1])  # the best cell that should stay under the threshold
    payload["model"]["head.cate_pred.bias"] += math.log(SCORE_THR / (1 - SCORE_THR)) - first_out
    save_checkpoint(path, payload)
    return path
