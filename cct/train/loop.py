"""The training loop, top to bottom: data on the device, batched augmentation, autocast, optimiser step, EMA,
evaluation, atomic checkpoints. The same code runs alone or under torchrun (DDP); only rank 0 writes.

Every random draw of step `s` comes from generators seeded by (seed, s[, rank]), so a run resumed from any
saved step replays exactly the batches, augmentations, dropout masks and skipped layers it would have had.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import platform
import subprocess
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from timm.layers import Attention
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

from ..data.augment import BatchAugment, normalize
from ..data.jpeg import eval_file_transform, train_file_transform
from ..data.loader import BatchSource, epoch_seed, eval_batch_indices, steps_per_epoch, train_batch_indices
from ..data.prepared import build_dataset, dataset_info
from ..errors import CCTError
from ..kernels import accelerate, fast_paths
from ..models import create_model
from ..models.checkpoint import model_metadata
from ..models.complexity import count_params
from . import distributed as dist
from .config import Config, check_crop_fits, config_to_dict
from .finetune import initialise, optimizer_params
from .precision import resolve_precision
from .report import MetricsLog, Progress
from .state import RunLock, atomic_write_text, load_state, restoring_state, save_state, save_weights

STATE_FILE = "last.state.pt"


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A distinct 63-bit seed per (run seed, step, rank)."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def learning_rate(cfg: Config, step: int, total_steps: int, spe: int) -> float:
    """Per-step LR: linear warmup from `warmup_lr`, then cosine / linear decay to `min_lr` (held there for the
    last `cooldown_epochs`), or constant. A pure function of the step rather than timm's stateful per-epoch
    scheduler: resuming mid-epoch needs no scheduler state, and warmup moves every step."""
    warmup = round(cfg.warmup_epochs * spe)
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    if cfg.scheduler == "constant":
        return cfg.lr
    decay_steps = total_steps - warmup - round(cfg.cooldown_epochs * spe)
    progress = min(1.0, (step - warmup) / max(1, decay_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.scheduler == "cosine" else 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (label smoothing and Mixup/CutMix already folded into them)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision (`auto` resolved for the device first): bf16 on CPU, CUDA and MPS,
    fp16 on CUDA only, fp32 none."""
    precision = resolve_precision(precision, device)[0]
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise CCTError("precision fp16 needs a CUDA device; use bf16 on a CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def has_float64(device: torch.device) -> bool:
    """Whether a device computes in float64 (Apple's MPS does not): the batched augmentation's geometry and the
    evaluation's sums use it where it is there."""
    return device.type != "mps"


def configure_attention(model: torch.nn.Module, device: torch.device, precision: str) -> None:
    """Pick the attention implementation for a device and precision. On a CPU computing bf16 natively the explicit
    product (q @ k^T, softmax, @ v: timm's `fused_attn=False` path) is much faster than every fused SDPA kernel at
    CCT's sizes, in training and inference; elsewhere (other CPU kinds: `cct.kernels.fast_paths`) SDPA with
    PyTorch's own kernel choice is kept (figures: `benchmarks/attention.py`, results in
    benchmarks/results/attention/). In a process of one thread the explicit path runs the C operator of
    `cct.kernels.Attention` where it applies (head widths in multiples of 16)."""
    explicit = device.type == "cpu" and precision == "bf16" and fast_paths().explicit_attention
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = not explicit


def configure_for_device(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """The per-model speed settings of a device, for training and inference alike: the attention path and, on a
    CPU, this package's C kernels (`cct.kernels.accelerate`, same parameters and state-dict keys).

    Args:
        model: a plain model from `cct.create_model`, on `device`.
        device: where it runs.
        precision: the run's precision (`bf16`, `fp16` or `fp32`).

    Returns:
        `model`, changed in place.
    """
    configure_attention(model, device, precision)
    return accelerate(model) if device.type == "cpu" else model


def retain_freed_memory() -> None:
    """Make glibc keep freed memory in the process instead of returning large blocks to the system. By default
    every activation above a (dynamic) threshold is mmap-ed and unmapped each step, so each training step
    page-faults and zeroes its activations afresh, which costs a fifth of a small model's step on a CPU
    (docs/cpu-speed.md). Process-wide, so the `cct` commands apply it (the library never does); a no-op where
    the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


class FrozenForInference(torch.nn.Module):
    """A model compiled for inference with weights that no longer change: torch.compile with inductor's freezing,
    which folds the weights into the graph as constants (the linear layers' prepacked for oneDNN on a CPU, the
    Winograd filter tiles computed once) and fuses the work between the matmuls. `cct eval --compile` and the
    inference of `cct bench --set compile=true` run it; never training, whose weights move (a compiled training
    model must not be wrapped). A first call compiles for a few seconds, so it pays off on large evaluation sets
    only."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.compiled = torch.compile(model)

    def forward(self, *args, **kwargs):
        # Freezing must be on while dynamo traces (to take the weights as constants) as well as while inductor
        # compiles; torch.compile's `options` reach only the latter (torch 2.14), so it is set around each call,
        # which is where (re)compilation happens, and only there: a global setting would freeze a training model.
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def compile_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """`model` compiled for inference with frozen weights (see `FrozenForInference`)."""
    return FrozenForInference(model)


@torch.no_grad()
def view_logits(model: torch.nn.Module, x: torch.Tensor, flip: bool = False, shift: bool = False) -> torch.Tensor:
    """The model's float logits for a normalised batch, averaged over test-time views.

    `flip` averages each view with its mirror image. `shift` is airbench's multi-crop: half the weight on the
    image, a quarter on each of two copies moved one pixel diagonally (up-left, down-right; the edges
    reflected), which the padded random crops of training make the model see as the same image.

    Args:
        model: the model, in eval mode.
        x: normalised images, N x C x H x W.
        flip: average with the horizontally flipped view.
        shift: add the two shifted views.
    """
    def mirrored(view: torch.Tensor) -> torch.Tensor:
        logits = model(view).float()
        return 0.5 * (logits + model(view.flip(3)).float()) if flip else logits

    logits = mirrored(x)
    if shift:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        height, width = x.shape[-2:]
        logits = 0.5 * logits + 0.25 * (mirrored(padded[..., :height, :width]) + mirrored(padded[..., 2:, 2:]))
    return logits


@torch.no_grad()
def evaluate(model: torch.nn.Module, source: BatchSource, mean: Sequence[float], std: Sequence[float], cfg: Config,
             device: torch.device, num_classes: int) -> dict[str, Any]:
    """Loss, top-1, top-5 and per-class accuracy over the whole evaluation set (sharded over ranks).

    Args:
        model: the model to evaluate (put in eval mode for the pass, then back as it was).
        source: the evaluation images (its first `cfg.eval_samples` where set).
        mean: the per-channel normalisation mean, in [0, 1].
        std: the per-channel normalisation standard deviation.
        cfg: `precision`, `eval_batch_size`, `test_time_flip`, `test_time_shift`, `channels_last` and
            `eval_samples` are used.
        device: where `source`'s batches and the model are.
        num_classes: the model's class count.

    Returns:
        `loss`, `top1`, `top5` (in %), `per_class_top1` (list, in %), `confusion` (int64 tensor, rows: true
        class) and `images` (the count evaluated, over every rank).
    """
    was_training = model.training
    model.eval()
    total = torch.float64 if has_float64(device) else torch.float32
    sums = torch.zeros(3, dtype=total, device=device)  # loss sum, top1, top5
    per_class = torch.zeros(2, num_classes, dtype=total, device=device)  # correct, count
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    count = min(len(source), cfg.eval_samples or len(source))
    indices = eval_batch_indices(count, cfg.eval_batch_size, dist.rank(), dist.world_size())
    for images, labels, _ in source.batches(indices):
        x = normalize(images, mean, std, channels_last=cfg.channels_last)
        with autocast(device, cfg.precision):
            logits = view_logits(model, x, cfg.test_time_flip, cfg.test_time_shift)
        top5 = logits.topk(min(5, num_classes), dim=1).indices
        correct1 = top5[:, 0] == labels
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").to(total)
        sums[1] += correct1.sum()
        sums[2] += (top5 == labels[:, None]).any(dim=1).sum()
        per_class[0].index_add_(0, labels, correct1.to(total))
        per_class[1].index_add_(0, labels, torch.ones_like(labels, dtype=total))
        confusion.view(-1).index_add_(0, labels * num_classes + top5[:, 0], torch.ones_like(labels))
    for t in (sums, per_class, confusion):
        dist.all_reduce_sum(t)
    model.train(was_training)
    n = per_class[1].sum().item()
    return dict(loss=sums[0].item() / n, top1=100 * sums[1].item() / n, top5=100 * sums[2].item() / n,
                per_class_top1=(100 * per_class[0] / per_class[1].clamp(min=1)).tolist(),
                confusion=confusion.cpu(), images=int(n))


def gradients_finite(model: torch.nn.Module) -> bool:
    """Whether every gradient of `model` is finite (parameters without a gradient are left out). The check is
    GradScaler's own (one fused pass, here with a scale of exactly 1), over 20x cheaper than a max-abs by
    `_foreach_norm`."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    found = torch.zeros(1, device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=grads[0].device))
    return found.item() == 0


@dataclass
class EpochStats:
    """Running training loss/accuracy of the current epoch (saved with the state so a mid-epoch resume
    reports the same epoch figures)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: int = 0
    seconds: float = 0.0
    skipped: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def _summed_over_ranks(stats: EpochStats) -> dict[str, Any]:
    """The running epoch figures summed over DDP ranks, as a checkpoint saves them (a collective: every rank
    calls it). Identity in a single process."""
    sums = dist.reduce_floats([stats.loss_sum, stats.correct, stats.seen, stats.skipped])
    return dict(vars(stats), loss_sum=sums[0], correct=sums[1], seen=int(sums[2]), skipped=int(sums[3]))


class Engine:
    """Model, optimiser, grad scaler, EMA and augmentation of a run, and one optimisation step.

    Shared by the training loop and `cct bench`, so the benchmark times exactly what training runs:
    augment the uint8 batch on its device, forward under autocast, loss, backward, clip, step, EMA.
    `cfg` is the recipe with its precision resolved for `device` (never `auto`), `precision_reason` says why.
    """

    def __init__(self, cfg: Config, num_classes: int, img_size: int, mean, std, in_memory: bool,
                 device: torch.device, load_init: bool = True):
        precision, self.precision_reason = resolve_precision(cfg.precision, device)
        self.cfg = cfg = dataclasses.replace(cfg, precision=precision)
        self.device = device
        self.model = create_model(cfg.model, num_classes=num_classes, img_size=img_size,
                                  drop_path_rate=cfg.drop_path_rate, stochastic_depth=cfg.stochastic_depth,
                                  drop_rate=cfg.drop_rate, attn_drop_rate=cfg.attn_drop_rate)
        initialise(self.model, cfg, load_weights=load_init)  # before the optimizer: frozen parameters stay out
        self.model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        configure_for_device(self.model, device, cfg.precision)
        # fused=True: one kernel per step instead of a Python loop over parameters (PyTorch's default on a CPU),
        # the same update rule, measurably faster (docs/cpu-speed.md).
        self.optimizer = create_optimizer_v2(optimizer_params(self.model, cfg), opt=cfg.optimizer, lr=cfg.lr,
                                             fused=True, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        # DDP first: its constructor broadcasts rank 0's initial weights, which the EMA copy must start from.
        forward = dist.wrap_ddp(self.model, find_unused=cfg.stochastic_depth == "skip")
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.forward = forward
        if cfg.compile and device.type == "cpu":
            # On a CPU only the encoder blocks: inductor's max-pool backward is several times slower than eager's,
            # so compiling the tokenizer loses (docs/cpu-speed.md).
            for block in self.model.blocks:
                block.compile()
        elif cfg.compile:
            self.forward = torch.compile(forward)
        self.augments = {mixing: BatchAugment(
            num_classes=num_classes, mean=mean, std=std, out_size=img_size,
            crop=cfg.crop if in_memory else "none", padding=cfg.padding, scale=tuple(cfg.scale), hflip=cfg.hflip,
            auto_augment=cfg.auto_augment, mixup=cfg.mixup if mixing else 0.0,
            cutmix=cfg.cutmix if mixing else 0.0, mix_prob=cfg.mix_prob, switch_prob=cfg.switch_prob,
            label_smoothing=cfg.label_smoothing, erasing=cfg.erasing, channels_last=cfg.channels_last)
            for mixing in (True, False)}
        self.augment_device = device if has_float64(device) else torch.device("cpu")
        self.generator = torch.Generator(self.augment_device)
        self.base_lr = cfg.lr  # the schedule's LR of the last step, before each group's `lr_scale`

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are evaluated and saved: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def step(self, images: torch.Tensor, labels: torch.Tensor, step: int, lr: float, mixing: bool = True,
             size: int | None = None) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One optimisation step on a uint8 batch, at input `size` if given (progressive resizing); returns
        (loss, logits, soft targets). With `accumulate_steps` k the batch is split into k micro-batches, each
        augmented, forwarded and back-propagated in turn (the gradients summed, weighted by their share of the
        batch, all-reduced under DDP after the last only), then one update: the step of the whole batch in a
        k-th of the activation memory. A non-finite loss or gradient changes nothing (no update) and is
        returned as a non-finite loss for the caller to act on."""
        cfg = self.cfg
        self.base_lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.generator.manual_seed(step_seed(cfg.seed, step, dist.rank()))
        torch.manual_seed(step_seed(cfg.seed, step, dist.rank()) + 1)  # dropout masks
        parts = list(zip(images.chunk(cfg.accumulate_steps), labels.chunk(cfg.accumulate_steps), strict=True))
        loss_sum, all_logits, all_targets = 0.0, [], []
        for i, (part_images, part_labels) in enumerate(parts):
            # the same on every rank, and for every micro-batch: the step skips the branches one pass would
            self.model.seed_stochastic_depth(step_seed(cfg.seed, step))
            with nullcontext() if i == len(parts) - 1 else dist.no_sync(self.forward):
                loss_value, logits, targets = self._forward_backward(part_images, part_labels, mixing, size,
                                                                     len(part_labels) / len(labels))
            all_logits.append(logits)
            all_targets.append(targets)
            loss_sum += loss_value * len(part_labels)
            if not math.isfinite(loss_value):
                self.optimizer.zero_grad(set_to_none=True)
                return loss_value, torch.cat(all_logits), torch.cat(all_targets)
        logits, targets = torch.cat(all_logits), torch.cat(all_targets)
        if not self.scaler.is_enabled() and not gradients_finite(self.model):
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan, logits, targets
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        return loss_sum / len(labels), logits, targets

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor, mixing: bool, size: int | None,
                          weight: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Augment, forward and back-propagate one (micro-)batch, its loss weighted by `weight` in the gradients;
        returns (loss, logits, soft targets), with no backward where the loss is non-finite (see below)."""
        cfg = self.cfg
        x, targets = self.augments[mixing](images.to(self.augment_device), labels.to(self.augment_device),
                                           self.generator)
        x, targets = x.to(self.device), targets.to(self.device)
        if size is not None and size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = x.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        with autocast(self.device, cfg.precision):
            logits = self.forward(x)
        loss = soft_cross_entropy(logits, targets)
        loss_value = loss.item()
        # Under DDP every rank must take part in the backward's all-reduce (a rank alone out of it hangs), and all
        # must skip the same steps. In bf16 / fp32 a non-finite loss on any rank makes the all-reduced gradients
        # non-finite on every rank, so each rank finds it by itself after the backward. A vote of its own before
        # the backward cost a few percent of a step (docs/cpu-speed.md). In fp16 overflowing gradients are normal (the
        # scaler skips them and lowers its scale), so there the ranks still vote.
        vote = dist.is_distributed() and self.scaler.is_enabled()
        if vote and dist.reduce_floats([float(not math.isfinite(loss_value))])[0]:
            loss_value = math.nan
        if not math.isfinite(loss_value) and (vote or not dist.is_distributed()):
            return loss_value, logits, targets
        self.scaler.scale(loss * weight).backward()
        return loss_value, logits, targets

    def state_dict(self) -> dict[str, Any]:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict(),
                    ema=self.ema.module.state_dict() if self.ema is not None else None)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:  # a run that turns EMA on at a resume starts its average from the loaded weights
            self.ema.module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU model, for recorded results."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_data(cfg: Config, data_root: Path | None, img_size: int):
    info = dataset_info(cfg.dataset)
    kwargs = dict(root=data_root, flowers_split=cfg.flowers_split, val_fraction=cfg.val_fraction, seed=cfg.seed,
                  strict_images=cfg.strict_images)
    train_ds = build_dataset(cfg.dataset, "train", **kwargs)
    eval_ds = build_dataset(cfg.dataset, info.eval_split, img_size=img_size, **kwargs)
    if len(eval_ds) == 0:
        raise CCTError(f"the {info.eval_split} split of {cfg.dataset} holds no images ({len(train_ds)} for "
                       f"training): add images (or, for a tree without a val folder, raise val_fraction, now "
                       f"{cfg.val_fraction})")
    if not info.in_memory:
        train_ds.transform = train_file_transform(img_size, scale=tuple(cfg.scale))
        eval_ds.transform = eval_file_transform(img_size)
    return info, train_ds, eval_ds


@dist.peer_failures_as_errors
def train(cfg: Config, run_dir: Path, data_root: Path | None = None, resume: bool = False,
          device: str | None = None) -> dict[str, Any]:
    """Train `cfg` into `run_dir`, or continue the run saved there.

    Rank 0 holds the run directory's lock from before the first read to the end: a second run into it is
    refused instead of interleaving its checkpoints with this one's.

    Args:
        cfg: the recipe (see `Config`).
        run_dir: the run directory: `config.yaml`, `metrics.csv`, weights, training state, `summary.json`.
        data_root: the folder holding the datasets (default: `$CCT_DATA`, then `./data`).
        resume: continue from the training state saved in `run_dir` (exactly as if never stopped).
        device: "cpu", "cuda" or "mps" (default: CUDA where there is a GPU).

    Returns:
        The run's summary, as written to `summary.json` (final and best top-1, timings, device, ...).
    """
    dist.setup(device)
    threads = torch.get_num_threads()  # a run may set its own; the caller's are given back
    try:
        with RunLock(run_dir) if dist.rank() == 0 else nullcontext():
            return _train(cfg, run_dir, data_root, resume, device)
    finally:
        torch.set_num_threads(threads)


# What the saved weights and optimiser state are shaped by, and what a saved step means (it counts global
# batches of the training set): a resumed run must keep them.
_FIXED_ON_RESUME = ("model", "dataset", "img_size", "optimizer", "batch_size", "accumulate_steps", "train_samples",
                    "init", "freeze", "layer_decay", "head_lr_scale")


def check_resumable(cfg: Config, saved: dict[str, Any], run_dir: Path) -> None:
    """Refuse, in one line, to resume a run with a recipe whose weights or optimiser state do not fit its saved
    state (loading them would fail with a wall of missing keys). `saved`: the configuration the run recorded."""
    changed = [f"{key} {getattr(cfg, key)} (was {saved[key]})" for key in _FIXED_ON_RESUME
               if key in saved and saved[key] != getattr(cfg, key)]
    if changed:
        raise CCTError(f"cannot resume {run_dir} with another {', '.join(changed)}: resume with the values it "
                       "was trained with, or train into another --out folder")


def _training_device(device: str | None) -> torch.device:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dist.world_size() > 1:
        dev = torch.device("cuda", dist.local_rank())
    return dev


def _saved_state(cfg: Config, run_dir: Path, resume: bool) -> dict[str, Any] | None:
    """The training state to resume from (None for a new run), refused where this job cannot continue it."""
    state = load_state(run_dir / STATE_FILE) if resume else None
    if state is None:
        return None
    if state.get("processes", 1) != dist.world_size():  # steps count global batches
        raise CCTError(f"{run_dir} was trained with {state.get('processes', 1)} process(es): resume it with as many "
                       f"(this job has {dist.world_size()})")
    check_resumable(cfg, state.get("config", {}), run_dir)
    return state


@dataclass
class _Run:
    """One training run while it runs: what it was set up with, and where it stands (`step`, `best_top1`,
    `train_seconds`, `history`, `stats`: what a checkpoint saves)."""

    cfg: Config
    run_dir: Path
    device: torch.device
    rank0: bool
    engine: Engine
    train_source: BatchSource
    eval_source: BatchSource
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    num_train: int
    steps_per_epoch: int
    wall_start: float
    metadata: dict[str, str] = field(default_factory=dict)
    log: MetricsLog | None = None
    progress: Progress | None = None
    step: int = 0
    best_top1: float = -1.0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    stats: EpochStats = field(default_factory=EpochStats)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs


def _leave_cores_to_workers(workers: int) -> None:
    """Keep one torch thread per core that `workers` decoding processes leave free (at least one), for a CPU run
    from files whose `threads` is unset. Threads and workers otherwise contend for the cores, and OpenMP threads
    spin while they wait, which cost `cct train finetune` on a folder of JPEGs more than a third of its speed on
    2 cores (docs/own-images.md). A model whose compute outweighs decoding wants every core: `--set threads=N`."""
    torch.set_num_threads(max(1, torch.get_num_threads() - workers))


def _start(cfg: Config, run_dir: Path, data_root: Path | None, resume: bool, device: str | None) -> _Run:
    """Set a run up: data, model and optimiser (from the saved state on a resume), the run directory's
    `config.yaml`, the metrics log and the progress bar (rank 0)."""
    wall_start = time.perf_counter()
    dev = _training_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    state = _saved_state(cfg, run_dir, resume)
    check_crop_fits(cfg)
    img_size = cfg.img_size or dataset_info(cfg.dataset).img_size
    info, train_ds, eval_ds = _load_data(cfg, data_root, img_size)
    train_source, eval_source = BatchSource(train_ds, dev, cfg.workers), BatchSource(eval_ds, dev, cfg.workers)
    if not cfg.threads and dev.type == "cpu" and not info.in_memory:
        _leave_cores_to_workers(train_source.workers)
    num_train = min(len(train_ds), cfg.train_samples or len(train_ds))
    spe = steps_per_epoch(num_train, cfg.batch_size * cfg.accumulate_steps, dist.world_size())
    if spe == 0 and cfg.epochs > 0:
        raise CCTError(f"{num_train} training images are fewer than one batch of {cfg.batch_size} x "
                       f"{cfg.accumulate_steps} accumulated x {dist.world_size()} process(es): lower batch_size")
    torch.manual_seed(cfg.seed)  # the initial weights
    engine = Engine(cfg, len(train_ds.classes), img_size, info.mean, info.std, info.in_memory, dev,
                    load_init=state is None)
    cfg = engine.cfg  # the precision that runs (config.yaml and summary.json record it)
    run = _Run(cfg=cfg, run_dir=run_dir, device=dev, rank0=dist.rank() == 0, engine=engine,
               train_source=train_source, eval_source=eval_source, mean=info.mean, std=info.std,
               num_classes=len(train_ds.classes), num_train=num_train, steps_per_epoch=spe, wall_start=wall_start)
    if state is not None:
        _resume(run, state)
    run.metadata = model_metadata(engine.model, cfg.model, list(train_ds.classes), info.mean, info.std, cfg.dataset)
    if run.rank0:
        run.log = MetricsLog(run_dir, run.history)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        run.progress = Progress(run.total_steps, run.step, cfg.batch_size * cfg.accumulate_steps * dist.world_size())
        run.progress.write(f"{cfg.model} on {dev}: precision {cfg.precision} ({engine.precision_reason})")
    return run


def _resume(run: _Run, state: dict[str, Any]) -> None:
    """Put a run where its saved state left it: weights, optimiser, step, history, the epoch's running sums."""
    with restoring_state(run.run_dir / STATE_FILE):
        run.engine.load_state_dict(state)
        run.step, run.best_top1, run.train_seconds = state["step"], state["best_top1"], state["train_seconds"]
        run.history, run.stats = state["history"], EpochStats(**state["epoch_stats"])
    if not run.rank0:  # the saved running sums are over all ranks (see `_save`): rank 0 alone carries them on
        run.stats = EpochStats(seconds=run.stats.seconds, extra=run.stats.extra)


def _save(run: _Run, epoch_stats: dict[str, Any] | None = None) -> None:
    """The last weights and the training state (rank 0), with the epoch's running sums `epoch_stats`."""
    if not run.rank0:
        return
    save_weights(run.run_dir / "last.safetensors", run.engine.eval_model, run.metadata)
    save_state(run.run_dir / STATE_FILE, dict(
        version=1, step=run.step, processes=dist.world_size(), **run.engine.state_dict(), best_top1=run.best_top1,
        train_seconds=run.train_seconds, history=run.history, epoch_stats=epoch_stats or vars(run.stats),
        config=config_to_dict(run.cfg)))


def _add_time(run: _Run, since: float) -> float:
    """Count the training time since `since` for the epoch (its img/s) and the run; returns now."""
    now = time.perf_counter()
    run.stats.seconds += now - since
    run.train_seconds += now - since
    return now


def _train_step(run: _Run, images: torch.Tensor, labels: torch.Tensor, skipped: int, epoch: int,
                mixing: bool) -> bool:
    """One optimisation step and the epoch's running figures; False for a non-finite step (skipped, or an
    error with `on_nan=stop`)."""
    cfg, step, stats = run.cfg, run.step, run.stats
    lr = learning_rate(cfg, step, run.total_steps, run.steps_per_epoch)
    size = cfg.low_res_size if step < cfg.low_res_epochs * run.steps_per_epoch else None
    loss_value, logits, targets = run.engine.step(images, labels, step, lr, mixing, size)
    if not math.isfinite(loss_value) and cfg.on_nan == "stop":
        raise CCTError(f"loss became {loss_value} at step {step} (epoch {epoch}): stopped; the last "
                       f"good checkpoint in {run.run_dir} is kept (lower lr, or --set on_nan=skip)")
    run.step += 1
    if not math.isfinite(loss_value):
        stats.extra["nan_steps"] = stats.extra.get("nan_steps", 0) + 1
        return False
    stats.loss_sum += loss_value * len(labels)
    stats.correct += (logits.argmax(1) == targets.argmax(1)).sum().item()
    stats.seen += len(labels)
    stats.skipped += skipped
    if run.progress:
        run.progress.update(epoch, loss_value)
    return True


def _train_epoch(run: _Run) -> int:
    """Train from `run.step` to the end of its epoch, with the mid-epoch checkpoints the recipe asks for;
    returns the number of epochs done."""
    cfg, spe = run.cfg, run.steps_per_epoch
    epoch, offset = divmod(run.step, spe)
    mixing = cfg.mixup_off_epoch is None or epoch < cfg.mixup_off_epoch
    batches = train_batch_indices(run.num_train, cfg.batch_size * cfg.accumulate_steps, cfg.seed, epoch, dist.rank(),
                                  dist.world_size())
    tic = time.perf_counter()
    for images, labels, skipped in run.train_source.batches(batches[offset:], seed=epoch_seed(cfg.seed, epoch)):
        finite = _train_step(run, images, labels, skipped, epoch, mixing)
        if finite and cfg.checkpoint_every_steps and run.step % cfg.checkpoint_every_steps == 0 \
                and run.step % spe:
            tic = _add_time(run, tic)
            _save(run, _summed_over_ranks(run.stats))
    _add_time(run, tic)
    return epoch + 1


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2f}% | "
            f"test loss {row['test_loss']:.4f} top-1 {row['test_top1']:.2f}% top-5 {row['test_top5']:.2f}% | "
            f"{row['img_per_s']:.0f} img/s"
            + (f" | {row['nan_steps']} non-finite steps skipped" if row["nan_steps"] else ""))


def _evaluate_and_log(run: _Run, epoch: int) -> None:
    """Evaluate after `epoch`, add its row to the history (metrics.csv, TensorBoard, progress line), keep the
    best weights, and start the next epoch's running figures."""
    stats = run.stats
    result = evaluate(run.engine.eval_model, run.eval_source, run.mean, run.std, run.cfg, run.device,
                      run.num_classes)
    totals = dist.reduce_floats([stats.loss_sum, stats.correct, stats.seen, stats.skipped])
    row = dict(epoch=epoch, step=run.step, lr=run.engine.base_lr,
               train_loss=totals[0] / max(totals[2], 1), train_top1=100 * totals[1] / max(totals[2], 1),
               test_loss=result["loss"], test_top1=result["top1"], test_top5=result["top5"],
               img_per_s=totals[2] / max(stats.seconds, 1e-9), seconds=round(run.train_seconds, 2),
               skipped=int(totals[3]), nan_steps=int(stats.extra.get("nan_steps", 0)))
    if run.rank0:
        run.log.add(row)
        run.progress.write(_epoch_line(row, run.cfg.epochs))
        if result["top1"] > run.best_top1:
            run.best_top1 = result["top1"]
            save_weights(run.run_dir / "best.safetensors", run.engine.eval_model, run.metadata)
    else:  # other ranks keep the same history: the end-of-run "evaluate again?" test (a collective)
        run.history.append(row)  # must take the same branch on every rank, or the job hangs
        run.best_top1 = max(run.best_top1, result["top1"])
    run.stats = EpochStats()


def _final_result(run: _Run) -> dict[str, float]:
    """The final top-1, top-5 and loss: the last evaluation's, or a new one where the run ended after it."""
    if run.history and run.history[-1]["step"] == run.step:
        last = run.history[-1]
        return dict(top1=last["test_top1"], top5=last["test_top5"], loss=last["test_loss"])
    # epochs=0, or resumed after the last evaluation
    result = evaluate(run.engine.eval_model, run.eval_source, run.mean, run.std, run.cfg, run.device,
                      run.num_classes)
    if run.rank0 and not (run.run_dir / "last.safetensors").exists():
        _save(run)
    return dict(top1=result["top1"], top5=result["top5"], loss=result["loss"])


def _summary(run: _Run, final: dict[str, float]) -> dict[str, Any]:
    cfg, dev, spe = run.cfg, run.device, run.steps_per_epoch
    return dict(
        model=cfg.model, params=count_params(run.engine.model), dataset=cfg.dataset, epochs=cfg.epochs,
        steps=run.step, batch_size=cfg.batch_size, processes=dist.world_size(), precision=cfg.precision,
        precision_reason=run.engine.precision_reason,
        best_top1=max(run.best_top1, final["top1"]), final_top1=final["top1"], final_top5=final["top5"],
        final_loss=final["loss"], train_seconds=round(run.train_seconds, 2),
        wall_seconds=round(time.perf_counter() - run.wall_start, 2),
        img_per_s=round(run.num_train * (run.step / max(spe, 1)) / max(run.train_seconds, 1e-9), 1),
        device=f"cpu ({cpu_name()})" if dev.type == "cpu" else str(dev), threads=torch.get_num_threads(),
        torch=torch.__version__, git_commit=_git_commit(), skipped_images=sum(r.get("skipped", 0) for r in run.history),
        seed=cfg.seed, nan_steps_skipped=sum(r.get("nan_steps", 0) for r in run.history), init=cfg.init,
        # the final figures depend on the test-time views; `cct eval` repeats them
        test_time_flip=cfg.test_time_flip, test_time_shift=cfg.test_time_shift)


def _finish(run: _Run) -> dict[str, Any]:
    """The final figures, `summary.json` (rank 0) and the run's summary."""
    if run.progress:
        run.progress.close()
    summary = _summary(run, _final_result(run))
    if run.rank0:
        atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        run.log.close()
    dist.barrier()
    return summary


def _train(cfg: Config, run_dir: Path, data_root: Path | None, resume: bool, device: str | None) -> dict[str, Any]:
    run = _start(cfg, run_dir, data_root, resume, device)
    run.engine.model.train()
    while run.step < run.total_steps:
        epoch = _train_epoch(run)
        if epoch % cfg.eval_every == 0 or run.step >= run.total_steps:
            _evaluate_and_log(run, epoch)
        _save(run, _summed_over_ranks(run.stats))
    return _finish(run)
