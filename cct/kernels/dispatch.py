"""Which CPU this process runs on, as PyTorch and oneDNN see it, and which fast paths that kind of CPU takes.

The kind is read from what PyTorch reports, not from the hardware alone: ATen's vector level
(`torch.backends.cpu.get_cpu_capability()`, capped by `ATEN_CPU_CAPABILITY`) and oneDNN's bf16 support
(`torch.ops.mkldnn._is_mkldnn_bf16_supported()` and the `ONEDNN_MAX_CPU_ISA` cap). A CPU whose bf16 PyTorch
emulates is not a bf16 CPU here, whatever `/proc/cpuinfo` says. `CCT_CPU_KIND` forces a kind (tests, benchmarks).
The measured figures behind each entry of `FAST_PATHS` are in docs/cpu-kinds.md and docs/kernels.md.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

from ..errors import UsageError

KINDS = ("amx", "avx512_bf16", "avx512", "avx2", "arm_bf16", "other")
FORCE_VARIABLE = "CCT_CPU_KIND"
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which its matmuls cannot use bf16 dot-product instructions
_ONEDNN_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                             "AVX512_CORE_VNNI"}


@dataclass(frozen=True)
class FastPaths:
    """The fast paths a kind of CPU takes, each with the reason it is on or off.

    Attributes:
        bf16_native: whether the CPU computes bf16 products natively (what `precision: auto` follows).
        c_kernels: whether the C kernels of `cpu_kernels.c` run (Winograd convolution, max-pool + ReLU, fused
            first tokenizer layer, attention operator, bias + GELU).
        explicit_attention: whether attention runs timm's explicit path (`fused_attn = False`) in bf16 instead of
            PyTorch's SDPA.
        reasons: one sentence per field above.
    """

    bf16_native: bool
    c_kernels: bool
    explicit_attention: bool
    reasons: dict[str, str]


def _paths(bf16: tuple[bool, str], kernels: tuple[bool, str], attention: tuple[bool, str]) -> FastPaths:
    return FastPaths(bf16[0], kernels[0], attention[0],
                     dict(bf16_native=bf16[1], c_kernels=kernels[1], explicit_attention=attention[1]))


_NO_AVX512_BF16 = "the C kernels are built from AVX-512 bf16 instructions this CPU does not run"
_SDPA_UNMEASURED = "bf16 is emulated here and the explicit path was measured only where it is native: SDPA kept"

FAST_PATHS: dict[str, FastPaths] = {
    "amx": _paths(
        (True, "AMX tiles compute bf16 natively (oneDNN uses them)"),
        (True, "not measured on an AMX CPU: the kernels use AVX-512 bf16 dot products, which AMX CPUs run, and "
               "nothing measured says they lose there"),
        (True, "not measured on an AMX CPU: kept as on AVX-512 bf16, where the explicit path beats SDPA")),
    "avx512_bf16": _paths(
        (True, "AVX-512 bf16 dot products, as oneDNN sees them"),
        (True, "measured: each kernel beats PyTorch's bf16 kernels in processes of one thread"),
        (True, "measured: the explicit product beats every fused SDPA kernel at CCT's sizes in bf16")),
    "avx512": _paths(
        (False, "AVX-512 without bf16 instructions: bf16 products are emulated, slower than fp32"),
        (False, _NO_AVX512_BF16),
        (False, _SDPA_UNMEASURED)),
    "avx2": _paths(
        (False, "AVX2: bf16 products are emulated, slower than fp32"),
        (False, _NO_AVX512_BF16),
        (False, _SDPA_UNMEASURED)),
    "arm_bf16": _paths(
        (True, "Arm bf16 extension, as oneDNN sees it"),
        (False, "the C kernels are x86-64 code"),
        (False, "not measured on Arm: PyTorch's SDPA kept")),
    "other": _paths(
        (False, "no native bf16 that PyTorch reports on this CPU"),
        (False, "the C kernels need an x86-64 CPU with AVX-512 bf16"),
        (False, "not measured on this kind of CPU: PyTorch's SDPA kept")),
}


def _onednn_cap() -> str:
    """oneDNN's instruction-set cap (`ONEDNN_MAX_CPU_ISA`, formerly `DNNL_MAX_CPU_ISA`), `ALL` when unset."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()


def _onednn_bf16() -> bool:
    """Whether oneDNN, within its cap, multiplies in bf16 with bf16 instructions (`_is_mkldnn_bf16_supported`
    alone also says yes where it emulates them, on AVX-512 without bf16)."""
    return (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and _onednn_cap() not in _ONEDNN_CAPS_WITHOUT_BF16)


@functools.cache
def detected_kind() -> str:
    """The kind of this CPU as PyTorch sees it (one of `KINDS`), ignoring `CCT_CPU_KIND`."""
    hardware = torch.cpu.get_capabilities()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        vectors = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2" or "DEFAULT"
        if vectors != "AVX512":
            return "avx2" if vectors == "AVX2" else "other"
        if not _onednn_bf16():
            return "avx512"
        if hardware.get("amx_bf16") and (_onednn_cap() in ("ALL", "DEFAULT") or "AMX" in _onednn_cap()):
            return "amx"
        return "avx512_bf16" if hardware.get("avx512_bf16") else "avx512"
    if machine in ("arm64", "aarch64") and (hardware.get("bf16") or hardware.get("sve_bf16")) and _onednn_bf16():
        return "arm_bf16"
    return "other"


def cpu_kind() -> str:
    """The kind of this CPU (one of `KINDS`): `CCT_CPU_KIND` where set, else `detected_kind()`.

    Raises:
        UsageError: `CCT_CPU_KIND` names no kind.
    """
    forced = os.environ.get(FORCE_VARIABLE)
    if not forced:
        return detected_kind()
    if forced not in KINDS:
        raise UsageError(f"{FORCE_VARIABLE}={forced!r} is not one of {', '.join(KINDS)}")
    return forced


def fast_paths(kind: str | None = None) -> FastPaths:
    """The fast paths of a kind of CPU (default: this one, `cpu_kind()`)."""
    return FAST_PATHS[kind or cpu_kind()]
