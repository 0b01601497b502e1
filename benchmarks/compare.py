"""Training throughput of one CCT three ways, in one run: this library, a plain PyTorch version, the official code.

Rows (all CIFAR-10 training images, batch 128 by default, AdamW, label smoothing 0.1, crop + flip):

* ours: the training step of `cct train keras-example` itself (`cct.train.loop.Engine.step`): uint8 batches
  gathered from one in-memory tensor, batched crop + flip on that tensor, channels_last, bf16 autocast,
  attention through scaled_dot_product_attention (math kernel for CPU training), AdamW from timm's optimizer factory.
* plain fp32: the same architecture and parameterisation (fused qkv Linear without bias) written plainly in
  this file: attention computed explicitly (q @ k^T, softmax, @ v), the tokenizer's ReLU before the max-pool,
  fp32, per-image torchvision transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
  Normalize) in a DataLoader with 2 workers, torch.optim.AdamW. The script asserts that it computes the same
  function as ours: the same parameter count, and the same outputs (to ~1e-7) once ours' weights are loaded.
* official fp32 / official + bf16 autocast: the SHI-Labs implementation (github.com/SHI-Labs/Compact-Transformers,
  src/cct.py), imported at run time from a checkout outside this repository (`--official PATH`), trained with
  the same step and the same DataLoader as plain. Skipped, with a note, when the checkout is missing.

Every row is timed the same way: warm-up steps, then `--windows` windows of `--steps-per-window` steps; the
figure is the median window's images/s. Data loading is included in every row (gathering + batched
augmentation in ours; waiting on the DataLoader in the others, whose workers share the same cores).

    CCT_DATA=/path/to/data python benchmarks/compare.py [--model cct_2_3x2_32] [--threads 2]

Prints a table and writes benchmarks/results/compare/<model>-<cpu>-<threads>t.json (or `--out`).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cct.data.datasets import build_dataset, dataset_info  # noqa: E402
from cct.data.loader import BatchSource, train_batch_indices  # noqa: E402
from cct.models.complexity import count_params  # noqa: E402
from cct.train import load_config  # noqa: E402
from cct.train.bench import window_seconds  # noqa: E402
from cct.train.loop import Engine, cpu_name, retain_freed_memory  # noqa: E402

RECIPE = "keras-example"
OFFICIAL_PACKAGE = "official_cct_src"  # a name of our own, so the checkout's `src` package clashes with nothing


# ----------------------------------------------------------------------------------------------- timing


def timed_windows(step: Callable[[], None], batch_size: int, windows: int, steps_per_window: int,
                  warmup: int) -> dict[str, Any]:
    """Images/s per timed window and their median (timing by `cct.train.bench.window_seconds`)."""
    rates = [batch_size / s for s in window_seconds(step, windows, steps_per_window, warmup)]
    return dict(img_per_s=round(statistics.median(rates), 1), windows_img_per_s=[round(r, 1) for r in rates])


# ------------------------------------------------------------------------------------------------- ours


def bench_ours(cfg, windows: int, steps_per_window: int, warmup: int) -> dict[str, Any]:
    """Time `Engine.step`, fed exactly as `cct train` feeds it (BatchSource over the in-memory uint8 images)."""
    device = torch.device("cpu")
    info = dataset_info(cfg.dataset)
    train_ds = build_dataset(cfg.dataset, "train")
    engine = Engine(cfg, len(train_ds.classes), info.img_size, info.mean, info.std, info.in_memory, device)
    engine.model.train()
    source = BatchSource(train_ds, device)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            indices = train_batch_indices(len(train_ds), cfg.batch_size, cfg.seed, epoch)
            for images, labels, _ in source.batches(indices):
                yield images, labels
            epoch += 1

    it = batches()
    counter = [0]

    def step() -> None:
        images, labels = next(it)
        engine.step(images, labels, counter[0], cfg.lr)
        counter[0] += 1

    result = timed_windows(step, cfg.batch_size, windows, steps_per_window, warmup)
    result.update(params=count_params(engine.model), precision=cfg.precision, channels_last=cfg.channels_last,
                  data="in-memory uint8 tensor, batched crop(pad 4) + flip (cct.data.augment)")
    return result


# ------------------------------------------------------------------------------------------------ plain


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth: zero the branch for a random `rate` of the samples, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class PlainAttention(nn.Module):
    """Multi-head self-attention with the softmax(q k^T / sqrt(d)) v product written out."""

    def __init__(self, dim: int, heads: int, attn_drop: float):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        weights = self.attn_drop(torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1))
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class PlainBlock(nn.Module):
    """Encoder layer in CCT's order: x = norm2(x + attn(norm1(x))); x = x + mlp(x)."""

    def __init__(self, dim: int, heads: int, hidden: int, attn_drop: float, drop_path_rate: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = PlainAttention(dim, heads, attn_drop)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        x = self.norm2(x)
        return x + drop_path(self.fc2(F.gelu(self.fc1(x))), self.drop_path_rate, self.training)


class PlainCCT(nn.Module):
    """CCT written plainly: conv -> ReLU -> max-pool tokenizer, learnable positions, encoder, sequence pooling."""

    def __init__(self, convs: list[tuple[int, int, int, int, int]], num_tokens: int, dim: int, depth: int,
                 heads: int, hidden: int, num_classes: int, attn_drop: float, drop_path_rate: float):
        super().__init__()
        self.tokenizer = nn.Sequential(*(
            nn.Sequential(nn.Conv2d(c_in, c_out, k, s, p, bias=False), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
            for c_in, c_out, k, s, p in convs))
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.2)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*(PlainBlock(dim, heads, hidden, attn_drop, r) for r in rates))
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Linear(dim, 1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokenizer(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.norm(self.blocks(x))
        x = (torch.softmax(self.pool(x), dim=1).transpose(1, 2) @ x).squeeze(1)
        return self.head(x)


def plain_like(ours: nn.Module, num_classes: int, attn_drop: float, drop_path_rate: float) -> PlainCCT:
    """A PlainCCT with the shapes of one of our (CCT tokenizer, learnable position, seq-pool) models."""
    convs = [(m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size[0], m.conv.stride[0], m.conv.padding[0])
             for m in ours.tokenizer.convs]
    block = ours.blocks[0]
    return PlainCCT(convs, ours.pos_embed.shape[1], ours.embed_dim, len(ours.blocks), block.attn.num_heads,
                    block.mlp.fc1.out_features, num_classes, attn_drop, drop_path_rate)


@torch.no_grad()
def max_output_difference(ours: nn.Module, plain: PlainCCT) -> float:
    """Load our model's weights into a copy of `plain` and return the largest |difference| of their fp32 eval
    outputs on random images: ~1e-7 when the plain model computes the same function."""
    renames = (("tokenizer.convs.", "tokenizer."), (".conv.weight", ".0.weight"), ("mlp.", ""),
               ("pool.score", "pool"))
    state = {}
    for key, value in ours.state_dict().items():
        for old, new in renames:
            key = key.replace(old, new)
        state[key] = value
    twin = copy.deepcopy(plain)
    twin.load_state_dict(state, strict=True)
    x = torch.randn(4, 3, *ours.img_size, generator=torch.Generator().manual_seed(0))
    return (ours.eval()(x) - twin.eval()(x)).abs().max().item()


# --------------------------------------------------------------------------------- per-image DataLoader


class PerImageCIFAR(torch.utils.data.Dataset):
    """CIFAR images (uint8 N x H x W x 3) through a per-image PIL transform, as torchvision training does."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def per_image_batches(batch_size: int, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless training batches: torchvision RandomCrop(32, 4), flip, ToTensor, Normalize per image."""
    from torchvision import transforms as T

    info = dataset_info("cifar10")
    train_ds = build_dataset("cifar10", "train")
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(info.mean, info.std)])
    ds = PerImageCIFAR(train_ds.images.permute(0, 2, 3, 1).numpy().copy(), train_ds.labels.numpy(), transform)
    extra = dict(persistent_workers=True, prefetch_factor=4) if workers > 0 else {}
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, **extra)
    while True:
        yield from loader


def bench_loader_model(model: nn.Module, batches: Iterator, precision: str, batch_size: int, windows: int,
                       steps_per_window: int, warmup: int, lr: float, weight_decay: float,
                       label_smoothing: float) -> dict[str, Any]:
    """Time a plain training step (DataLoader batch, forward, cross-entropy, backward, AdamW) of `model`."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

    def step() -> None:
        images, labels = next(batches)
        with ctx():
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    result = timed_windows(step, batch_size, windows, steps_per_window, warmup)
    result.update(params=count_params(model), precision=precision)
    return result


# --------------------------------------------------------------------------------------------- official


def import_official(path: Path) -> ModuleType:
    """Import the official checkout's `src` package under a private name, without letting it register its
    models with timm (its names are ours too, and `cct.create_model` resolves names through timm)."""
    import timm.models.registry as timm_registry  # the deprecated module the official code imports from

    spec = importlib.util.spec_from_file_location(OFFICIAL_PACKAGE, path / "src" / "__init__.py",
                                                  submodule_search_locations=[str(path / "src")])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path / 'src'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[OFFICIAL_PACKAGE] = module
    original = timm_registry.register_model
    timm_registry.register_model = lambda fn: fn
    try:
        spec.loader.exec_module(module)
    finally:
        timm_registry.register_model = original
    return module


def official_commit(path: Path) -> str | None:
    """The checked-out commit of the official repository, read from its .git directory."""
    try:
        head = (path / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = path / ".git" / head[5:]
            if ref.is_file():
                return ref.read_text().strip()
            for line in (path / ".git" / "packed-refs").read_text().splitlines():
                if line.endswith(head[5:]):
                    return line.split()[0]
            return None
        return head
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, time every row, print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cct_2_3x2_32", choices=("cct_2_3x2_32", "cct_7_3x1_32"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--windows", type=int, default=7, help="timed windows per row (the median is reported)")
    p.add_argument("--steps-per-window", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per row before its windows")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the training process")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain and official rows")
    p.add_argument("--official", default="../Compact-Transformers",
                   help="checkout of SHI-Labs/Compact-Transformers (default: next to this repository)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/compare/<model>-<cpu>-<n>t.json)")
    args = p.parse_args(argv)
    if not os.environ.get("CCT_DATA"):
        p.error("set CCT_DATA to the folder holding cifar-10-batches-py")
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the `cct` commands do: the steps timed are those of `cct train`
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"warning: 1-min load average is {load_before[0]:.2f} at start: other processes share these cores, "
              "so the figures are unreliable (run on a quiet machine)", file=sys.stderr)
    timing = dict(windows=args.windows, steps_per_window=args.steps_per_window, warmup=args.warmup)

    cfg = load_config(RECIPE, [f"model={args.model}", f"batch_size={args.batch_size}", f"threads={args.threads}"])
    rows: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    print(f"timing ours ({RECIPE} Engine.step) ...", file=sys.stderr)
    rows["ours"] = bench_ours(cfg, **timing)

    num_classes = 10
    train_kw = dict(batch_size=args.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    label_smoothing=cfg.label_smoothing, **timing)
    from cct import create_model

    reference = create_model(args.model, num_classes=num_classes)
    plain = plain_like(reference, num_classes, cfg.attn_drop_rate, cfg.drop_path_rate)
    plain_params, ours_params = count_params(plain), rows["ours"]["params"]
    assert plain_params == ours_params, f"plain model has {plain_params:,} parameters, ours {ours_params:,}"
    difference = max_output_difference(reference, plain)
    assert difference < 1e-4, f"plain model computes another function than ours (max |difference| {difference:g})"
    checks = dict(plain_params=plain_params, plain_vs_ours_max_abs_output_difference=difference)
    batches = per_image_batches(args.batch_size, args.workers)
    print("timing plain fp32 ...", file=sys.stderr)
    rows["plain fp32"] = bench_loader_model(plain, batches, "fp32", **train_kw)

    official_path = Path(args.official)
    # the commit identifies the code; a local path would mean nothing on another machine
    official_info: dict[str, Any] = dict(repository="SHI-Labs/Compact-Transformers")
    if (official_path / "src" / "cct.py").is_file():
        official = import_official(official_path)
        official_info["commit"] = official_commit(official_path)
        factory = getattr(official, args.model)
        for precision in ("fp32", "bf16"):
            # the registered variant's own defaults: dropout 0, attention dropout 0.1, stochastic depth 0.1
            model = factory(num_classes=num_classes)
            name = "official fp32" if precision == "fp32" else "official + bf16 autocast"
            print(f"timing {name} ...", file=sys.stderr)
            rows[name] = bench_loader_model(model, batches, precision, **train_kw)
            if rows[name]["params"] != ours_params:
                notes.append(f"{name}: {rows[name]['params']:,} parameters, ours {ours_params:,}")
    else:
        notes.append(f"official rows skipped: no checkout at {official_path} (clone "
                     "github.com/SHI-Labs/Compact-Transformers there or pass --official PATH)")
    load_after = os.getloadavg()

    cpu = cpu_name()
    ours_rate = rows["ours"]["img_per_s"]
    for row in rows.values():
        row["ratio_to_ours"] = round(row["img_per_s"] / ours_rate, 3)
    result = dict(
        model=args.model, recipe=RECIPE, batch_size=args.batch_size, threads=torch.get_num_threads(),
        workers=args.workers, cpu=cpu, cpu_count=os.cpu_count(), torch=torch.__version__, **timing,
        loadavg_before=[round(v, 2) for v in load_before], loadavg_after=[round(v, 2) for v in load_after],
        load_warning=load_before[0] > 0.5, official=official_info, notes=notes, checks=checks, rows=rows,
        augmentation="random crop 32 (zero padding 4) + horizontal flip; label smoothing 0.1; AdamW "
                     f"lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}",
    )

    print(f"{args.model}, batch {args.batch_size}, {result['threads']} threads, {args.workers} DataLoader workers, "
          f"torch {torch.__version__}, {cpu}")
    print(f"{'row':<28}{'images/s':>10}{'vs ours':>9}   windows")
    for name, row in rows.items():
        windows = " ".join(f"{r:.0f}" for r in row["windows_img_per_s"])
        print(f"{name:<28}{row['img_per_s']:>10.0f}{row['ratio_to_ours']:>8.2f}x   {windows}")
    print(f"plain model: {checks['plain_params']:,} parameters, as ours; max |output difference| with ours' weights "
          f"{checks['plain_vs_ours_max_abs_output_difference']:.1e}")
    for note in notes:
        print(f"note: {note}")
    print(f"load average (1/5/15 min) before {result['loadavg_before']}, after {result['loadavg_after']}"
          + ("  <- NOT a quiet machine" if result["load_warning"] else ""))

    if args.out:
        out = Path(args.out)
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or "cpu"
        out = Path(__file__).resolve().parent / "results" / "compare" / f"{args.model}-{slug}-{result['threads']}t.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
