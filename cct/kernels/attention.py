"""timm's `Attention` with softmax(q k^T / sqrt(d)) v of all heads as one operator, head by head in the cache
(PyTorch's explicit attention is a chain of copies, batched products and a softmax, each a pass over memory)."""

from __future__ import annotations

import torch
from timm.layers import Attention as TimmAttention
from torch import nn

from .native import computes_in_bf16, fast_path, records_gradient, run


def _attention_shapes(qkv: torch.Tensor, heads: int) -> tuple[int, int, int, int]:
    """(images, tokens, heads, head width) of a qkv projection's output (n, t, 3 * heads * d)."""
    n, t, width = qkv.shape
    return n, t, heads, width // (3 * heads)


def _attention_output(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """An uninitialised output of `cct::attention`, (n, t, heads * d)."""
    n, t, heads, d = _attention_shapes(qkv, heads)
    return qkv.new_empty(n, t, heads * d)


def _attention_probs(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Uninitialised probabilities kept for the backward, (n, heads, tp, tp), with the tokens padded to tp, a
    multiple of 16, as the kernel computes them."""
    n, t, heads, _ = _attention_shapes(qkv, heads)
    padded = -(-t // 16) * 16
    return qkv.new_empty(n, heads, padded, padded)


@torch.library.custom_op("cct::attention", mutates_args=())
def _attention(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d)) v of every head, (n, t, heads * d), and the probabilities for the backward."""
    out, probs = _attention_output(qkv, heads), _attention_probs(qkv, heads)
    run("attention", (qkv.contiguous(), out, probs), *_attention_shapes(qkv, heads))
    return out, probs


@_attention.register_fake
def _(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_output(qkv, heads), _attention_probs(qkv, heads)


@torch.library.custom_op("cct::attention_backward", mutates_args=())
def _attention_backward(grad: torch.Tensor, qkv: torch.Tensor, probs: torch.Tensor, heads: int) -> torch.Tensor:
    grad_qkv = torch.empty_like(qkv)
    run("attention_grad", (grad.contiguous(), qkv, probs, grad_qkv), *_attention_shapes(qkv, heads))
    return grad_qkv


@_attention_backward.register_fake
def _(grad: torch.Tensor, qkv: torch.Tensor, probs: torch.Tensor, heads: int) -> torch.Tensor:
    return torch.empty_like(qkv)


def _attention_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0].contiguous(), output[1])
    ctx.heads = inputs[1]
    ctx.set_materialize_grads(False)  # the probabilities get no gradient: no tensor of zeros for them


def _attention_grad(ctx, grad: torch.Tensor, _grad_probs: torch.Tensor | None):
    qkv, probs = ctx.saved_tensors
    return _attention_backward(grad, qkv, probs, ctx.heads), None


_attention.register_autograd(_attention_grad, setup_context=_attention_setup_context)


@torch.library.custom_op("cct::attention_inference", mutates_args=())
def _attention_inference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The forward without gradients: no probabilities kept."""
    out = _attention_output(qkv, heads)
    run("attention", (qkv.contiguous(), out, None), *_attention_shapes(qkv, heads))
    return out


@_attention_inference.register_fake
def _(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    return _attention_output(qkv, heads)


class Attention(TimmAttention):
    """timm's `Attention` (same parameters, same function). In its explicit path (`fused_attn = False`, the
    choice on a CPU in bf16: `cct.train.loop.configure_attention`) on a CPU in bf16 (see `native.fast_path`), the heads'
    softmax(q k^T / sqrt(d)) v runs as one operator of ours, forward and backward, from the qkv projection's output
    as it comes to the output projection's input as it goes: no copies into and out of a head-major layout, the
    scores of one head kept in the cache, the scale folded into the softmax, the products on the bf16 dot-product
    instructions with fp32 sums (so slightly more exact than PyTorch's bf16 chain, which rounds the scores).
    PyTorch's attention products run near the matmul peak, but the softmax, permutes and scale around them are
    passes over memory that take about as long again (docs/kernels.md).
    Only CCT's plain attention (no mask, no q/k norms, no gate, no attention dropout while training) with a multiple
    of 16 channels per head; the tokens are padded to a multiple of 16 inside. Otherwise timm's code runs."""

    def _kernel_applies(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
        plain = (not self.fused_attn and attn_mask is None and not is_causal and self.gate is None
                 and isinstance(self.q_norm, nn.Identity)
                 and isinstance(self.k_norm, nn.Identity) and isinstance(self.norm, nn.Identity)
                 and not (self.training and self.attn_drop.p > 0))
        return plain and x.dim() == 3 and fast_path(x, (self.head_dim,), computes_in_bf16(x))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if not self._kernel_applies(x, attn_mask, is_causal):
            return super().forward(x, attn_mask, is_causal)
        qkv = self.qkv(x).to(torch.bfloat16)
        if records_gradient(qkv):
            x = _attention(qkv, self.num_heads)[0]
        else:
            x = _attention_inference(qkv, self.num_heads)
        return self.proj_drop(self.proj(x))
