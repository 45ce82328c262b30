"""The ``freesolo pretrain`` subcommand: DenseCL self-supervised pre-training of the backbone on unlabeled images."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.cli_args import Subcommands, add_config_arguments, positive_int
from training.config import Config, apply_overrides, config_from_dict, load_preset
from training.errors import UserError


def register(commands: Subcommands) -> None:
    """Add ``pretrain`` to the ``freesolo`` parser."""
    pretrain = commands.add_parser(
        "pretrain",
        help="DenseCL self-supervised pre-training of the backbone on unlabeled images",
        description="Pre-train a ResNet backbone with DenseCL (global + dense contrastive losses, momentum key "
        "encoder, queues of negatives) on a folder of unlabeled images. Writes the run directory like `train`: "
        "RUN/config.yaml, RUN/checkpoint.pt (latest, for --resume), RUN/model.pt (final weights), RUN/log.jsonl and "
        "RUN/loss_curve.png. Export the backbone as a torchvision ResNet state dict with `freesolo export-backbone`. "
        "The pretrain.* config values (e.g. --set pretrain.queue_size=1024) set the method; keep the queue well below "
        "the number of images, or it holds keys of the query's own image as negatives. Runs under torchrun for DDP "
        "(each process keeps its own queues).",
    )
    pretrain.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder of unlabeled images")
    pretrain.add_argument("--out", type=Path, required=True, metavar="RUN", help="run directory")
    add_config_arguments(pretrain)
    pretrain.add_argument("--iters", type=positive_int, metavar="N", help="override the preset's pretrain iterations")
    pretrain.add_argument("--batch-size", type=positive_int, metavar="N", help="override the pretrain batch size")
    pretrain.add_argument("--lr", type=float, metavar="LR", help="override the pretrain base learning rate")
    pretrain.add_argument(
        "--init",
        type=Path,
        metavar="BACKBONE",
        help="start both encoders from these ResNet weights (a torchvision state dict, e.g. from `freesolo "
        "import-weights`, a DenseCL run or a SOLOv2 checkpoint); the depth must be the preset's",
    )
    pretrain.add_argument("--resume", action="store_true", help="continue RUN from its checkpoint.pt")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")
    pretrain.set_defaults(handler=run_pretrain)


def pretrain_config(args: argparse.Namespace, state: dict[str, Any] | None) -> Config:
    """The run's config: the checkpoint's when resuming, else the preset with ``--set``; then the solver options."""
    if state and args.set:
        raise UserError("--set cannot change a run that is being resumed (its config is fixed by its checkpoint)")
    config = config_from_dict(state["config"]) if state else apply_overrides(load_preset(args.preset), args.set)
    overrides = {
        key: value
        for key, value in (("iters", args.iters), ("batch_size", args.batch_size), ("base_lr", args.lr))
        if value is not None
    }
    solver = dataclasses.replace(config.pretrain.solver, **overrides)
    return dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, solver=solver))


def densecl_loss(
    network: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], iteration: int
) -> dict[str, torch.Tensor]:
    """The trainer's loss function: the DenseCL model computes its own losses from the two views."""
    view_q, view_k = batch
    return network(view_q, view_k, iteration)


def train_densecl(
    images: Path,
    run: Any,
    config: Config,
    state: dict[str, Any] | None,
    progress: bool = True,
    init: Path | None = None,
) -> Path:
    """Pre-train (or resume, given the checkpoint ``state``) a DenseCL model on ``images`` into the run directory
    ``run`` (a ``RunPaths``) with ``config.pretrain``; returns the final model's path. ``init`` starts a new run's
    encoders from a backbone."""
    from training.data.views import TwoViews, stack_view_pairs
    from training.densecl import DenseCL
    from training.engine.distributed import is_main_process
    from training.engine.trainer import new_metadata, train_loop

    config = dataclasses.replace(config, solver=config.pretrain.solver)
    dataset = TwoViews.from_folder(images, config.pretrain.crop_size, tuple(config.pretrain.crop_scale))
    torch.manual_seed(config.seed)
    model = DenseCL(config.model.depth, config.pretrain, config.model.pixel_mean, config.model.pixel_std)
    metadata = {**new_metadata([], []), "kind": "densecl", "depth": config.model.depth}
    say = print if is_main_process() else (lambda *_: None)
    if init is not None and state is None:
        say(initialise_encoders(model, init, config.model.depth))
    if state and state["iteration"] >= config.solver.iters:
        say(f"{run.root} already has {state['iteration']} iterations (--iters {config.solver.iters}); nothing to train")
    elif state:
        say(f"resuming {run.root} from iteration {state['iteration']}")
    return train_loop(
        config, model, dataset, densecl_loss, run, metadata, state, progress=progress, collate_fn=stack_view_pairs
    )


def initialise_encoders(model: nn.Module, path: Path, depth: int) -> str:
    """Both encoders' ResNet from a backbone file (the key encoder starts as a copy of the query encoder, as in
    DenseCL); the projection heads keep their random initialisation. Returns a one-line summary."""
    from training.backbone_io import backbone_state_dict

    state, found = backbone_state_dict(path)
    if found != depth:
        raise UserError(f"{path} holds a ResNet-{found} backbone; this run builds ResNet-{depth} (--preset / --set)")
    missing, unexpected = model.encoder_q.backbone.load_state_dict(state, strict=False)
    left_out = [key for key in missing if not key.endswith("num_batches_tracked")]
    if left_out or unexpected:
        raise UserError(f"{path}: backbone does not fit the DenseCL encoder ({(left_out + unexpected)[:3]})")
    model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    return f"initialised both encoders' ResNet-{depth} ({len(state)} tensors) from {path}"


def run_pretrain(args: argparse.Namespace) -> int:
    from training.engine.distributed import is_main_process
    from training.engine.trainer import RunPaths, requested_state

    run = RunPaths(args.out)
    state = requested_state(run, args.resume)
    if args.init is not None and state is not None:
        raise UserError("--init starts a new run; a resumed run continues from its own checkpoint")
    config = pretrain_config(args, state)
    model_path = train_densecl(args.images, run, config, state, progress=not args.no_progress, init=args.init)
    if is_main_process():
        print(f"model: {model_path} (export the backbone with `freesolo export-backbone`)")
    return 0
