"""The training loop: deterministic sampling, resume after a crash equals an uninterrupted run, DDP under torchrun."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint
from training.config import Config, load_preset
from training.data.coco import CocoInstances, ResizePolicy
from training.data.synth import CATEGORIES
from training.engine.sampler import TrainBatchSampler
from training.engine.trainer import RunPaths, new_metadata, resumable_state, train_loop
from training.models import SOLOv2
from training.supervised import supervised_loss


def test_sampler_is_deterministic_and_resumable() -> None:
    full = list(TrainBatchSampler(10, 4, seed=1, start_iter=0, num_iters=7))
    resumed = list(TrainBatchSampler(10, 4, seed=1, start_iter=3, num_iters=7))
    assert resumed == full[3:]
    indices = [index for batch in full[:5] for index, _ in batch]  # 20 samples = 2 epochs of 10
    assert sorted(indices[:10]) == list(range(10)) and sorted(indices[10:]) == list(range(10))
    assert len({seed for batch in full for _, seed in batch}) == 28  # every sample position has its own seed


def test_sampler_ranks_split_the_global_batch() -> None:
    single = list(TrainBatchSampler(9, 4, seed=2, start_iter=0, num_iters=5))
    ranks = [list(TrainBatchSampler(9, 4, seed=2, start_iter=0, num_iters=5, rank=r, world_size=2)) for r in (0, 1)]
    for iteration, batch in enumerate(single):
        assert ranks[0][iteration] + ranks[1][iteration] == batch


def small_config() -> Config:
    config = load_preset("tiny")
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, num_classes=len(CATEGORIES)),
        solver=dataclasses.replace(
            config.solver, iters=4, batch_size=2, checkpoint_period=2, log_period=1, warmup_iters=2
        ),
    )


class Crash(RuntimeError):
    pass


def crashing_after(calls: int, loss_fn):
    """The real loss, but the process 'dies' on call number ``calls`` (after the checkpoint before it)."""
    count = {"n": 0}

    def wrapped(network, batch, iteration):
        count["n"] += 1
        if count["n"] == calls:
            raise Crash("simulated crash")
        return loss_fn(network, batch, iteration)

    return wrapped


def train(config: Config, dataset: CocoInstances, run: RunPaths, loss_fn=None, resume: bool = False) -> None:
    torch.manual_seed(config.seed)
    model = SOLOv2(config.model)
    state = resumable_state(run, resume)
    train_loop(
        config,
        model,
        dataset,
        loss_fn or supervised_loss(config),
        run,
        new_metadata(CATEGORIES, list(range(1, len(CATEGORIES) + 1))),
        state,
        progress=False,
    )


def test_resume_after_crash_matches_uninterrupted_run(synth_data: Path, tmp_path: Path) -> None:
    config = small_config()
    dataset = CocoInstances(
        synth_data / "train",
        synth_data / "train.json",
        ResizePolicy(tuple(config.input.train_sizes), config.input.max_size, hflip=True),
    )
    straight = RunPaths(tmp_path / "straight")
    train(config, dataset, straight)

    crashed = RunPaths(tmp_path / "crashed")
    with pytest.raises(Crash):
        train(config, dataset, crashed, crashing_after(4, supervised_loss(config)))
    assert load_checkpoint(crashed.checkpoint)["iteration"] == 2 and not crashed.model.exists()
    train(config, dataset, crashed, resume=True)

    expected = load_checkpoint(straight.model)["model"]
    resumed = load_checkpoint(crashed.model)["model"]
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-5, msg=key)
    iterations = [json.loads(line)["iter"] for line in crashed.log.read_text().splitlines()]
    assert iterations == [1, 2, 3, 4]


def test_torchrun_two_processes(synth_data: Path, tmp_path: Path, freesolo_under_torchrun: Callable) -> None:
    run = tmp_path / "ddp"
    data = f"--images {synth_data / 'train'} --ann {synth_data / 'train.json'}"
    done = freesolo_under_torchrun(*f"train {data} --out {run} --iters 2 --batch-size 4 --no-progress".split())
    assert done.stdout.count("model: ") == 1  # only rank 0 speaks
    payload = load_checkpoint(run / "model.pt")
    assert payload["metadata"]["iteration"] == 2
    assert [json.loads(line)["iter"] for line in (run / "log.jsonl").read_text().splitlines()] == [2]


def test_class_agnostic_training_has_one_class(synth_data: Path, tmp_path: Path) -> None:
    from training.cli import main

    run = tmp_path / "agnostic"
    data = f"--images {synth_data / 'train'} --ann {synth_data / 'train.json'}"
    argv = f"train {data} --out {run} --class-agnostic --iters 2 --batch-size 2 --no-progress".split()
    assert main(argv) == 0
    checkpoint = load_checkpoint(run / "model.pt")
    assert checkpoint["metadata"]["class_agnostic"] is True
    assert checkpoint["config"]["model"]["num_classes"] == 1
    assert checkpoint["model"]["head.cate_pred.weight"].shape[0] == 1
