"""DDP context from torchrun's environment (gloo on CPU, nccl on CUDA); a single process needs nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain single process: the one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> DistributedContext:
        """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar logs over processes (the logged loss is the whole batch's, not rank 0's share)."""
        if not self.enabled:
            return values
        packed = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(packed)
        return dict(zip(values, (packed / self.world_size).tolist(), strict=True))

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
