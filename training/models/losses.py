"""SOLOv2 losses: Dice on the masks of positive cells, sigmoid focal loss on every cell's category."""

from __future__ import annotations

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


def positive_mask_logits(output: SOLOv2Output, targets: list[ImageTargets]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits of every positive cell (its dynamic kernel applied to its image's mask features) and the
    matching GT masks: ([P, H/4, W/4], [P, H/4, W/4])."""
    features = output.mask_features
    logits, gt = [], []
    for b, target in enumerate(targets):
        flat_features = features[b].flatten(1)
        for kernels, cells, instances in zip(
            output.kernels, target.positive_cells, target.positive_instances, strict=True
        ):
            if cells.numel() == 0:
                continue
            cell_kernels = kernels[b].flatten(1)[:, cells.to(kernels.device)].t()
            logits.append((cell_kernels @ flat_features).view(-1, *features.shape[-2:]))
            gt.append(target.masks[instances].to(features.device))
    if not logits:
        empty = features.new_zeros((0, *features.shape[-2:]))
        return empty, empty
    return torch.cat(logits), torch.cat(gt)


def solo_losses(output: SOLOv2Output, targets: list[ImageTargets], config: LossConfig) -> dict[str, torch.Tensor]:
    """{"loss_mask": Dice (weight 3), "loss_cate": focal / (num_pos + 1) (weight 1)}."""
    mask_logits, gt_masks = positive_mask_logits(output, targets)
    num_pos = mask_logits.shape[0]
    if num_pos:
        loss_mask = dice_loss(mask_logits.sigmoid(), gt_masks).mean()
    else:
        # Touch every mask parameter with zero weight so DDP sees a full gradient set.
        loss_mask = output.mask_features.sum() * 0 + sum(k.sum() for k in output.kernels) * 0
    num_classes = output.cate_logits[0].shape[1]
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, num_classes) for c in output.cate_logits])
    labels = torch.cat(
        [torch.stack([t.cate_targets[level] for t in targets]).flatten() for level in range(len(output.cate_logits))]
    ).to(logits.device)
    one_hot = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    loss_cate = sigmoid_focal_loss(logits, one_hot, config.focal_alpha, config.focal_gamma, reduction="sum")
    return {
        "loss_mask": config.dice_weight * loss_mask,
        "loss_cate": config.focal_weight * loss_cate / (num_pos + 1),
    }
