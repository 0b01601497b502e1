"""Opt-in fast paths for CCT models: C kernels for CPUs computing in bf16, swapped into a plain model.

The model in `cct.models` is built from PyTorch and timm layers only; `accelerate(model)` replaces its
tokenizer convolutions, max-pool + ReLU, attention and MLP modules in place by subclasses that run the kernels
of `cpu_kernels.c` where they apply (a CPU with AVX-512 bf16 or AMX as PyTorch sees it, see
`cct.kernels.dispatch`; bf16 computation, one intra-op thread, channel counts in multiples of 16) and PyTorch's
own kernels everywhere else, like `torch.compile` leaves a model's definition alone. Figures of what each kernel
gains are in docs/kernels.md.
"""

from __future__ import annotations

from itertools import pairwise

from timm.layers import Attention as TimmAttention
from timm.layers import Mlp as TimmMlp
from torch import nn

from .attention import Attention
from .conv import Conv2d
from .dispatch import cpu_kind, fast_paths
from .mlp import Mlp
from .native import available, usable
from .pool import MaxPoolReLU
from .tokenizer import TokenizerLayer

__all__ = ["accelerate", "available", "cpu_kind", "fast_paths", "usable", "Attention", "Conv2d", "MaxPoolReLU",
           "Mlp", "TokenizerLayer"]

# Plain module class -> the subclass with the same parameters that runs the kernels. Only exact classes are
# swapped: a user's own subclass of one of them may compute something else.
_ACCELERATED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: Conv2d, TimmAttention: Attention, TimmMlp: Mlp,
}
_TOKENIZER_LAYER_PARTS = ("conv", "pool", "act")


def _fuse_pool_and_relu(sequence: nn.Sequential) -> None:
    """Turn each `nn.MaxPool2d` directly followed by `nn.ReLU` in `sequence` into one `MaxPoolReLU` (the ReLU
    becomes an `nn.Identity`): one pass instead of two, same parameters (none) and state-dict keys."""
    children = list(sequence.named_children())
    for (_, pool), (relu_name, relu) in pairwise(children):
        if type(pool) is nn.MaxPool2d and type(relu) is nn.ReLU:
            pool.__class__ = MaxPoolReLU
            setattr(sequence, relu_name, nn.Identity())


def accelerate(model: nn.Module) -> nn.Module:
    """Swap the modules of a plain model in place for ones that run the C kernels where they apply.

    The swap changes only the modules' classes (and replaces a ReLU that follows a max-pool by an identity, the
    pool then applying it), so parameters, buffers and `state_dict()` keys and values stay as they are, and the
    model computes the same function up to bf16 rounding. Calling it again, or on a machine without the kernels,
    is safe: the swapped modules decide per call whether the kernels apply (bf16 on a CPU, one intra-op thread,
    suitable shapes, not tracing) and otherwise run PyTorch's code, bit for bit the plain model's. Attention
    modules run the kernel only in timm's explicit path (`fused_attn = False`, what training sets on a CPU in
    bf16).

    Args:
        model: a model from `cct.models` (or any module holding `nn.Conv2d`, `nn.MaxPool2d` + `nn.ReLU` in an
            `nn.Sequential`, timm `Attention` or timm `Mlp`).

    Returns:
        The same model object, accelerated.
    """
    for module in list(model.modules()):
        if type(module) in _ACCELERATED:
            module.__class__ = _ACCELERATED[type(module)]
        elif isinstance(module, nn.Sequential):
            _fuse_pool_and_relu(module)
            if type(module) is nn.Sequential and tuple(module._modules) == _TOKENIZER_LAYER_PARTS:
                module.__class__ = TokenizerLayer
    return model
