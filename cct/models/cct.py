"""Compact Convolutional Transformers and their siblings, as one parametrised module.

CCT (Hassani et al., 2021) = convolutional tokenizer + transformer encoder + sequence pooling.
CVT is the same with a patch tokenizer (one strided conv), ViT-Lite additionally uses a class token instead of
sequence pooling. All three are `CCT` with different arguments; the named variants live in `registry.py`.

The encoder block keeps the official layer order, which differs from a plain pre-norm ViT block: the second
LayerNorm is applied to the residual stream itself after the attention residual (x = norm2(x + attn(norm1(x)));
x = x + mlp(x)), so the MLP branch sees normalised input and the stream is renormalised once per block.

The module is built from PyTorch and timm layers only and follows timm's model interface (features, intermediate
layers, pruning, classifier reset, layer groups, gradient checkpointing), so it scripts, traces (FX) and exports
(`torch.export`). Hardware-specific fast paths are swapped in from outside by `cct.kernels.accelerate`.
"""

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath, Mlp, to_2tuple
from torch import nn
from torch.utils.checkpoint import checkpoint

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
    """Turns an image into a map of token features with a small stack of conv(-maxpool)(-ReLU) layers.

    CCT uses 1 or 2 overlapping convolutions with max-pooling (the inductive bias that lets it learn from small
    data); CVT and ViT-Lite use a single non-overlapping patch convolution with bias, no activation, no pooling.

    Args:
        in_chans: image channels.
        embed_dim: channels of the last layer, the width of the tokens.
        kernel_size: convolution kernel size.
        stride: convolution stride.
        padding: convolution padding.
        n_conv_layers: number of conv(-pool)(-ReLU) layers.
        hidden_dim: channels of the layers before the last.
        conv_bias: whether the convolutions have a bias.
        activation: whether a ReLU ends each layer.
        max_pool: whether each layer max-pools its convolution's output.
        pool_kernel: max-pool kernel size.
        pool_stride: max-pool stride.
        pool_padding: max-pool padding.
    """

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, padding: int,
                 n_conv_layers: int = 1, hidden_dim: int = 64, conv_bias: bool = False, activation: bool = True,
                 max_pool: bool = True, pool_kernel: int = 3, pool_stride: int = 2, pool_padding: int = 1):
        super().__init__()
        widths = [in_chans] + [hidden_dim] * (n_conv_layers - 1) + [embed_dim]
        # ReLU after the max-pool rather than before (as the paper draws it): the two commute exactly, since both
        # are monotone, and the ReLU then touches 4x fewer values (`cct.kernels` does the two in one pass).
        self.convs = nn.Sequential(*(
            nn.Sequential(OrderedDict(
                conv=nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=conv_bias),
                pool=nn.MaxPool2d(pool_kernel, pool_stride, pool_padding) if max_pool else nn.Identity(),
                act=nn.ReLU(inplace=True) if activation else nn.Identity(),
            ))
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        ))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def _geometry(self) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """(kernel, stride, padding) of every convolution and pool, in order."""
        return [tuple(to_2tuple(getattr(op, name)) for name in ("kernel_size", "stride", "padding"))
                for layer in self.convs for op in (layer.conv, layer.pool) if not isinstance(op, nn.Identity)]

    def grid_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (rows, cols) produced for an input of `img_size`, computed from the layer arithmetic."""
        size = list(img_size)
        for k, s, p in self._geometry():
            size = [(n + 2 * p[i] - k[i]) // s[i] + 1 for i, n in enumerate(size)]
        return size[0], size[1]

    def reduction(self) -> int:
        """The total stride from image pixels to tokens (along the rows)."""
        return math.prod(s[0] for _, s, _ in self._geometry())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch (B x C x H x W) -> token feature map (B x embed_dim x rows x cols)."""
        return self.convs(x)


class SeqPool(nn.Module):
    """Sequence pooling: an attention-weighted average of the output tokens, replacing the class token.

    Args:
        dim: token width.
    """

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
    depth's speed-up comes from; the decision is taken by the caller (see `CCT._skip_decisions`).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over `dim`.
        drop: dropout after the attention's projection and in the MLP.
        attn_drop: dropout of the attention probabilities.
        drop_path: the probability of dropping each residual branch in training.
        stochastic_depth: "droppath" or "skip".
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

    @torch.jit.unused
    def _residual(self, x: torch.Tensor, branch: Any, keep: bool) -> torch.Tensor:
        """`skip` mode: the residual with its branch run and rescaled by 1 / (1 - p), or without it."""
        if not keep:
            return x
        return x + branch(x) / (1.0 - self.drop_prob)

    @torch.jit.unused
    def _forward_skipping(self, x: torch.Tensor, keep: tuple[bool, bool]) -> torch.Tensor:
        x = self._residual(x, self._attention_branch, keep[0])
        x = self.norm2(x)
        return self._residual(x, self.mlp, keep[1])

    def forward(self, x: torch.Tensor, keep: tuple[bool, bool] | None = None) -> torch.Tensor:
        """Tokens -> tokens; `keep` (attention, MLP) is the `skip` decision of this step, None otherwise."""
        if keep is not None:
            return self._forward_skipping(x, keep)
        x = x + self.drop_path(self._attention_branch(x))
        x = self.norm2(x)
        return x + self.drop_path(self.mlp(x))


def block_indices(depth: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """The blocks that timm's `indices` argument selects, counted from the first, and the largest of them.

    Args:
        depth: the number of blocks.
        indices: the last n blocks if an int, these blocks if a sequence (negative from the end), all if None.

    Returns:
        (sorted block indices, the largest).
    """
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"cannot take the last {indices} of {depth} blocks")
        taken = list(range(depth - indices, depth))
    else:
        taken = sorted(depth + i if i < 0 else i for i in indices)
        if not taken or not 0 <= taken[0] <= taken[-1] < depth:
            raise ValueError(f"block indices {list(indices)} out of range for {depth} blocks")
    return taken, taken[-1]


@torch.fx.wrap  # a leaf for FX: it branches on the token grid, which symbolic tracing cannot
def position_table(pos_embed: torch.Tensor, grid: list[int], stored_grid: tuple[int, int], sine: bool,
                   num_prefix_tokens: int) -> torch.Tensor:
    """The position table for a token grid: the stored one at the model's own size; otherwise resampled
    (learnable) or recomputed (sine), so a model also runs on other input sizes (progressive resizing).

    Args:
        pos_embed: the model's table (1 x positions x dim).
        grid: the token grid (rows, cols) of the input.
        stored_grid: the grid the table was made for.
        sine: whether the table is the fixed sinusoidal one.
        num_prefix_tokens: class tokens in front of the grid's tokens.

    Returns:
        A table of 1 x (num_prefix_tokens + rows * cols) x dim.
    """
    if tuple(grid) == tuple(stored_grid):
        return pos_embed
    if sine:
        table = sinusoidal_embedding(grid[0] * grid[1] + num_prefix_tokens, pos_embed.shape[-1])
        return table.to(pos_embed.device, pos_embed.dtype)
    return resize_pos_embed(pos_embed, (grid[0], grid[1]), num_prefix_tokens)


class CCT(nn.Module):
    """Compact Convolutional Transformer (also CVT and ViT-Lite, by arguments), with timm's model interface.

    One class for the family, so the registry's variants are data; built from PyTorch and timm layers only, so
    it scripts, traces and exports, and fast paths are swapped in by `cct.kernels.accelerate` without changing it.

    Args:
        img_size: input size (one int for a square); sets the stored position table's grid.
        num_classes: classes of the head (0: no head, `forward` returns the pooled features).
        in_chans: image channels.
        embed_dim: token width.
        depth: encoder layers.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over `embed_dim`.
        kernel_size: tokenizer convolution kernel size.
        stride: tokenizer convolution stride (default: the official `max(1, kernel_size // 2 - 1)`).
        padding: tokenizer convolution padding (default: `max(1, kernel_size // 2)`).
        n_conv_layers: tokenizer convolutions.
        conv_hidden_dim: channels of the tokenizer layers before the last.
        conv_bias: whether the tokenizer convolutions have a bias.
        conv_activation: whether each tokenizer layer ends in a ReLU.
        max_pool: whether each tokenizer layer max-pools.
        seq_pool: sequence pooling (CCT, CVT); otherwise a class token (ViT-Lite).
        pos_embed: "learnable", "sine" (a fixed buffer) or "none".
        drop_rate: dropout after the position embedding, the attention projection and in the MLP.
        attn_drop_rate: dropout of the attention probabilities.
        drop_path_rate: stochastic depth of the last layer; it rises linearly from 0 over the layers, as in the
            paper.
        stochastic_depth: "droppath" (timm's per-sample DropPath) or "skip" (whole-batch decisions; a dropped
            branch is not computed).
        global_pool: how the head sees the tokens, as in `reset_classifier` (timm passes it when it rebuilds a
            model from its saved config); None: sequence pooling with `seq_pool`, else the class token.
    """

    # the generator serves `skip` stochastic depth, a training path that TorchScript leaves out; it cannot be saved
    __jit_ignored_attributes__ = ["skip_generator"]

    def __init__(self, img_size: int | Sequence[int] = 224, num_classes: int = 1000, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 14, num_heads: int = 6, mlp_ratio: float = 4.0,
                 kernel_size: int = 7, stride: int | None = None, padding: int | None = None,
                 n_conv_layers: int = 1, conv_hidden_dim: int = 64, conv_bias: bool = False,
                 conv_activation: bool = True, max_pool: bool = True, seq_pool: bool = True,
                 pos_embed: str = "learnable", drop_rate: float = 0.0, attn_drop_rate: float = 0.1,
                 drop_path_rate: float = 0.1, stochastic_depth: str = "droppath", global_pool: str | None = None):
        super().__init__()
        if pos_embed not in POSITIONAL_EMBEDDINGS:
            raise ValueError(f"pos_embed must be one of {POSITIONAL_EMBEDDINGS}, got {pos_embed!r}")
        if stochastic_depth not in STOCHASTIC_DEPTH_MODES:
            raise ValueError(f"stochastic_depth must be one of {STOCHASTIC_DEPTH_MODES}, got {stochastic_depth!r}")
        self.img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.stochastic_depth = stochastic_depth
        self.grad_checkpointing = False
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
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=self.tokenizer.reduction())
                             for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim)
        self.global_pool = "token" if self.cls_token is not None else "seq"
        self.pool = SeqPool(embed_dim) if seq_pool else None
        if global_pool is not None:
            self._set_global_pool(global_pool)
        self.head = self._new_head(num_classes)
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

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def seed_stochastic_depth(self, seed: int) -> None:
        """Seed the generator of `skip` stochastic depth. Training calls this every step with a value derived
        from (run seed, step), so every DDP rank skips the same branches and a resumed run skips as before."""
        self.skip_generator.manual_seed(seed)

    @torch.jit.unused
    def _skip_decisions(self) -> list[tuple[bool, bool] | None]:
        """Per block, whether its attention and MLP branches run in this step (`skip` mode, training only;
        None for every block otherwise)."""
        if not (self.training and self.stochastic_depth == "skip"):
            return [None] * len(self.blocks)
        keep = torch.rand(self.drop_path_rates.shape, generator=self.skip_generator) >= self.drop_path_rates
        return [tuple(pair) for pair in keep.tolist()]

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Image batch -> the encoder's input tokens (class token first for ViT-Lite, positions added), and the
        token grid (rows, cols)."""
        maps = self.tokenizer(x)
        grid = [maps.shape[2], maps.shape[3]]
        x = maps.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            if torch.jit.is_scripting():  # a scripted model runs at its own size
                x = x + self.pos_embed
            else:
                x = x + position_table(self.pos_embed, grid, self.grid_size, self.pos_embed_kind == "sine",
                                       self.num_prefix_tokens)
        return self.pos_drop(x), grid

    def _run_blocks(self, x: torch.Tensor, take: list[int], last: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder blocks up to block `last`; returns its output and the outputs of the blocks in `take`.

        In training, `skip` mode draws which branches run, and with gradient checkpointing each block keeps only
        its input for the backward and runs again there."""
        keeps: list[tuple[bool, bool] | None] | None = None
        if not torch.jit.is_scripting() and self.training and self.stochastic_depth == "skip":
            keeps = self._skip_decisions()
        outputs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            if i <= last:
                keep = keeps[i] if keeps is not None else None
                if not torch.jit.is_scripting() and self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, keep, use_reentrant=False)
                else:
                    x = block(x, keep)
                if i in take:
                    outputs.append(x)
        return x, outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> normalised output tokens (B x N x embed_dim), class token first for ViT-Lite."""
        x = self._embed(x)[0]
        x = self._run_blocks(x, [], len(self.blocks) - 1)[0]
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits, or with `pre_logits` the pooled features (by sequence pooling or the class token; the
        tokens themselves after `reset_classifier(..., global_pool="")`)."""
        if self.pool is not None:
            x = self.pool(x)
        elif self.global_pool == "token":
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self, x: torch.Tensor, indices: int | list[int] | None = None, return_prefix_tokens: bool = False,
            norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """The outputs of chosen encoder blocks, as timm's models give them (for `features_only` models, dense
        heads, probing).

        Args:
            x: image batch.
            indices: the last n blocks if an int, these blocks if a list (negative from the end), all if None.
            return_prefix_tokens: pair each output with its class token (ViT-Lite; no effect without one).
            norm: apply the final LayerNorm to each output.
            stop_early: run no block after the last one taken (then the final features are not the model's).
            output_fmt: "NCHW" (token maps on the token grid) or "NLC" (token sequences).
            intermediates_only: return only the outputs of the blocks.

        Returns:
            The list of block outputs, or (final normalised tokens, that list).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = block_indices(len(self.blocks), indices)
        batch = x.shape[0]
        x, grid = self._embed(x)
        x, outputs = self._run_blocks(x, take, max_index if stop_early else len(self.blocks) - 1)
        if norm:
            outputs = [self.norm(y) for y in outputs]
        prefixes = [y[:, :self.num_prefix_tokens] for y in outputs]
        outputs = [y[:, self.num_prefix_tokens:] for y in outputs]
        if output_fmt == "NCHW":
            outputs = [y.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in outputs]
        if return_prefix_tokens and self.num_prefix_tokens:
            outputs = list(zip(outputs, prefixes, strict=True))
        return outputs if intermediates_only else (self.norm(x), outputs)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last one `indices` takes (and the final norm, the pooling and the head if
        asked), for a model used only through `forward_intermediates`.

        Args:
            indices: as in `forward_intermediates`.
            prune_norm: replace the final LayerNorm by an identity.
            prune_head: remove the pooling and the classifier.

        Returns:
            The indices of the blocks taken, counted from the first.
        """
        take, max_index = block_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.drop_path_rates = self.drop_path_rates[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    # timm's model interface, so that timm's helpers (create_model, features_only, optimizer factories with layer
    # decay, reset_classifier, gradient checkpointing) work.
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head (an identity without classes)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for `num_classes` classes.

        Args:
            num_classes: classes of the new head (0: no head).
            global_pool: None keeps the pooling; "seq" sequence pooling (a fresh one if there is none), "token" the
                class token (ViT-Lite only), "" none (`forward` returns the tokens).
        """
        if global_pool is not None:
            self._set_global_pool(global_pool)
        self.num_classes = num_classes
        self.head = self._like_parameters(self._new_head(num_classes))

    def _set_global_pool(self, global_pool: str) -> None:
        if global_pool not in ("seq", "token", ""):
            raise ValueError(f"global_pool must be 'seq', 'token' or '', got {global_pool!r}")
        if global_pool == "token" and self.cls_token is None:
            raise ValueError("global_pool 'token' needs a class token (a ViT-Lite model)")
        if global_pool == "seq" and self.pool is None:
            self.pool = self._like_parameters(SeqPool(self.embed_dim))
        elif global_pool != "seq":
            self.pool = None
        self.global_pool = global_pool

    def _like_parameters(self, module: nn.Module) -> nn.Module:
        """`module` moved to the device and dtype of the model's parameters."""
        reference = next(self.parameters())
        return module.to(reference.device, reference.dtype)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay by timm's optimizer factory."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth for timm's layer-wise learning-rate decay: the tokenizer and the embeddings
        first, then each block, then the final norm with the pooling and head.

        Args:
            coarse: accepted for timm's interface; the groups are the same (one per block).
        """
        return dict(stem=r"^cls_token|^pos_embed|^tokenizer",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block in the backward instead of keeping its activations (less memory, about one
        more forward of the encoder per training step).

        Args:
            enable: turn checkpointing on or off.
        """
        self.grad_checkpointing = enable


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
