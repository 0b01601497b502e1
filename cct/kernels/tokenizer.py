"""In inference, the first tokenizer layer of an RGB image (3x3 convolution, max-pool, ReLU) in one pass per
image, whose convolution output stays in the cache for the pool."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import Conv2d
from .native import computes_in_bf16, fast_path, pooled, records_gradient, run
from .pool import MaxPoolReLU


def _packed_filters(weight: torch.Tensor) -> torch.Tensor:
    """(k, c, 3, 3) filters -> the pairs that conv3x3_pool_relu reads, (kp, k, 2): each filter's values in the
    order of a neighbourhood's row (filter row, column, channel), with a zero at the end where they are odd."""
    k = weight.shape[0]
    rows = weight.permute(0, 2, 3, 1).reshape(k, -1)
    rows = F.pad(rows, (0, rows.shape[1] % 2))
    return rows.view(k, -1, 2).transpose(0, 1).contiguous()


@torch.library.custom_op("cct::conv3x3_pool_relu_inference", mutates_args=())
def _conv3x3_pool_relu_inference(x: torch.Tensor, packed_filters: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(conv2d(x, w, padding=1), 3, 2, 1)) without gradients, from `_packed_filters(w)` (computed
    outside, so that a compiled model with frozen weights computes them once)."""
    n, c, h, w = x.shape
    k = packed_filters.shape[1]
    y = pooled(x, k)
    run("conv3x3_pool_relu", (x.contiguous(memory_format=torch.channels_last), packed_filters, y), n, h, w, c, k)
    return y


@_conv3x3_pool_relu_inference.register_fake
def _(x: torch.Tensor, packed_filters: torch.Tensor) -> torch.Tensor:
    return pooled(x, packed_filters.shape[1])


class TokenizerLayer(nn.Sequential):
    """One layer of a convolutional tokenizer: `conv`, `pool`, `act` in sequence (an `nn.Sequential`, so its
    state-dict keys are those of its parts). In inference on a CPU in bf16, a first layer of an RGB image (3x3
    `Conv2d` with stride 1, then the `MaxPoolReLU`) runs as one pass per image, whose convolution output stays in
    the cache for the pool (faster than oneDNN's convolution of the whole batch, then the pool)."""

    def _fused_applies(self, x: torch.Tensor) -> bool:
        conv, pool = self.conv, self.pool
        return (isinstance(conv, Conv2d) and conv.is_3x3_same() and 3 * conv.in_channels <= 16
                and isinstance(pool, MaxPoolReLU) and pool.is_3x3_half() and isinstance(self.act, nn.Identity)
                and not records_gradient(x, conv.weight)
                and x.dim() == 4 and fast_path(x, (conv.out_channels,), computes_in_bf16(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused_applies(x):
            return super().forward(x)
        weight = _packed_filters(self.conv.weight.to(torch.bfloat16))
        return _conv3x3_pool_relu_inference(x.to(torch.bfloat16), weight)
