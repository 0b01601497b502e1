"""Training input pipelines from files, side by side in one run: images/s delivered as normalised float batches.

* `torchvision`: `ImageFolder` + `RandomResizedCrop` + `ToTensor` + `Normalize` in a DataLoader (the usual
  ImageNet pipeline; decodes every image in full, per-image float tensors in the workers).
* `jpeg` (ours, from the JPEGs): `ImageFiles` with `train_file_transform` (box drawn from the header, JPEG
  decoded at reduced DCT scale, only the box resampled, uint8 out) in `BatchSource`'s DataLoader, then
  `BatchAugment` (flip, normalise) on the batch.
* `prepared` (ours, from a store made once by `prepare_dataset` at 8/7 of the output size, as 72 px for 64):
  batches gathered from the memory-mapped pixels, then `BatchAugment` (random crop of the output size within
  the stored square, flip, normalise), as CIFAR is read and as `imagenet64-cct` trains.

The same number of DataLoader workers for both file pipelines; each measures at least `--images` training images
and 3 seconds after its workers have delivered a first batch (the store's preparation is timed apart). Where workers
decode, the consuming process keeps one torch thread per core they leave free (at least one): a second thread
only contends with the workers for the cores, and PyTorch's OpenMP threads spin while waiting, which cost the
JPEG pipeline a third of its images/s at 224 px on 2 cores. The prepared store has no workers and uses every core.
Freed memory is kept in the process (`retain_freed_memory`), as in the `cct` commands.

It also times decoding alone, on one core: a whole JPEG of the tree with Pillow at full size and at libjpeg's
1/2, 1/4 and 1/8 DCT scalings, and with torchvision's `decode_jpeg`; and resampling alone, a 300 px box of a
decoded image to 224 px with Pillow and with the JPEG path's torch kernel (median ms per image over
`--decode-files`).

    python benchmarks/make_jpeg_tree.py jpeg-tree            # 5,000 JPEGs of about 500 x 375
    python benchmarks/loader.py jpeg-tree [--workers N] [--sizes 224 128 64]

Writes benchmarks/results/loader/<cpu>.json: per size, `torchvision_img_per_s`, `jpeg_img_per_s`,
`prepared_img_per_s` and the two ratios to torchvision.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cct.data import BatchAugment, BatchSource, build_dataset, prepare_dataset, train_file_transform  # noqa: E402
from cct.data.datasets import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from cct.data.loader import train_batch_indices  # noqa: E402
from cct.train.loop import cpu_name, retain_freed_memory  # noqa: E402


def _images_per_s(batches: Iterator[torch.Tensor], images: int, min_seconds: float = 3.0) -> float:
    """Images/s over the batches after the first (which waits for the workers to start): at least `images`
    images and `min_seconds` (a fast pipeline's 4,096 images take a fraction of a second, too short to time)."""
    first = next(batches)
    start, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch)
        if seen + len(first) >= images and time.perf_counter() - start >= min_seconds:
            break
    return seen / (time.perf_counter() - start)


def _augment(size: int, crop: str) -> BatchAugment:
    return BatchAugment(num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD, out_size=size, crop=crop, padding=0,
                        hflip=0.5, channels_last=True)


def torchvision_batches(tree: Path, size: int, workers: int, batch_size: int) -> Iterator[torch.Tensor]:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(tree / "train"), transform=transform),
                                         batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    for images, _ in loader:
        yield images


def _source_batches(source: BatchSource, augment: BatchAugment, batch_size: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1000):
        indices = train_batch_indices(len(source), batch_size, seed=0, epoch=epoch)
        for images, labels, _ in source.batches(indices, seed=epoch):
            yield augment(images, labels, generator)[0]


def jpeg_batches(tree: Path, size: int, workers: int, batch_size: int) -> Iterator[torch.Tensor]:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - workers))
    dataset = build_dataset(f"folder:{tree}", "train")
    dataset.transform = train_file_transform(size)
    yield from _source_batches(BatchSource(dataset, torch.device("cpu"), workers), _augment(size, "none"),
                               batch_size)


def prepared_batches(store: Path, size: int, batch_size: int) -> Iterator[torch.Tensor]:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dataset = build_dataset(f"prepared:{store}", "train")
    yield from _source_batches(BatchSource(dataset, torch.device("cpu")), _augment(size, "pad"), batch_size)


def _median_ms(work, items) -> float:
    """Median milliseconds of `work(item)` over `items`, on one core, after a warm-up on the first ten."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for item in items[:10]:
        work(item)
    times = []
    for item in items:
        start = time.perf_counter()
        work(item)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return round(sorted(times)[len(times) // 2] * 1e3, 3)


def decode_ms(tree: Path, files: int) -> dict[str, float]:
    """Median milliseconds to decode one whole JPEG of the tree on one core, per decoder and DCT scale."""
    import warnings

    from PIL import Image
    from torchvision.io import decode_jpeg

    paths = sorted((tree / "train").rglob("*.jpg"))[:files]

    def pillow(scale: int):
        def decode(path: Path) -> None:
            with Image.open(path) as image:
                image.draft("RGB", (image.size[0] // scale, image.size[1] // scale))
                image.load()
        return decode

    def torchvision(path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            decode_jpeg(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))

    result = {f"pillow_1/{scale}" if scale > 1 else "pillow": _median_ms(pillow(scale), paths)
              for scale in (1, 2, 4, 8)}
    result["torchvision_decode_jpeg"] = _median_ms(torchvision, paths)
    return result


def resample_ms(tree: Path, files: int, size: int = 224, side: int = 300) -> dict[str, float]:
    """Median milliseconds to resample the central `side` x `side` box of a decoded JPEG of the tree to `size` px,
    bilinear and antialiased, on one core: Pillow's `resize(box=...)` against the torch kernel the JPEG path uses
    (from the box's pixels copied out of Pillow, the copy included)."""
    import numpy as np
    from PIL import Image

    images = []
    for path in sorted((tree / "train").rglob("*.jpg"))[:files]:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    transform = train_file_transform(size)

    def box(image: Image.Image) -> tuple[int, int, int, int]:
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return left, top, left + side, top + side

    def pillow(image: Image.Image) -> None:
        np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box(image)))

    def ours(image: Image.Image) -> None:
        pixels = torch.from_numpy(np.array(image.crop(box(image)), dtype=np.uint8)).permute(2, 0, 1)
        transform._resample(pixels, (0, 0, side, side))

    return {f"pillow_{side}_to_{size}": _median_ms(pillow, images), f"torch_{side}_to_{size}": _median_ms(ours, images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", type=Path, help="an ImageFolder tree with train/ (benchmarks/make_jpeg_tree.py)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128, 64])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=4096, help="images timed per pipeline and size")
    parser.add_argument("--decode-files", type=int, default=250, help="JPEGs timed for the decode figures")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/loader/<cpu>.json")
    args = parser.parse_args()
    retain_freed_memory()  # as the `cct` commands do: a 224 px float batch is otherwise page-faulted afresh each time
    files = sum(1 for p in (args.tree / "train").rglob("*") if p.is_file())
    images = min(args.images, files)
    result = dict(cpu=cpu_name(), cpus=len(os.sched_getaffinity(0)), workers=args.workers, torch=torch.__version__,
                  batch_size=args.batch_size, min_images_timed=images, min_seconds_timed=3.0, tree_images=files,
                  load_average=os.getloadavg()[0], sizes={})
    result["decode_ms_one_core"] = decode_ms(args.tree, args.decode_files)
    result["resample_ms_one_core"] = resample_ms(args.tree, args.decode_files)
    print("decoding one JPEG on one core, median ms:",
          ", ".join(f"{k} {v}" for k, v in result["decode_ms_one_core"].items()))
    print("resampling a crop on one core, median ms:",
          ", ".join(f"{k} {v}" for k, v in result["resample_ms_one_core"].items()))
    print(f"{result['cpu']}, {args.workers} workers, batches of {args.batch_size}, {images} images per figure")
    print(f"{'size':>5} {'torchvision':>12} {'jpeg':>9} {'prepared':>9} {'jpeg x':>7} {'prepared x':>10}")
    with tempfile.TemporaryDirectory(prefix="cct-loader-") as work:
        for size in args.sizes:
            start = time.perf_counter()
            store = Path(work) / f"store{size}"
            prepare_dataset(f"folder:{args.tree}", round(size * 8 / 7), store, workers=args.workers)
            prepare_seconds = time.perf_counter() - start
            row = dict(
                torchvision_img_per_s=_images_per_s(torchvision_batches(args.tree, size, args.workers,
                                                                        args.batch_size), images),
                jpeg_img_per_s=_images_per_s(jpeg_batches(args.tree, size, args.workers, args.batch_size), images),
                prepared_img_per_s=_images_per_s(prepared_batches(store, size, args.batch_size), images),
                prepare_seconds=round(prepare_seconds, 2))
            row["jpeg_vs_torchvision"] = row["jpeg_img_per_s"] / row["torchvision_img_per_s"]
            row["prepared_vs_torchvision"] = row["prepared_img_per_s"] / row["torchvision_img_per_s"]
            result["sizes"][str(size)] = {k: round(v, 2) for k, v in row.items()}
            print(f"{size:>5} {row['torchvision_img_per_s']:>12.0f} {row['jpeg_img_per_s']:>9.0f} "
                  f"{row['prepared_img_per_s']:>9.0f} {row['jpeg_vs_torchvision']:>7.2f} "
                  f"{row['prepared_vs_torchvision']:>10.2f}")
    slug = re.sub(r"[^a-z0-9]+", "-", result["cpu"].lower()).strip("-") or "cpu"
    out = args.out or Path(__file__).resolve().parent / "results" / "loader" / f"{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
