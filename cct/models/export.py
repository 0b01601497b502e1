"""Export a trained model for use outside PyTorch training: ONNX (dynamic batch axis), safetensors weights
with their metadata, or TorchScript."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import CCTError, UsageError
from .checkpoint import load_trained, model_metadata, resolve_weights_path, run_records
from .hub import export_hub_folder

FORMATS = ("onnx", "safetensors", "torchscript", "hub")

_UMASK = os.umask(0)
os.umask(_UMASK)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # also where the folder itself is missing or a file
        path.unlink()


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


def export_model(checkpoint: str | os.PathLike, fmt: str, output: Path, model_name: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write `checkpoint`'s model to `output` in format `fmt` ("hub": a Hub model folder); the output is
    written to a temporary file in the same folder first and renamed, so a failed export never leaves a
    half-written file. What `check_export_target` refuses is refused before anything is read or written."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_export_target(checkpoint, fmt, output, overwrite)
    model, meta = load_trained(checkpoint, model_name)
    model = model.float().eval()
    if fmt == "hub":
        summary, recipe = run_records(Path(checkpoint))
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
