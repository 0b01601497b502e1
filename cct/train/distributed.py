"""The few places where a torchrun (DDP) run differs from a single process: process group set-up, the model
wrapper, reductions of metrics and "only rank 0 writes". Everything else is PyTorch's own engine."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel

from ..errors import CCTError

#: Set by `cct` for the workers of a torchrun it starts: the pid of the process they must not outlive.
LAUNCHER_PID = "CCT_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_launcher() -> bool:
    """Have the kernel SIGKILL this worker the moment the process that started it dies, however it dies
    (SIGKILL included, which leaves the launcher no chance to stop its workers). Linux only (`prctl`); a worker
    whose launcher is already gone exits at once. Returns whether the kernel took the request.

    The death signal follows the thread that forked the worker: torchrun starts its workers from the launcher's
    main thread, which lives as long as the launcher."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is not None and os.getppid() != int(launcher):  # it died before the request was made
        os._exit(128 + signal.SIGKILL)
    return True


def is_distributed() -> bool:
    """True inside a torchrun job with more than one process."""
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def setup(device: str | None = None) -> None:
    """Join the process group that torchrun describes in the environment: nccl when training on CUDA (the
    default where there is a GPU), gloo on CPU (also `--device cpu` on a GPU machine)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        td.init_process_group(backend, timeout=timedelta(minutes=10))


def rank() -> int:
    return td.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return td.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        td.barrier()


def wrap_ddp(model: torch.nn.Module, find_unused: bool) -> torch.nn.Module:
    """The model as the training step calls it: DDP-wrapped under torchrun, itself otherwise.

    `find_unused` is set for `skip` stochastic depth. Every rank skips the same branches in a step (seeded per
    step), so the skipped branches' parameters get no gradient anywhere; plain DDP (find_unused=False) then
    fails ("Expected to have finished reduction in the prior iteration"). Of the two remedies,
    `find_unused_parameters=True` measured faster than adding `0 * sum(branch params)` (docs/cpu-speed.md),
    and it is also the correct one: DDP leaves a parameter unused on every rank with grad None, so AdamW
    skips it exactly as in one process; the zero gradient makes AdamW apply weight decay and its momentum to
    the skipped branch (weights 0.053 apart after 43 steps). tests/train/test_distributed.py checks that
    2 ranks match 1 process with skipped branches. Its cost is one traversal of the autograd graph per step.
    """
    if not is_distributed():
        return model
    device_ids = [local_rank()] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def no_sync(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The context in which backward passes of `model` (as `wrap_ddp` gave it, compiled or not) add to the
    gradients without all-reducing them: DDP's `no_sync` for every micro-batch but a step's last; nothing to do
    outside DDP."""
    ddp = getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the module it compiled there
    return ddp.no_sync() if isinstance(ddp, DistributedDataParallel) else contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op alone)."""
    if is_distributed():
        td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def reduce_floats(values: list[float]) -> list[float]:
    """Sum a few Python numbers over ranks."""
    if not is_distributed():
        return [float(v) for v in values]
    device = "cuda" if td.get_backend() == "nccl" else "cpu"
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def _is_peer_failure(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, td.DistError) or any(
        key in text for key in ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe"))


def peer_failures_as_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Under DDP, a collective that fails because another worker died (gloo/NCCL errors raised from backward,
    all_reduce or barrier) becomes a one-line CCTError on the surviving ranks instead of a traceback each;
    torchrun then stops them and `cct train --nproc-per-node` names the worker that failed first."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            if not is_distributed() or not _is_peer_failure(e):
                raise
            detail = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip() or type(e).__name__).splitlines()[0])
            detail = detail.split(". ")[0][:160]  # "[.../pair.cc:545] Read error ...: Connection reset by peer"
            raise CCTError(f"rank {rank()} lost contact with another worker ({detail}); "
                           "the job stops, the last checkpoint is kept") from e

    return wrapper
