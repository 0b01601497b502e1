"""timm's `Mlp` with its first layer's bias and exact GELU as one operator (PyTorch takes three passes for them
in the backward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp as TimmMlp
from torch import nn

from .native import computes_in_bf16, fast_path, run


def _rows(x: torch.Tensor) -> tuple[int, int]:
    """(rows, width) of x seen as a matrix whose rows run along its last dimension."""
    return x.numel() // x.shape[-1], x.shape[-1]


@torch.library.custom_op("cct::bias_gelu", mutates_args=())
def _bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(h + bias) over h's last dimension, in bf16 with fp32 arithmetic."""
    y = torch.empty_like(h)
    run("bias_gelu", (h.contiguous(), bias.contiguous(), y), *_rows(h))
    return y


@_bias_gelu.register_fake
def _(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(h)


@torch.library.custom_op("cct::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward(grad: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `cct::bias_gelu` for h and for the bias (summed over the rows in fp32)."""
    grad_h, grad_bias = torch.empty_like(h), torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    run("bias_gelu_grad", (grad.contiguous(), h, bias, grad_h, grad_bias), *_rows(h))
    return grad_h, grad_bias.to(bias.dtype)


@_bias_gelu_backward.register_fake
def _(grad: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(h), torch.empty_like(bias)


def _bias_gelu_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0].contiguous(), inputs[1].contiguous())


def _bias_gelu_grad(ctx, grad: torch.Tensor):
    return _bias_gelu_backward(grad, *ctx.saved_tensors)


_bias_gelu.register_autograd(_bias_gelu_grad, setup_context=_bias_gelu_setup_context)


class Mlp(TimmMlp):
    """timm's `Mlp` (same parameters, same function) whose first layer's bias and exact GELU run as one operator
    of ours on a CPU in bf16 (see `native.fast_path`), forward and backward, its bias gradient summed in the same pass:
    PyTorch adds the bias inside the matrix product, applies GELU in a second pass, and in the backward sums the
    bias gradient in a third. Not under torch.compile, whose inductor fuses the bias and GELU itself (into
    oneDNN's product when the weights are frozen). Otherwise timm's code runs."""

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        act = self.act
        plain = (isinstance(act, nn.GELU) and act.approximate == "none" and self.fc1.bias is not None
                 and isinstance(self.fc1, nn.Linear) and isinstance(self.norm, nn.Identity)
                 and not torch.compiler.is_compiling())
        return plain and fast_path(x, (self.fc1.out_features,), computes_in_bf16(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kernel_applies(x):
            return super().forward(x)
        h = F.linear(x, self.fc1.weight).to(torch.bfloat16)
        x = self.drop1(_bias_gelu(h, self.fc1.bias.to(torch.bfloat16)))
        return self.drop2(self.fc2(x))
