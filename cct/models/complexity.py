"""Parameter and multiply-accumulate counts, measured by tracing one forward pass on the meta device
(no memory, no compute), so even the 384-pixel models are counted instantly."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as a fixed sine table are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image (convolutions, linear layers and attention)."""
    size = img_size or model.img_size
    height, width = (size, size) if isinstance(size, int) else size
    meta_model = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta_model(torch.empty(1, 3, height, width, device="meta"))
    return counter.get_total_flops() // 2
