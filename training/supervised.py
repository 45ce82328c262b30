"""Supervised SOLOv2 training: center-sampling targets from GT masks, Dice + focal losses."""

from __future__ import annotations

import torch
from torch import nn

from training.config import Config
from training.data.batching import Batch
from training.engine.trainer import LossFunction
from training.models.losses import solo_losses
from training.models.targets import build_targets


def supervised_loss(config: Config) -> LossFunction:
    """The loss of ``freesolo train --mode supervised``."""
    model_config = config.model

    def loss_fn(network: nn.Module, batch: Batch, iteration: int) -> dict[str, torch.Tensor]:
        output = network(batch.images)
        targets = [
            build_targets(
                masks,
                labels,
                model_config.num_classes,
                model_config.grids,
                model_config.scale_ranges,
                config.loss.center_sigma,
            )
            for masks, labels in zip(batch.masks, batch.labels, strict=True)
        ]
        return solo_losses(output, targets, config.loss)

    return loss_fn
