"""DenseCL (docs/algorithms.md, "DenseCL"): self-supervised pre-training of a ResNet backbone for Free Mask.

MoCo-v2 style contrastive learning with two heads on one backbone: a global head (one vector per image) and a dense
head (one vector per C5 cell). The query encoder learns; the key encoder is its momentum average. Negatives come from
two queues of past keys, so the number of negatives does not depend on the batch size.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.models._utils import IntermediateLayerGetter

from training.backbone_io import dilate_last_stage
from training.config import PretrainConfig
from training.models.backbone import build_resnet, stage_channels

QUEUE_BUFFERS = ["queue_global", "queue_dense", "queue_ptr"]


def resnet_trunk(depth: int, dilate_res5: bool) -> nn.Module:
    """A torchvision ResNet up to C5: state-dict keys ``conv1.*``, ``bn1.*``, ``layer1.*`` .. ``layer4.*``. The
    dilation is Free Mask's (``backbone_io.dilate_last_stage``), so both see the same C5 features."""
    resnet = build_resnet(depth)
    if dilate_res5:
        dilate_last_stage(resnet)
    return IntermediateLayerGetter(resnet, return_layers={"layer4": "c5"})


class Encoder(nn.Module):
    """Backbone plus the global (pooled MLP) and dense (1x1-conv MLP on the C5 grid) projection heads."""

    def __init__(self, depth: int, hidden_dim: int, projection_dim: int, dilate_res5: bool) -> None:
        super().__init__()
        channels = stage_channels(depth)[-1]
        self.backbone = resnet_trunk(depth, dilate_res5)
        self.global_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim),
        )
        self.dense_head = nn.Sequential(
            nn.Conv2d(channels, hidden_dim, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, projection_dim, 1),
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C5 [B, C, h, w], global projection [B, D], dense projection [B, D, h, w]), none normalised."""
        c5 = self.backbone(images)["c5"]
        return c5, self.global_head(c5), self.dense_head(c5)


def info_nce(positive: torch.Tensor, negative: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy picking the positive among ``[positive, negatives]``: positive [N], negative [N, K]."""
    logits = torch.cat([positive[:, None], negative], dim=1) / temperature
    return F.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long))


def dense_matches(query_c5: torch.Tensor, key_c5: torch.Tensor) -> torch.Tensor:
    """For each query cell, the key cell whose L2-normalised backbone feature is most similar: [B, h*w] indices."""
    query = F.normalize(query_c5.flatten(2), dim=1)
    key = F.normalize(key_c5.flatten(2), dim=1)
    return torch.einsum("bcq,bck->bqk", query, key).argmax(dim=2)


class DenseCL(nn.Module):
    """Query/key encoders, the two key queues and the DenseCL loss.

    ``forward`` is one training step's loss (``loss_global``, ``loss_dense``); in training mode it first moves the
    key encoder towards the query encoder and afterwards enqueues this batch's keys. Under DDP every rank keeps its
    own queues, filled with its own keys (no all_gather; the queue buffers are excluded from DDP's buffer broadcast),
    and batch norm sees each rank's own batch (no shuffled BN): with a small per-rank batch keep an eye on the BN
    shortcut MoCo describes.
    """

    def __init__(
        self, depth: int, config: PretrainConfig, pixel_mean: Sequence[float], pixel_std: Sequence[float]
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder_q = Encoder(depth, config.hidden_dim, config.projection_dim, config.dilate_res5)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), False)
        shape = (config.projection_dim, config.queue_size)
        self.register_buffer("queue_global", F.normalize(torch.randn(shape), dim=0))
        self.register_buffer("queue_dense", F.normalize(torch.randn(shape), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, QUEUE_BUFFERS)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (0-255) -> standardised float."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def momentum_update(self) -> None:
        """k <- m * k + (1 - m) * q for every key-encoder parameter (buffers keep their own running statistics)."""
        m = self.config.momentum
        for key, query in zip(self.encoder_k.parameters(), self.encoder_q.parameters(), strict=True):
            key.mul_(m).add_(query.detach(), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, keys_global: torch.Tensor, keys_dense: torch.Tensor) -> None:
        """Overwrite the oldest queue entries with this batch's keys, wrapping around the end."""
        size = self.queue_global.shape[1]
        keys_global, keys_dense = keys_global[-size:], keys_dense[-size:]
        slots = (self.queue_ptr + torch.arange(len(keys_global), device=self.queue_ptr.device)) % size
        self.queue_global[:, slots] = keys_global.T
        self.queue_dense[:, slots] = keys_dense.T
        self.queue_ptr.copy_((self.queue_ptr + len(keys_global)) % size)

    def forward(self, view_q: torch.Tensor, view_k: torch.Tensor, iteration: int = 0) -> dict[str, torch.Tensor]:
        """Weighted global and dense InfoNCE losses of two augmented views of the same images.

        ``iteration`` is the trainer's loss-function argument; DenseCL's loss does not depend on it."""
        if self.training:
            self.momentum_update()
        query_c5, query_global, query_dense = self.encoder_q(self.normalize(view_q))
        query_global = F.normalize(query_global, dim=1)
        query_dense = F.normalize(query_dense.flatten(2), dim=1)  # [B, D, S]
        with torch.no_grad():
            key_c5, key_global, key_dense = self.encoder_k(self.normalize(view_k))
            key_global = F.normalize(key_global, dim=1)
            key_pooled = F.normalize(key_dense.mean(dim=(2, 3)), dim=1)
            key_dense = F.normalize(key_dense.flatten(2), dim=1)
            matches = dense_matches(query_c5, key_c5)
            key_matched = torch.gather(key_dense, 2, matches[:, None].expand(-1, key_dense.shape[1], -1))
        temperature = self.config.temperature
        # The queues are cloned: autograd keeps them for the backward pass, and ``enqueue`` overwrites them in place.
        loss_global = info_nce(
            (query_global * key_global).sum(1), query_global @ self.queue_global.clone(), temperature
        )
        dense_positive = (query_dense * key_matched).sum(1).flatten()
        dense_negative = torch.einsum("bds,dk->bsk", query_dense, self.queue_dense.clone()).flatten(0, 1)
        loss_dense = info_nce(dense_positive, dense_negative, temperature)
        if self.training:
            self.enqueue(key_global, key_pooled)
        weight = self.config.dense_weight
        return {"loss_global": (1 - weight) * loss_global, "loss_dense": weight * loss_dense}
