"""`precision: auto`: bf16 where the device computes it natively, fp32 elsewhere, with the reason.

On a CPU without native bf16 (AVX2, AVX-512 without bf16) PyTorch emulates bf16 products, many times slower than
fp32 (docs/cpu-kinds.md), so a recipe that asked for bf16 everywhere would crawl there. The decision follows what
PyTorch and oneDNN report (`cct.kernels.dispatch`), so `ATEN_CPU_CAPABILITY` / `ONEDNN_MAX_CPU_ISA` caps count.
"""

from __future__ import annotations

import torch

from ..kernels.dispatch import cpu_kind, fast_paths


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The precision a run computes in, and why.

    Args:
        requested: `auto`, or an explicit `bf16`, `fp16` or `fp32` (which always wins).
        device: where the run computes.

    Returns:
        (`bf16`, `fp16` or `fp32`, a short reason for the record: `summary.json`, `cct bench --json`).
    """
    if requested != "auto":
        return requested, f"{requested} asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} computes bf16"
        return "fp32", f"auto: {torch.cuda.get_device_name(device)} does not compute bf16"
    if device.type == "cpu":
        kind = cpu_kind()
        paths = fast_paths(kind)
        return ("bf16" if paths.bf16_native else "fp32"), f"auto: CPU kind {kind}: {paths.reasons['bf16_native']}"
    return "fp32", f"auto: {device.type} bf16 speed not measured, fp32 kept"
