"""One entry point that trains a SOLOv2 run, used by `freesolo train`, `selftrain` and `pipeline`.

Modes: "supervised" (full GT masks, Dice) and "weak" (coarse masks as weak labels: projection + pairwise losses,
embedding loss, weak and strong views; docs/algorithms.md, "Self-supervised SOLO"). A weak model has one "object" class.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from training.config import Config
from training.data.coco import CocoInstances, ResizePolicy
from training.engine.distributed import is_main_process
from training.engine.trainer import LossFunction, RunPaths, load_initial_weights, new_metadata, train_loop
from training.models import SOLOv2
from training.supervised import supervised_loss

MODES = ("supervised", "weak")


def weak_model_config(config: Config) -> Config:
    """One class, FreeSOLO's embedding head when the embedding loss is on, and the weak-mode schedule (the loop
    reads ``solver``)."""
    embedding_dim = config.weak.embedding_dim if config.weak.embedding_weight > 0 else 0
    model = dataclasses.replace(config.model, num_classes=1, embedding_dim=embedding_dim)
    return dataclasses.replace(config, model=model, solver=config.weak.solver)


def with_solver_overrides(config: Config, mode: str, overrides: dict[str, Any]) -> Config:
    """Apply --iters/--batch-size/... to the schedule the mode trains with (``solver``, or ``weak.solver``), so that
    they are saved in the run's config and a resumed run keeps them."""
    if not overrides:
        return config
    if mode == "weak":
        weak = dataclasses.replace(config.weak, solver=dataclasses.replace(config.weak.solver, **overrides))
        return dataclasses.replace(config, weak=weak)
    return dataclasses.replace(config, solver=dataclasses.replace(config.solver, **overrides))


def build_training(config: Config, mode: str, dataset: CocoInstances) -> tuple[Config, Any, LossFunction, Any]:
    """(config, dataset, loss, collate) for a mode; imports of the weak path stay lazy."""
    if mode == "supervised":
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, num_classes=len(dataset.category_ids))
        )
        return config, dataset, supervised_loss(config), None
    from training.weak import WeakStrongViews, collate_weak_strong, weak_loss

    config = weak_model_config(config)
    views = WeakStrongViews(dataset, config.weak) if config.weak.strong_view else dataset
    collate_fn = (
        (lambda items: collate_weak_strong(items, config.input.size_divisor)) if config.weak.strong_view else None
    )
    return config, views, weak_loss(config), collate_fn


def train_solo(
    images: Path,
    ann: Path,
    run: RunPaths,
    config: Config,
    state: dict[str, Any] | None,
    *,
    mode: str = "supervised",
    class_agnostic: bool = False,
    init: Path | None = None,
    progress: bool = True,
) -> Path:
    """Train (or resume, when ``state`` is a checkpoint) one SOLOv2 run; returns RUN/model.pt."""
    say = print if is_main_process() else (lambda *_: None)
    sizes = config.input
    policy = ResizePolicy(
        tuple(sizes.train_sizes), sizes.max_size, sizes.hflip, sizes.resize_filter, sizes.resize_rounding
    )
    dataset = CocoInstances(images, ann, policy, class_agnostic or mode == "weak")
    config, train_set, loss_fn, collate_fn = build_training(config, mode, dataset)
    torch.manual_seed(config.seed)  # the initial weights, so a run is reproducible from its command line
    model = SOLOv2(config.model)
    if init is not None and state is None:
        say(load_initial_weights(model, init))
    metadata = {
        **new_metadata(dataset.class_names, dataset.category_ids),
        "class_agnostic": class_agnostic,
        "mode": mode,
    }
    if state is not None:
        done = int(state["iteration"])
        say(
            f"{run.root} already has {done} iterations; nothing to train"
            if done >= config.solver.iters
            else f"resuming {run.root} from iteration {done}"
        )
    model_path = train_loop(config, model, train_set, loss_fn, run, metadata, state, progress, collate_fn)
    say(f"model: {model_path}")
    return model_path
