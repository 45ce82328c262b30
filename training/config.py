"""One config system: nested dataclasses with defaults = the paper's SOLOv2, overridden by YAML presets.

A preset file (``training/presets/<name>.yaml``) lists only what differs from the defaults. The full config is
written into every run directory and every checkpoint, so a checkpoint always rebuilds its own model.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.errors import UserError
from training.fileio import atomic_write_text
from training.geometry import SIZE_DIVISOR
from training.ops.matrix_nms import DEFAULT_KERNEL, DEFAULT_SIGMA

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class ModelConfig:
    """SOLOv2 architecture (docs/algorithms.md, "SOLOv2")."""

    depth: int = 50
    frozen_bn: bool = False
    fpn_channels: int = 256
    head_channels: int = 512
    head_convs: int = 4
    mask_branch_channels: int = 128
    mask_channels: int = 256  # E: mask feature channels = dynamic 1x1 kernel size D
    num_classes: int = 80
    embedding_dim: int = 0  # > 0 adds FreeSOLO's embedding head (conv3x3 on the category tower)
    strides: list[int] = field(default_factory=lambda: [8, 8, 16, 32, 32])
    grids: list[int] = field(default_factory=lambda: [40, 36, 24, 16, 12])
    scale_ranges: list[list[float]] = field(
        default_factory=lambda: [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
    )
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    # Padding as mmdetection and detectron2 pad: zeros after normalisation (the mean colour) rather than black
    # pixels. It needs each image's size (``SOLOv2.forward(images, sizes)``, which prediction and evaluation pass; an
    # exported graph takes them as its ``image_sizes`` input). Imported upstream weights set it.
    pad_normalized: bool = False


@dataclass
class LossConfig:
    """Loss weights (docs/algorithms.md, "SOLOv2": Dice weight 3, focal alpha 0.25 gamma 2 weight 1, center
    sampling sigma 0.2)."""

    dice_weight: float = 3.0
    focal_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    center_sigma: float = 0.2


@dataclass
class InputConfig:
    """Resize policy: shorter side to one of ``train_sizes`` (test: ``test_size``), longer side at most ``max_size``;
    the batch is then padded to a multiple of ``size_divisor``. ``resize_filter`` and ``resize_rounding`` say how
    (``training.geometry``): this project's antialiased filter and round-half-even sizes, or an upstream
    pipeline's for imported weights."""

    train_sizes: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    test_size: int = 800
    max_size: int = 1333
    size_divisor: int = SIZE_DIVISOR
    hflip: bool = True
    resize_filter: str = "antialias"
    resize_rounding: str = "half_even"


@dataclass
class SolverConfig:
    """Schedule (docs/algorithms.md, "SOLOv2": SGD, lr 0.01 for 16 images, momentum 0.9, wd 1e-4, clip 35, warm-up 500).
    ``optimizer`` is "sgd" (the paper's) or "adamw" (weight decay on conv/linear weights only)."""

    optimizer: str = "sgd"
    batch_size: int = 16
    iters: int = 90000
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_factor: float = 0.01
    lr_steps: list[float] = field(default_factory=lambda: [0.667, 0.889])  # fractions of iters
    lr_gamma: float = 0.1
    grad_clip: float = 35.0
    checkpoint_period: int = 1000
    log_period: int = 20
    num_workers: int = 2


@dataclass
class InferenceConfig:
    """Post-processing (docs/algorithms.md, "SOLOv2 inference")."""

    score_thr: float = 0.1
    mask_thr: float = 0.5
    nms_pre: int = 500
    update_thr: float = 0.05
    max_per_img: int = 100
    nms_kernel: str = DEFAULT_KERNEL
    nms_sigma: float = DEFAULT_SIGMA
    # Upstream resizes each kept mask's probabilities to the image and thresholds there; the binary contract
    # thresholds at stride 4 first (binary masks), which moves boundaries by up to half a stride-4 cell. True makes
    # prediction resize the probabilities (imported upstream weights set it); the exported graph then returns them.
    resize_soft_masks: bool = False


@dataclass
class PretrainConfig:
    """DenseCL self-supervised pre-training of the backbone (docs/algorithms.md, "DenseCL"). ``dilate_res5``
    replaces the last stride with dilation (C5 at stride 16): the weights stay plain ResNet weights, but small images
    keep a usable C5 grid for the dense loss and for Free Mask."""

    crop_size: int = 224
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    dilate_res5: bool = False
    queue_size: int = 65536
    projection_dim: int = 128
    hidden_dim: int = 2048
    temperature: float = 0.2
    momentum: float = 0.999
    dense_weight: float = 0.5  # lambda: loss = (1 - lambda) * global + lambda * dense
    solver: SolverConfig = field(
        default_factory=lambda: SolverConfig(
            batch_size=256,
            iters=100000,
            base_lr=0.3,
            weight_decay=1e-4,
            warmup_iters=1000,
            lr_steps=[0.6, 0.8],
            grad_clip=0.0,
        )
    )


@dataclass
class FreeMaskConfig:
    """Free Mask coarse masks (docs/algorithms.md, "Free Mask")."""

    input_size: int = 800  # shorter side of the image fed to the backbone
    max_size: int = 1333
    dilate_res5: bool = False
    query_scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    mask_thr: float = 0.5  # tau
    nms_sigma: float = DEFAULT_SIGMA
    top_k: int = 20
    score_thr: float = 0.7  # on the decayed maskness
    max_box_fraction: float = 0.95  # drop masks whose box is wider than this share of the image
    min_area_fraction: float = 0.0  # drop masks smaller than this share of the image (not in the paper; 0 = off)
    drop_top_fraction: float = 0.2  # drop masks centred in the top share of the image (0 disables)
    embedding_dim: int = 128
    batch_size: int = 8
    # Not in the paper, off by default (see the tiny preset): mirror the image outwards by this many feature cells
    # before the backbone and crop them off after, so that zero padding does not make the border cells alike; and
    # subtract each image's mean feature before the cosine scores, so that the component all locations share does
    # not dominate them.
    border_cells: int = 0
    center_features: bool = False
    # Not in the paper, 0 (off) by default: the share of hand-made low-level features in what Free Mask compares.
    # Each feature cell also gets the mean and standard deviation of its pixels' CIE Lab colour; the learned and the
    # low-level cell features are each mean-centred and L2-normalised, then weighted so that the cosine score of two
    # cells is (1 - w) * learned cosine + w * low-level cosine. 1 reads colour statistics alone (the hand-made
    # baseline: no backbone is run), 0 res5 alone (the paper).
    low_level_weight: float = 0.0


@dataclass
class WeakConfig:
    """Self-supervised SOLO from coarse masks (docs/algorithms.md, "Self-supervised SOLO").

    ``mask_loss``: "weak" = alpha * L_avg + L_max + L_pairwise (projection Dice and BoxInst pairwise affinity);
    "dice" = full-mask Dice against the coarse masks (the paper's ablation). Zero weights switch terms off.
    ``solver`` is the schedule of weak-mode training; its ``batch_size`` counts images, and with ``strong_view``
    each image is trained as two views (a step sees 2 x batch_size views)."""

    mask_loss: str = "weak"
    max_weight: float = 1.0
    avg_weight: float = 0.1  # alpha
    pairwise_weight: float = 1.0
    pairwise_dilation: int = 2
    pairwise_color_thr: float = 0.3
    pairwise_warmup: int = 1000
    embedding_weight: float = 4.0  # beta
    embedding_dim: int = 128
    strong_view: bool = True
    copy_paste: bool = True
    selftrain_score_thr: float = 0.3
    selftrain_max_per_img: int = 20
    # Not in the paper: also keep the masks the teacher trained on that no pseudo-label covers (mask IoU < 0.5), so a
    # round refines its labels where the teacher is confident instead of dropping every object it is unsure of
    # (docs/freesolo_results.md: with the earlier tiny preset's teacher val AP 0.93 with them, 0.85 without; with the
    # current one AP ties over three seeds held out, and keeping them gives 0.5-1.9 more AR100).
    selftrain_keep_coarse: bool = True
    # A round's training steps; 0 keeps the teacher's own schedule. A round fine-tunes a trained teacher, so it may
    # be shorter than the schedule that trained the teacher from the backbone (the tiny preset: 1600 and 800).
    selftrain_iters: int = 0
    solver: SolverConfig = field(
        default_factory=lambda: SolverConfig(batch_size=16, iters=30000, base_lr=0.001, warmup_iters=1000, lr_steps=[])
    )


@dataclass
class Config:
    """Everything needed to rebuild a model and its training run."""

    preset: str = "r50"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    input: InputConfig = field(default_factory=InputConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    freemask: FreeMaskConfig = field(default_factory=FreeMaskConfig)
    weak: WeakConfig = field(default_factory=WeakConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _merge(instance: Any, updates: dict[str, Any], where: str) -> Any:
    """Return a copy of a dataclass with ``updates`` applied, rejecting unknown keys (typos must not pass silently)
    and values of the wrong type (a checkpoint or YAML file must not fail later, deep inside the model)."""
    if not isinstance(updates, dict):
        raise UserError(f"a config must be a mapping of keys to values, got {type(updates).__name__}")
    known = {f.name: f for f in dataclasses.fields(instance)}
    types = typing.get_type_hints(type(instance))
    changes = {}
    for key, value in updates.items():
        if key not in known:
            raise UserError(f"unknown config key '{where}{key}' (known: {', '.join(sorted(known))})")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key '{where}{key}' must be a mapping")
            value = _merge(current, value, f"{where}{key}.")
        elif not _has_type(value, types[key]):
            raise UserError(f"config key '{where}{key}' must be {_type_name(types[key])}, got {value!r}")
        changes[key] = value
    return dataclasses.replace(instance, **changes)


def _has_type(value: Any, expected: Any) -> bool:
    """Whether a value read from YAML or a checkpoint has a field's declared type: an int passes for a float, a
    bool passes for neither (YAML reads ``yes`` as true, which must not become 1)."""
    if typing.get_origin(expected) is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, list) and all(_has_type(element, item) for element in value)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    return str(expected) if typing.get_origin(expected) is list else f"of type {expected.__name__}"


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from its ``to_dict`` form (checkpoints, config.yaml)."""
    return _merge(Config(), data, "")


def load_preset(name: str) -> Config:
    """The default Config overridden by ``presets/<name>.yaml``."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown preset '{name}' (available: {', '.join(available_presets())})")
    data = yaml.safe_load(path.read_text()) or {}
    config = _merge(Config(), data, "")
    return dataclasses.replace(config, preset=name)


def apply_overrides(config: Config, assignments: list[str]) -> Config:
    """``["weak.avg_weight=0", "solver.iters=50"]`` -> a new Config; values are parsed as YAML scalars/lists."""
    for assignment in assignments:
        key, separator, text = assignment.partition("=")
        if not separator or not key:
            raise UserError(f"--set expects KEY=VALUE (e.g. weak.avg_weight=0), got '{assignment}'")
        update: dict[str, Any] = {}
        cursor = update
        *parents, leaf = key.strip().split(".")
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[leaf] = yaml.safe_load(text)
        config = _merge(config, update, "")
    return config


def save_config(config: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
