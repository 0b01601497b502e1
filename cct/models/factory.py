"""`create_model` and `list_models`: the front door to the registry, with clear errors for wrong names."""

from __future__ import annotations

import difflib
import fnmatch
import os
from pathlib import Path
from typing import Any

import timm

from ..errors import CCTError, UsageError
from .cct import CCT
from .checkpoint import load_checkpoint
from .hub import load_hub_folder
from .registry import VARIANTS


def list_models(pattern: str | None = None) -> list[str]:
    """Registered variant names, sorted, optionally filtered by a shell-style pattern (`cct_7*`)."""
    names = sorted(VARIANTS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def check_model_name(name: str) -> str:
    """Return `name` if it is a registered variant, else raise UsageError naming the closest ones."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, VARIANTS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `cct models` lists them"
        raise UsageError(f"unknown model {name!r}{hint}")
    return name


def create_model(name: str | None = None, num_classes: int | None = None, img_size: int | None = None,
                 pretrained: bool | str | os.PathLike = False, checkpoint: str | os.PathLike | None = None,
                 drop_path_rate: float | None = None, stochastic_depth: str = "droppath",
                 **kwargs: Any) -> CCT:
    """Build a named variant, optionally with another class count / input size and weights from `checkpoint`
    (our safetensors or an official `.pth`; position tables are resampled, a head of another class count is
    re-initialised with a warning). `name` may carry a timm-style tag (`cct_7_3x1_32.official_cifar10_300ep`),
    which `pretrained=True` loads: shipped weights, or an official checkpoint downloaded and checked by
    `cct.models.pretrained`. `stochastic_depth` is "droppath" (per sample, as the paper) or "skip"
    (per batch, the dropped branch is not computed at all). `pretrained` may also be the path of a Hub model
    folder (see `cct.models.hub`), in which case `name` may be omitted."""
    if isinstance(pretrained, str | os.PathLike) and Path(pretrained).is_dir():
        model, meta = load_hub_folder(pretrained)
        if name is not None and name != meta["model"]:
            raise CCTError(f"{pretrained} holds {meta['model']}, not {name}")
        return model
    if name is None:
        raise UsageError("create_model needs a model name (or pretrained=<Hub folder>)")
    check_model_name(name.split(".", 1)[0])  # a timm-style `model.tag` names one of its weights
    pretrained = bool(pretrained)
    if stochastic_depth not in ("droppath", "skip"):
        raise UsageError(f"stochastic_depth must be 'droppath' or 'skip', got {stochastic_depth!r}")
    overrides = dict(num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path_rate)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    try:
        model = timm.create_model(name, pretrained=pretrained, stochastic_depth=stochastic_depth, **kwargs)
    except RuntimeError as e:
        if pretrained:
            raise CCTError(f"no pretrained weights available for {name}: {e}") from None
        raise
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model
