"""Building, loading and calling the C kernels (`cpu_kernels.c`), and the test of when they apply.

The kernels run where `cct.kernels.dispatch` turns them on for this kind of CPU as PyTorch sees it (AVX-512 bf16
or AMX). The library is then compiled on first use with the system's C compiler (which inductor needs too) for
this CPU (`-march=native`) and cached in `$CCT_CACHE` (default `~/.cache/cct`). Where the kind of CPU turns them
off, that cannot be done (no compiler, no AVX-512 bf16, not x86-64 Linux) or an input does not suit them (fp32,
channels not a multiple of 16, several intra-op threads, tracing for export), the modules of this package run
PyTorch's own kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from .dispatch import fast_paths

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
# each C function: its pointer arguments, then its integers (n0, n1, n, then the sizes: h, w, c of the image
# passes, and k, the filters' count, for conv3x3_pool_relu; tokens, heads, head width of the attention; the width
# of the GELU's rows)
_KERNELS = {"winograd_input": (2, 6), "winograd_output": (2, 6), "winograd_output_grad": (2, 6),
            "maxpool_relu": (3, 6), "maxpool_relu_grad": (3, 6), "attention": (3, 6), "attention_grad": (4, 6),
            "conv3x3_pool_relu": (3, 7), "bias_gelu": (3, 4), "bias_gelu_grad": (5, 4)}


def _cpu_description() -> str:
    """The CPU's model name and feature flags (Linux), which decide what `-march=native` builds."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))


def _cache_dir() -> Path:
    return Path(os.environ.get("CCT_CACHE") or Path.home() / ".cache" / "cct") / "kernels"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built once per source, compiler and CPU; None where they cannot be built or loaded
    here (then the modules run PyTorch's kernels)."""
    cpu = _cpu_description()
    if platform.machine() != "x86_64" or not {"avx512_bf16", "avx512bw"} <= set(cpu.split()):
        return None
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([compiler, *flags, cpu]).encode()).hexdigest()
    built = _cache_dir() / f"cpu_kernels-{key[:16]}.so"
    try:
        if not built.exists():
            built.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=built.parent) as tmp:  # then renamed: processes may race here
                out = Path(tmp) / built.name
                subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(out)], check=True, capture_output=True)
                os.replace(out, built)
        lib = ctypes.CDLL(str(built))
    except (OSError, subprocess.CalledProcessError):
        return None
    for name, (pointers, integers) in _KERNELS.items():
        getattr(lib, name).argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * integers
        getattr(lib, name).restype = None
    return lib


def available() -> bool:
    """Whether the C kernels are on for this kind of CPU (`cct.kernels.dispatch.fast_paths`) and built and
    loadable here; where they are off nothing is compiled."""
    return fast_paths().c_kernels and library() is not None


@torch.compiler.assume_constant_result  # so that torch.compile does not trace the build
def usable() -> bool:
    """Whether the kernels run here now: available, and one intra-op thread (see `fast_path`)."""
    return torch.get_num_threads() == 1 and available()


def run(kernel: str, tensors: tuple[torch.Tensor | None, ...], n: int, *sizes: int) -> None:
    """Run one function of cpu_kernels.c over a whole batch of n (one thread; see `fast_path`), with its sizes;
    None passes a null pointer."""
    getattr(library(), kernel)(*(None if t is None else t.data_ptr() for t in tensors), 0, n, n, *sizes)


def images(like: torch.Tensor, n: int, c: int, h: int, w: int) -> torch.Tensor:
    """An uninitialised channels-last image batch with `like`'s dtype and device."""
    return torch.empty(n, c, h, w, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def pooled(x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """An uninitialised output of the 3x3 / 2 / 1 pool of `x` (n, c, ceil(h / 2), ceil(w / 2)), with x's channel
    count or `channels`."""
    n, c, h, w = x.shape
    return images(x, n, channels or c, (h + 1) // 2, (w + 1) // 2)


def records_gradient(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an operation on these tensors: the training paths, which keep what a backward
    needs, against the inference ones."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fast_path(x: torch.Tensor, channels: tuple[int, ...], bf16: bool) -> bool:
    """Whether the compiled kernels take an input on the CPU: bf16, every channel count a multiple of 16, one
    intra-op thread, not traced or scripted for export, and the kernels built here.

    One thread: the kernels are single-threaded, and a process of several threads (PyTorch's kernels parallelise)
    trained slower with them, also with a batch split over Python threads (docs/kernels.md). Processes of one
    thread each, the layout of `processes: N` recipes and of `cct bench` on a CPU, are where they win."""
    return (not torch.jit.is_tracing() and not torch.jit.is_scripting() and bf16 and x.device.type == "cpu"
            and all(c % 16 == 0 for c in channels) and usable())


def computes_in_bf16(x: torch.Tensor) -> bool:
    """Whether a layer's products on `x` run in bf16: a bf16 input, or bf16 autocast on the CPU."""
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)
