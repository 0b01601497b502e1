"""Training configuration: one flat dataclass, filled from a recipe (YAML) and `--set KEY=VALUE` overrides.

Recipes are data: a bundled one is named by its file stem (`keras-example`), any other by its path.
Unknown keys and values of the wrong type are usage errors that name the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..data.prepared import dataset_info
from ..errors import UsageError
from ..models.factory import check_model_name

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adamw", "sgd"),
    "scheduler": ("cosine", "linear", "constant"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "stochastic_depth": ("droppath", "skip"),
    "crop": ("pad", "resized", "none"),
    "on_nan": ("stop", "skip"),
    "flowers_split": ("official", "cct"),
    "freeze": ("none", "tokenizer", "backbone"),
}


@dataclass
class Config:
    """Every knob of a training run. Defaults are the paper's CIFAR set-up where it has one.

    Build one with `load_config(recipe, overrides)` (a bundled recipe or a YAML file, validated) or directly;
    a recipe's flat keys are these fields, each described beside it below.

    Attributes:
        model: the registered variant to train (`cct models` lists them).
        dataset: `cifar10`, `cifar100`, `flowers102`, `imagenet` or `folder:PATH`.
        epochs: training epochs; `batch_size` is per process, `lr` for the global batch.
        seed: the seed of the weights, the data order and every augmentation draw.
        precision: the autocast of training and evaluation: `auto` (bf16 where the device computes it natively,
            else fp32: `cct.train.precision.resolve_precision`), `bf16`, `fp16` (CUDA only) or `fp32`.
        init: the weights training starts from (`none`: random), named as every command names weights
            (`cct.train.runs.resolve_weights`); `freeze`, `layer_decay` and `head_lr_scale` shape fine-tuning.

    The other fields (schedule, optimiser, regularisation, augmentation, evaluation, checkpoints) are
    commented where they are declared below.
    """

    # what to train on
    model: str = "cct_7_3x1_32"
    dataset: str = "cifar10"
    img_size: int | None = None  # None: the dataset's (32 for CIFAR)
    train_samples: int | None = None  # use only the first N training images (smoke tests)
    eval_samples: int | None = None  # evaluate on the first N evaluation images only (smoke tests)
    flowers_split: str = "cct"
    val_fraction: float = 0.1  # folder datasets without a val/ split
    strict_images: bool = False  # a bad image file is fatal instead of skipped
    workers: int = 4  # DataLoader workers for file datasets
    # initial weights (fine-tuning): what `cct.train.runs.resolve_weights` accepts, e.g. `cct_2_3x2_32.cifar10_keras`,
    # a weights file, a run directory, a Hub folder or `hf-hub:ORG/NAME`; `none`: random weights
    init: str = "none"
    # `tokenizer`: the convolutions stay as loaded; `backbone`: a linear probe, only the head trains (the
    # sequence pooling is part of the features: frozen too)
    freeze: str = "none"
    layer_decay: float | None = None  # each block's LR is this times the next one's (timm's layer-wise decay)
    head_lr_scale: float = 1.0  # the head's LR multiplier (a re-initialised head may learn faster)
    # schedule and optimiser
    epochs: int = 300
    batch_size: int = 128  # per process and micro-batch
    accumulate_steps: int = 1  # micro-batches whose gradients make one step (global batch: x batch_size x processes)
    lr: float = 5.5e-4  # for the global batch (batch_size x accumulate_steps x processes)
    min_lr: float = 1e-5
    warmup_epochs: float = 10.0
    warmup_lr: float = 1e-5
    cooldown_epochs: float = 0.0  # final epochs held at min_lr (timm's cool-down)
    scheduler: str = "cosine"
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.06
    grad_clip: float | None = None
    label_smoothing: float = 0.1
    # model regularisation
    drop_path_rate: float = 0.1
    stochastic_depth: str = "droppath"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.1
    # augmentation (batched, on the training device)
    crop: str = "pad"
    padding: int = 4
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    auto_augment: str | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    mixup_off_epoch: int | None = None
    erasing: float = 0.0
    low_res_size: int | None = None  # progressive resizing: train the first `low_res_epochs` at this size
    low_res_epochs: float = 0.0
    # engine
    ema: bool = False
    ema_decay: float = 0.9998
    precision: str = "auto"
    compile: bool = False
    channels_last: bool = True
    threads: int | None = None  # torch intra-op threads; None: torch's default, less the workers for files on a CPU
    processes: int = 1  # DDP processes `cct train` starts for a CPU run (as --nproc-per-node, which wins)
    seed: int = 0
    on_nan: str = "stop"
    # evaluation and checkpoints
    eval_every: int = 1  # epochs
    eval_batch_size: int = 500
    test_time_flip: bool = False
    test_time_shift: bool = False  # also the image moved one pixel diagonally both ways (see `loop.view_logits`)
    checkpoint_every_steps: int | None = None


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def bundled_recipes() -> dict[str, Path]:
    """Recipe name -> path of the YAML files shipped inside the package."""
    folder = resources.files("cct") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def _closest_key(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.4)
    return f"; did you mean {close[0]!r}?" if close else ""


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    hint = eval(annotation, vars(typing), {}) if isinstance(annotation, str) else annotation  # noqa: S307
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(a) or a for a in args)


def coerce(key: str, value: Any) -> Any:
    """Check `value` against the type of `key` (ints accepted where floats are expected)."""
    if key not in FIELDS:
        raise UsageError(f"unknown recipe key {key!r}{_closest_key(key)}")
    allowed = _allowed_types(FIELDS[key].type)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if float in allowed and isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = "/".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise UsageError(f"recipe key {key!r} expects {names}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise UsageError(f"recipe key {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


# Allowed values of the numeric keys (a key left null, e.g. `img_size`, is not checked).
_AT_LEAST = {
    **dict.fromkeys(("epochs", "workers", "padding", "mixup_off_epoch", "min_lr", "warmup_lr", "warmup_epochs",
                     "cooldown_epochs", "weight_decay", "mixup", "cutmix", "low_res_epochs"), 0),
    **dict.fromkeys(("img_size", "train_samples", "eval_samples", "batch_size", "eval_batch_size", "eval_every",
                     "checkpoint_every_steps", "threads", "low_res_size", "processes",
                     "accumulate_steps"), 1),
}
_POSITIVE = ("lr", "grad_clip", "head_lr_scale")
_FRACTIONS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "label_smoothing", "momentum", "val_fraction")
_PROBABILITIES = ("hflip", "mix_prob", "switch_prob", "erasing", "ema_decay", "layer_decay")
_LARGEST_INT = 2**31 - 1  # seeds and thread counts beyond this overflow torch's C integers


@dataclass(frozen=True)
class MachineLimits:
    """Upper bounds of the settings that size processes, threads, batches and images on this machine: far above
    what fits it well, low enough that a typo (an extra zero or three) is refused in one line instead of ending
    in a crash, a swap storm or a fork bomb."""

    cores: int
    memory: int  # bytes of physical memory

    @property
    def processes(self) -> int:
        return max(8, 4 * self.cores)

    @property
    def threads(self) -> int:  # intra-op threads and data-loading workers
        return max(64, 8 * self.cores)

    @property
    def img_size(self) -> int:  # the side of one float32 RGB image that fills a quarter of the memory
        return min(MAX_IMG_SIZE, math.isqrt(self.memory // (4 * 3 * 4)))

    def batch_size(self, img_size: int) -> int:
        """The largest batch of float32 RGB images of side `img_size` that fits in the memory."""
        return max(1, self.memory // (3 * 4 * img_size * img_size))


MAX_IMG_SIZE = 8192  # far above any model of this library, whatever the machine


def machine_limits() -> MachineLimits:
    """The limits of this machine: the cores this process may use and the physical memory."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 16 << 30
    return MachineLimits(cores=cores, memory=memory)


def check_batch_fits(option: str, batch_size: int, img_size: int, limits: MachineLimits | None = None) -> None:
    """Refuse, as a usage error, a batch of `img_size` images whose float32 input alone exceeds the memory."""
    limits = limits or machine_limits()
    if img_size > limits.img_size:
        raise UsageError(f"img_size must be <= {limits.img_size} on this machine, got {img_size}")
    largest = limits.batch_size(img_size)
    if batch_size > largest:
        raise UsageError(f"{option} must be <= {largest} for {img_size} px images on this machine "
                         f"({limits.memory / 2**30:.0f} GiB of memory), got {batch_size}")


def _check_machine_limits(cfg: Config) -> None:
    limits = machine_limits()
    bounds = dict(processes=limits.processes, threads=limits.threads, workers=limits.threads,
                  padding=MAX_IMG_SIZE, low_res_size=limits.img_size)
    for key, bound in bounds.items():
        value = getattr(cfg, key)
        if value is not None and value > bound:
            raise UsageError(f"{key} must be <= {bound} on this machine ({limits.cores} cores), got {value}")
    img_size = cfg.img_size or dataset_info(cfg.dataset).img_size
    check_batch_fits("batch_size", cfg.batch_size, img_size, limits)
    check_batch_fits("eval_batch_size", cfg.eval_batch_size, img_size, limits)


def _validate(cfg: Config) -> Config:
    """Refuse values that would otherwise fail later with a traceback (or silently train nonsense)."""
    for key in FIELDS:
        value = getattr(cfg, key)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        problem = ("a finite number" if not math.isfinite(value)
                   else f"within ±{_LARGEST_INT}" if isinstance(value, int) and abs(value) > _LARGEST_INT
                   else f">= {_AT_LEAST[key]}" if key in _AT_LEAST and value < _AT_LEAST[key]
                   else "> 0" if key in _POSITIVE and value <= 0
                   else "in [0, 1)" if key in _FRACTIONS and not 0 <= value < 1
                   else "in [0, 1]" if key in _PROBABILITIES and not 0 <= value <= 1 else None)
        if problem:
            raise UsageError(f"{key} must be {problem}, got {value}")
    check_model_name(cfg.model)
    dataset_info(cfg.dataset)  # refuses an unknown name
    _check_machine_limits(cfg)
    scale = cfg.scale
    if len(scale) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in scale) \
            or not 0 < scale[0] <= scale[1] <= 1:
        raise UsageError(f"scale must be [min, max] with 0 < min <= max <= 1, got {cfg.scale}")
    return cfg


def check_crop_fits(cfg: Config) -> None:
    """Refuse a training `img_size` that the padded crop of an in-memory dataset cannot give (`cct bench`, which
    makes its images at the size it measures, does not need this)."""
    info = dataset_info(cfg.dataset)
    img_size, largest_crop = cfg.img_size or info.img_size, info.img_size + 2 * cfg.padding
    if info.in_memory and cfg.crop == "pad" and img_size > largest_crop:
        raise UsageError(f"img_size {img_size} does not fit crop=pad on {info.name}: its {info.img_size} px images "
                         f"padded by {cfg.padding} give crops of {largest_crop} px at most; use --set crop=resized "
                         f"to train at {img_size} px")


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE parsed as YAML (so 1e-3, true, null, [0.8, 1.0] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from a bundled recipe name or a YAML path, then apply `KEY=VALUE` overrides.

    Args:
        recipe: a bundled recipe name (`bundled_recipes()`) or the path of a YAML file of flat keys.
        overrides: `KEY=VALUE` strings, applied in order (values parsed as YAML, checked against the field).

    Returns:
        The validated configuration; an unknown key, a wrong type or value raises a one-line `UsageError`.
    """
    recipes = bundled_recipes()
    path = recipes.get(recipe) or Path(recipe)
    if path.exists() and not path.is_file():  # a folder, FIFO or device: reading it could block or never end
        raise UsageError(f"recipe {path} is not a regular file")
    if not path.is_file():
        close = difflib.get_close_matches(recipe, recipes, n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown recipe {recipe!r}: {hint}bundled recipes are {', '.join(sorted(recipes))}, "
                         "or give a YAML file path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"recipe {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UsageError(f"cannot read recipe {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of keys to values")
    data.update(parse_override(o) for o in overrides)
    return _validate(Config(**{k: coerce(k, v) for k, v in data.items()}))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain dict of the resolved configuration (written to the run directory as YAML)."""
    return dataclasses.asdict(cfg)
