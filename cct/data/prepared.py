"""Prepared stores: a file dataset converted once into pre-resized uint8 pixels that later epochs read without
decoding a single JPEG (`cct prepare`, then `dataset=prepared:PATH`).

Format. A store is a folder with one sub-folder per split (`train/`, `val/`), each holding

* `images.u8`: the raw pixels, uint8, `N x 3 x S x S` in C order (no header),
* `labels.npy`: the `N` int64 labels,
* `meta.json`: `format`, `version`, `size` (S), `count` (N), `skipped` (bad source images left out), `classes`,
  `class_ids`, `mean`, `std`, `source` (the dataset it came from) and `source_split`.

Each image is the source's shorter side resized to S, then its central S x S square (the whole image where it is
square; a recipe's random-resized crop then works inside that square). Why this format: the file is memory-mapped,
so a run reads only the batches it touches and its memory stays flat however large the store (ImageNet at 72 px
is about 20 GB); the page cache is shared by every DDP process on the machine; a batch is one gather of rows, so
the trainer treats the store like CIFAR's in-memory tensor (`InMemoryImages`: batched crop, flip and the rest on
the training device); and it needs nothing beyond numpy. The `N x 3 x S x S` layout is the one `InMemoryImages`
and `BatchAugment` take, so nothing is transposed per batch. Archive formats (webdataset tar shards, LitData
chunks) would add a dependency for streaming from object stores and compression, which a local store of raw
pixels does not need.

Writing is atomic: the store is written into a temporary folder beside `OUT` and renamed to `OUT` at the end,
so an interrupted `cct prepare` leaves no half store behind; an existing `OUT` is replaced only when asked
and only if it is a store (or an empty folder): `--overwrite` never deletes anything else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cct.errors import CCTError, UsageError

from . import datasets
from .datasets import DatasetInfo, InMemoryImages, collate_skip_bad
from .jpeg import eval_file_transform

__all__ = ["FORMAT", "PreparedImages", "build_dataset", "dataset_info", "ensure_dataset", "prepare_dataset"]

FORMAT = "cct-prepared"
_VERSION = 1
_PREFIX = "prepared:"
_SPLITS = ("train", "val")


class PreparedImages(InMemoryImages):
    """One split of a prepared store, memory-mapped: `images` is a uint8 `N x 3 x S x S` tensor over the file
    (nothing read until indexed), optionally its central `crop` x `crop` square (a view, not a copy).

    Attributes: those of `InMemoryImages`, and `meta` (the split's meta.json).
    """

    def __init__(self, folder: Path, crop: int | None = None):
        meta = _read_meta(folder)
        count, size = int(meta["count"]), int(meta["size"])
        try:
            # copy-on-write mapping: writable for torch (no warning), and nothing is ever written back to the file
            pixels = np.memmap(folder / "images.u8", dtype=np.uint8, mode="c", shape=(count, 3, size, size)) \
                if count else np.zeros((0, 3, size, size), dtype=np.uint8)
            labels = np.load(folder / "labels.npy")
        except (OSError, ValueError) as exc:  # a missing or truncated file (shorter than meta.json says)
            raise CCTError(f"prepared store {folder} is incomplete ({exc}): prepare it again") from None
        if labels.shape != (count,) or (count and not 0 <= labels.min() <= labels.max() < len(meta["classes"])):
            raise CCTError(f"prepared store {folder} holds labels that do not fit its {count} images and "
                           f"{len(meta['classes'])} classes: prepare it again")
        images = torch.from_numpy(pixels)
        if crop is not None and crop < size:
            offset = (size - crop) // 2
            images = images[:, :, offset:offset + crop, offset:offset + crop]
        self.images = images  # not made contiguous as `InMemoryImages` does: that would read the whole file
        self.labels = torch.from_numpy(labels).to(torch.int64)
        self.classes = list(meta["classes"])
        self.name, self.split, self.meta = f"{_PREFIX}{folder.parent}", folder.name, meta
        self.transform = None
        self.skipped = 0


def _store_path(name: str) -> Path | None:
    """PATH of a `prepared:PATH` name (relative to the working directory, like `folder:PATH`), else None."""
    if not isinstance(name, str) or not name.strip().lower().startswith(_PREFIX):
        return None
    path = name.strip()[len(_PREFIX):].strip()
    if not path:
        raise UsageError("dataset 'prepared:' needs a path, e.g. prepared:imagenet64 (made by cct prepare)")
    return Path(path).expanduser()


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CCTError(f"prepared store not found: expected {folder}/{{images.u8,labels.npy,meta.json}}; make it "
                       f"with: cct prepare DATASET --size S -o {folder.parent}") from None
    except (OSError, ValueError) as exc:
        raise CCTError(f"prepared store {folder}/meta.json is unreadable ({exc}): prepare it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != _VERSION:
        raise CCTError(f"{folder} is not a prepared store of this version of cct: prepare it again")
    return meta


def dataset_info(name: str) -> DatasetInfo:
    """`datasets.dataset_info`, and for `prepared:PATH` the store's own figures (read from its train meta.json;
    where there is none yet, a placeholder with the right name and splits, so that a recipe naming a store
    still loads: reading the data then says what is missing)."""
    path = _store_path(name)
    if path is None:
        return datasets.dataset_info(name)
    folder = path / "train"
    if not (folder / "meta.json").is_file():  # not in memory: no crop check on a placeholder size
        return DatasetInfo("prepared", None, 0, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD, False, _SPLITS)
    meta = _read_meta(folder)
    return DatasetInfo("prepared", len(meta["classes"]), int(meta["size"]), tuple(meta["mean"]), tuple(meta["std"]),
                       True, _SPLITS)


def ensure_dataset(name: str, splits, root=None, *, download: bool = False) -> None:
    """`datasets.ensure_dataset`, and for `prepared:PATH` a check that the store's `splits` are there."""
    path = _store_path(name)
    if path is None:
        datasets.ensure_dataset(name, splits, root, download=download)
        return
    for split in splits:
        _read_meta(path / _check_split(split))


def _check_split(split: str) -> str:
    key = str(split).strip().lower()
    if key not in _SPLITS:
        raise UsageError(f"unknown split '{split}' for a prepared store (valid: {', '.join(_SPLITS)})")
    return key


def build_dataset(name: str, split: str, root=None, *, img_size: int | None = None, **options):
    """`datasets.build_dataset`, and for `prepared:PATH` its split as `PreparedImages` (the evaluation split
    cut to its central `img_size` square where the store is larger: training crops its own)."""
    path = _store_path(name)
    if path is None:
        return datasets.build_dataset(name, split, root, **options)
    key = _check_split(split)
    images = PreparedImages(path / key, crop=img_size if key == "val" else None)
    stored = int(images.meta["size"])
    if img_size is not None and img_size > stored:
        raise CCTError(f"img_size {img_size} is larger than the {stored} px images of {path}: prepare the store "
                       f"again with --size {img_size} or more")
    return images


def _write_split(dataset: datasets.ImageFiles, size: int, folder: Path, workers: int, source: str,
                 source_split: str) -> dict:
    """Decode, resize and write one split into `folder`; returns its meta.json."""
    dataset.transform = eval_file_transform(size, crop_pct=1.0)
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=collate_skip_bad)
    count = skipped = 0
    labels = []
    with open(folder / "images.u8", "wb") as f:
        for images, batch_labels, bad in loader:
            f.write(images.numpy().tobytes())
            labels.append(batch_labels.numpy())
            count, skipped = count + len(batch_labels), skipped + bad
        f.flush()
        os.fsync(f.fileno())
    np.save(folder / "labels.npy", np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64))
    info = datasets.dataset_info(source)
    meta = dict(format=FORMAT, version=_VERSION, size=size, count=count, skipped=skipped,
                classes=list(dataset.classes), class_ids=list(dataset.class_ids), mean=list(info.mean),
                std=list(info.std), source=source, source_split=source_split,
                layout=f"images.u8: uint8 N x 3 x {size} x {size}, C order; shorter side resized, central square")
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def prepare_dataset(name: str, size: int, out: str | os.PathLike[str], *, root=None, overwrite: bool = False,
                    workers: int = 4, **options) -> dict[str, dict]:
    """Convert a file dataset into a prepared store at `out` (`out/train`, `out/val`), atomically.

    Args:
        name: `imagenet`, `flowers102` or `folder:PATH` (as in training).
        size: S, the side of the stored squares.
        out: the store's folder; must not exist unless `overwrite`.
        root: the folder holding the datasets (default: `resolve_data_root`).
        overwrite: replace an existing `out`.
        workers: DataLoader processes decoding the images.
        **options: `build_dataset` options (`flowers_split`, `val_fraction`, `seed`, `strict_images`).

    Returns:
        The meta.json of each split, by split name (`count`, `skipped`, ...).

    Raises:
        UsageError: `out` exists without `overwrite`, a bad size or a dataset that is not made of files.
        CCTError: missing source data (one line, as in training).
    """
    if size < 1:
        raise UsageError(f"--size must be >= 1, got {size}")
    target = Path(out)
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists: pass --overwrite to replace it, or -o another folder")
    if target.exists() and not _replaceable(target):
        raise UsageError(f"{target} is not a prepared store: refusing to replace it, choose another -o folder")
    info = datasets.dataset_info(name)
    if info.in_memory:
        raise UsageError(f"{name} is already held in memory as pixels: train on it directly, there is nothing to "
                         "prepare")
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier run of this process id, killed
    staging.mkdir(parents=True)
    try:
        metas = {}
        for split, source_split in zip(_SPLITS, ("train", info.eval_split), strict=True):
            (staging / split).mkdir()
            dataset = datasets.build_dataset(name, source_split, root, **options)
            metas[split] = _write_split(dataset, size, staging / split, workers, name, source_split)
        _replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metas


def _replaceable(target: Path) -> bool:
    """Whether `--overwrite` may delete `target`: an empty folder or a store (never any other folder or file)."""
    if not target.is_dir() or target.is_symlink():
        return False
    names = {entry.name for entry in target.iterdir()}
    return names <= set(_SPLITS) and all(_is_split_folder(target / name) for name in names)


def _is_split_folder(folder: Path) -> bool:
    try:
        _read_meta(folder)
    except CCTError:
        return False
    return set(os.listdir(folder)) <= {"images.u8", "labels.npy", "meta.json"}


def _replace(staging: Path, target: Path) -> None:
    """Put the finished `staging` folder at `target`, the old `target` (if any) removed only once it is there."""
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
