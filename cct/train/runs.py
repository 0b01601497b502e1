"""Trained models as users name them, one way for every command and for `--set init=`: a weights file (ours or
an official `.pth`), a run directory (its weights, `config.yaml` and `summary.json`), a Hub model folder,
`hf-hub:ORG/NAME`, or `MODEL.TAG` (weights shipped in the package, or an official checkpoint, downloaded)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..errors import CCTError, UsageError
from ..models import create_model
from ..models.checkpoint import is_pytorch_file, load_checkpoint, read_metadata
from ..models.export import FORMATS, export_model
from ..models.factory import list_models
from ..models.hub import HUB_PREFIX, download_hub_model, is_hub_folder, load_hub_folder, weights_of_hub_folder
from ..models.pretrained import OFFICIAL_WEIGHTS, fetch_official
from ..models.registry import SHIPPED_WEIGHTS, official_key, shipped_weights

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


def _named_weights(name: str) -> tuple[Path, str] | None:
    """The file of `MODEL.TAG` (or `MODEL`, its default tag): shipped, else official (downloaded, checked)."""
    model, _, tag = name.partition(".")
    if model not in list_models():
        return None
    shipped = shipped_weights(model, tag or None)
    if shipped is not None:
        return shipped, model
    key = official_key(model, tag or None)
    if key is None:
        return None
    return fetch_official(key, create_model(model)), model


def resolve_weights(source: str | os.PathLike) -> tuple[Path, str | None]:
    """Where the weights a user names are on this machine, fetching them first where they are remote.

    Args:
        source: a weights file, a run directory, a Hub folder, `hf-hub:ORG/NAME` (through huggingface_hub's
            cache) or `MODEL.TAG` (shipped weights, or an official checkpoint downloaded into torch hub's cache).

    Returns:
        The local file or folder, and the architecture where the name gives it (`MODEL.TAG`), else None.
    """
    text = str(source)
    if text.startswith(HUB_PREFIX):
        return download_hub_model(text[len(HUB_PREFIX):]), None
    if Path(source).exists():
        return Path(source), None
    named = _named_weights(text)
    if named is None:
        tags = sorted({*SHIPPED_WEIGHTS, *OFFICIAL_WEIGHTS})
        raise CCTError(f"weights {text!r} not found: give a weights file, a run directory, a Hub folder, "
                       f"hf-hub:ORG/NAME or MODEL.TAG (one of {', '.join(tags)})")
    return named


def load_weights_into(model: nn.Module, source: str | os.PathLike) -> nn.Module:
    """Load the weights `source` names (see `resolve_weights`) into `model`, in place: official keys converted,
    position tables resampled to its input size, a head of another class count re-initialised (one warning);
    anything else that does not fit is a one-line CCTError naming the keys."""
    path, _ = resolve_weights(source)
    return load_checkpoint(model, weights_of_hub_folder(path) if is_hub_folder(path) else resolve_weights_path(path))


def load_trained(source: str | os.PathLike, model_name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from what `resolve_weights` accepts.

    Args:
        source: a `.safetensors` weights file, a run directory, a Hub folder, an official `.pth`,
            `hf-hub:ORG/NAME` or `MODEL.TAG`.
        model_name: the architecture, for files without metadata (official `.pth`, bare state dicts).

    Returns:
        The model (eval mode) and its metadata (`model`, `classes`, `mean`, `std`, and what the file records).
    """
    path, named_model = resolve_weights(source)
    return _load_local(path, model_name or named_model)


def _load_local(path: Path, model_name: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """`load_trained` of a local file or folder."""
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
        checkpoint: a weights file, a run directory or a Hub folder.

    Returns:
        (summary, recipe): the JSON beside shipped weights, or the `summary.json` and `config.yaml` of the run
        directory the checkpoint lies in, or those kept in a Hub folder's `config.json`; None for what is not
        there.
    """
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    summary = recipe = None
    record = checkpoint.with_suffix(".json")  # shipped weights carry their run's summary beside them
    if checkpoint.is_file() and record.is_file():
        summary = _read_record(record, json.loads)
    elif (run_dir / "summary.json").is_file():
        summary = _read_record(run_dir / "summary.json", json.loads)
    if (run_dir / "config.yaml").is_file():
        recipe = _read_record(run_dir / "config.yaml", yaml.safe_load)
    if summary is None and recipe is None and is_hub_folder(run_dir):  # `export_hub_folder` keeps both here
        config = _read_record(run_dir / "config.json", json.loads)
        summary, recipe = (config.get(key) if isinstance(config.get(key), dict) else None
                           for key in ("summary", "recipe"))
    return summary, recipe


def _read_record(path: Path, parse: Any) -> dict:
    """A run's JSON or YAML record as a dict, or one line saying that the file is damaged."""
    try:
        record = parse(path.read_text(encoding="utf-8"))
    except Exception as e:  # unreadable, not UTF-8, not JSON or YAML: each parser has its own error types
        raise CCTError(f"{path} is damaged ({str(e).splitlines()[0][:160]}): restore it or remove it") from None
    if not isinstance(record, dict):
        raise CCTError(f"{path} is damaged (it holds a {type(record).__name__}, not a mapping): restore it or "
                       "remove it")
    return record


def _is_same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_export_target(checkpoint: str | os.PathLike, fmt: str, output: Path, overwrite: bool = False) -> None:
    """Refuse, in one line, an export that would destroy something: writing over its own input, over what is not
    a regular file (a folder, FIFO, device, or a link to one), or over an existing file without `overwrite`.

    Args:
        checkpoint: what the export reads (a weights file or a run directory).
        fmt: the export format; "hub" writes a new folder, checked by `export_hub_folder`.
        output: the file (or, for "hub", folder) to write.
        overwrite: replace an existing regular file.

    Raises:
        UsageError: `output` is the input, or exists and `overwrite` is false.
        CCTError: `output` is not a regular file.
    """
    source = Path(checkpoint)
    sources = [source] + ([resolve_weights_path(source)] if source.is_dir() else [])
    if any(_is_same_file(output, s) for s in sources):
        raise UsageError(f"{output} is the checkpoint being exported: write the export to another file")
    if fmt == "hub" or not os.path.lexists(output):
        return
    try:
        mode = os.stat(output).st_mode
    except OSError as e:  # a dangling symbolic link, or a folder on the way that cannot be read
        raise CCTError(f"cannot write {output}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise CCTError(f"{output} exists and is not a regular file: write the export to a new file name")
    if not overwrite:
        raise UsageError(f"{output} exists: pass --overwrite to replace it, or write to a new file name")


def export_trained(checkpoint: str | os.PathLike, fmt: str, output: Path, model_name: str | None = None,
                   overwrite: bool = False) -> Path:
    """Export a trained model (weights file, run directory, Hub folder) with `cct.models.export.export_model`;
    a Hub folder also carries the run's record (summary and recipe) in its model card.

    Args:
        checkpoint: what `resolve_weights` accepts.
        fmt: one of `cct.models.export.FORMATS`.
        output: the file (or, for "hub", the new folder) to write.
        model_name: the architecture, for files that do not record it.
        overwrite: replace an existing regular file at `output`.

    Returns:
        The path written.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_export_target(checkpoint, fmt, output, overwrite)
    path, named_model = resolve_weights(checkpoint)
    model, meta = _load_local(path, model_name or named_model)
    summary, recipe = run_records(path) if fmt == "hub" else (None, None)
    return export_model(model, meta, fmt, output, summary=summary, recipe=recipe)
