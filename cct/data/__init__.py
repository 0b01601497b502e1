"""Data: dataset readers (CIFAR, Flowers-102, ImageNet, image folders), prepared stores of pre-resized pixels
(`prepared:PATH`), batched augmentation on the training device, and the batches of an epoch (the same for
in-memory and file datasets, alone or under torchrun)."""

from .augment import BatchAugment, normalize
from .datasets import (
    DatasetInfo,
    ImageFiles,
    InMemoryImages,
    decode_image_file,
    eval_transform,
    resolve_data_root,
    train_transform,
)
from .jpeg import eval_file_transform, train_file_transform
from .loader import BatchSource, eval_batch_indices, steps_per_epoch, train_batch_indices
from .prepared import PreparedImages, build_dataset, dataset_info, ensure_dataset, prepare_dataset

__all__ = [
    "BatchAugment", "normalize", "DatasetInfo", "ImageFiles", "InMemoryImages", "build_dataset", "dataset_info",
    "decode_image_file", "ensure_dataset", "eval_transform", "resolve_data_root", "train_transform", "BatchSource",
    "eval_batch_indices", "steps_per_epoch", "train_batch_indices", "eval_file_transform", "train_file_transform",
    "PreparedImages", "prepare_dataset",
]
