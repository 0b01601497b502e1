"""Make an ImageFolder tree of JPEGs with ImageNet-like sizes, for `benchmarks/loader.py`.

Each image is a CIFAR-10 training image (read from `CCT_DATA`) upsampled to about 500 x 375 (landscape or
portrait, sides varied by up to 15%), with mild noise added so that it holds photo-like detail (an upsampled
32 px image alone compresses and decodes unrealistically fast), saved at JPEG quality 90: about the size and
the decoding cost of an ILSVRC-2012 image. Without CIFAR-10 (`--procedural`), smooth random pictures are used.

    CCT_DATA=/path/to/data python benchmarks/make_jpeg_tree.py OUT [--images 5000] [--val 500]

Writes OUT/train/<class>/NNNNN.jpg and OUT/val/<class>/NNNNN.jpg (the ten CIFAR-10 classes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cct.data.datasets import build_dataset  # noqa: E402


def _sources(count: int, procedural: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`count` small HWC uint8 pictures, their labels and the class names."""
    if procedural:
        classes = [f"class_{i}" for i in range(10)]
        low = rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)  # upsampled: smooth colour fields
        return low, rng.integers(0, 10, count), classes
    cifar = build_dataset("cifar10", "train")
    pick = rng.permutation(len(cifar))[:count]
    return cifar.images[pick].permute(0, 2, 3, 1).numpy(), cifar.labels[pick].numpy(), cifar.classes


def _photo(small: np.ndarray, rng: np.random.Generator, noise: float) -> Image.Image:
    long_side, short_side = (int(s * rng.uniform(0.85, 1.15)) for s in (500, 375))
    size = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
    big = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    big += rng.normal(0.0, noise, big.shape).astype(np.float32)
    return Image.fromarray(big.clip(0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=5000, help="training images")
    parser.add_argument("--val", type=int, default=500, help="validation images")
    parser.add_argument("--noise", type=float, default=12.0, help="standard deviation of the added noise")
    parser.add_argument("--procedural", action="store_true", help="random pictures instead of CIFAR-10")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists: choose a new folder")
    rng = np.random.default_rng(args.seed)
    pictures, labels, classes = _sources(args.images + args.val, args.procedural, rng)
    for i, (small, label) in enumerate(zip(pictures, labels, strict=True)):
        folder = args.out / ("train" if i < args.images else "val") / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        _photo(small, rng, args.noise).save(folder / f"{i:05d}.jpg", quality=90)
    total = sum(p.stat().st_size for p in args.out.rglob("*.jpg"))
    print(f"wrote {len(pictures)} JPEGs ({total / len(pictures) / 1e3:.0f} kB on average) under {args.out}")


if __name__ == "__main__":
    main()
