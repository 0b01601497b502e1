"""The few places where a torchrun (DDP) run differs from a single process: process group set-up, the model
wrapper, reductions of metrics and "only rank 0 writes". Everything else is PyTorch's own engine."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel


def is_distributed() -> bool:
    """True inside a torchrun job with more than one process."""
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def setup() -> None:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
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
    """The model as the training step calls it: DDP-wrapped under torchrun, itself otherwise."""
    if not is_distributed():
        return model
    device_ids = [local_rank()] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


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
