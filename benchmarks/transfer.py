"""Transfer to a small image folder, measured on real images, built from CIFAR-10 alone.

1. Pre-train `cct_2_3x2_32` on CIFAR-10's six animal classes (bird, cat, deer, dog, frog, horse: 30,000 training
   images, tested on their 6,000 test images), written as an image folder and converted once into a prepared
   store (`cct prepare`), with the `cifar10-fast` recipe's schedule stretched to `--pretrain-epochs` (half of
   them at 24 px): from the store it trains at in-memory speed, so the backbone can be trained well.
2. Adapt from 100 training images per class, written as an image folder of PNGs exactly as a user's own folder
   would be, to two targets:
   * unseen classes: the four vehicle classes (airplane, automobile, ship, truck), which the pre-training never
     saw, measured on their 4,000 CIFAR-10 test images (the usual case: your classes are not CIFAR-10's);
   * seen classes: the six animal classes again, measured on their 6,000 test images (images like the
     pre-training's, where adapting can only lose some of what 30,000 images taught).
3. Compare, at the same budget (the `finetune` recipe's schedule, same epochs and steps), three seeds each:
   * scratch: random weights (learning rate 1e-3, the from-scratch rate of `keras-example`);
   * fine-tuned: `init` = the pre-trained weights, the `finetune` recipe as shipped (lr 1e-3);
   * fine-tuned, lr 1e-4, head 10x: the same at the low rate of BiT/DeiT-style fine-tuning, the pretrained
     layers 10x slower than the new head;
   * linear probe: the same weights with `freeze=backbone` (only the head trains; learning rate 1e-3, since
     a probe's head alone starts from zero).

Every run goes through the library's own training (`cct.train.train`), so the figures are what
`cct train finetune --set dataset=folder:... --set init=...` gives.

    python benchmarks/transfer.py [--data-dir DIR] [--quick]

writes `benchmarks/results/transfer/results.json` and `results.md` (a Markdown table: mean and standard deviation
of the final top-1 over the seeds, per target). `--quick` checks the whole path in a minute (a few images, one
epoch each) and writes into a temporary folder unless `--out` is given: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from cct.data import prepare_dataset
from cct.data.datasets import build_dataset
from cct.train import load_config, train
from cct.train.loop import cpu_name

ANIMALS = ("bird", "cat", "deer", "dog", "frog", "horse")
VEHICLES = ("airplane", "automobile", "ship", "truck")
# name: (image folder in the work dir, its classes), 100 training images per class
TARGETS = {"unseen classes": ("vehicles", VEHICLES), "seen classes": ("animals100", ANIMALS)}
MODES = {
    "scratch": ["init=none", "lr=1.0e-3", "head_lr_scale=1.0"],
    "fine-tuned": [],  # init is set to the pre-trained run
    "fine-tuned, lr 1e-4, head 10x": ["lr=1.0e-4", "head_lr_scale=10.0"],
    "linear probe": ["freeze=backbone", "lr=1.0e-3", "head_lr_scale=1.0"],
}
RESULTS = Path(__file__).resolve().parent / "results" / "transfer"


def write_folder(split, classes: tuple[str, ...], folder: Path, per_class: int | None, seed: int) -> int:
    """Write the images of `classes` from a CIFAR split as `folder/<class>/<n>.png`: `per_class` of each drawn
    at random with `seed` (all where None). Returns the number written."""
    generator = torch.Generator().manual_seed(seed)
    written = 0
    for name in classes:
        indices = (split.labels == split.classes.index(name)).nonzero().flatten()
        if per_class is not None:
            indices = indices[torch.randperm(len(indices), generator=generator)[:per_class]]
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in indices.tolist():
            Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).save(folder / name / f"{i}.png")
        written += len(indices)
    return written


def build_folders(data_dir: Path | None, work: Path, quick: bool) -> dict[str, int]:
    """The image trees, each with train/ and val/: `animals/` (pre-training), `vehicles/` and `animals100/` (the
    targets, 100 training images per class); returns their sizes."""
    train_split, test_split = build_dataset("cifar10", "train", data_dir), build_dataset("cifar10", "test", data_dir)
    pretrain_train, test = (50, 20) if quick else (None, None)
    sizes = {"animals/train": write_folder(train_split, ANIMALS, work / "animals" / "train", pretrain_train, 0),
             "animals/val": write_folder(test_split, ANIMALS, work / "animals" / "val", test, 0)}
    for folder, classes in TARGETS.values():
        sizes[f"{folder}/train"] = write_folder(train_split, classes, work / folder / "train", 100, 0)
        sizes[f"{folder}/val"] = write_folder(test_split, classes, work / folder / "val", test, 0)
    return sizes


def run(recipe: str, overrides: list[str], run_dir: Path) -> dict:
    """One training run through the library; returns its summary."""
    return train(load_config(recipe, overrides), run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="folder holding cifar-10-batches-py (default: $CCT_DATA)")
    parser.add_argument("--out", type=Path, help=f"results folder (default: {RESULTS}; --quick: a temporary one)")
    parser.add_argument("--work", type=Path, help="folder for the image trees and runs (default: temporary)")
    parser.add_argument("--pretrain-epochs", type=int, default=30, help="pre-training epochs on the animals")
    parser.add_argument("--epochs", type=int, default=30, help="adaptation epochs (every mode)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="image decoding workers")
    parser.add_argument("--quick", action="store_true", help="a minute-long check of the whole path")
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.epochs = 2, 1
    out = args.out or (Path(tempfile.mkdtemp(prefix="transfer-quick-")) if args.quick else RESULTS)
    work = args.work or Path(tempfile.mkdtemp(prefix="transfer-work-"))
    try:
        measure(args, work, out)
    finally:
        if args.work is None:  # tens of thousands of PNGs and nine runs
            shutil.rmtree(work, ignore_errors=True)
    return 0


def measure(args: argparse.Namespace, work: Path, out: Path) -> None:
    """Build the folders in `work`, pre-train, adapt in every mode and seed, write the results into `out`."""
    tic = time.perf_counter()

    sizes = build_folders(args.data_dir, work, args.quick)
    print(f"image folders in {work}: {sizes} ({time.perf_counter() - tic:.0f} s)", flush=True)
    common = [f"workers={args.workers}", "processes=1"]
    pretrained, store = work / "runs" / "pretrain", work / "animals-store"
    prepare_dataset(f"folder:{work / 'animals'}", 32, store, workers=args.workers)
    pretrain = run("cifar10-fast", [f"dataset=prepared:{store}", "model=cct_2_3x2_32",
                                    f"epochs={args.pretrain_epochs}", f"low_res_epochs={args.pretrain_epochs // 2}",
                                    f"eval_every={args.pretrain_epochs}", *common], pretrained)
    print(f"pre-trained on the animals: {pretrain['final_top1']:.2f}% top-1 "
          f"({pretrain['train_seconds']:.0f} s)", flush=True)

    runs = []
    for target, (folder, _) in TARGETS.items():
        for mode, overrides in MODES.items():
            for seed in range(args.seeds):
                init = [] if mode == "scratch" else [f"init={pretrained / 'last.safetensors'}"]
                summary = run("finetune", [f"dataset=folder:{work / folder}", f"epochs={args.epochs}",
                                           f"eval_every={args.epochs}", f"seed={seed}", *common, *init, *overrides],
                              work / "runs" / re.sub(r"[^a-z0-9]+", "-", f"{folder} {mode} {seed}"))
                runs.append(dict(target=target, mode=mode, seed=seed, top1=summary["final_top1"],
                                 top5=summary["final_top5"], train_seconds=summary["train_seconds"]))
                print(f"{target}, {mode}, seed {seed}: {summary['final_top1']:.2f}% top-1", flush=True)

    def stats(target: str, mode: str) -> dict:
        top1 = [r["top1"] for r in runs if r["target"] == target and r["mode"] == mode]
        return dict(mean_top1=statistics.mean(top1), std_top1=statistics.stdev(top1) if len(top1) > 1 else 0.0)

    result = dict(
        quick=args.quick, pretrain=dict(classes=ANIMALS, epochs=args.pretrain_epochs, top1=pretrain["final_top1"],
                                        train_seconds=pretrain["train_seconds"]),
        targets={target: dict(classes=classes, folder=folder) for target, (folder, classes) in TARGETS.items()},
        train_per_class=100, epochs=args.epochs, seeds=args.seeds, images=sizes, overrides=MODES,
        results={t: {m: stats(t, m) for m in MODES} for t in TARGETS},
        runs=runs, cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
        python=platform.python_version(), seconds=round(time.perf_counter() - tic, 1))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| start | unseen classes: 4 vehicles | seen classes: 6 animals |", "|---|---|---|"]
    lines += [f"| {mode} | " + " | ".join(f"{result['results'][t][mode]['mean_top1']:.2f} ± "
                                         f"{result['results'][t][mode]['std_top1']:.2f} %" for t in TARGETS) + " |"
              for mode in MODES]
    lines += ["", f"Top-1 on the targets' CIFAR-10 test images, mean ± sd over {args.seeds} seeds. cct_2_3x2_32 "
              f"pre-trained {args.pretrain_epochs} epochs on the 6 animal classes ({pretrain['final_top1']:.2f}% "
              f"top-1 on their test images); adapted {args.epochs} epochs on 100 images per class; {cpu_name()}, "
              f"{torch.get_num_threads()} threads."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    sys.exit(main())
