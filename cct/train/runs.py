"""Trained models as users name them: a weights file, a run directory (its weights, `config.yaml` and
`summary.json`), shipped weights with their record beside them, or a Hub folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..errors import CCTError
from ..models import create_model
from ..models.checkpoint import is_pytorch_file, read_metadata
from ..models.export import export_model
from ..models.hub import is_hub_folder, load_hub_folder

WEIGHT_FILES = ("best.safetensors", "last.safetensors", "model.safetensors")


def resolve_weights_path(path: str | os.PathLike) -> Path:
    """A weights file from what a user names: the file itself, or a run directory (its best, else last).

    Args:
        path: a weights file or a run directory.

    Returns:
        The weights file to load.
    """
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CCTError(f"{path} holds no {', '.join(WEIGHT_FILES[:-1])} or {WEIGHT_FILES[-1]}")
    if not path.is_file():
        raise CCTError(f"checkpoint not found: {path}")
    return path


def load_trained(path: str | os.PathLike, model_name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a cct weights file, a run directory or a Hub folder.

    Args:
        path: a `.safetensors` weights file, a run directory, a Hub folder or an official `.pth`.
        model_name: the architecture, for files without metadata (official `.pth`, bare state dicts).

    Returns:
        The model (eval mode) and its metadata (`model`, `classes`, `mean`, `std`, and what the file records).
    """
    if is_hub_folder(path):
        return load_hub_folder(path)
    path = resolve_weights_path(path)
    meta = {} if is_pytorch_file(path) else read_metadata(path)
    name = model_name or meta.get("model")
    if name is None:
        raise CCTError(f"{path} does not say which model it holds: pass --model NAME")
    kwargs = {k: meta[k] for k in ("num_classes",) if k in meta}
    if "img_size" in meta:
        kwargs["img_size"] = tuple(meta["img_size"])
    model = create_model(name, checkpoint=path, **kwargs).eval()
    if "classes" not in meta:
        meta["classes"] = [str(i) for i in range(model.num_classes)]
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    meta.setdefault("mean", list(cfg.get("mean", (0.5, 0.5, 0.5))))
    meta.setdefault("std", list(cfg.get("std", (0.5, 0.5, 0.5))))
    meta["model"] = name
    return model, meta


def run_records(checkpoint: Path) -> tuple[dict | None, dict | None]:
    """The run record of a checkpoint.

    Args:
        checkpoint: a weights file or a run directory.

    Returns:
        (summary, recipe): the JSON beside shipped weights, or the `summary.json` and `config.yaml` of the run
        directory the checkpoint lies in; None for what is not there.
    """
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    summary = recipe = None
    record = checkpoint.with_suffix(".json")  # shipped weights carry their run's summary beside them
    if checkpoint.is_file() and record.is_file():
        summary = json.loads(record.read_text())
    elif (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    if (run_dir / "config.yaml").is_file():
        recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
    return summary, recipe


def export_trained(checkpoint: str | os.PathLike, fmt: str, output: Path, model_name: str | None = None) -> Path:
    """Export a trained model (weights file, run directory, Hub folder) with `cct.models.export.export_model`;
    a Hub folder also carries the run's record (summary and recipe) in its model card.

    Args:
        checkpoint: what `load_trained` accepts.
        fmt: one of `cct.models.export.FORMATS`.
        output: the file (or, for "hub", the new folder) to write.
        model_name: the architecture, for files that do not record it.

    Returns:
        The path written.
    """
    model, meta = load_trained(checkpoint, model_name)
    summary, recipe = run_records(Path(checkpoint)) if fmt == "hub" else (None, None)
    return export_model(model, meta, fmt, output, summary=summary, recipe=recipe)
