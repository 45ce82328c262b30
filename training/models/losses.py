"""SOLOv2 losses: Dice on the masks of positive cells, sigmoid focal loss on every cell's category."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from training.config import LossConfig
from training.models.solov2 import SOLOv2Output
from training.models.targets import ImageTargets

DICE_EPS = 1e-3


def dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask ``1 - 2*sum(pq) / (sum(p^2) + sum(q^2))`` over the last dims: [P, ...] -> [P]."""
    pred, target = pred.flatten(1), target.flatten(1)
    overlap = (pred * target).sum(dim=1)
    norms = pred.square().sum(dim=1) + target.square().sum(dim=1) + 2 * DICE_EPS
    return 1.0 - 2.0 * overlap / norms


@dataclass
class Positives:
    """Every positive cell of a batch: its mask logits (its dynamic kernel applied to its image's mask features),
    its target mask, which image and instance it belongs to, and its predicted embedding (when the model has an
    embedding head)."""

    logits: torch.Tensor  # [P, H/4, W/4]
    targets: torch.Tensor  # [P, H/4, W/4]
    images: torch.Tensor  # [P] index into the batch
    instances: torch.Tensor  # [P] index into that image's instances
    embeddings: torch.Tensor | None  # [P, D]

    @property
    def count(self) -> int:
        return self.logits.shape[0]


def positives(output: SOLOv2Output, targets: list[ImageTargets]) -> Positives:
    features = output.mask_features
    logits, masks, images, instances, embeddings = [], [], [], [], []
    for b, target in enumerate(targets):
        flat_features = features[b].flatten(1)
        for level, (cells, owners) in enumerate(zip(target.positive_cells, target.positive_instances, strict=True)):
            if cells.numel() == 0:
                continue
            cells = cells.to(features.device)
            cell_kernels = output.kernels[level][b].flatten(1)[:, cells].t()
            logits.append((cell_kernels @ flat_features).view(-1, *features.shape[-2:]))
            masks.append(target.masks[owners].to(features.device))
            images.append(torch.full_like(owners, b))
            instances.append(owners)
            if output.embeddings:
                embeddings.append(output.embeddings[level][b].flatten(1)[:, cells].t())
    if not logits:
        empty = features.new_zeros((0, *features.shape[-2:]))
        index = torch.zeros(0, dtype=torch.long)
        return Positives(empty, empty, index, index, None)
    return Positives(
        torch.cat(logits),
        torch.cat(masks),
        torch.cat(images),
        torch.cat(instances),
        torch.cat(embeddings) if embeddings else None,
    )


def zero_mask_loss(output: SOLOv2Output) -> torch.Tensor:
    """Zero that still touches every mask parameter, so DDP sees a full gradient set on a batch without positives."""
    return output.mask_features.sum() * 0 + sum(k.sum() for k in output.kernels) * 0


def category_loss(output: SOLOv2Output, targets: list[ImageTargets], config: LossConfig, num_pos: int) -> torch.Tensor:
    """Sigmoid focal loss over every cell and class, / (num_pos + 1), times the focal weight."""
    num_classes = output.cate_logits[0].shape[1]
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, num_classes) for c in output.cate_logits])
    labels = torch.cat(
        [torch.stack([t.cate_targets[level] for t in targets]).flatten() for level in range(len(output.cate_logits))]
    ).to(logits.device)
    one_hot = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    loss = sigmoid_focal_loss(logits, one_hot, config.focal_alpha, config.focal_gamma, reduction="sum")
    return config.focal_weight * loss / (num_pos + 1)


def solo_losses(output: SOLOv2Output, targets: list[ImageTargets], config: LossConfig) -> dict[str, torch.Tensor]:
    """{"loss_mask": Dice (weight 3), "loss_cate": focal / (num_pos + 1) (weight 1)}."""
    found = positives(output, targets)
    loss_mask = dice_loss(found.logits.sigmoid(), found.targets).mean() if found.count else zero_mask_loss(output)
    return {
        "loss_mask": config.dice_weight * loss_mask,
        "loss_cate": category_loss(output, targets, config, found.count),
    }
