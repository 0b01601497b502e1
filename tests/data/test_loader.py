"""Batch index plans of `cct.data.loader`."""

import torch

from cct.data.loader import eval_batch_indices


def test_evaluation_batches_cover_every_sample_once_and_are_never_empty():
    for count, batch, world in ((10, 4, 1), (10, 4, 3), (3, 500, 4), (0, 8, 2)):
        plans = [eval_batch_indices(count, batch, rank, world) for rank in range(world)]
        flat = [b for plan in plans for b in plan]
        assert all(0 < len(b) <= batch for b in flat)
        assert torch.cat([*flat, torch.empty(0, dtype=torch.long)]).tolist() == list(range(count))
