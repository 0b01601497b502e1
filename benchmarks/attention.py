"""Attention kernels and stochastic depth: what each costs in CCT's training step and inference on a CPU.

Part 1, attention (training img/s at `--batch-size`, inference img/s at `--infer-batch-size`, bf16 autocast):

* explicit: timm's explicit path (q @ k^T, softmax, @ v; `fused_attn = False`), which is what the library uses
  on a CPU in bf16 (`configure_attention` in cct/train/loop.py), in training and inference; with `--threads 1`
  that path runs the library's C attention operator (cct/kernels/attention.py), shown as "cct op";
* sdpa default: F.scaled_dot_product_attention with PyTorch's own backend choice (on CPU the fused flash kernel);
* sdpa math: the same call restricted to `sdpa_kernel([SDPBackend.MATH])`.

Part 2, stochastic depth: training img/s at each `--rates` value for `stochastic_depth=droppath` (per-sample
DropPath: the branch is still computed) and `skip` (whole-batch skipping: a dropped branch is not computed), as
ratios to the same mode at rate 0.

On CPU the fused flash kernel does not implement attention dropout: with `attn_drop_rate` > 0 the default
selection falls back to the math kernel in training, and the two sdpa rows time the same thing. Hence the
default recipe here is `cifar10-fast` (no attention dropout, no stochastic depth; `cct bench`'s default too).

Training figures time the library's real step (`cct.train.loop.Engine.step`: batched augmentation of a uint8
batch, autocast forward, loss, backward, AdamW) with the recipe's settings, each variant's model
switched to its attention path and its steps run inside its kernel context. The variants of a
part are timed round-robin, one window each in turn, so that a drift in background load hits all of them alike;
each figure is the median over its windows. The attention kernels actually called are recorded with the profiler.

    python benchmarks/attention.py [--model cct_2_3x2_32] [--threads 2]

Prints tables and writes benchmarks/results/attention/<model>-<cpu>-<threads>t.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cct.data.augment import normalize  # noqa: E402
from cct.train import load_config  # noqa: E402
from cct.train.loop import Engine, cpu_name, retain_freed_memory  # noqa: E402

NUM_CLASSES = 10
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _math_kernel():
    return sdpa_kernel([SDPBackend.MATH])


ATTENTION_VARIANTS: dict[str, dict[str, Any]] = {
    # name: timm fused_attn, the SDPA kernel context around training steps and inference
    "explicit (library)": dict(fused=False, context=nullcontext),
    "sdpa default (flash)": dict(fused=True, context=nullcontext),
    "sdpa math": dict(fused=True, context=_math_kernel),
}


def round_robin(steps: dict[str, Callable[[], None]], items_per_step: int, windows: int, steps_per_window: int,
                warmup: int) -> dict[str, dict[str, Any]]:
    """Warm each step function up, then time `windows` rounds, each timing one window of `steps_per_window`
    calls of every function in turn; images/s per window and the median, per name."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(windows):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(steps_per_window):
                step()
            rates[name].append(items_per_step * steps_per_window / (time.perf_counter() - start))
    return {name: dict(img_per_s=round(statistics.median(r), 1), windows_img_per_s=[round(x, 1) for x in r])
            for name, r in rates.items()}


class Trainer:
    """An Engine of the recipe with some overrides, stepping on one fixed uint8 batch (as `cct bench` does),
    with a given attention path (timm `fused_attn`) and SDPA kernel context; by default the library's own."""

    def __init__(self, recipe: str, overrides: list[str], fused: bool | None = None, context=nullcontext):
        self.cfg = load_config(recipe, overrides)
        torch.manual_seed(0)
        device = torch.device("cpu")
        self.engine = Engine(self.cfg, NUM_CLASSES, 32, MEAN, STD, True, device)
        if fused is not None:
            for block in self.engine.model.blocks:
                block.attn.fused_attn = fused
        self.engine.model.train()
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (self.cfg.batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, NUM_CLASSES, (self.cfg.batch_size,), generator=generator)
        self.context = context
        self.count = 0

    def step(self) -> None:
        """One training step of the library's loop in this trainer's kernel context."""
        with self.context():
            self.engine.step(self.images, self.labels, self.count, self.cfg.lr)
        self.count += 1


def attention_ops(run: Callable[[], None]) -> list[str]:
    """Names of the attention-related aten ops that one call of `run` executes (profiled)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    keys = ("scaled_dot_product", "flash", "attention", "softmax", "bmm")
    return sorted({e.key for e in prof.key_averages() if any(k in e.key for k in keys)})


def kernel_kind(ops: list[str]) -> str:
    """'flash', 'math', 'cct op' (the library's C operator, which the explicit path runs in a process of one
    thread) or 'explicit': which attention implementation a list of profiled op names shows."""
    if any(o.startswith("cct::attention") for o in ops):
        return "cct op"
    if any("flash_attention" in o for o in ops):
        return "flash"
    if any("attention_math" in o for o in ops):
        return "math"
    return "explicit"


def bench_attention(args) -> dict[str, Any]:
    """Training and inference img/s of each attention variant, and the kernels each one calls."""
    base = [f"model={args.model}", f"batch_size={args.batch_size}", f"threads={args.threads}", "precision=bf16"]
    trainers = {name: Trainer(args.recipe, base, v["fused"], v["context"])
                for name, v in ATTENTION_VARIANTS.items()}
    kernels = {name: dict(train=attention_ops(t.step)) for name, t in trainers.items()}
    train = round_robin({name: t.step for name, t in trainers.items()}, args.batch_size, args.windows,
                        args.steps_per_window, args.warmup)

    generator = torch.Generator().manual_seed(1)
    source = torch.randint(0, 256, (args.infer_batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    x = normalize(source, MEAN, STD, channels_last=True)

    def inferer(trainer: Trainer, context) -> Callable[[], None]:
        model = trainer.engine.model

        @torch.no_grad()
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16), context():
                model(x)

        return run

    for t in trainers.values():
        t.engine.model.eval()
    infer_steps = {name: inferer(trainers[name], v["context"]) for name, v in ATTENTION_VARIANTS.items()}
    for name, run in infer_steps.items():
        kernels[name]["infer"] = attention_ops(run)
    infer = round_robin(infer_steps, args.infer_batch_size, args.windows, args.steps_per_window, args.warmup)
    return {name: dict(train=train[name], infer=infer[name], kernels=kernels[name]) for name in trainers}


def bench_stochastic_depth(args) -> dict[str, Any]:
    """Training img/s per (stochastic-depth mode, drop_path_rate), and the ratio to that mode at rate 0."""
    base = [f"model={args.model}", f"batch_size={args.batch_size}", f"threads={args.threads}", "precision=bf16"]
    trainers = {(mode, rate): Trainer(args.recipe, base + [f"stochastic_depth={mode}", f"drop_path_rate={rate}"])
                for mode in ("droppath", "skip") for rate in args.rates}
    timed = round_robin({f"{mode} {rate:g}": t.step for (mode, rate), t in trainers.items()}, args.batch_size,
                        args.windows, args.steps_per_window, args.warmup)
    out: dict[str, Any] = {}
    for mode, rate in trainers:
        row = timed[f"{mode} {rate:g}"]
        zero = timed.get(f"{mode} 0")
        row["ratio_to_rate_0"] = round(row["img_per_s"] / zero["img_per_s"], 3) if zero else None
        out.setdefault(mode, {})[f"{rate:g}"] = row
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run both parts, print the tables and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cct_2_3x2_32")
    p.add_argument("--recipe", default="cifar10-fast", help="recipe giving augmentation, optimiser, dropout")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--infer-batch-size", type=int, default=512)
    p.add_argument("--windows", type=int, default=7, help="timed windows per variant (the median is reported)")
    p.add_argument("--steps-per-window", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before the windows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rates", default="0,0.1,0.5", help="drop_path_rate values, comma-separated (include 0)")
    p.add_argument("--only", choices=("attention", "stochastic-depth"), help="run one part only")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/attention/<model>-<cpu>-<n>t.json)")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the `cct` commands do: the steps timed are those of `cct train`
    warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"warning: 1-min load average is {load_before[0]:.2f} at start: other processes share these cores, "
              "so the figures are unreliable (run on a quiet machine)", file=sys.stderr)

    cpu = cpu_name()
    result: dict[str, Any] = dict(
        model=args.model, recipe=args.recipe, batch_size=args.batch_size, infer_batch_size=args.infer_batch_size,
        precision="bf16 autocast", threads=torch.get_num_threads(), cpu=cpu, cpu_count=os.cpu_count(),
        torch=torch.__version__, windows=args.windows, steps_per_window=args.steps_per_window, warmup=args.warmup)
    if args.only != "stochastic-depth":
        print("timing attention variants ...", file=sys.stderr)
        result["attention"] = bench_attention(args)
    if args.only != "attention":
        print("timing stochastic depth ...", file=sys.stderr)
        result["stochastic_depth"] = bench_stochastic_depth(args)
    load_after = os.getloadavg()
    result.update(loadavg_before=[round(v, 2) for v in load_before],
                  loadavg_after=[round(v, 2) for v in load_after], load_warning=load_before[0] > 0.5)

    print(f"{args.model}, bf16 autocast, {result['threads']} threads, torch {torch.__version__}, {cpu}")
    if "attention" in result:
        print(f"\n{'attention':<33}{'train img/s':>12}{'infer img/s':>13}   kernels (train / infer)")
        for name, row in result["attention"].items():
            kinds = " / ".join(kernel_kind(row["kernels"][phase]) for phase in ("train", "infer"))
            print(f"{name:<33}{row['train']['img_per_s']:>12.0f}{row['infer']['img_per_s']:>13.0f}   {kinds}")
        print(f"(train batch {args.batch_size}, inference batch {args.infer_batch_size})")
        if kernel_kind(result["attention"]["sdpa default (flash)"]["kernels"]["train"]) != "flash":
            print("note: the default selection did not pick the flash kernel for training (attention dropout > 0 in "
                  f"recipe {args.recipe}?), so the two sdpa training rows time the same kernel")
    if "stochastic_depth" in result:
        print(f"\n{'stochastic depth':<18}{'rate':>6}{'train img/s':>13}{'vs rate 0':>11}")
        for mode, rows in result["stochastic_depth"].items():
            for rate, row in rows.items():
                ratio = f"{row['ratio_to_rate_0']:.2f}x" if row["ratio_to_rate_0"] is not None else "-"
                print(f"{mode:<18}{rate:>6}{row['img_per_s']:>13.0f}{ratio:>11}")
    print(f"\nload average (1/5/15 min) before {result['loadavg_before']}, after {result['loadavg_after']}"
          + ("  <- NOT a quiet machine" if result["load_warning"] else ""))

    if args.out:
        out = Path(args.out)
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or "cpu"
        name = f"{args.model}-{slug}-{result['threads']}t.json"
        out = Path(__file__).resolve().parent / "results" / "attention" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
