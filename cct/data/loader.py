"""Batches for training and evaluation, the same way for in-memory and file datasets, alone or under torchrun.

An epoch's order is a permutation computed from (seed, epoch) alone, so a resumed run (even one resumed
mid-epoch) sees exactly the batches it would have seen, and every rank can compute every other rank's share.
Each rank takes an interleaved shard of the permutation; all ranks get the same number of full batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import ImageFiles, InMemoryImages, collate_skip_bad
from .prepared import PreparedImages

Batch = tuple[torch.Tensor, torch.Tensor, int]  # uint8 images B x 3 x S x S, int64 labels, images skipped


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch` of a run seeded with `seed` (its order, its per-image random crops)."""
    return seed * 100_003 + epoch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of epoch `epoch`: a permutation depending only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


def train_batch_indices(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                        world_size: int = 1) -> list[torch.Tensor]:
    """This rank's batches of sample indices for one epoch (last partial batch dropped, equal count per rank)."""
    steps = num_samples // (batch_size * world_size)
    order = epoch_permutation(num_samples, seed, epoch)[: steps * batch_size * world_size]
    return list(order.view(steps, world_size, batch_size)[:, rank].unbind(0)) if steps else []


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps in one epoch (each a batch on every rank)."""
    return num_samples // (batch_size * world_size)


class _IndexBatches:
    """The batch sampler of a file dataset's one DataLoader: the (seed, index) batches of the current pass, set
    before each pass while the workers persist."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int | None, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int | None, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _SeededItems(Dataset):
    """Items of a file dataset by (seed, index): the image's random transform draws from torch's generator
    seeded with `seed` (where not None), so a crop depends on neither the worker that decodes it nor on where
    a run resumed."""

    def __init__(self, dataset: ImageFiles):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int | None, int]):
        seed, index = item
        if seed is not None:
            # the CPU generator alone: torch.manual_seed also queues a seed for every accelerator backend,
            # recording a stack trace each time, which costs a tenth of a small image's decoding
            torch.default_generator.manual_seed(seed)
        return self.dataset[index]


class BatchSource:
    """Yields uint8 batches of a dataset: by indexing one device tensor (in-memory data, no worker, no copy
    per image) or through one DataLoader whose workers decode and crop files, started at the first pass and
    kept for every later one (pinned memory on a GPU)."""

    def __init__(self, dataset: InMemoryImages | ImageFiles, device: torch.device, workers: int = 4):
        self.dataset = dataset
        self.device = device
        # never more workers than CPUs this process may use: more only contend (PyTorch warns of it, and the
        # default of 4 would make it warn on every 2-core laptop)
        self.workers = min(workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else os.cpu_count() or 1)
        if isinstance(dataset, InMemoryImages):
            # a memory-mapped store stays on the host (it may not fit the device): each batch is gathered there
            store = torch.device("cpu") if isinstance(dataset, PreparedImages) else device
            self.images = dataset.images.to(store)
            self.labels = dataset.labels.to(store)
        else:
            self._plan = _IndexBatches()
            self.loader = DataLoader(_SeededItems(dataset), batch_sampler=self._plan, num_workers=self.workers,
                                     collate_fn=collate_skip_bad, pin_memory=device.type == "cuda",
                                     persistent_workers=self.workers > 0)

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, index_batches: list[torch.Tensor], seed: int | None = None) -> Iterator[Batch]:
        """One batch per index tensor, in order.

        Args:
            index_batches: the sample indices of each batch.
            seed: for file datasets, each image's random transform is seeded by (`seed`, its index), so a pass
                over the same batches gives the same crops, whatever the workers (None: not seeded).

        Returns:
            An iterator of (uint8 images, int64 labels, images skipped) on the source's device.
        """
        if isinstance(self.dataset, InMemoryImages):
            for idx in index_batches:
                idx = idx.to(self.images.device)
                yield (self.images.index_select(0, idx).to(self.device, non_blocking=True),
                       self.labels.index_select(0, idx).to(self.device, non_blocking=True), 0)
            return
        self._plan.batches = [[(None if seed is None else seed * 1_000_003 + i, i) for i in idx.tolist()]
                              for idx in index_batches]
        for images, labels, skipped in self.loader:
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), skipped)


def eval_batch_indices(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """This rank's contiguous share of the evaluation set, in batches (every sample evaluated exactly once)."""
    share = torch.arange(num_samples).tensor_split(world_size)[rank]
    return [batch for batch in share.split(batch_size) if len(batch)]  # a rank with nothing gets no batch
