"""Presets and config round-trips: a checkpoint's config rebuilds the same model; typos are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import available_presets, config_from_dict, load_preset, save_config
from training.errors import UserError


def test_presets_exist_and_round_trip(tmp_path: Path) -> None:
    assert {"tiny", "r50", "r101"} <= set(available_presets())
    for name in available_presets():
        config = load_preset(name)
        assert config.preset == name
        save_config(config, tmp_path / f"{name}.yaml")
        assert config_from_dict(yaml.safe_load((tmp_path / f"{name}.yaml").read_text())) == config


def test_r50_preset_has_the_paper_settings() -> None:
    config = load_preset("r50")
    assert config.model.depth == 50 and config.model.grids == [40, 36, 24, 16, 12]
    assert config.model.strides == [8, 8, 16, 32, 32] and config.model.head_convs == 4
    assert config.solver.optimizer == "sgd" and config.solver.base_lr == 0.01 and config.solver.grad_clip == 35
    assert config.inference.nms_pre == 500 and config.inference.max_per_img == 100


def test_unknown_preset_and_unknown_keys_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        load_preset("huge")
    with pytest.raises(UserError, match=r"unknown config key 'model\.dept'"):
        config_from_dict({"model": {"dept": 18}})
    with pytest.raises(UserError, match="must be a mapping"):
        config_from_dict({"solver": 3})


def test_frozen_bn_option_freezes_backbone_norms() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    from training.models import SOLOv2

    config = load_preset("tiny")
    config.model.frozen_bn = True
    norms = [m for m in SOLOv2(config.model).backbone.body.modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
