"""Checkpoints of a run: weights as safetensors (with the metadata needed to rebuild and use the model) and a
separate training-state file for `--resume`, each written atomically so a kill at any moment leaves the
previous file intact and loadable."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CCTError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically replace a text file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str]) -> None:
    """Write the model's state dict as safetensors, atomically, with `metadata` in the header."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the training state (tensors and plain Python values only) atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state with `weights_only=True`: pickled code in it is refused, never run."""
    if not path.is_file():
        raise CCTError(f"cannot resume: no training state at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CCTError(f"refusing to load {path}: it contains pickled Python objects, not only tensors "
                       f"({str(e).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CCTError(f"cannot resume: {path} is not a readable training state ({str(e)[:200]})") from None
