"""Deterministic, resumable batches: iteration i always gets the same samples and augmentation seeds,
whatever the number of workers, and whether or not the run was interrupted and resumed."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from training.errors import UserError


class TrainBatchSampler:
    """Yields, for each iteration in ``[start_iter, num_iters)``, this rank's share of a global batch as
    ``(dataset index, augmentation seed)`` pairs. The stream walks a fresh permutation every epoch."""

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int,
        start_iter: int,
        num_iters: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise UserError(
                f"batch size {batch_size} is not divisible by {world_size} processes; "
                "--batch-size is the total over all processes"
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.seed = seed
        self.start_iter = start_iter
        self.num_iters = num_iters
        self.rank = rank
        self._epoch = -1
        self._permutation = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return max(0, self.num_iters - self.start_iter)

    def _index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.dataset_size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._permutation = torch.randperm(self.dataset_size, generator=generator)
            self._epoch = epoch
        return int(self._permutation[offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for iteration in range(self.start_iter, self.num_iters):
            first = iteration * self.batch_size + self.rank * self.local_batch
            yield [(self._index_at(p), self.seed * 1_000_003 + p) for p in range(first, first + self.local_batch)]
