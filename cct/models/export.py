"""Export a trained model for use outside PyTorch training: ONNX (dynamic batch axis), safetensors weights
with their metadata, or TorchScript."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from ..errors import CCTError, UsageError
from .checkpoint import model_metadata
from .hub import export_hub_folder

FORMATS = ("onnx", "safetensors", "torchscript", "hub")

_UMASK = os.umask(0)
os.umask(_UMASK)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # also where the folder itself is missing or a file
        path.unlink()


def export_model(model: nn.Module, meta: dict[str, Any], fmt: str, output: Path,
                 summary: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None) -> Path:
    """Write `model` to `output` in format `fmt`; the output is written to a temporary name first and renamed,
    so a failed export never leaves a half-written file.

    Args:
        model: the trained model (exported in fp32, eval mode).
        meta: its metadata (`model`, `classes`, `mean`, `std`, `dataset`, ...), as `cct.train.load_trained`
            returns it.
        fmt: one of `FORMATS` ("hub": a Hub model folder).
        output: the file (a new folder for "hub") to write.
        summary: the run's summary, for a Hub folder's model card.
        recipe: the run's recipe, for a Hub folder's model card.

    Returns:
        The path written.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    model = model.float().eval()
    if fmt == "hub":
        return export_hub_folder(model, meta, output, summary=summary, recipe=recipe)
    height, width = model.img_size
    example = torch.zeros(1, 3, height, width)
    tmp = None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # a new name that nobody can have planted a link at; an unwritable place fails here as an OSError
        fd, name = tempfile.mkstemp(prefix=f".{output.name[:200]}.", suffix=".tmp", dir=output.parent)
        os.close(fd)
        tmp = Path(name)
        if fmt == "onnx":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                                  opset_version=17, dynamo=False)
        elif fmt == "torchscript":
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(model, example), str(tmp))
        else:
            extra = {k: v for k, v in meta.items()
                     if k not in ("format", "model", "num_classes", "img_size", "classes", "mean", "std", "dataset")}
            metadata = model_metadata(model, meta["model"], meta["classes"], meta["mean"], meta["std"],
                                      meta.get("dataset", ""), extra)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, output)
    except (OSError, SafetensorError) as e:  # e.g. the disk filled up while writing
        if tmp is not None:
            _remove(tmp)
        raise CCTError(f"cannot write {output}: {getattr(e, 'strerror', None) or e}") from None
    except BaseException:
        if tmp is not None:
            _remove(tmp)
        raise
    return output
