"""Shared fixtures: a small synthetic COCO set and a randomly initialised tiny checkpoint (no training needed
to exercise the plumbing; tests that need learning train for themselves), its ONNX exports, and tritonservers
started on free loopback ports (one shared by the client and robustness tests)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from benchmarks.lively import make_lively
from serving.launcher import ServerState, loopback_ports, read_state
from training.checkpoint import load_checkpoint, save_checkpoint
from training.cli import main
from training.config import load_preset
from training.data.images import read_rgb
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


@pytest.fixture(scope="session")
def lively_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint, sharpened for export and parity tests (``benchmarks.lively``): an untrained model scores
    every cell near the focal prior, so a parity test on it would compare empty outputs; sharpened, it gives a few
    dozen detections per image, fewer than K."""
    path = tmp_path_factory.mktemp("lively") / "model.pt"
    save_checkpoint(path, make_lively(load_checkpoint(tiny_checkpoint)))
    return path


@pytest.fixture(scope="session")
def dynamic_onnx(lively_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lively_checkpoint`` exported with dynamic H and W (an export takes 25-50 s here: once per session)."""
    out = tmp_path_factory.mktemp("onnx") / "dynamic.onnx"
    assert main(["export", "onnx", "--checkpoint", str(lively_checkpoint), "--out", str(out), "--dynamic"]) == 0
    return out


@pytest.fixture(scope="session")
def fixed_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained checkpoint at the preset's default size (128 x 128), without the optimizer."""
    out = tmp_path_factory.mktemp("onnx") / "fixed.onnx"
    assert main(["export", "onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--no-simplify"]) == 0
    return out


@pytest.fixture(scope="session")
def pictures(synth_data: Path) -> list[np.ndarray]:
    """Four synthetic val scenes (128 px) and three photographs (512 x 512, 400 x 600, 300 x 451)."""
    synthetic = [read_rgb(p) for p in sorted((synth_data / "val").iterdir())]
    return [*synthetic, skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]


@pytest.fixture(scope="session")
def free_ports() -> Callable[[int], list[int]]:
    """``free_ports(n)``: n free loopback ports."""
    return loopback_ports


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The launcher's backend folder goes to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("cache")
        patch.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def start_triton(cache_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerState]]:
    """``start_triton(model.onnx, *prepare_options)``: `serve prepare` (python backend, max batch 8, one ORT thread)
    and `serve start`
    on free loopback ports; returns the server's state (pid, ports; the repository is the folder of its log). Every
    server still running is stopped at the end of the session."""
    repos: list[Path] = []

    def start(onnx_path: Path, *prepare_options: str) -> ServerState:
        repo = tmp_path_factory.mktemp("serve") / "repo"
        prepare = ["serve", "prepare", "--onnx", str(onnx_path), "--repo", str(repo), "--max-batch", "8"]
        assert main([*prepare, "--threads", "1", *prepare_options]) == 0
        ports = loopback_ports(3)
        named = ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
        assert main(["serve", "start", "--repo", str(repo), *named, "--timeout", "180"]) == 0
        repos.append(repo)
        state = read_state(repo)
        assert state is not None
        return state

    yield start
    for repo in repos:
        main(["serve", "stop", "--repo", str(repo)])


@pytest.fixture(scope="session")
def shared_server(start_triton: Callable[..., ServerState], dynamic_onnx: Path) -> ServerState:
    """One server of ``dynamic_onnx`` served at a fixed 128 x 128 (batches of images share one input tensor) for the
    tests that leave it running."""
    return start_triton(dynamic_onnx, "--height", "128", "--width", "128")


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
