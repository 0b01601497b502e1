"""Batch index plans of `cct.data.loader`, and the one DataLoader of a file dataset."""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cct.data import BatchSource, build_dataset, train_batch_indices, train_transform
from cct.data.loader import eval_batch_indices


def test_evaluation_batches_cover_every_sample_once_and_are_never_empty():
    for count, batch, world in ((10, 4, 1), (10, 4, 3), (3, 500, 4), (0, 8, 2)):
        plans = [eval_batch_indices(count, batch, rank, world) for rank in range(world)]
        flat = [b for plan in plans for b in plan]
        assert all(0 < len(b) <= batch for b in flat)
        assert torch.cat([*flat, torch.empty(0, dtype=torch.long)]).tolist() == list(range(count))


def _image_tree(root: Path, classes: int = 2, per_class: int = 12) -> Path:
    """An ImageFolder tree of small PNGs of random noise (every crop of them differs)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


class _StampPid:
    """A transform that writes the decoding process's id into the image's first pixels."""

    def __init__(self, crop):
        self.crop = crop

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self.crop(image).clone()
        image.view(-1)[:4] = torch.tensor(list(os.getpid().to_bytes(4, "little")), dtype=torch.uint8)
        return image


def _pids(images: torch.Tensor) -> set[int]:
    return {int.from_bytes(bytes(row.tolist()), "little") for row in images.flatten(1)[:, :4]}


def _files(tmp_path: Path, workers: int) -> BatchSource:
    data = build_dataset(f"folder:{_image_tree(tmp_path / 'tree')}", "train")
    data.transform = train_transform(16)
    return BatchSource(data, torch.device("cpu"), workers)


def test_file_dataset_workers_persist_across_epochs(tmp_path):
    source = _files(tmp_path, workers=2)
    source.dataset.transform = _StampPid(source.dataset.transform)
    seen = []
    for epoch in range(2):
        batches = train_batch_indices(len(source), 4, seed=0, epoch=epoch)
        seen.append(set().union(*(_pids(images) for images, _, _ in source.batches(batches, seed=epoch))))
    assert seen[0] == seen[1] and os.getpid() not in seen[0]


def test_file_batches_replay_exactly_from_any_batch_whatever_the_workers(tmp_path):
    source = _files(tmp_path, workers=2)
    batches = train_batch_indices(len(source), 4, seed=3, epoch=1)
    whole = [(images, labels) for images, labels, _ in source.batches(batches, seed=7)]
    assert len(whole) == len(source) // 4
    again = [images for images, _, _ in source.batches(batches, seed=7)]  # a second pass of the same workers
    other_seed = [images for images, _, _ in source.batches(batches, seed=8)]
    resumed = _files(tmp_path / "fresh", workers=0)  # a new process resuming at batch 2, without workers
    tail = [(images, labels) for images, labels, _ in resumed.batches(batches[2:], seed=7)]
    for (images, labels), (images2, labels2) in zip(whole[2:], tail, strict=True):
        assert torch.equal(images, images2) and torch.equal(labels, labels2)
    assert all(torch.equal(a, b) for (a, _), b in zip(whole, again, strict=True))
    assert not all(torch.equal(a, b) for (a, _), b in zip(whole, other_seed, strict=True))
