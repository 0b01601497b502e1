"""Checkpoints of a run: weights as safetensors (with the metadata needed to rebuild and use the model) and a
separate training-state file for `--resume`, each written atomically so a kill at any moment leaves the
previous file intact and loadable; and the lock that keeps two runs out of one run directory."""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import pickle
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from ..errors import CCTError, UsageError

logger = logging.getLogger("cct.train")

_UMASK = os.umask(0)
os.umask(_UMASK)


def _write_error(path: Path, error: OSError) -> CCTError:
    """A failed write (disk full, read-only, file too large, no permission) as one line naming the file."""
    return CCTError(f"cannot write {path}: {error.strerror or error}; the files already in {path.parent} "
                    "(the last checkpoint too) are kept as they were")


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename it over `path`: readers see the old
    file or the new one. The data are serialised before the file is opened, so a full or read-only disk shows
    up here as an OSError (torch.save into a file would report it as an opaque RuntimeError); it becomes a
    one-line CCTError and the temporary file is removed."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically replace a text file."""
    atomic_write(path, text.encode())


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str]) -> None:
    """Write the model's state dict as safetensors, atomically, with `metadata` in the header."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, save(tensors, metadata=metadata))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the training state (tensors and plain Python values only) atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getbuffer())


# the fields of a saved training state and the types they must have (a state written by `cct train` has them)
_STATE_FIELDS: dict[str, type | tuple[type, ...]] = dict(
    step=int, best_top1=(int, float), train_seconds=(int, float), history=list, epoch_stats=dict,
    model=dict, optimizer=dict, scaler=dict)
_OPTIONAL_STATE_FIELDS: dict[str, type] = dict(processes=int, config=dict)


def _check_state(state: object, path: Path) -> dict[str, Any]:
    """The state itself, if it has every field of a `cct train` state with the right type; else one line."""
    if not isinstance(state, dict):
        raise CCTError(f"cannot resume: {path} is not a training state (it holds a {type(state).__name__})")
    wrong = [k for k, kind in _STATE_FIELDS.items() if not isinstance(state.get(k), kind)
             or isinstance(state.get(k), bool)]
    wrong += [k for k, kind in _OPTIONAL_STATE_FIELDS.items() if k in state and not isinstance(state[k], kind)]
    if wrong:
        raise CCTError(f"cannot resume: {path} is not a training state written by `cct train` (missing or wrong: "
                       f"{', '.join(wrong)})")
    if state["step"] < 0 or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CCTError(f"cannot resume: {path} is not a training state written by `cct train` (a negative step "
                       "or weights that are not tensors)")
    return state


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state with `weights_only=True`: pickled code in it is refused, never run; a file that
    loads but does not have the fields of a `cct train` state is refused too."""
    if not path.is_file():
        raise CCTError(f"cannot resume: no training state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CCTError(f"refusing to load {path}: it contains pickled Python objects, not only tensors "
                       f"({str(e).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CCTError(f"cannot resume: {path} is not a readable training state ({str(e)[:200]})") from None
    return _check_state(state, path)


@contextlib.contextmanager
def restoring_state(path: Path) -> Iterator[None]:
    """Around restoring a loaded training state: a field that does not fit (tensors of other shapes, unknown
    keys, values of other types) becomes one line naming the state file instead of a traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        detail = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise CCTError(f"cannot resume: {path} does not fit this run ({detail})") from None


class RunLock:
    """Exclusive use of a run directory by one `cct train` (rank 0 under DDP), for the life of the run.

    The file `.lock` holds the holder's pid and host while an `fcntl.flock` on it is held. The kernel drops the
    flock when the process dies, however it dies, so a run killed with SIGKILL leaves the file filled in but
    unlocked: the next run takes it over with a notice, and removes the temporary files the dead run was
    writing. A clean exit empties the file. The file itself is never deleted: deleting it would let a third
    process lock a fresh file while a second still holds the old one.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as e:
            raise _write_error(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CCTError(f"{self.run_dir} is in use by a running `cct train` ({holder}): wait for it to end, "
                           "or train into another --out folder") from None
        previous = os.read(fd, 256).decode(errors="replace").strip()
        if previous:
            stale = sorted(self.run_dir.glob(".*.tmp"))
            for tmp in stale:
                tmp.unlink(missing_ok=True)
            logger.warning("%s: the run that held it (%s) ended without releasing it; taking it over "
                           "(%d unfinished temporary file(s) removed)", self.path, previous, len(stale))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise _write_error(self.path, e) from None
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # a released lock: no notice for the next run
            except OSError:
                pass  # the disk went read-only or full: the next run will just see a stale lock
            os.close(self._fd)  # closing drops the flock
            self._fd = None


#: The files a run writes into its directory; any of them there means the folder holds a run.
RUN_FILES = ("config.yaml", "metrics.csv", "summary.json", "curves.png", "last.state.pt", "last.safetensors",
             "best.safetensors")


def previous_run_files(run_dir: Path) -> list[str]:
    """The names of the files of an earlier run in `run_dir` (any weights file counts), sorted; none where the
    folder does not exist."""
    try:
        names = [entry.name for entry in os.scandir(run_dir)] if run_dir.is_dir() else []
    except OSError as e:
        raise CCTError(f"cannot read {run_dir}: {e.strerror or e}") from None
    return sorted(n for n in names if n in RUN_FILES or n.endswith(".safetensors"))


def claim_fresh_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Make sure a new run never writes over another one: a `run_dir` holding an earlier run's files is refused,
    unless `overwrite`, which deletes those files first. A folder in use by a live run is refused by its lock
    either way.

    Args:
        run_dir: the `--out` folder of a new (not resumed) run.
        overwrite: replace the earlier run (`cct train --overwrite`).

    Raises:
        UsageError: the folder holds a run and `overwrite` is false.
        CCTError: the folder is in use, or cannot be read or cleared.
    """
    previous = previous_run_files(run_dir)
    if not previous:
        return
    with RunLock(run_dir):
        if not overwrite:
            shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
            if "last.state.pt" in previous:
                raise UsageError(f"{run_dir} already holds a run ({shown}): pass --resume to continue it, or a "
                                 "fresh --out folder (--overwrite replaces it)")
            raise UsageError(f"{run_dir} holds a run stopped before its first checkpoint ({shown}), so there is "
                             "nothing to --resume: pass --overwrite to start it again, or a fresh --out folder")
        for name in previous:
            try:
                (run_dir / name).unlink(missing_ok=True)
            except OSError as e:
                raise CCTError(f"cannot remove {run_dir / name} for --overwrite: {e.strerror or e}") from None
