"""A 3x3 convolution (CCT's tokenizer convolutions) by Winograd's F(4x4, 3x3) algorithm: 36 matrix products
(`torch.bmm`, which oneDNN runs at the matmul peak) per 16 outputs, 4x fewer multiplications than the direct
convolution, at a larger bf16 error (see cpu_kernels.c). PyTorch has no Winograd convolution on a CPU, and written
as PyTorch ops (eager or compiled by inductor) the memory-bound tile transforms took all that the products saved,
so the transforms are C passes.
"""

from __future__ import annotations

import torch
from torch import nn

from .native import computes_in_bf16, fast_path, images, records_gradient, run

# G of F(4x4, 3x3) for the points of BT4 and AT4 in cpu_kernels.c: a 3x3 filter becomes a 6x6 tile, G w G^T
_G = ((1.0, 0.0, 0.0), (1 / 3, 1 / 3, 1 / 3), (-1 / 3, 1 / 3, -1 / 3), (-16 / 15, -8 / 15, -4 / 15),
      (1 / 15, -2 / 15, 4 / 15), (0.0, 0.0, 1.0))


@torch.compiler.assume_constant_result
def _g_matrix() -> torch.Tensor:
    """G as an fp32 tensor; torch.compile takes it as a constant, so that inductor's freezing folds the filters'
    tiles with the weights (a tensor that it computes, or a global one, would be recomputed per call)."""
    return torch.tensor(_G)


# each C function: its pointer arguments, then its integers (n0, n1, n, then the sizes: h, w, c of the image

def _tiles(n: int, h: int, w: int) -> int:
    return n * ((h + 3) // 4) * ((w + 3) // 4)


def _input_tiles(x: torch.Tensor) -> torch.Tensor:
    """x (n, c, h, w) -> B^T d B of its tiles, (36, tiles, c)."""
    n, c, h, w = x.shape
    v = x.new_empty(36, _tiles(n, h, w), c)
    run("winograd_input", (x.contiguous(memory_format=torch.channels_last), v), n, h, w, c)
    return v


def _output_from_tiles(m: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(36, tiles, c) products -> A^T m A, the output (n, c, h, w) in channels-last order."""
    c = m.shape[2]
    y = images(m, n, c, h, w)
    run("winograd_output", (m, y), n, h, w, c)
    return y


def _sandwich(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """m . t . m^T over the first two dimensions of t (p, p, n), in fp32 also under autocast (G's thirds and
    fifteenths are not exact in bf16): two matrix products with a long trailing dimension, instead of n tiny ones."""
    p, q = m.shape
    with torch.autocast(t.device.type, enabled=False):
        a = (m @ t.reshape(q, -1)).view(p, q, -1)  # rows: (p, q, n)
        return (m @ a.transpose(0, 1).reshape(q, -1)).view(p, p, -1).transpose(0, 1)  # columns: (p, p, n)


def _filter_tiles(weight: torch.Tensor) -> torch.Tensor:
    """(k, c, 3, 3) filters -> G w G^T, (36, c, k), in the weight's dtype."""
    k, c = weight.shape[:2]
    t = weight.float().permute(2, 3, 1, 0).reshape(3, 3, c * k)
    return _sandwich(_g_matrix().to(weight.device), t).reshape(36, c, k).to(weight.dtype)


def _convolve(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """conv2d(x, weight, padding=1) and the input tiles it used (kept for the weight gradient)."""
    n, _, h, w = x.shape
    v = _input_tiles(x)
    return _output_from_tiles(torch.bmm(v, _filter_tiles(weight)), n, h, w), v


@torch.library.custom_op("cct::winograd_conv3x3", mutates_args=())
def _winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _convolve(x, weight)


@_winograd_conv3x3.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    return images(x, n, weight.shape[0], h, w), x.new_empty(36, _tiles(n, h, w), c)


@torch.library.custom_op("cct::winograd_conv3x3_backward", mutates_args=())
def _winograd_conv3x3_backward(grad: torch.Tensor, tiles: torch.Tensor, weight: torch.Tensor,
                               input_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for the input (an empty tensor unless `input_grad`) and the weight, from the output's gradient
    and the forward's input tiles."""
    n, k, h, w = grad.shape
    grad = grad.contiguous(memory_format=torch.channels_last)
    # input: the convolution of the gradient with the filters flipped and transposed, by the same algorithm
    grad_x = _convolve(grad, weight.flip(2, 3).transpose(0, 1))[0] if input_grad else grad.new_empty(0)
    # weight: per tile point, (input tiles)^T @ (A g A^T of the output gradient), then back through G^T . G
    z = grad.new_empty(36, _tiles(n, h, w), k)
    run("winograd_output_grad", (grad, z), n, h, w, k)
    grad_u = torch.bmm(tiles.transpose(1, 2), z).float().view(6, 6, -1)  # (6, 6, c * k)
    grad_w = _sandwich(_g_matrix().to(grad.device).T, grad_u).reshape(3, 3, -1, k).permute(3, 2, 0, 1)
    return grad_x, grad_w.to(weight.dtype).contiguous()


@_winograd_conv3x3_backward.register_fake
def _(grad: torch.Tensor, tiles: torch.Tensor, weight: torch.Tensor, input_grad: bool):
    n, _, h, w = grad.shape
    c = weight.shape[1]
    grad_x = images(grad, n, c, h, w) if input_grad else grad.new_empty(0)
    return grad_x, torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], inputs[1])


def _backward(ctx, grad: torch.Tensor, _grad_tiles: torch.Tensor | None):
    tiles, weight = ctx.saved_tensors
    grad_x, grad_w = _winograd_conv3x3_backward(grad, tiles, weight, ctx.needs_input_grad[0])
    return (grad_x if ctx.needs_input_grad[0] else None), grad_w


_winograd_conv3x3.register_autograd(_backward, setup_context=_setup_context)


# Images per pass without gradients: the tiles of a few images stay in the cache between the passes (the best
# chunk measured, docs/kernels.md).
_INFERENCE_CHUNK = 16


@torch.library.custom_op("cct::winograd_conv3x3_inference", mutates_args=())
def _winograd_conv3x3_inference(x: torch.Tensor, filter_tiles: torch.Tensor) -> torch.Tensor:
    """The forward without gradients, from the filters' tiles (computed outside, so that a compiled model with
    frozen weights computes them once)."""
    n, _, h, w = x.shape
    k = filter_tiles.shape[2]
    x = x.contiguous(memory_format=torch.channels_last)
    y = images(x, n, k, h, w)
    for start in range(0, n, _INFERENCE_CHUNK):
        part = x[start:start + _INFERENCE_CHUNK]
        products = torch.bmm(_input_tiles(part), filter_tiles)
        run("winograd_output", (products, y[start:start + _INFERENCE_CHUNK]), len(part), h, w, k)
    return y


@_winograd_conv3x3_inference.register_fake
def _(x: torch.Tensor, filter_tiles: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    return images(x, n, filter_tiles.shape[2], h, w)

class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that runs by Winograd's algorithm where that is faster: a 3x3 convolution with stride 1, padding
    1, no bias, in bf16 (by autocast or by its input) on a CPU (see `native.fast_path`)."""

    def is_3x3_same(self) -> bool:
        """A 3x3 convolution with stride 1, padding 1 and no bias, the shape of the kernels here."""
        return (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.bias is None)

    def _winograd_applies(self, x: torch.Tensor) -> bool:
        channels = (self.in_channels, self.out_channels)
        return self.is_3x3_same() and x.dim() == 4 and fast_path(x, channels, computes_in_bf16(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._winograd_applies(x):
            return super().forward(x)
        x, weight = x.to(torch.bfloat16), self.weight.to(torch.bfloat16)
        if records_gradient(x, weight):
            return _winograd_conv3x3(x, weight)[0]
        return _winograd_conv3x3_inference(x, _filter_tiles(weight))
