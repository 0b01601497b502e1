"""Fast CPU paths for CCT in bf16 (its convolutional tokenizer, its attention and its MLP's GELU, forward and
backward), as drop-in subclasses of the PyTorch and timm modules (same parameters, same state-dict keys, same
function up to bf16 rounding):

- `Conv2d`: a 3x3 convolution with stride 1 and padding 1 (CCT's tokenizer convolutions) by Winograd's F(4x4, 3x3)
  algorithm: 36 matrix products (`torch.bmm`, which oneDNN runs at the matmul peak) per 16 outputs, 4x fewer
  multiplications than the direct convolution, at a larger bf16 error (see cpu_kernels.c). The second convolution
  of `cct_2_3x2_32` holds half the model's FLOPs.
- `MaxPoolReLU`: the tokenizer's 3x3 / 2 max-pool and the ReLU after it in one pass, remembering each maximum's
  place in one byte instead of PyTorch's 8-byte index.
- `TokenizerLayer`: in inference, the first convolution of an RGB image and its pool in one pass per image.
- `Attention`: timm's, with softmax(q k^T / sqrt(d)) v of all heads as one operator, head by head in the cache.
- `Mlp`: timm's, with the first layer's bias and exact GELU as one operator, the bias gradient summed in its pass.

Why our own code: PyTorch has no Winograd convolution on a CPU, its max-pool with ReLU takes four passes, its
attention is a chain of copies, batched products and a softmax, each a pass over memory, and its bias + GELU take
three passes in the backward. The passes around the products are memory-bound: written as PyTorch ops (eager or
compiled by inductor) the Winograd tile transforms took all that the products saved (README, "Not kept").
`cpu_kernels.c` does each in one pass, compiled on first use with the system's C compiler (which inductor needs
too) and cached in `$CCT_CACHE` (default `~/.cache/cct`).
Where that cannot be done (no compiler, no AVX-512 bf16, not x86-64 Linux, channels not a multiple of 16, fp32,
several intra-op threads, tracing for export) the modules run PyTorch's own kernels.

Figures (one thread, 64 images, this project's 2-core Zen 4, each against PyTorch's bf16 kernels): the 64 -> 128
channel convolution at 16 x 16, forward + backward 25.0 ms by F(2x2, 3x3) against PyTorch's 33.2, and (another day)
19.0 ms by F(4x4, 3x3) against F(2x2, 3x3)'s 26.7; max-pool + ReLU at 32 x 32 x 64, forward + backward 2.2 against
5.8 ms. `cct_2_3x2_32` training step, one process of one thread: 685 -> 754 img/s with the
convolution, 790 with both. The attention at `cct_7_3x1_32`'s size (256 tokens, 4 heads of 64), 8 images, forward +
backward: 11.1 against 14.6 ms; its training step, 64 images: 2,883 -> 2,740 ms. The bias + GELU at its MLP's size
(64 images of 256 tokens x 512): training step 2,756 -> 2,679 ms with the dispatch timer (GELU 27 + its backward
47 + the bias gradient 15 ms -> 26 + 43 ms, and the first product without its bias 15% faster); inference 46.9
against 51.2 ms per MLP call (64 x 128 at `cct_2_3x2_32`'s size: 1.74 against 1.71, the same).
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
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.layers import Mlp as TimmMlp
from torch import nn

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
# G of F(4x4, 3x3) for the points of BT4 and AT4 in cpu_kernels.c: a 3x3 filter becomes a 6x6 tile, G w G^T
_G = ((1.0, 0.0, 0.0), (1 / 3, 1 / 3, 1 / 3), (-1 / 3, 1 / 3, -1 / 3), (-16 / 15, -8 / 15, -4 / 15),
      (1 / 15, -2 / 15, 4 / 15), (0.0, 0.0, 1.0))


@torch.compiler.assume_constant_result
def _g_matrix() -> torch.Tensor:
    """G as an fp32 tensor; torch.compile takes it as a constant, so that inductor's freezing folds the filters'
    tiles with the weights (a tensor that it computes, or a global one, would be recomputed per call)."""
    return torch.tensor(_G)


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


@torch.compiler.assume_constant_result  # so that torch.compile does not trace the build
def usable() -> bool:
    """Whether the kernels run here now: built, and one intra-op thread (see `_fast_path`)."""
    return torch.get_num_threads() == 1 and library() is not None


def _run(kernel: str, tensors: tuple[torch.Tensor | None, ...], n: int, *sizes: int) -> None:
    """Run one function of cpu_kernels.c over a whole batch of n (one thread; see `_fast_path`), with its sizes;
    None passes a null pointer."""
    getattr(library(), kernel)(*(None if t is None else t.data_ptr() for t in tensors), 0, n, n, *sizes)


def _images(like: torch.Tensor, n: int, c: int, h: int, w: int) -> torch.Tensor:
    """An uninitialised channels-last image batch with `like`'s dtype and device."""
    return torch.empty(n, c, h, w, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _pooled(x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """An uninitialised output of the 3x3 / 2 / 1 pool of `x` (n, c, ceil(h / 2), ceil(w / 2)), with x's channel
    count or `channels`."""
    n, c, h, w = x.shape
    return _images(x, n, channels or c, (h + 1) // 2, (w + 1) // 2)


def _records_gradient(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an operation on these tensors: the training paths, which keep what a backward
    needs, against the inference ones."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _tiles(n: int, h: int, w: int) -> int:
    return n * ((h + 3) // 4) * ((w + 3) // 4)


def _input_tiles(x: torch.Tensor) -> torch.Tensor:
    """x (n, c, h, w) -> B^T d B of its tiles, (36, tiles, c)."""
    n, c, h, w = x.shape
    v = x.new_empty(36, _tiles(n, h, w), c)
    _run("winograd_input", (x.contiguous(memory_format=torch.channels_last), v), n, h, w, c)
    return v


def _output_from_tiles(m: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(36, tiles, c) products -> A^T m A, the output (n, c, h, w) in channels-last order."""
    c = m.shape[2]
    y = _images(m, n, c, h, w)
    _run("winograd_output", (m, y), n, h, w, c)
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
    return _images(x, n, weight.shape[0], h, w), x.new_empty(36, _tiles(n, h, w), c)


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
    _run("winograd_output_grad", (grad, z), n, h, w, k)
    grad_u = torch.bmm(tiles.transpose(1, 2), z).float().view(6, 6, -1)  # (6, 6, c * k)
    grad_w = _sandwich(_g_matrix().to(grad.device).T, grad_u).reshape(3, 3, -1, k).permute(3, 2, 0, 1)
    return grad_x, grad_w.to(weight.dtype).contiguous()


@_winograd_conv3x3_backward.register_fake
def _(grad: torch.Tensor, tiles: torch.Tensor, weight: torch.Tensor, input_grad: bool):
    n, _, h, w = grad.shape
    c = weight.shape[1]
    grad_x = _images(grad, n, c, h, w) if input_grad else grad.new_empty(0)
    return grad_x, torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], inputs[1])


def _backward(ctx, grad: torch.Tensor, _grad_tiles: torch.Tensor | None):
    tiles, weight = ctx.saved_tensors
    grad_x, grad_w = _winograd_conv3x3_backward(grad, tiles, weight, ctx.needs_input_grad[0])
    return (grad_x if ctx.needs_input_grad[0] else None), grad_w


_winograd_conv3x3.register_autograd(_backward, setup_context=_setup_context)


# Images per pass without gradients: the tiles of a few images stay in the cache between the passes (64 -> 128
# channels at 16 x 16, 64 images, one thread: 5.0 ms in passes of 16, 5.2 in one pass or passes of 8 or 32).
_INFERENCE_CHUNK = 16


@torch.library.custom_op("cct::winograd_conv3x3_inference", mutates_args=())
def _winograd_conv3x3_inference(x: torch.Tensor, filter_tiles: torch.Tensor) -> torch.Tensor:
    """The forward without gradients, from the filters' tiles (computed outside, so that a compiled model with
    frozen weights computes them once)."""
    n, _, h, w = x.shape
    k = filter_tiles.shape[2]
    x = x.contiguous(memory_format=torch.channels_last)
    y = _images(x, n, k, h, w)
    for start in range(0, n, _INFERENCE_CHUNK):
        part = x[start:start + _INFERENCE_CHUNK]
        products = torch.bmm(_input_tiles(part), filter_tiles)
        _run("winograd_output", (products, y[start:start + _INFERENCE_CHUNK]), len(part), h, w, k)
    return y


@_winograd_conv3x3_inference.register_fake
def _(x: torch.Tensor, filter_tiles: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    return _images(x, n, filter_tiles.shape[2], h, w)


@torch.library.custom_op("cct::maxpool3x3_relu_inference", mutates_args=())
def _maxpool3x3_relu_inference(x: torch.Tensor) -> torch.Tensor:
    """The forward without gradients: no argmax kept."""
    n, c, h, w = x.shape
    y = _pooled(x)
    _run("maxpool_relu", (x.contiguous(memory_format=torch.channels_last), y, None), n, h, w, c)
    return y


@_maxpool3x3_relu_inference.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return _pooled(x)


@torch.library.custom_op("cct::maxpool3x3_relu", mutates_args=())
def _maxpool3x3_relu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    y = _pooled(x)
    where = torch.empty(n, (h + 1) // 2, (w + 1) // 2, c, dtype=torch.uint8, device=x.device)
    _run("maxpool_relu", (x.contiguous(memory_format=torch.channels_last), y, where), n, h, w, c)
    return y, where


@_maxpool3x3_relu.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    return _pooled(x), x.new_empty(n, (h + 1) // 2, (w + 1) // 2, c, dtype=torch.uint8)


@torch.library.custom_op("cct::maxpool3x3_relu_backward", mutates_args=())
def _maxpool3x3_relu_backward(grad: torch.Tensor, where: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, c = grad.shape[:2]
    grad_x = _images(grad, n, c, h, w)
    _run("maxpool_relu_grad", (grad.contiguous(memory_format=torch.channels_last), where, grad_x), n, h, w, c)
    return grad_x


@_maxpool3x3_relu_backward.register_fake
def _(grad: torch.Tensor, where: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _images(grad, *grad.shape[:2], h, w)


def _pool_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.size = inputs[0].shape[-2:]


def _pool_backward(ctx, grad: torch.Tensor, _grad_where: torch.Tensor | None):
    return _maxpool3x3_relu_backward(grad, ctx.saved_tensors[0], *ctx.size)


_maxpool3x3_relu.register_autograd(_pool_backward, setup_context=_pool_setup_context)


def _fast_path(x: torch.Tensor, channels: tuple[int, ...], bf16: bool) -> bool:
    """Whether the compiled kernels take an input on the CPU: bf16, every channel count a multiple of 16, one
    intra-op thread, not traced or scripted for export, and the kernels built here.

    One thread: the kernels are single-threaded, and a process of several threads (PyTorch's kernels parallelise)
    trained slower with them, also with a batch split over Python threads: `cct bench --nproc-per-node 1`
    (2 threads) gave 962-993 img/s against 1,215 without them. Processes of one thread each, the layout of
    `processes: N` recipes and of `cct bench` on a CPU, are where they win."""
    return (not torch.jit.is_tracing() and not torch.jit.is_scripting() and bf16 and x.device.type == "cpu"
            and all(c % 16 == 0 for c in channels) and usable())


def _computes_in_bf16(x: torch.Tensor) -> bool:
    """Whether a layer's products on `x` run in bf16: a bf16 input, or bf16 autocast on the CPU."""
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that runs by Winograd's algorithm where that is faster: a 3x3 convolution with stride 1, padding
    1, no bias, in bf16 (by autocast or by its input) on a CPU (see `_fast_path`)."""

    def is_3x3_same(self) -> bool:
        """A 3x3 convolution with stride 1, padding 1 and no bias, the shape of the kernels here."""
        return (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.bias is None)

    def _winograd_applies(self, x: torch.Tensor) -> bool:
        channels = (self.in_channels, self.out_channels)
        return self.is_3x3_same() and x.dim() == 4 and _fast_path(x, channels, _computes_in_bf16(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._winograd_applies(x):
            return super().forward(x)
        x, weight = x.to(torch.bfloat16), self.weight.to(torch.bfloat16)
        if _records_gradient(x, weight):
            return _winograd_conv3x3(x, weight)[0]
        return _winograd_conv3x3_inference(x, _filter_tiles(weight))


class MaxPoolReLU(nn.MaxPool2d):
    """A max-pool followed by ReLU (`relu(max_pool2d(x))`), in one pass for the tokenizer's 3x3 / 2 / 1 pool on
    bf16 input on a CPU (see `_fast_path`); an `nn.MaxPool2d`, so its geometry reads as usual."""

    def is_3x3_half(self) -> bool:
        """The 3x3 / 2 / 1 pool of the kernels here."""
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        return (geometry in ((3, 2, 1, 1), ((3, 3), (2, 2), (1, 1), (1, 1))) and not self.ceil_mode
                and not self.return_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_3x3_half() and x.dim() == 4 and _fast_path(x, (x.shape[1],), x.dtype == torch.bfloat16):
            return _maxpool3x3_relu(x)[0] if _records_gradient(x) else _maxpool3x3_relu_inference(x)
        return F.relu(super().forward(x))


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
    y = _pooled(x, k)
    _run("conv3x3_pool_relu", (x.contiguous(memory_format=torch.channels_last), packed_filters, y), n, h, w, c, k)
    return y


@_conv3x3_pool_relu_inference.register_fake
def _(x: torch.Tensor, packed_filters: torch.Tensor) -> torch.Tensor:
    return _pooled(x, packed_filters.shape[1])


class TokenizerLayer(nn.Sequential):
    """One layer of a convolutional tokenizer: `conv`, `pool`, `act` in sequence (an `nn.Sequential`, so its
    state-dict keys are those of its parts). In inference on a CPU in bf16, a first layer of an RGB image (3x3
    `Conv2d` with stride 1, then the `MaxPoolReLU`) runs as one pass per image, whose convolution output stays in
    the cache for the pool: `cct_2_3x2_32`'s, 64 images, one thread: 2.3 against 3.1-3.3 ms (oneDNN's convolution
    of the whole batch, then the pool)."""

    def _fused_applies(self, x: torch.Tensor) -> bool:
        conv, pool = self.conv, self.pool
        return (isinstance(conv, Conv2d) and conv.is_3x3_same() and 3 * conv.in_channels <= 16
                and isinstance(pool, MaxPoolReLU) and pool.is_3x3_half() and isinstance(self.act, nn.Identity)
                and not _records_gradient(x, conv.weight)
                and x.dim() == 4 and _fast_path(x, (conv.out_channels,), _computes_in_bf16(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused_applies(x):
            return super().forward(x)
        weight = _packed_filters(self.conv.weight.to(torch.bfloat16))
        return _conv3x3_pool_relu_inference(x.to(torch.bfloat16), weight)


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
    _run("attention", (qkv.contiguous(), out, probs), *_attention_shapes(qkv, heads))
    return out, probs


@_attention.register_fake
def _(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_output(qkv, heads), _attention_probs(qkv, heads)


@torch.library.custom_op("cct::attention_backward", mutates_args=())
def _attention_backward(grad: torch.Tensor, qkv: torch.Tensor, probs: torch.Tensor, heads: int) -> torch.Tensor:
    grad_qkv = torch.empty_like(qkv)
    _run("attention_grad", (grad.contiguous(), qkv, probs, grad_qkv), *_attention_shapes(qkv, heads))
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
    _run("attention", (qkv.contiguous(), out, None), *_attention_shapes(qkv, heads))
    return out


@_attention_inference.register_fake
def _(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    return _attention_output(qkv, heads)


class Attention(TimmAttention):
    """timm's `Attention` (same parameters, same function). In its explicit path (`fused_attn = False`, the
    choice on a CPU in bf16: `cct.train.loop.configure_attention`) on a CPU in bf16 (see `_fast_path`), the heads'
    softmax(q k^T / sqrt(d)) v runs as one operator of ours, forward and backward, from the qkv projection's output
    as it comes to the output projection's input as it goes: no copies into and out of a head-major layout, the
    scores of one head kept in the cache, the scale folded into the softmax, the products on the bf16 dot-product
    instructions with fp32 sums (so slightly more exact than PyTorch's bf16 chain, which rounds the scores).
    PyTorch's attention bmms reached ~160 GFLOP/s of this core's ~210 at `cct_7_3x1_32`'s size, and the softmax,
    permutes and scale around them took as long again.
    Only CCT's plain attention (no mask, no q/k norms, no gate, no attention dropout while training) with a multiple
    of 16 channels per head; the tokens are padded to a multiple of 16 inside. Otherwise timm's code runs."""

    def _kernel_applies(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
        plain = (not self.fused_attn and attn_mask is None and not is_causal and self.gate is None
                 and isinstance(self.q_norm, nn.Identity)
                 and isinstance(self.k_norm, nn.Identity) and isinstance(self.norm, nn.Identity)
                 and not (self.training and self.attn_drop.p > 0))
        return plain and x.dim() == 3 and _fast_path(x, (self.head_dim,), _computes_in_bf16(x))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if not self._kernel_applies(x, attn_mask, is_causal):
            return super().forward(x, attn_mask, is_causal)
        qkv = self.qkv(x).to(torch.bfloat16)
        if _records_gradient(qkv):
            x = _attention(qkv, self.num_heads)[0]
        else:
            x = _attention_inference(qkv, self.num_heads)
        return self.proj_drop(self.proj(x))


def _rows(x: torch.Tensor) -> tuple[int, int]:
    """(rows, width) of x seen as a matrix whose rows run along its last dimension."""
    return x.numel() // x.shape[-1], x.shape[-1]


@torch.library.custom_op("cct::bias_gelu", mutates_args=())
def _bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(h + bias) over h's last dimension, in bf16 with fp32 arithmetic."""
    y = torch.empty_like(h)
    _run("bias_gelu", (h.contiguous(), bias.contiguous(), y), *_rows(h))
    return y


@_bias_gelu.register_fake
def _(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(h)


@torch.library.custom_op("cct::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward(grad: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `cct::bias_gelu` for h and for the bias (summed over the rows in fp32)."""
    grad_h, grad_bias = torch.empty_like(h), torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    _run("bias_gelu_grad", (grad.contiguous(), h, bias, grad_h, grad_bias), *_rows(h))
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
    of ours on a CPU in bf16 (see `_fast_path`), forward and backward, its bias gradient summed in the same pass:
    PyTorch adds the bias inside the matrix product, applies GELU in a second pass, and in the backward sums the
    bias gradient in a third. Not under torch.compile, whose inductor fuses the bias and GELU itself (into
    oneDNN's product when the weights are frozen). Otherwise timm's code runs."""

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        act = self.act
        plain = (isinstance(act, nn.GELU) and act.approximate == "none" and self.fc1.bias is not None
                 and isinstance(self.fc1, nn.Linear) and isinstance(self.norm, nn.Identity)
                 and not torch.compiler.is_compiling())
        return plain and _fast_path(x, (self.fc1.out_features,), _computes_in_bf16(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kernel_applies(x):
            return super().forward(x)
        h = F.linear(x, self.fc1.weight).to(torch.bfloat16)
        x = self.drop1(_bias_gelu(h, self.fc1.bias.to(torch.bfloat16)))
        return self.drop2(self.fc2(x))
