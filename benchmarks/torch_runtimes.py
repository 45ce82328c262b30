"""The PyTorch runtimes the benchmarks time: the eager network plus post-processing to the graph contract, in fp32 and
in bf16 done the fast way. Light on purpose (torch and the model only): a runtime worker process imports it, and its
peak memory should be the runtime's (``benchmarks.runtime_worker``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from training.config import Config
from training.models import SOLOv2
from training.models.postprocess import postprocess
from training.models.solov2 import SOLOv2Output


class ChannelsLastNetwork(nn.Module):
    """A copy of a SOLOv2 with its weights in ``dtype`` and channels_last, fed channels_last input (the network
    casts the uint8 pixels to its own dtype), handing fp32 outputs to post-processing. oneDNN's convolutions run
    fastest on channels_last (NHWC) tensors; a contiguous (NCHW) input would be reordered at every layer. The original
    model is left as it was."""

    def __init__(self, model: SOLOv2, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(dtype=dtype, memory_format=torch.channels_last).eval()

    def forward(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> SOLOv2Output:
        output = self.model(images.contiguous(memory_format=torch.channels_last), sizes)
        return SOLOv2Output(
            *(
                field.float() if isinstance(field, torch.Tensor) else type(field)(t.float() for t in field)
                for field in output
            )
        )


class Bf16Network(ChannelsLastNetwork):
    """bf16 done right: bf16 weights and input in channels_last, so oneDNN runs bf16 convolutions natively (AMX or
    AVX512-BF16 where the CPU has them, emulated where not); post-processing (thresholds, Matrix NMS) stays fp32, as
    int8 keeps it float. ``torch.autocast`` instead keeps fp32 weights and casts weights and activations around every
    op: 1.1-1.3x over fp32 where this gave 2.0x over fp32 channels_last (ResNet-50 at 512 px, a CPU with AMX). The
    backbone and FPN run channels_last throughout; the CoordConv concatenations (the heads' S x S grids, the mask
    branch's P5) come out NCHW, small maps oneDNN reorders."""

    def __init__(self, model: SOLOv2) -> None:
        super().__init__(model, torch.bfloat16)


def eager(network: nn.Module, config: Config, images: torch.Tensor) -> Callable[[], Any]:
    """One call of ``network`` on ``images`` and post-processing to the graph contract (fixed-K detections)."""

    @torch.inference_mode()
    def call() -> Any:
        return postprocess(network(images), config.inference, config.model.strides)

    return call
