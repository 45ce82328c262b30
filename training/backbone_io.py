"""The learned ResNet backbone as a product: read it out of any FreeSOLO checkpoint under torchvision's names,
rename it for detectron2, or rebuild it as a torchvision ResNet (Free Mask's feature extractor).

Accepted inputs (published DenseCL backbones use torchvision ResNet keys, so this one does too):
- a SOLOv2 checkpoint (``freesolo train``): the backbone is ``backbone.body.*``;
- a DenseCL checkpoint (``freesolo pretrain``, ``metadata["kind"] == "densecl"``): the query encoder
  ``encoder_q.backbone.*``; the momentum encoder ``encoder_k.*`` is a lagging copy and is never exported;
- a plain torchvision ResNet state dict (``conv1.weight``, ``layer1.0...``, optionally ``fc.*``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from training.checkpoint import read_torch_file
from training.errors import UserError
from training.models.backbone import RESNETS, build_resnet

SOLO_PREFIX = "backbone.body."
DENSECL_PREFIX = "encoder_q.backbone."
CLASSIFIER_PREFIX = "fc."  # the ImageNet classifier: not part of the backbone, never exported
BATCH_COUNTER = "num_batches_tracked"  # BatchNorm bookkeeping, not a weight; optional everywhere

# (residual blocks in layer1..layer4, bottleneck blocks) -> depth, for every depth RESNETS builds.
DEPTH_BY_LAYOUT = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
}


def backbone_state_dict(path: Path) -> tuple[dict[str, Tensor], int]:
    """The backbone weights under torchvision names (no ``fc.*``) and the ResNet depth, from any accepted input.

    The weights are checked against a ResNet of that depth, so ``resnetN().load_state_dict(state, strict=False)``
    misses only ``fc.*``; every problem is one UserError naming the file."""
    path = Path(path)
    state, declared_depth = _extract_backbone(read_torch_file(path, "checkpoint"), path)
    depth = infer_depth(state, str(path))
    if declared_depth is not None and declared_depth != depth:
        raise UserError(f"{path}: its config says ResNet-{declared_depth} but its backbone weights are ResNet-{depth}")
    check_resnet(state, depth, str(path))
    return state, depth


def _extract_backbone(payload: Any, path: Path) -> tuple[dict[str, Tensor], int | None]:
    """Strip the checkpoint's prefix; also return the depth its config declares (None for a plain state dict)."""
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict) and "config" in payload:
        metadata = payload.get("metadata") or {}
        prefix = DENSECL_PREFIX if metadata.get("kind") == "densecl" else SOLO_PREFIX
        state = {
            key.removeprefix(prefix): value
            for key, value in payload["model"].items()
            if key.startswith(prefix) and isinstance(value, Tensor)
        }
        _require_resnet_keys(state, path, f"no '{prefix}*' ResNet weights")
        config = payload["config"]
        model_config = config.get("model") if isinstance(config, dict) else None
        return state, model_config.get("depth") if isinstance(model_config, dict) else None
    if isinstance(payload, dict) and all(isinstance(value, Tensor) for value in payload.values()):
        state = {key: value for key, value in payload.items() if not str(key).startswith(CLASSIFIER_PREFIX)}
        _require_resnet_keys(state, path, "neither a FreeSOLO checkpoint nor torchvision ResNet keys")
        return state, None
    raise UserError(f"no ResNet backbone in {path}: neither a FreeSOLO checkpoint nor a state dict of tensors")


def _require_resnet_keys(state: dict[str, Tensor], path: Path, reason: str) -> None:
    if "conv1.weight" not in state or "layer1.0.conv1.weight" not in state:
        raise UserError(f"no ResNet backbone in {path}: {reason}")


def infer_depth(state: dict[str, Tensor], source: str) -> int:
    """The depth from the key layout alone: blocks per stage, and whether blocks are bottlenecks (have conv3)."""
    blocks = tuple(len({key.split(".")[1] for key in state if key.startswith(f"layer{n}.")}) for n in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    depth = DEPTH_BY_LAYOUT.get((blocks, bottleneck))
    if depth is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise UserError(
            f"{source}: unsupported ResNet layout ({kind} blocks {list(blocks)} in layer1..layer4); "
            f"supported depths are {sorted(RESNETS)}"
        )
    return depth


def check_resnet(state: dict[str, Tensor], depth: int, source: str) -> None:
    """Every backbone tensor of a torchvision ResNet-``depth`` is present with its shape, and nothing else
    (``fc.*`` and ``num_batches_tracked`` may be present or not)."""
    with torch.device("meta"):  # shapes only: no memory, no random init cost
        expected = {key: tuple(value.shape) for key, value in build_resnet(depth).state_dict().items()}
    missing = [key for key in expected if key not in state and _is_weight(key)]
    unexpected = [key for key in state if key not in expected and not key.startswith(CLASSIFIER_PREFIX)]
    reshaped = [key for key in state if key in expected and tuple(state[key].shape) != expected[key]]
    for problem, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape for", reshaped)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise UserError(f"{source}: not a complete ResNet-{depth} backbone ({problem} {shown})")


def _is_weight(key: str) -> bool:
    return not key.startswith(CLASSIFIER_PREFIX) and not key.endswith(BATCH_COUNTER)


def to_detectron2(state: dict[str, Tensor], depth: int) -> dict[str, np.ndarray]:
    """detectron2's ResNet names with float32 numpy values (its pickle convention); drops ``fc.*`` and the
    BatchNorm batch counters, which detectron2's ResNet does not have."""
    check_resnet(state, depth, "backbone state dict")
    return {
        detectron2_name(key): value.detach().cpu().to(torch.float32).numpy()
        for key, value in state.items()
        if _is_weight(key)
    }


def detectron2_name(key: str) -> str:
    """``conv1``/``bn1`` -> ``stem.conv1[.norm]``; ``layerN.i.convK``/``bnK`` -> ``res{N+1}.i.convK[.norm]``;
    ``downsample.0``/``downsample.1`` -> ``shortcut[.norm]``."""
    parts = key.split(".")
    if parts[0] == "conv1":
        return f"stem.conv1.{parts[1]}"
    if parts[0] == "bn1":
        return f"stem.conv1.norm.{parts[1]}"
    block = f"res{int(parts[0].removeprefix('layer')) + 1}.{parts[1]}"
    module, rest = parts[2], parts[3:]
    if module.startswith("conv"):
        return f"{block}.{module}.{rest[0]}"
    if module.startswith("bn"):
        return f"{block}.conv{module.removeprefix('bn')}.norm.{rest[0]}"
    if module == "downsample":
        return f"{block}.shortcut.{rest[1]}" if rest[0] == "0" else f"{block}.shortcut.norm.{rest[1]}"
    raise ValueError(f"not a torchvision ResNet backbone key: {key}")


DETECTRON2_BLOCK = re.compile(r"res(\d)\.(\d+)\.(conv\d|shortcut)\.(norm\.)?(\w+)")
DETECTRON2_STEM = re.compile(r"stem\.conv1\.(norm\.)?(\w+)")


def torchvision_name(key: str) -> str | None:
    """The inverse of ``detectron2_name``; None for a key that is not a detectron2 ResNet tensor name."""
    if match := DETECTRON2_STEM.fullmatch(key):
        return f"{'bn1' if match[1] else 'conv1'}.{match[2]}"
    match = DETECTRON2_BLOCK.fullmatch(key)
    if match is None:
        return None
    stage, block, module, norm, part = match.groups()
    prefix = f"layer{int(stage) - 1}.{block}"
    if module == "shortcut":
        return f"{prefix}.downsample.{1 if norm else 0}.{part}"
    return f"{prefix}.{'bn' + module.removeprefix('conv') if norm else module}.{part}"


def load_backbone(path: Path, dilate_res5: bool = False) -> tuple[nn.Module, int]:
    """A torchvision ResNet holding the checkpoint's backbone, in eval mode, and its depth.

    ``fc`` is an Identity (no random classifier is left behind), so ``model(x)`` gives pooled C5 features;
    ``dilate_res5`` trades res5's stride for dilation (C5 at stride 16), as ``dilate_last_stage`` describes."""
    state, depth = backbone_state_dict(path)
    model = build_resnet(depth)
    model.fc = nn.Identity()
    if dilate_res5:
        dilate_last_stage(model)
    model.load_state_dict(state)
    return model.eval(), depth


def dilate_last_stage(resnet: nn.Module) -> nn.Module:
    """In place: layer4 keeps stride 16 instead of 32; the 3x3 convs after the one that lost its stride get
    dilation 2. For bottleneck ResNets this is torchvision's ``replace_stride_with_dilation=[False, False, True]``;
    torchvision refuses it for basic blocks (ResNet-18/34), which the tiny preset's DenseCL/Free Mask need."""
    strided_seen = False
    for block in resnet.layer4:
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        for conv in (module for module in block.children() if isinstance(module, nn.Conv2d)):
            if conv.kernel_size != (3, 3):
                continue
            if conv.stride == (2, 2):
                conv.stride, strided_seen = (1, 1), True
            elif strided_seen:
                conv.dilation, conv.padding = (2, 2), (2, 2)
    return resnet
