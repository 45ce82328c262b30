"""The training loop shared by every ``freesolo`` training mode: SGD with warm-up and step decay, gradient
clipping, DDP under torchrun, atomic resumable checkpoints, ``log.jsonl`` and a loss-curve PNG.

A mode supplies only ``loss_fn(model, batch) -> {name: loss}``; everything else is here once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from training.checkpoint import load_checkpoint, read_torch_file, save_checkpoint
from training.config import Config, SolverConfig, save_config
from training.data.batching import collate
from training.engine.distributed import DistributedContext
from training.engine.run_log import append_log, plot_losses, truncate_log
from training.engine.sampler import TrainBatchSampler
from training.engine.schedule import learning_rate
from training.errors import UserError
from training.fileio import remove_stale_temporaries
from training.progress import progress as progress_bar

LossFunction = Callable[[nn.Module, Any, int], dict[str, torch.Tensor]]  # (network, batch, iteration)


class RunPaths:
    """The files of a run directory (docs/architecture.md, "Run directories and checkpoints")."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.checkpoint = self.root / "checkpoint.pt"
        self.model = self.root / "model.pt"
        self.log = self.root / "log.jsonl"
        self.curve = self.root / "loss_curve.png"


def check_run_dir(run: RunPaths, resume: bool) -> None:
    """Refuse to overwrite a previous run unless asked to resume it."""
    if not resume and (run.checkpoint.exists() or run.model.exists()):
        raise UserError(f"{run.root} already holds a run; pass --resume to continue it or choose another --out")


def resumable_state(run: RunPaths, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None for a fresh start."""
    check_run_dir(run, resume)
    return load_checkpoint(run.checkpoint) if resume and run.checkpoint.exists() else None


def resume_option(out: Path) -> list[str]:
    """``["--resume"]`` when ``out`` holds a started run, else nothing: for scripts that start or continue a run."""
    return ["--resume"] if RunPaths(out).checkpoint.is_file() else []


def requested_state(run: RunPaths, resume: bool) -> dict[str, Any] | None:
    """``--resume`` as a user asked for it: the run's checkpoint, and an error where there is none, since a mistyped
    ``--out`` would otherwise quietly train from scratch (pipelines that mean "continue if possible" call
    ``resumable_state``)."""
    if resume and not run.checkpoint.is_file():
        raise UserError(f"--resume: {run.root} holds no checkpoint.pt to continue (check --out, or leave out --resume)")
    return resumable_state(run, resume)


def new_metadata(class_names: list[str], category_ids: list[int]) -> dict[str, Any]:
    stamp = datetime.now(timezone.utc)
    return {
        "run_id": f"{stamp:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
        "created": stamp.isoformat(timespec="seconds"),
        "class_names": list(class_names),
        "category_ids": [int(c) for c in category_ids],
    }


def build_optimizer(model: nn.Module, solver: SolverConfig) -> torch.optim.Optimizer:
    """SGD as in the paper (decay on every parameter), or AdamW (no decay on norms and biases)."""
    if solver.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=solver.base_lr, momentum=solver.momentum, weight_decay=solver.weight_decay
        )
    if solver.optimizer == "adamw":
        weights = [p for p in model.parameters() if p.dim() > 1]
        others = [p for p in model.parameters() if p.dim() <= 1]
        return torch.optim.AdamW(
            [{"params": weights, "weight_decay": solver.weight_decay}, {"params": others, "weight_decay": 0.0}],
            lr=solver.base_lr,
        )
    raise UserError(f"unknown optimizer '{solver.optimizer}' (use sgd or adamw)")


def train_loop(
    config: Config,
    model: nn.Module,
    dataset: Dataset,
    loss_fn: LossFunction,
    run: RunPaths,
    metadata: dict[str, Any],
    state: dict[str, Any] | None = None,
    progress: bool = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> Path:
    """Train ``model`` for ``config.solver.iters`` iterations (continuing ``state`` when given); returns model.pt.
    ``collate_fn`` turns a list of dataset items into what ``loss_fn`` takes (default: a padded ``Batch``)."""
    solver = config.solver
    context = DistributedContext.from_env()
    torch.manual_seed(config.seed)
    optimizer = build_optimizer(model, solver)
    start_iter = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_iter = int(state["iteration"])
        metadata = dict(state.get("metadata", metadata))
    if context.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        for path in (run.checkpoint, run.model):  # a run killed while saving leaves its temporary file
            remove_stale_temporaries(path)
        save_config(config, run.config)
        truncate_log(run.log, start_iter)
    context.barrier()

    sampler = TrainBatchSampler(
        len(dataset), solver.batch_size, config.seed, start_iter, solver.iters, context.rank, context.world_size
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=solver.num_workers,
        collate_fn=collate_fn or (lambda samples: collate(samples, config.input.size_divisor)),
    )
    network = DistributedDataParallel(model) if context.enabled else model
    network.train()

    def save(iteration: int) -> None:
        if context.is_main:
            save_checkpoint(
                run.checkpoint,
                {
                    "config": config.to_dict(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "iteration": iteration,
                    "metadata": {**metadata, "iteration": iteration},
                },
            )
            plot_losses(run.log, run.curve, f"{config.preset} - {run.root.name}")

    bar = progress_bar(solver.iters, "train", "it", progress and context.is_main, initial=start_iter)
    started = time.perf_counter()
    for iteration, batch in enumerate(loader, start=start_iter):
        lr = learning_rate(iteration, solver, solver.iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = loss_fn(network, batch, iteration)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise RuntimeError(f"loss became {float(total)} at iteration {iteration}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if solver.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), solver.grad_clip)
        optimizer.step()
        done = iteration + 1
        bar.update(1)
        if done % solver.log_period == 0 or done == solver.iters:
            values = context.mean({"loss": total.item(), **{k: v.item() for k, v in losses.items()}})
            seconds = (time.perf_counter() - started) / (done - start_iter)
            bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2g}")
            if context.is_main:
                append_log(run.log, {"iter": done, "lr": lr, **values, "sec_per_iter": round(seconds, 4)})
        if done % solver.checkpoint_period == 0 and done < solver.iters:
            save(done)
    bar.close()
    trained = start_iter < solver.iters
    if trained:
        save(solver.iters)
    if context.is_main and (trained or not run.model.exists()):
        save_checkpoint(
            run.model,
            {
                "config": config.to_dict(),
                "model": model.state_dict(),
                "metadata": {**metadata, "iteration": max(start_iter, solver.iters)},
            },
        )
    context.barrier()
    context.close()
    return run.model


def load_initial_weights(model: nn.Module, path: Path) -> str:
    """Initialise from a FreeSOLO checkpoint (SOLO or DenseCL) or a plain state dict (torchvision ResNet keys go to
    the backbone); tensors whose name and shape match are loaded. Returns a one-line summary."""
    payload = _read_state_dict(path)
    if any(key.startswith("layer1.") for key in payload):
        payload = {f"backbone.body.{key}": value for key, value in payload.items()}
    own = model.state_dict()
    matched = {k: v for k, v in payload.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not matched:
        raise UserError(f"no weights in {path} match this model (keys or shapes differ)")
    model.load_state_dict(matched, strict=False)
    return f"initialised {len(matched)}/{len(own)} tensors from {path}"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a SOLO checkpoint (its full model), a DenseCL run (its query backbone, torchvision keys)
    or a plain state dict."""
    payload = read_torch_file(path, "initial weights")
    if isinstance(payload, dict) and payload.get("metadata", {}).get("kind") == "densecl":
        from training.backbone_io import backbone_state_dict

        return backbone_state_dict(path)[0]
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        payload = payload["model"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    return payload
