"""The tokenizer's 3x3 / 2 max-pool and the ReLU after it in one pass, remembering each maximum's place in one byte
instead of PyTorch's 8-byte index (PyTorch's max-pool with ReLU takes four passes over memory, forward and
backward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .native import fast_path, images, pooled, records_gradient, run


@torch.library.custom_op("cct::maxpool3x3_relu_inference", mutates_args=())
def _maxpool3x3_relu_inference(x: torch.Tensor) -> torch.Tensor:
    """The forward without gradients: no argmax kept."""
    n, c, h, w = x.shape
    y = pooled(x)
    run("maxpool_relu", (x.contiguous(memory_format=torch.channels_last), y, None), n, h, w, c)
    return y


@_maxpool3x3_relu_inference.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return pooled(x)


@torch.library.custom_op("cct::maxpool3x3_relu", mutates_args=())
def _maxpool3x3_relu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    y = pooled(x)
    where = torch.empty(n, (h + 1) // 2, (w + 1) // 2, c, dtype=torch.uint8, device=x.device)
    run("maxpool_relu", (x.contiguous(memory_format=torch.channels_last), y, where), n, h, w, c)
    return y, where


@_maxpool3x3_relu.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    return pooled(x), x.new_empty(n, (h + 1) // 2, (w + 1) // 2, c, dtype=torch.uint8)


@torch.library.custom_op("cct::maxpool3x3_relu_backward", mutates_args=())
def _maxpool3x3_relu_backward(grad: torch.Tensor, where: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, c = grad.shape[:2]
    grad_x = images(grad, n, c, h, w)
    run("maxpool_relu_grad", (grad.contiguous(memory_format=torch.channels_last), where, grad_x), n, h, w, c)
    return grad_x


@_maxpool3x3_relu_backward.register_fake
def _(grad: torch.Tensor, where: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return images(grad, *grad.shape[:2], h, w)


def _pool_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.size = inputs[0].shape[-2:]


def _pool_backward(ctx, grad: torch.Tensor, _grad_where: torch.Tensor | None):
    return _maxpool3x3_relu_backward(grad, ctx.saved_tensors[0], *ctx.size)


_maxpool3x3_relu.register_autograd(_pool_backward, setup_context=_pool_setup_context)

class MaxPoolReLU(nn.MaxPool2d):
    """A max-pool followed by ReLU (`relu(max_pool2d(x))`), in one pass for the tokenizer's 3x3 / 2 / 1 pool on
    bf16 input on a CPU (see `native.fast_path`); an `nn.MaxPool2d`, so its geometry reads as usual."""

    def is_3x3_half(self) -> bool:
        """The 3x3 / 2 / 1 pool of the kernels here."""
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        return (geometry in ((3, 2, 1, 1), ((3, 3), (2, 2), (1, 1), (1, 1))) and not self.ceil_mode
                and not self.return_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_3x3_half() and x.dim() == 4 and fast_path(x, (x.shape[1],), x.dtype == torch.bfloat16):
            return _maxpool3x3_relu(x)[0] if records_gradient(x) else _maxpool3x3_relu_inference(x)
        return F.relu(super().forward(x))
