"""`cct bench`: training and inference throughput of one model on this machine, against its matmul peak.

The training step is the training loop's own (`Engine.step`: batched augmentation, autocast forward, loss,
backward, optimiser step), on uint8 images that already live on the device, as in training. With `compile: true`
the training step compiles as training does, and inference runs `compile_for_inference` (as `cct eval
--compile`).
Figures are medians over several timed windows after a warm-up: these machines are shared and noisy.

Under torchrun (`cct bench --nproc-per-node N`, the default on a CPU when the recipe trains with `processes: N`)
every process runs its share of the batch as a DDP rank, the way `cct train` runs that recipe; each timed window
starts and ends with a barrier, so a window lasts as long as the slowest rank, and the images/s and the matmul
peak are those of all processes together.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..data.augment import normalize
from ..kernels import cpu_kind
from ..kernels import usable as cpu_kernels_usable
from ..models.complexity import count_macs
from ..models.registry import VARIANTS
from . import distributed as dist
from .config import Config
from .loop import Engine, autocast, compile_for_inference, cpu_name


def window_seconds(run: Callable[[], None], windows: int, calls_per_window: int, warmup: int,
                   sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds per call, one figure per timed window, after `warmup` untimed calls (`sync` waits for an
    asynchronous device before the clock is read). Shared by `cct bench` and the scripts in benchmarks/."""
    for _ in range(warmup):
        run()
    sync()
    seconds = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(calls_per_window):
            run()
        sync()
        seconds.append((time.perf_counter() - start) / calls_per_window)
    return seconds


def _median_rate(run: Callable[[], None], items_per_call: int, windows: int, calls_per_window: int,
                 warmup: int) -> float:
    """Items per second of all ranks together: every rank runs `run` on its own `items_per_call` items, and a
    barrier closes each window (the slowest rank sets its length)."""
    seconds = window_seconds(run, windows, calls_per_window, warmup, sync=dist.barrier)
    return items_per_call * dist.world_size() / statistics.median(seconds)


def synchronize(device: torch.device) -> None:
    """Wait for an asynchronous device (CUDA, MPS) to finish its queued work; nothing on a CPU."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def matmul_peak_gflops(precision: str, device: torch.device, size: int = 2048, windows: int = 5) -> float:
    """Measured dense matmul throughput (GFLOP/s) of a size x size product in the given precision (under
    torchrun: every rank multiplies at once, and the figure is their sum, the peak of that process layout)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def run() -> None:
        torch.mm(a, b)
        synchronize(device)

    return 2 * size**3 * _median_rate(run, 1, windows, 3, 2) / 1e9


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()})" if device.type == "cpu" else device.type


def run_bench(cfg: Config, device: torch.device, windows: int = 5, steps_per_window: int = 5,
              num_classes: int = 10) -> dict[str, Any]:
    """Benchmark `cfg.model` at `cfg.batch_size` images per process / `cfg.precision` (`auto` resolved as training
    resolves it); returns the figures as a dict (images/s and GFLOP/s of all processes together under
    torchrun), with the precision that ran and why."""
    img_size = cfg.img_size or VARIANTS[cfg.model]["img_size"]  # the model's own input size
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    engine = Engine(cfg, num_classes, img_size, mean, std, True, device)
    cfg = engine.cfg
    generator = torch.Generator(device).manual_seed(0)
    source = torch.randint(0, 256, (cfg.batch_size, 3, img_size, img_size), dtype=torch.uint8, device=device,
                           generator=generator)
    labels = torch.randint(0, num_classes, (cfg.batch_size,), device=device, generator=generator)
    step = [0]

    def train_step() -> None:
        engine.step(source, labels, step[0], cfg.lr)
        step[0] += 1

    engine.model.train()
    train_rate = _median_rate(train_step, cfg.batch_size, windows, steps_per_window, warmup=3)
    engine.model.eval()
    x = normalize(source, mean, std, channels_last=cfg.channels_last)

    model = compile_for_inference(engine.model) if cfg.compile else engine.model

    @torch.no_grad()
    def infer() -> None:
        with autocast(device, cfg.precision):
            model(x)
        synchronize(device)

    infer_rate = _median_rate(infer, cfg.batch_size, windows, steps_per_window, warmup=2)
    peak = matmul_peak_gflops(cfg.precision, device)
    # forward + backward ~ 3x the forward FLOPs (backward computes gradients of inputs and of weights)
    gflops_train = 3 * 2 * count_macs(engine.model, img_size) / 1e9
    return dict(model=cfg.model, batch_size=cfg.batch_size * dist.world_size(), precision=cfg.precision,
                precision_reason=engine.precision_reason, cpu_kind=cpu_kind() if device.type == "cpu" else None,
                processes=dist.world_size(), batch_per_process=cfg.batch_size, img_size=img_size,
                stochastic_depth=cfg.stochastic_depth, drop_path_rate=cfg.drop_path_rate,
                auto_augment=cfg.auto_augment, compile=cfg.compile,
                cpu_kernels=device.type == "cpu" and cfg.precision == "bf16" and cpu_kernels_usable(),
                device=_device_name(device),
                threads=torch.get_num_threads(), torch=torch.__version__,
                train_img_per_s=round(train_rate, 1), infer_img_per_s=round(infer_rate, 1),
                gflops_per_img_train=round(gflops_train, 4), achieved_gflops=round(train_rate * gflops_train, 1),
                peak_matmul_gflops=round(peak, 1), fraction_of_peak=round(train_rate * gflops_train / peak, 3))
