"""Which published layout a file holds, and the conversion of each: full SOLOv2 models become an ImportedModel,
backbone-only files (DenseCL's torchvision-keyed ``.pth``, detectron2 ``.pkl``) a torchvision ResNet state dict."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from training.backbone_io import BATCH_COUNTER, CLASSIFIER_PREFIX, check_resnet, infer_depth, torchvision_name
from training.checkpoint import read_torch_file
from training.errors import UserError
from training.importers.architecture import Widths, imported_config
from training.importers.core import ImportedModel, map_weights, reject_unsupported, shown, tensor_state
from training.importers.freesolo import COUNTERS, FREESOLO_NAMES, freesolo_widths
from training.importers.mmdet import MMDET3_NAMES, SOLO_NAMES, mmdet_class_names, mmdet_widths, solo_widths
from training.importers.solov2_layout import SourceNames, solov2_rules
from training.safe_pickle import load_plain_pickle

MODEL_FORMATS = ("mmdet", "solo", "freesolo")
BACKBONE_FORMATS = ("densecl", "detectron2")
FORMATS = ("auto", *MODEL_FORMATS, *BACKBONE_FORMATS)


@dataclass(frozen=True)
class ModelLayout:
    """A full-model layout: where its state dict sits, a key only it has, its names and how to read its widths."""

    container: str
    marker: str
    names: SourceNames
    widths: Callable[[Mapping[str, Tensor], str], Widths]
    description: str
    resize_filter: str  # how upstream's test pipeline resizes (InputConfig.resize_filter)


# mmcv resizes with OpenCV (cv2.resize, bilinear); detectron2 resizes uint8 images with Pillow's bilinear filter.
LAYOUTS = {
    "mmdet": ModelLayout(
        "state_dict", "mask_head.mask_feature_head.", MMDET3_NAMES, mmdet_widths, "mmdetection 3.x", "opencv"
    ),
    "solo": ModelLayout(
        "state_dict", "mask_feat_head.", SOLO_NAMES, solo_widths, "WXinlong/SOLO (mmdetection 1.x)", "opencv"
    ),
    "freesolo": ModelLayout(
        "model", "ins_head.", FREESOLO_NAMES, freesolo_widths, "NVlabs/FreeSOLO (detectron2)", "pil"
    ),
}


def read_source(path: Path) -> Any:
    """A ``.pkl`` through the restricted unpickler (detectron2 weights are pickles); anything else with
    ``torch.load(weights_only=True)``."""
    if Path(path).suffix == ".pkl":
        return load_plain_pickle(path, "weights file")
    return read_torch_file(path, "weights file")


def detect_format(payload: Any, source: str) -> str:
    """The layout from the file's keys alone."""
    for name, layout in LAYOUTS.items():
        state = payload.get(layout.container) if isinstance(payload, Mapping) else None
        if isinstance(state, Mapping) and any(str(key).startswith(layout.marker) for key in state):
            return name
    state = _weights_of(payload)
    if state is not None and "stem.conv1.weight" in state:
        return "detectron2"
    if state is not None and "conv1.weight" in state:
        return "densecl"
    raise UserError(
        f"{source}: not a recognised weights file (no mmdetection SOLOv2 'state_dict', FreeSOLO 'model', "
        "torchvision ResNet or detectron2 ResNet keys); name the layout with --format"
    )


def _weights_of(payload: Any) -> Mapping[str, Any] | None:
    """The state dict of a backbone file: the payload itself, or its ``state_dict`` / ``model`` entry."""
    if not isinstance(payload, Mapping):
        return None
    for container in ("state_dict", "model"):
        if isinstance(payload.get(container), Mapping):
            return payload[container]
    return payload


def import_model(
    payload: Any, fmt: str, source: str, test_size: int | None = None, max_size: int | None = None
) -> ImportedModel:
    """A full SOLOv2 from an mmdetection, SOLO or FreeSOLO checkpoint: architecture read from its tensors, every
    tensor mapped and checked."""
    layout = LAYOUTS[fmt]
    state = payload.get(layout.container) if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not any(str(key).startswith(layout.marker) for key in state):
        expected = f"'{layout.container}' with {layout.marker}* tensors"
        raise UserError(f"{source}: not a {layout.description} checkpoint (expected {expected})")
    state = tensor_state(state, source)
    reject_unsupported(state, source)
    config, family = imported_config(layout.widths(state, source), source, layout.resize_filter, test_size, max_size)
    weights = map_weights(
        state,
        config,
        solov2_rules(layout.names),
        source,
        consumed=lambda key: key.endswith(BATCH_COUNTER) or key in COUNTERS,
    )
    meta = payload.get("meta") if isinstance(payload, Mapping) else None
    return ImportedModel(config, weights, mmdet_class_names(meta), f"{layout.description} {family}")


def import_backbone(payload: Any, fmt: str, source: str) -> tuple[dict[str, Tensor], int]:
    """A torchvision ResNet state dict (no ``fc``) and its depth from a DenseCL ``.pth`` (torchvision names) or a
    detectron2 ``.pkl`` (detectron2 names); checked complete like every backbone this project reads."""
    weights = _weights_of(payload)
    if weights is None:
        raise UserError(f"{source}: no state dict found")
    state = tensor_state(weights, source)
    reject_unsupported(state, source)
    if fmt == "detectron2":
        renamed = {key: torchvision_name(key) for key in state}
        foreign = [key for key, name in renamed.items() if name is None]
        if foreign:
            raise UserError(f"{source}: not detectron2 ResNet names: {shown(foreign)}")
        state = {renamed[key]: value for key, value in state.items()}
    state = {key: value for key, value in state.items() if not key.startswith(CLASSIFIER_PREFIX)}
    if "conv1.weight" not in state:
        raise UserError(f"{source}: no ResNet backbone ('conv1.weight' missing)")
    depth = infer_depth(state, source)
    check_resnet(state, depth, source)
    return state, depth
