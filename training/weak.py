"""FreeSOLO's self-supervised SOLO (docs/algorithms.md, "Self-supervised SOLO"): coarse masks as weak labels.

- Views: every coarse-labelled image is trained twice per step, as a weak view (resize, flip) and a strong view
  (instances copy-pasted from another image, colour jitter, grayscale, blur, random erasing).
- Mask loss ("weak"): ``mask_weight * (alpha * L_avg + L_max + L_pairwise)``, with L_max/L_avg the Dice of the
  max/mean projections of predicted and coarse masks along each axis, and L_pairwise BoxInst's colour-affinity
  term inside the coarse mask's box (linearly warmed up). "dice" replaces them by full-mask Dice (the ablation).
- Category loss: focal + beta * (1 - cos(q, q*)) on positive cells, q* the coarse mask's embedding. The released
  FreeSOLO code multiplies the embedding term by 0; here it is a real term, off when ``embedding_weight`` is 0.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.data import Dataset

from training.config import Config, WeakConfig
from training.data.batching import Batch, Sample, collate
from training.data.coco import CocoInstances
from training.data.views import chance, photometric, uniform
from training.engine.trainer import LossFunction
from training.errors import UserError
from training.geometry import MASK_STRIDE
from training.models.losses import Positives, category_loss, dice_loss, positives, zero_mask_loss
from training.models.solov2 import SOLOv2Output
from training.models.targets import build_targets
from training.models.weak_losses import (
    box_fill,
    embedding_loss,
    neighbour_similarity,
    pairwise_loss,
    projection_losses,
    warmup_factor,
)

PASTE_P = 0.5  # chance that each donor instance is pasted
MIN_KEPT_SHARE = 0.3  # an occluded instance keeps its label only if this share of it stays visible
ERASE_P, ERASE_AREA = 0.5, (0.02, 0.1)


def copy_paste(target: Sample, donor: Sample, generator: torch.Generator) -> Sample:
    """Paste a random subset of ``donor``'s instances (pixels and masks, top-left aligned) onto ``target``;
    target instances they cover lose those pixels, and are dropped when less than a third stays visible."""
    height, width = target.image.shape[-2:]
    chosen = [i for i in range(donor.masks.shape[0]) if chance(PASTE_P, generator)]
    if not chosen:
        return target
    pasted = torch.zeros((len(chosen), height, width), dtype=target.masks.dtype)
    overlap_h, overlap_w = min(height, donor.masks.shape[-2]), min(width, donor.masks.shape[-1])
    pasted[:, :overlap_h, :overlap_w] = donor.masks[chosen, :overlap_h, :overlap_w]
    cover = pasted.amax(dim=0).bool()
    image = target.image.clone()
    donor_image = torch.zeros_like(image)
    donor_image[:, :overlap_h, :overlap_w] = donor.image[:, :overlap_h, :overlap_w]
    image[:, cover] = donor_image[:, cover]
    remaining = target.masks * (~cover).to(target.masks.dtype)
    kept = remaining.flatten(1).sum(1) >= MIN_KEPT_SHARE * target.masks.flatten(1).sum(1).clamp(min=1)
    kept &= remaining.flatten(1).sum(1) > 0
    masks = torch.cat([remaining[kept], pasted])
    labels = torch.cat([target.labels[kept], donor.labels[chosen]])
    embeddings = None
    if target.embeddings is not None and donor.embeddings is not None:
        embeddings = torch.cat([target.embeddings[kept], donor.embeddings[chosen]])
    return dataclasses.replace(target, image=image, masks=masks, labels=labels, embeddings=embeddings)


def random_erase(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """With probability ``ERASE_P``, fill one rectangle (2-10% of the image) with a random colour."""
    if not chance(ERASE_P, generator):
        return image
    height, width = image.shape[-2:]
    area = uniform(*ERASE_AREA, generator) * height * width
    aspect = uniform(0.5, 2.0, generator)
    box_h = max(1, min(height, round((area / aspect) ** 0.5)))
    box_w = max(1, min(width, round((area * aspect) ** 0.5)))
    top = int(torch.randint(height - box_h + 1, (), generator=generator))
    left = int(torch.randint(width - box_w + 1, (), generator=generator))
    colour = torch.randint(0, 256, (3, 1, 1), generator=generator, dtype=torch.uint8)
    erased = image.clone()
    erased[:, top : top + box_h, left : left + box_w] = colour
    return erased


class WeakStrongViews(Dataset):
    """Item ``(index, seed)`` -> (weak view, strong view) of a coarse-labelled image; deterministic by seed."""

    def __init__(self, dataset: CocoInstances, config: WeakConfig) -> None:
        self.dataset = dataset
        self.copy_paste = config.copy_paste

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Sample, Sample]:
        index, seed = item
        weak = self.dataset[(index, seed)]
        generator = torch.Generator().manual_seed(seed * 7919 + 1)
        strong = weak
        if self.copy_paste and len(self.dataset) > 1:
            donor_index = (index + 1 + int(torch.randint(len(self.dataset) - 1, (), generator=generator))) % len(
                self.dataset
            )
            donor_seed = int(torch.randint(2**31 - 1, (), generator=generator))
            strong = copy_paste(weak, self.dataset[(donor_index, donor_seed)], generator)
        image = random_erase(photometric(strong.image, generator), generator)
        return weak, dataclasses.replace(strong, image=image)


def collate_weak_strong(items: list[tuple[Sample, Sample]], size_divisor: int) -> Batch:
    """Weak views first, then strong views, as one padded batch: both are trained."""
    return collate([weak for weak, _ in items] + [strong for _, strong in items], size_divisor)


def weak_mask_losses(
    found: Positives, batch: Batch, output: SOLOv2Output, config: Config, iteration: int
) -> dict[str, torch.Tensor]:
    """The mask terms of one batch's positives (see the module docstring); the same keys on every batch, so logs
    and DDP averages line up even when a batch has no positives."""
    weak = config.weak
    weight = config.loss.dice_weight
    if weak.mask_loss not in ("weak", "dice"):
        raise UserError(f"unknown weak.mask_loss '{weak.mask_loss}' (use weak or dice)")
    if weak.mask_loss == "dice":
        dice = dice_loss(found.logits.sigmoid(), found.targets).mean() if found.count else zero_mask_loss(output)
        return {"loss_mask": weight * dice}
    if not found.count:
        zero = zero_mask_loss(output)
        return {"loss_max": zero, "loss_avg": zero, "loss_pairwise": zero}
    loss_max, loss_avg = projection_losses(found.logits, found.targets)
    similarity = neighbour_similarity(batch.images, MASK_STRIDE, weak.pairwise_dilation)[found.images]
    pairwise = pairwise_loss(
        found.logits, similarity, box_fill(found.targets), weak.pairwise_color_thr, weak.pairwise_dilation
    )
    return {
        "loss_max": weight * weak.max_weight * loss_max.mean(),
        "loss_avg": weight * weak.avg_weight * loss_avg.mean(),
        "loss_pairwise": weight
        * weak.pairwise_weight
        * warmup_factor(iteration, weak.pairwise_warmup)
        * pairwise.mean(),
    }


def embedding_targets(found: Positives, batch: Batch) -> torch.Tensor | None:
    """q* of every positive (its instance's embedding), or None when an image in the batch has none."""
    if found.embeddings is None or any(e is None for e in batch.embeddings):
        return None
    return torch.stack([batch.embeddings[int(b)][int(i)] for b, i in zip(found.images, found.instances, strict=True)])


def weak_loss(config: Config) -> LossFunction:
    """The loss of ``freesolo train --mode weak`` (one class: label 0 for every coarse mask)."""
    model = config.model

    def loss_fn(network: nn.Module, batch: Batch, iteration: int) -> dict[str, torch.Tensor]:
        output = network(batch.images)
        targets = [
            build_targets(masks, labels, 1, model.grids, model.scale_ranges, config.loss.center_sigma)
            for masks, labels in zip(batch.masks, batch.labels, strict=True)
        ]
        found = positives(output, targets)
        losses = weak_mask_losses(found, batch, output, config, iteration)
        losses["loss_cate"] = category_loss(output, targets, config.loss, found.count)
        if config.weak.embedding_weight > 0 and output.embeddings:
            wanted = embedding_targets(found, batch) if found.count else None
            losses["loss_embed"] = (
                config.weak.embedding_weight * embedding_loss(found.embeddings, wanted.to(found.embeddings)).mean()
                if wanted is not None
                else sum(e.sum() for e in output.embeddings) * 0
            )
        return losses

    return loss_fn
