"""The compiled CPU kernels (Winograd 3x3 convolution, fused max-pool + ReLU, multi-head attention) against
PyTorch's own, in bf16: the same function to bf16 rounding, forward and backward, the fast path taken where it
applies and PyTorch's kernels everywhere else, and a machine without a C compiler still gets a working model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp as TimmMlp

import cct
from cct.kernels import Attention, Conv2d, MaxPoolReLU, Mlp, accelerate, available
from cct.train.loop import compile_for_inference, configure_attention
from tests.helpers import OpsSeen

needs_kernels = pytest.mark.skipif(not available(), reason="the CPU kernels cannot be built on this machine")


def _relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value.double() - exact).abs().max() / exact.abs().max()).item()


def _channels_last(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).bfloat16().contiguous(memory_format=torch.channels_last)


def _errors_against_fp64(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, operator: str,
                         parameters: list[str]) -> list[tuple[float, float]]:
    """(our error, PyTorch's bf16 error) relative to fp64, for the module's output, its input's gradient and the
    gradients of the named parameters: ours in one thread (where `operator` must run), PyTorch's in two (its
    kernels; the module is converted in place for each)."""
    results = {}
    for name, threads, dtype in (("fast", 1, torch.bfloat16), ("pytorch", 2, torch.bfloat16),
                                 ("exact", 1, torch.float64)):
        torch.set_num_threads(threads)
        module.to(dtype).zero_grad()
        inputs = x.to(dtype, copy=True).requires_grad_()
        with OpsSeen() as seen:
            out = module(inputs)
            out.backward(grad.to(dtype))
        assert (operator in seen.names) == (name == "fast")
        results[name] = (out, inputs.grad, *(module.get_parameter(p).grad for p in parameters))
    return [(_relative_error(fast, exact), _relative_error(pytorch, exact))
            for fast, pytorch, exact in zip(results["fast"], results["pytorch"], results["exact"], strict=True)]


@needs_kernels
@pytest.mark.parametrize("shape", [(4, 64, 128, 16, 16), (3, 16, 32, 7, 9), (2, 32, 16, 1, 2)])
def test_winograd_convolution_is_pytorchs_to_bf16_rounding(shape):
    """Output, input gradient and weight gradient, each against the exact (fp64) convolution: within 1/16 of the
    largest value. Measured 2.3-3.7e-2 on these random layers, against 2-3.5e-3 for PyTorch's bf16 convolution:
    F(4x4, 3x3)'s transforms amplify bf16's rounding (on CCT's trained tokenizer the output's error is 6.7e-3, and
    the recipes' accuracy holds); a wrong transform is off by O(1). Without gradients (in passes of a few images):
    the same output."""
    n, c, k, h, w = shape
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    conv = Conv2d(c, k, 3, 1, 1, bias=False).bfloat16()
    x = _channels_last(n, c, h, w, generator=gen).requires_grad_()
    grad = _channels_last(n, k, h, w, generator=gen)
    exact_x, exact_w = x.detach().double().requires_grad_(), conv.weight.detach().double().requires_grad_()
    F.conv2d(exact_x, exact_w, padding=1).backward(grad.double())
    with OpsSeen() as seen:
        y = conv(x)
        y.backward(grad)
    assert "cct.winograd_conv3x3.default" in seen.names and "cct.winograd_conv3x3_backward.default" in seen.names
    assert y.is_contiguous(memory_format=torch.channels_last)
    exact = (F.conv2d(exact_x, exact_w, padding=1), exact_x.grad, exact_w.grad)
    for fast, truth, what in zip((y, x.grad, conv.weight.grad), exact, ("output", "input", "weight"), strict=True):
        assert _relative_error(fast, truth) <= 2**-4, what
    with torch.no_grad(), OpsSeen() as seen:
        torch.testing.assert_close(conv(x), y, rtol=0, atol=0)
    assert "cct.winograd_conv3x3_inference.default" in seen.names


@needs_kernels
@pytest.mark.parametrize("shape", [(4, 64, 32, 32), (3, 16, 7, 9), (2, 32, 1, 2)])
def test_maxpool_relu_is_pytorchs(shape):
    """The output is PyTorch's bit for bit, ties (first maximum wins) and NaN included; the gradient goes to the
    same places, summed where windows overlap (to bf16 rounding: PyTorch sums in bf16, these kernels in fp32)."""
    gen = torch.Generator().manual_seed(0)
    x = _channels_last(*shape, generator=gen)
    x = (x * 2).round() / 2  # many ties
    x[0, :, 0, 0] = float("nan")
    x.requires_grad_()
    pool = MaxPoolReLU(3, 2, 1)
    outputs, grads = [], []
    for forward in (pool, lambda t: F.relu(F.max_pool2d(t, 3, 2, 1))):
        with OpsSeen() as seen:
            y = forward(x)
            grad = _channels_last(*y.shape, generator=torch.Generator().manual_seed(1))
            y.backward(grad)
        outputs.append(y.detach())
        grads.append(x.grad)
        assert ("cct.maxpool3x3_relu.default" in seen.names) == (forward is pool)
        x.grad = None
    assert torch.equal(outputs[0].nan_to_num(-7.0), outputs[1].nan_to_num(-7.0))
    with torch.no_grad(), OpsSeen() as seen:  # without gradients: no argmax kept, the same output
        assert torch.equal(pool(x).nan_to_num(-7.0), outputs[1].nan_to_num(-7.0))
    assert "cct.maxpool3x3_relu_inference.default" in seen.names
    # gradients are O(1), so a gradient routed to the wrong place would differ by far more than this
    torch.testing.assert_close(grads[0], grads[1], rtol=1 / 64, atol=1 / 64)


@needs_kernels
@pytest.mark.parametrize("shape", [(4, 3, 64, 32, 32), (3, 3, 80, 7, 9), (2, 1, 16, 5, 5), (2, 5, 48, 6, 6),
                                   (2, 3, 16, 1, 2)])
def test_the_first_tokenizer_layer_in_one_pass_is_pytorchs(shape):
    """Inference of a first tokenizer layer (3x3 convolution of a few channels, max-pool, ReLU) in one pass per
    image: PyTorch's result (its bf16 convolution, then the pool), to a rounding step on the rare value whose fp32
    sum (in another order) rounds the other way; NaN where the windows reach a NaN input (in fp64: oneDNN's bf16
    convolution spreads NaN further for 5 channels)."""
    n, c, k, h, w = shape
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = accelerate(cct.create_model("cct_2_3x2_32")).tokenizer.convs[0]
    layer.conv = Conv2d(c, k, 3, 1, 1, bias=False)
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    x[0, 0, h // 2, w // 2] = float("nan")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with OpsSeen() as seen:
            fused = layer(x)
        expected = F.relu(F.max_pool2d(F.conv2d(x, layer.conv.weight, padding=1), 3, 2, 1))
    nan = F.max_pool2d(F.conv2d(x.double(), layer.conv.weight.double(), padding=1), 3, 2, 1).isnan()
    assert "cct.conv3x3_pool_relu_inference.default" in seen.names
    assert fused.dtype == expected.dtype == torch.bfloat16 and fused.shape == expected.shape
    assert fused.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fused.isnan(), nan) and nan[0].any() and not nan[1:].any()
    finite = ~expected.isnan() & ~nan
    torch.testing.assert_close(fused[finite], expected[finite], rtol=2**-7, atol=0)
    assert (fused != expected)[finite].float().mean() < 0.01
    with torch.autocast("cpu", dtype=torch.bfloat16), OpsSeen() as seen:  # recording gradients: as in training
        layer(x)
    assert "cct.conv3x3_pool_relu_inference.default" not in seen.names


def test_pytorchs_kernels_where_the_fast_ones_do_not_apply():
    """fp32, channels not a multiple of 16, other geometry, attention dropout in training, several threads, or
    tracing for export: the modules are exactly PyTorch's (same kernels, same numbers)."""
    gen = torch.Generator().manual_seed(0)
    cases = [(Conv2d(16, 32, 3, 1, 1, bias=False), torch.randn(2, 16, 8, 8, generator=gen)),  # fp32
             (Conv2d(3, 16, 3, 1, 1, bias=False).bfloat16(), torch.randn(2, 3, 8, 8, generator=gen).bfloat16()),
             (Conv2d(16, 32, 3, 2, 1, bias=False).bfloat16(), torch.randn(2, 16, 8, 8, generator=gen).bfloat16())]
    for conv, x in cases:
        with OpsSeen() as seen:
            y = conv(x)
        assert not any(name.startswith("cct.") for name in seen.names)
        assert torch.equal(y, F.conv2d(x, conv.weight, stride=conv.stride, padding=1))
    x = torch.randn(2, 16, 8, 8, generator=gen)
    torch.set_num_threads(2)
    with OpsSeen() as seen:
        MaxPoolReLU(3, 2, 1)(x.bfloat16())
        Conv2d(16, 16, 3, 1, 1, bias=False).bfloat16()(x.bfloat16())
    assert not any(name.startswith("cct.") for name in seen.names)
    torch.set_num_threads(1)
    assert torch.equal(MaxPoolReLU(3, 2, 1)(x), F.relu(F.max_pool2d(x, 3, 2, 1)))
    assert torch.equal(MaxPoolReLU(2, 2, 0)(x.bfloat16()), F.relu(F.max_pool2d(x.bfloat16(), 2, 2)))
    # heads of 36 channels; attention dropout while training; timm's fused path (SDPA)
    for attention, fused in ((Attention(72, num_heads=2), False), (Attention(64, attn_drop=0.1), False),
                             (Attention(64, num_heads=2), True)):
        attention.fused_attn = fused
        with OpsSeen() as seen:
            attention.train().bfloat16()(torch.randn(2, 64, attention.qkv.in_features, generator=gen).bfloat16())
        assert not any(name.startswith("cct.") for name in seen.names)
    # fp32; a hidden width of 40; several threads
    for mlp, x, threads in ((Mlp(32, 64), torch.randn(2, 8, 32, generator=gen), 1),
                            (Mlp(32, 40).bfloat16(), torch.randn(2, 8, 32, generator=gen).bfloat16(), 1),
                            (Mlp(32, 64).bfloat16(), torch.randn(2, 8, 32, generator=gen).bfloat16(), 2)):
        torch.set_num_threads(threads)
        with OpsSeen() as seen:
            y = mlp(x)
        assert not any(name.startswith("cct.") for name in seen.names)
        assert torch.equal(y, TimmMlp.forward(mlp, x))
    torch.set_num_threads(1)
    model = accelerate(cct.create_model("cct_2_3x2_32")).eval().bfloat16()
    traced = torch.jit.trace(model, torch.zeros(1, 3, 32, 32, dtype=torch.bfloat16))
    assert "cct::" not in str(traced.inlined_graph)


@needs_kernels
def test_a_bf16_training_step_of_cct_2_takes_the_fast_kernels_and_learns_what_pytorchs_do():
    """Both tokenizer layers and the attention of cct_2_3x2_32 run the compiled kernels under autocast, forward and
    backward; its logits and gradients are those of the same model on PyTorch's kernels, to bf16 rounding."""
    torch.manual_seed(0)
    # without attention dropout, as the cifar10-fast recipe trains (the attention kernel has none)
    plain = cct.create_model("cct_2_3x2_32", attn_drop_rate=0.0).to(memory_format=torch.channels_last)
    fast = cct.create_model("cct_2_3x2_32", attn_drop_rate=0.0).to(memory_format=torch.channels_last)
    fast.load_state_dict(plain.state_dict())
    accelerate(fast)
    for model in (fast, plain):
        configure_attention(model, torch.device("cpu"), "bf16")  # timm's explicit path, as on a CPU in bf16
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    logits, grads = [], []
    for model in (fast, plain):
        with OpsSeen() as seen:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.float().logsumexp(1).mean().backward()
        logits.append(out.float())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        fast_ops = {name for name in seen.names if name.startswith("cct.")}
        expected = {f"cct.{name}.default" for name in ("winograd_conv3x3", "winograd_conv3x3_backward",
                    "maxpool3x3_relu", "maxpool3x3_relu_backward", "attention", "attention_backward",
                    "bias_gelu", "bias_gelu_backward")}
        assert fast_ops == (expected if model is fast else set())
    torch.testing.assert_close(logits[0], logits[1], rtol=0.05, atol=0.05)
    assert (grads[0] - grads[1]).norm() / grads[1].norm() < 0.05


def test_without_a_c_compiler_the_model_runs_on_pytorchs_kernels(tmp_path):
    """A machine where nothing can be compiled gets the plain modules, not an error."""
    script = ("import torch, cct\n"
              "from cct.kernels import accelerate, available\n"
              "assert not available()\n"
              "m = accelerate(cct.create_model('cct_2_3x2_32')).eval()\n"
              "with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):\n"
              "    print(tuple(m(torch.randn(2, 3, 32, 32)).shape))\n")
    env = dict(os.environ, CC=str(tmp_path / "no-such-compiler"), CCT_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 10)"


@needs_kernels
def test_bf16_inference_of_cct_2_takes_the_fast_kernels_and_gives_pytorchs_logits():
    """Without gradients every fast path runs (the first layer in one pass, Winograd's F(4x4, 3x3), the pool without
    argmax, the attention without its probabilities kept, the MLP's bias + GELU), and the logits are those of
    PyTorch's kernels (the same model with several threads) to bf16 rounding."""
    torch.manual_seed(0)
    model = accelerate(cct.create_model("cct_2_3x2_32")).eval().to(memory_format=torch.channels_last)
    configure_attention(model, torch.device("cpu"), "bf16")
    x = torch.randn(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    logits = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), OpsSeen() as seen:
            logits.append(model(x).float())
        fast_ops = {name for name in seen.names if name.startswith("cct.")}
        expected = {"cct.conv3x3_pool_relu_inference.default", "cct.winograd_conv3x3_inference.default",
                    "cct.maxpool3x3_relu_inference.default", "cct.attention_inference.default",
                    "cct.bias_gelu.default"}
        assert fast_ops == (expected if threads == 1 else set())
    torch.testing.assert_close(logits[0], logits[1], rtol=0.05, atol=0.05)


@needs_kernels
@pytest.mark.parametrize("shape", [(4, 256, 4, 64), (3, 64, 2, 64), (2, 48, 3, 32), (2, 16, 1, 16),
                                   (3, 36, 2, 64), (2, 65, 2, 32), (2, 1, 1, 16)])
def test_the_attention_kernel_is_pytorchs_to_bf16_rounding(shape):
    """Output and the gradients of the input and the qkv weights, against the exact (fp64) attention: within the
    error of PyTorch's own bf16 attention (measured about half of it at 256 tokens: the scores are not rounded to
    bf16); token counts that are not a multiple of 16 (padded inside) included."""
    n, tokens, heads, head_dim = shape
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    attention = Attention(heads * head_dim, num_heads=heads, qkv_bias=False).bfloat16()
    attention.fused_attn = False
    x = torch.randn(n, tokens, heads * head_dim, generator=gen).bfloat16()
    grad = torch.randn(n, tokens, heads * head_dim, generator=gen).bfloat16()
    errors = _errors_against_fp64(attention, x, grad, "cct.attention.default", ["qkv.weight"])
    # or within one bf16 rounding step of the largest value, where PyTorch's error happens to be smaller
    assert all(ours <= max(pytorchs, 2**-8) for ours, pytorchs in errors)


@needs_kernels
@pytest.mark.parametrize("shape", [(4, 64, 128, 256), (3, 7, 32, 16), (1, 1, 16, 48)])
def test_the_mlp_kernel_is_pytorchs_to_bf16_rounding(shape):
    """The MLP with its bias and GELU in one operator: output and the gradients of the input, of both layers'
    weights and of the first bias, against the exact (fp64) MLP, within the error of PyTorch's own bf16 MLP, or two
    bf16 rounding steps of the largest value (the first product is rounded before its bias is added, where PyTorch
    rounds after; measured 0.7-1.3x PyTorch's error); inputs that reach far into GELU's tails included."""
    n, tokens, dim, hidden = shape
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = Mlp(dim, hidden).bfloat16()
    with torch.no_grad():
        mlp.fc1.bias.normal_(0, 2, generator=gen)
    x = (4 * torch.randn(n, tokens, dim, generator=gen)).bfloat16()
    grad = torch.randn(n, tokens, dim, generator=gen).bfloat16()
    errors = _errors_against_fp64(mlp, x, grad, "cct.bias_gelu_backward.default",
                                  ["fc1.weight", "fc1.bias", "fc2.weight"])
    assert all(ours <= max(pytorchs, 2**-7) for ours, pytorchs in errors)


@needs_kernels
def test_compiled_inference_with_frozen_weights_runs_the_kernels_as_opaque_operators():
    """`cct eval --compile` / `cct bench --set compile=true` in a process of one thread: the model compiles with
    the kernels' operators in its graph (their shape functions hold), with its weights folded in as constants, and
    gives the eager model's logits."""
    torch.manual_seed(0)
    model = accelerate(cct.create_model("cct_2_3x2_32")).eval().to(memory_format=torch.channels_last)
    configure_attention(model, torch.device("cpu"), "bf16")
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    frozen = compile_for_inference(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager, compiled = model(x).float(), frozen(x).float()
    torch.testing.assert_close(compiled, eager, rtol=0.02, atol=0.02)
    torch.nn.init.zeros_(model.head.weight)  # folded into the compiled graph: no effect there
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(frozen(x).float(), compiled) and not torch.equal(model(x).float(), eager)


@needs_kernels
def test_the_kernels_build_in_an_empty_cache(tmp_path):
    """What a fresh machine does on first use: compile cpu_kernels.c into $CCT_CACHE and load it."""
    script = "from cct.kernels import available\nprint(available())\n"
    env = dict(os.environ, CCT_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert [p.suffix for p in (tmp_path / "cache" / "kernels").iterdir()] == [".so"]  # no temporary left behind
