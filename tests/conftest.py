"""Shared fixtures: a small synthetic COCO set and a randomly initialised tiny checkpoint (no training needed
to exercise the plumbing; tests that need learning train for themselves)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from training.checkpoint import save_checkpoint
from training.config import load_preset
from training.data.synth import CATEGORIES, write_synthetic_dataset
from training.engine.trainer import new_metadata
from training.models import SOLOv2


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train and 4 val images at 128 px."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, num_train=8, num_val=4, size=128, seed=3, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt of an untrained tiny SOLOv2 for the synthetic categories."""
    torch.manual_seed(0)
    config = load_preset("tiny")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=len(CATEGORIES)))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(
        path,
        {
            "config": config.to_dict(),
            "model": SOLOv2(config.model).state_dict(),
            "metadata": new_metadata(CATEGORIES, list(range(1, len(CATEGORIES) + 1))),
        },
    )
    return path
