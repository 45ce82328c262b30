"""Shared fixtures: a small synthetic COCO set and a randomly initialised tiny checkpoint (no training needed
to exercise the plumbing; tests that need learning train for themselves)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
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


@pytest.fixture
def freesolo_under_torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """Runs ``freesolo ARGS...`` as 2 gloo processes (one thread each) under torchrun; fails the test on a non-zero
    exit, showing the end of stderr."""

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        done = subprocess.run(
            [*command, "-m", "training.cli", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    return run
