"""`cct eval` as a library function: a trained model measured on its dataset's held-out split, as its run
measured it (the same split options and test-time flip), with an optional report folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..data.jpeg import eval_file_transform
from ..data.loader import BatchSource
from ..data.prepared import build_dataset, dataset_info
from ..errors import CCTError, UsageError
from .config import Config
from .loop import compile_for_inference, configure_for_device, evaluate
from .precision import resolve_precision
from .report import plot_confusion
from .runs import load_trained, resolve_weights, run_records

_SPLIT_OPTIONS = ("val_fraction", "seed", "flowers_split")


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CCTError(f"cannot write {out}: {e.strerror or e}") from None


def _write_report(report: dict[str, Any], confusion: torch.Tensor, classes: list[str], out: Path) -> None:
    """`eval.json` and `confusion.png` in `out`."""
    try:
        plot_confusion(confusion, classes, out / "confusion.png", title=f"{report['model']} on {report['dataset']}")
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise CCTError(f"cannot write into {out}: {e.strerror or e}") from None


def evaluate_checkpoint(checkpoint: str | os.PathLike, dataset: str | None = None, *,
                        model_name: str | None = None, data_root: Path | None = None, download: bool = False,
                        precision: str = "auto", batch_size: int = 500, workers: int = 4,
                        flip: bool | None = None, shift: bool | None = None, compile: bool = False,
                        device: torch.device | None = None, out: Path | None = None) -> dict[str, Any]:
    """Evaluate a trained model on a dataset's held-out split: top-1, top-5, loss and per-class accuracy.

    Args:
        checkpoint: a weights file, a run directory, a Hub folder, an official `.pth`, `hf-hub:ORG/NAME` or
            `MODEL.TAG` (see `resolve_weights`).
        dataset: the dataset to measure on (default: the one the model was trained on). On its own dataset a
            run is measured on the split it held out itself (its `val_fraction`, `seed`, `flowers_split`).
        model_name: the architecture, for files that do not record it.
        data_root: the folder holding the datasets (default: `$CCT_DATA`, then `./data`).
        download: download a missing dataset first (CIFAR, Flowers-102).
        precision: autocast precision: "auto" (bf16 where the device computes it natively, else fp32, as training
            resolves it), "bf16", "fp16" or "fp32".
        batch_size: images per evaluation batch.
        workers: decoding workers for file datasets.
        flip: test-time horizontal-flip averaging (default: as the run was evaluated, else off).
        shift: test-time averaging over two one-pixel shifts (`view_logits`; default: as the run was evaluated,
            else off).
        compile: compile the model for inference first (pays off on large evaluation sets only).
        device: where to evaluate (default: CUDA where there is a GPU).
        out: a folder to write `eval.json` and `confusion.png` into (created before the evaluation).

    Returns:
        The report: `model`, `checkpoint`, `dataset`, `split`, `top1`, `top5`, `loss`, `images`, `precision`
        and `precision_reason` (what ran and why), `test_time_flip` and `test_time_shift` (the views averaged),
        and `per_class_top1` (class name to accuracy in %).
    """
    if out is not None:
        _make_folder(Path(out))
    checkpoint, named_model = resolve_weights(checkpoint)  # once: a remote source is fetched here
    model, meta = load_trained(checkpoint, model_name or named_model)
    dataset = dataset or meta.get("dataset")
    if not dataset:
        raise UsageError("the checkpoint does not name its dataset: pass --dataset NAME")
    split = dataset_info(dataset).eval_split
    # as the run evaluated: its own held-out part and its test-time views (config.yaml of a run directory; the
    # JSON beside shipped weights)
    summary, recipe = run_records(Path(checkpoint)) if dataset == meta.get("dataset") else (None, None)
    summary, recipe = summary or {}, recipe or {}
    split_options = {key: recipe[key] for key in _SPLIT_OPTIONS if key in recipe}
    data = build_dataset(dataset, split, root=data_root, download=download, img_size=model.img_size[0],
                         **split_options)
    if len(data.classes) != model.num_classes:
        raise CCTError(f"{dataset} has {len(data.classes)} classes but the model predicts {model.num_classes}")
    if not dataset_info(dataset).in_memory:
        data.transform = eval_file_transform(model.img_size[0])
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    views = {key: bool(recipe.get(key, summary.get(key, False))) for key in ("test_time_flip", "test_time_shift")}
    views.update({key: value for key, value in (("test_time_flip", flip), ("test_time_shift", shift))
                  if value is not None})
    precision, precision_reason = resolve_precision(precision, device)
    cfg = Config(precision=precision, eval_batch_size=batch_size, **views)
    configure_for_device(model, device, cfg.precision)
    runner = compile_for_inference(model) if compile else model
    result = evaluate(runner, BatchSource(data, device, workers), meta["mean"], meta["std"], cfg, device,
                      model.num_classes)
    report = dict(model=meta["model"], checkpoint=str(checkpoint), dataset=dataset, split=split,
                  top1=result["top1"], top5=result["top5"], loss=result["loss"], images=result["images"],
                  precision=precision, precision_reason=precision_reason, **views,
                  per_class_top1=dict(zip(data.classes, result["per_class_top1"], strict=True)))
    if out is not None:
        _write_report(report, result["confusion"], data.classes, Path(out))
    return report
