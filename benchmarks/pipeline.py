"""Throughput of the batched CIFAR training augmentation (cct.data.augment) against torchvision per image.

Ours: crop(32, pad 4) + flip + AutoAugment(CIFAR10) + normalise + random erasing (0.25) + Mixup/CutMix
(0.8 / 1.0, label smoothing 0.1) on batches of 128 gathered from one uint8 tensor holding all 50,000 training
images.  Baseline: torchvision's per-image RandomCrop(32, 4), RandomHorizontalFlip, AutoAugment(CIFAR10),
ToTensor, Normalize, RandomErasing(0.25) in a DataLoader with 2 workers, plus timm's Mixup on each batch; and
the same per-image transforms run in-process (0 workers), which is what they cost in CPU time per batch.
Optionally one training step of cct_2_3x2_32 (bf16 autocast, AdamW) for scale.

    CCT_DATA=/path/to/data python benchmarks/pipeline.py [--threads 2] [--device cpu]

Prints a table and writes benchmarks/results/pipeline/<cpu>-<threads>t[-<device>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cct.data.augment import BatchAugment  # noqa: E402
from cct.train.bench import window_seconds  # noqa: E402
from cct.train.loop import cpu_name  # noqa: E402

CIFAR_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR_STD = (0.24703223, 0.24348513, 0.26158784)


def load_cifar_train(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in range(1, 6):
        with open(root / "cifar-10-batches-py" / f"data_batch_{i}", "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(batch[b"data"].reshape(-1, 3, 32, 32))
        ys.extend(batch[b"labels"])
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.int64)


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def bench_ours(x: torch.Tensor, y: torch.Tensor, args, device: torch.device) -> dict:
    aug = BatchAugment(
        num_classes=10,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        crop="pad",
        padding=4,
        hflip=0.5,
        auto_augment="cifar10",
        mixup=0.8,
        cutmix=1.0,
        label_smoothing=0.1,
        erasing=0.25,
    )
    xd, yd = x.to(device), y.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    n = xd.shape[0]
    bs = args.batch_size
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def step():
        idx = torch.randint(0, n, (bs,), generator=gen, device=device)
        aug(xd.index_select(0, idx), yd.index_select(0, idx), gen)

    secs = window_seconds(step, args.windows, args.window_batches, warmup=10, sync=sync)
    med = statistics.median(secs)
    return {"ms_per_batch": med * 1e3, "images_per_s": bs / med, "windows_ms": [s * 1e3 for s in secs]}


class _PerImageCIFAR(torch.utils.data.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray, transform) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def _tv_transform():
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.AutoAugment(T.AutoAugmentPolicy.CIFAR10),
            T.ToTensor(),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
            T.RandomErasing(p=0.25),
        ]
    )


def bench_torchvision(x: torch.Tensor, y: torch.Tensor, args, workers: int) -> dict:
    from timm.data import Mixup

    ds = _PerImageCIFAR(x.permute(0, 2, 3, 1).numpy().copy(), y.numpy(), _tv_transform())
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    bs = args.batch_size
    if workers == 0:
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=0, drop_last=True)
    else:
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=bs,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=True,
            prefetch_factor=4,
        )
    it = iter(loader)

    def step():
        nonlocal it
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        mix(xb, yb)

    windows = args.windows if workers else max(3, args.windows // 2)
    per = args.window_batches if workers else max(5, args.window_batches // 4)
    secs = window_seconds(step, windows, per, warmup=5)
    med = statistics.median(secs)
    return {"ms_per_batch": med * 1e3, "images_per_s": bs / med, "windows_ms": [s * 1e3 for s in secs]}


def bench_train_step(args, device: torch.device) -> dict | None:
    try:
        import cct

        create_model = cct.create_model
    except (ImportError, AttributeError):
        return None
    model = create_model("cct_2_3x2_32", num_classes=10).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    bs = args.batch_size
    gen = torch.Generator(device=device).manual_seed(0)
    xb = torch.randn(bs, 3, 32, 32, generator=gen, device=device).contiguous(
        memory_format=torch.channels_last
    )
    yb = torch.softmax(torch.randn(bs, 10, generator=gen, device=device), dim=1)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.sum(-yb * torch.log_softmax(model(xb).float(), dim=1), dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    secs = window_seconds(
        step, max(3, args.windows // 2), max(3, args.window_batches // 5), warmup=3, sync=sync
    )
    med = statistics.median(secs)
    return {
        "model": "cct_2_3x2_32",
        "autocast": "bfloat16",
        "optimizer": "AdamW",
        "ms_per_step": med * 1e3,
        "windows_ms": [s * 1e3 for s in secs],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("CCT_DATA"), help="folder holding cifar-10-batches-py")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--window-batches", type=int, default=40)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the torchvision baseline")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-train-step", action="store_true")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/pipeline/<cpu>-<n>t.json)"
    )
    args = p.parse_args()
    if not args.data:
        p.error("set CCT_DATA or pass --data")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y = load_cifar_train(Path(args.data))
    load_before = _loadavg()

    rows: list[tuple[str, dict]] = []
    res: dict = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "device": str(device),
        "batch_size": args.batch_size,
        "pipeline": "crop32 pad4 + hflip + AutoAugment(cifar10) + normalise + erasing 0.25 + "
        "mixup 0.8 / cutmix 1.0 (batch mode) + label smoothing 0.1",
    }
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    res["ours"] = bench_ours(x, y, args, device)
    rows.append(("cct BatchAugment (batched, in-process)", res["ours"]))
    if not args.no_baseline:
        res["torchvision_in_process"] = bench_torchvision(x, y, args, workers=0)
        rows.append(("torchvision per image, 0 workers + timm Mixup", res["torchvision_in_process"]))
        if args.workers > 0:
            res["torchvision_dataloader"] = bench_torchvision(x, y, args, workers=args.workers)
            res["torchvision_dataloader"]["workers"] = args.workers
            rows.append(
                (
                    f"torchvision per image, DataLoader {args.workers} workers + timm Mixup",
                    res["torchvision_dataloader"],
                )
            )
    if not args.no_train_step:
        step = bench_train_step(args, device)
        if step is not None:
            res["train_step"] = step
            res["ours"]["fraction_of_train_step"] = res["ours"]["ms_per_batch"] / step["ms_per_step"]

    res["loadavg_1min_before_after"] = [load_before, _loadavg()]
    res["cpu_count"] = os.cpu_count()
    if max(v or 0.0 for v in res["loadavg_1min_before_after"]) > (os.cpu_count() or 1) - 0.5:
        print(f"note: 1-min load average {res['loadavg_1min_before_after']} on {os.cpu_count()} CPUs: other "
              "processes share these cores, so multi-threaded timings are noisy (OpenMP barriers wait for "
              "descheduled threads)")
    print(
        f"torch {res['torch']}, {res['threads']} threads, {res['cpu']}, device {device}, "
        f"batch {args.batch_size}"
    )
    print(f"{'pipeline':<62} {'ms/batch':>9} {'images/s':>10}")
    for name, r in rows:
        print(f"{name:<62} {r['ms_per_batch']:>9.2f} {r['images_per_s']:>10.0f}")
    if "train_step" in res:
        s = res["train_step"]
        print(
            f"{'training step cct_2_3x2_32 (bf16 autocast, AdamW)':<62} {s['ms_per_step']:>9.2f} "
            f"{args.batch_size / s['ms_per_step'] * 1e3:>10.0f}"
        )
        print(f"augmentation / training step = {res['ours']['fraction_of_train_step']:.1%}")

    if args.out:
        out = Path(args.out)
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", res["cpu"].lower()).strip("-") or "cpu"
        suffix = "" if device.type == "cpu" else f"-{device.type}"
        out = (
            Path(__file__).resolve().parent
            / "results"
            / "pipeline"
            / f"{slug}-{res['threads']}t{suffix}.json"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
