"""Compact Convolutional Transformers and their siblings, as one parametrised module.

CCT (Hassani et al., 2021) = convolutional tokenizer + transformer encoder + sequence pooling.
CVT is the same with a patch tokenizer (one strided conv), ViT-Lite additionally uses a class token instead of
sequence pooling. All three are `CCT` with different arguments; the named variants live in `registry.py`.

The encoder block keeps the official layer order, which differs from a plain pre-norm ViT block: the second
LayerNorm is applied to the residual stream itself after the attention residual (x = norm2(x + attn(norm1(x)));
x = x + mlp(x)), so the MLP branch sees normalised input and the stream is renormalised once per block.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, to_2tuple
from torch import nn

from .cpu_kernels import Attention, Conv2d, MaxPoolReLU, Mlp, TokenizerLayer

POSITIONAL_EMBEDDINGS = ("learnable", "sine", "none")
STOCHASTIC_DEPTH_MODES = ("droppath", "skip")


def sinusoidal_embedding(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine position table of the paper (1 x num_positions x dim); channel 2i uses sin, 2i+1 cos,
    both at frequency 10000^(-2i/dim), as in the official implementation."""
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    pair_index = torch.div(torch.arange(dim), 2, rounding_mode="floor").to(torch.float64)
    angles = (position / (10000 ** (2 * pair_index / dim))).to(torch.float32)  # float32 sin/cos, as official
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.unsqueeze(0)


class ConvTokenizer(nn.Module):
    """Turns an image into a sequence of tokens with a small stack of conv(-ReLU-maxpool) layers.

    CCT uses 1 or 2 overlapping convolutions with max-pooling (the inductive bias that lets it learn from small
    data); CVT and ViT-Lite use a single non-overlapping patch convolution with bias, no activation, no pooling.
    """

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, padding: int,
                 n_conv_layers: int = 1, hidden_dim: int = 64, conv_bias: bool = False, activation: bool = True,
                 max_pool: bool = True, pool_kernel: int = 3, pool_stride: int = 2, pool_padding: int = 1):
        super().__init__()
        widths = [in_chans] + [hidden_dim] * (n_conv_layers - 1) + [embed_dim]
        # ReLU after the max-pool rather than before (as the paper draws it): the two commute exactly, since
        # both are monotone, and the ReLU then touches 4x fewer values; with both, one module does the two
        # (in one pass on a CPU in bf16, see cpu_kernels.py).
        pool = (MaxPoolReLU if activation else nn.MaxPool2d) if max_pool else None
        self.convs = nn.Sequential(*(
            TokenizerLayer(OrderedDict(
                conv=Conv2d(c_in, c_out, kernel_size, stride, padding, bias=conv_bias),
                pool=pool(pool_kernel, pool_stride, pool_padding) if pool else nn.Identity(),
                act=nn.ReLU(inplace=True) if activation and not max_pool else nn.Identity(),
            ))
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        ))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def grid_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (rows, cols) produced for an input of `img_size`, computed from the layer arithmetic."""
        size = list(img_size)
        for layer in self.convs:
            for op in (layer.conv, layer.pool):
                if isinstance(op, nn.Identity):
                    continue
                k, s, p = (to_2tuple(getattr(op, name)) for name in ("kernel_size", "stride", "padding"))
                size = [(n + 2 * p[i] - k[i]) // s[i] + 1 for i, n in enumerate(size)]
        return size[0], size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x).flatten(2).transpose(1, 2)


class SeqPool(nn.Module):
    """Sequence pooling: an attention-weighted average of the output tokens, replacing the class token."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.score(x).softmax(dim=1)  # B x N x 1
        return (weights.transpose(1, 2) @ x).squeeze(1)


class EncoderBlock(nn.Module):
    """One transformer encoder layer in the official CCT order, with either kind of stochastic depth.

    `droppath` zeroes the residual branch per sample (timm's DropPath): the branch is still computed.
    `skip` drops the branch for the whole batch and then does not compute it at all, which is where stochastic
    depth's speed-up comes from; the decision is taken by the caller (see `CCT.forward`).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float,
                 drop_path: float, stochastic_depth: str = "droppath"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=False, proj_bias=True,
                              attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_prob = drop_path
        per_sample = stochastic_depth == "droppath" and drop_path > 0
        self.drop_path = DropPath(drop_path) if per_sample else nn.Identity()

    def _attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(x))

    def _residual(self, x: torch.Tensor, branch, keep: bool | None) -> torch.Tensor:
        if keep is None:  # eval, droppath mode, or rate 0
            return x + self.drop_path(branch(x))
        if not keep:
            return x
        return x + branch(x) / (1.0 - self.drop_prob)

    def forward(self, x: torch.Tensor, keep: tuple[bool, bool] | tuple[None, None] = (None, None)) -> torch.Tensor:
        x = self._residual(x, self._attention_branch, keep[0])
        x = self.norm2(x)
        return self._residual(x, self.mlp, keep[1])


class CCT(nn.Module):
    """Compact Convolutional Transformer (also CVT and ViT-Lite, by arguments).

    Args mirror the paper's notation: `depth` layers of width `embed_dim`, `num_heads` heads, MLP ratio
    `mlp_ratio`; a tokenizer of `n_conv_layers` convolutions of `kernel_size`; `seq_pool` for sequence
    pooling (else a class token); `pos_embed` is "learnable", "sine" (a fixed buffer) or "none".
    `drop_path_rate` rises linearly from 0 over the layers, as in the paper.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, num_classes: int = 1000, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 14, num_heads: int = 6, mlp_ratio: float = 4.0,
                 kernel_size: int = 7, stride: int | None = None, padding: int | None = None,
                 n_conv_layers: int = 1, conv_hidden_dim: int = 64, conv_bias: bool = False,
                 conv_activation: bool = True, max_pool: bool = True, seq_pool: bool = True,
                 pos_embed: str = "learnable", drop_rate: float = 0.0, attn_drop_rate: float = 0.1,
                 drop_path_rate: float = 0.1, stochastic_depth: str = "droppath"):
        super().__init__()
        if pos_embed not in POSITIONAL_EMBEDDINGS:
            raise ValueError(f"pos_embed must be one of {POSITIONAL_EMBEDDINGS}, got {pos_embed!r}")
        if stochastic_depth not in STOCHASTIC_DEPTH_MODES:
            raise ValueError(f"stochastic_depth must be one of {STOCHASTIC_DEPTH_MODES}, got {stochastic_depth!r}")
        self.img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.stochastic_depth = stochastic_depth
        self.tokenizer = ConvTokenizer(
            in_chans, embed_dim, kernel_size,
            stride=max(1, kernel_size // 2 - 1) if stride is None else stride,
            padding=max(1, kernel_size // 2) if padding is None else padding,
            n_conv_layers=n_conv_layers, hidden_dim=conv_hidden_dim, conv_bias=conv_bias,
            activation=conv_activation, max_pool=max_pool)
        self.grid_size = self.tokenizer.grid_size(self.img_size)
        self.num_prefix_tokens = 0 if seq_pool else 1
        self.cls_token = None if seq_pool else nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_positions = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.pos_embed_kind = pos_embed
        if pos_embed == "learnable":
            self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, num_positions, embed_dim), std=0.2))
        elif pos_embed == "sine":
            self.register_buffer("pos_embed", sinusoidal_embedding(num_positions, embed_dim))
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            EncoderBlock(embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, rate, stochastic_depth)
            for rate in rates)
        self.drop_path_rates = torch.tensor(rates).repeat_interleave(2).view(depth, 2)
        self.norm = nn.LayerNorm(embed_dim)
        self.pool = SeqPool(embed_dim) if seq_pool else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.skip_generator = torch.Generator().manual_seed(0)
        self._init_transformer_weights()

    def _init_transformer_weights(self) -> None:
        for name, module in self.named_modules():
            if name.startswith("tokenizer"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def seed_stochastic_depth(self, seed: int) -> None:
        """Seed the generator of `skip` stochastic depth. Training calls this every step with a value derived
        from (run seed, step), so every DDP rank skips the same branches and a resumed run skips as before."""
        self.skip_generator.manual_seed(seed)

    def _skip_decisions(self) -> list[tuple[bool, bool]] | list[tuple[None, None]]:
        """Per block, whether its attention and MLP branches run in this step (`skip` mode, training only)."""
        if not (self.training and self.stochastic_depth == "skip"):
            return [(None, None)] * len(self.blocks)
        keep = torch.rand(self.drop_path_rates.shape, generator=self.skip_generator) >= self.drop_path_rates
        return [tuple(pair) for pair in keep.tolist()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> normalised output tokens (B x N x embed_dim), class token first for ViT-Lite."""
        grid = self.tokenizer.grid_size(tuple(x.shape[-2:]))
        x = self.tokenizer(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self._pos_embed_for(grid)
        x = self.pos_drop(x)
        for block, keep in zip(self.blocks, self._skip_decisions(), strict=True):
            x = block(x, keep)
        return self.norm(x)

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for a token grid: the stored one at the model's own size; otherwise resampled
        (learnable) or recomputed (sine), so a model also runs on other input sizes (progressive resizing)."""
        if grid == self.grid_size:
            return self.pos_embed
        if self.pos_embed_kind == "sine":
            table = sinusoidal_embedding(grid[0] * grid[1] + self.num_prefix_tokens, self.embed_dim)
            return table.to(self.pos_embed.device, self.pos_embed.dtype)
        return resize_pos_embed(self.pos_embed, grid, self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits (or the pooled features with `pre_logits`), by sequence pooling or class token."""
        x = self.pool(x) if self.pool is not None else x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # timm model interface, so that timm's helpers (create_model, optimizer factories, reset_classifier) work.
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for `num_classes` classes."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay by timm's optimizer factory."""
        return {"pos_embed", "cls_token"}


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Bilinearly resample a learnable position table to another token grid (prefix tokens kept as they are),
    the way the official code and timm adapt a checkpoint to another input resolution."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise ValueError(f"cannot resize a non-square position grid of {grid.shape[1]} tokens")
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
