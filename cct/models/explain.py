"""Where a trained model looked: sequence-pooling weights and attention rollout on the token grid.

Sequence pooling (`SeqPool`) classifies a softmax-weighted average of the output tokens, so its weights say
directly how much each image region counts for the prediction. Models with a class token (ViT-Lite) have no such
weights; their last block's class-token attention, averaged over the heads, takes that place. Attention rollout
(Abnar & Zuidema, 2020) follows the attention back through every block to the input tokens: per block the heads
are averaged, the identity is added for the residual connection and the rows are renormalised, and the blocks'
matrices are multiplied together.

Everything is captured with forward hooks on the model's own modules during one ordinary forward pass: the input
of each block's `attn` (the normalised tokens, from which q and k are recomputed) and the output of `pool.score`.
Every map is a distribution over the image tokens (it sums to one); a class token's own share is left out and
the rest renormalised.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

POOLING_TITLES = {"seq_pool": "sequence pooling", "class_token": "class-token attention (last block)"}


@dataclass
class Explanation:
    """The maps and the top-k classes of a batch of images.

    Attributes:
        pooling: B x rows x cols, the sequence-pooling weights (or, for class-token models, the last block's
            class-token attention averaged over heads) on the token grid; each map sums to one.
        rollout: B x rows x cols, the attention rollout on the token grid; each map sums to one.
        top_probs: B x k, the k highest class probabilities, highest first.
        top_classes: B x k, their class indices.
        pooling_kind: `"seq_pool"` or `"class_token"`: what `pooling` holds.
    """

    pooling: torch.Tensor
    rollout: torch.Tensor
    top_probs: torch.Tensor
    top_classes: torch.Tensor
    pooling_kind: str


def head_averaged_attention(attn: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The attention matrix softmax(q k^T * scale) of a timm `Attention` for its input `tokens`, averaged over
    the heads.

    Args:
        attn: a timm `Attention` (its `qkv`, `q_norm`, `k_norm`, `num_heads`, `head_dim` and `scale` are used).
        tokens: B x N x C, the module's input.

    Returns:
        B x N x N float32 attention, each row summing to one.
    """
    batch, n, _ = tokens.shape
    qkv = attn.qkv(tokens).float().reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)


def attention_rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) of head-averaged attention matrices, first block first.

    Args:
        attentions: per block, B x N x N attention with rows summing to one.

    Returns:
        B x N x N: row i gives how much each input token flows into output token i; rows sum to one.
    """
    rollout = None
    for attention in attentions:
        mixed = attention + torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs the attention of at least one block")
    return rollout


def _forward_with_hooks(model: nn.Module, images: torch.Tensor):
    """One forward pass of `model`, returning its logits, each block's head-averaged attention and the raw
    sequence-pooling scores (None for class-token models)."""
    attentions, scores = [], []
    handles = [block.attn.register_forward_hook(
        lambda module, args, output: attentions.append(head_averaged_attention(module, args[0])))
        for block in model.blocks]
    if model.cls_token is None:
        handles.append(model.pool.score.register_forward_hook(
            lambda module, args, output: scores.append(output.float())))
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, attentions, (scores[0].squeeze(-1) if scores else None)


def _distribution(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.sum(dim=-1, keepdim=True)


@torch.no_grad()
def explain(model: nn.Module, images: torch.Tensor, topk: int = 5) -> Explanation:
    """Sequence-pooling (or class-token) map, attention-rollout map and top-k classes of a batch of images.

    The model runs once, in eval mode (its mode is restored afterwards).

    Args:
        model: a `cct.models.CCT` (CCT, CVT or ViT-Lite).
        images: B x 3 x H x W, normalised as the model expects.
        topk: how many classes to return (at most the model's class count).

    Returns:
        The `Explanation`, its maps on the token grid of an H x W input.
    """
    rows, cols = model.tokenizer.grid_size(tuple(images.shape[-2:]))
    was_training = model.training
    model.eval()
    try:
        logits, attentions, scores = _forward_with_hooks(model, images)
    finally:
        model.train(was_training)
    rollout = attention_rollout(attentions)
    if scores is not None:
        weights = scores.softmax(dim=1)
        pooling, flow, kind = weights, (weights.unsqueeze(1) @ rollout).squeeze(1), "seq_pool"
    else:  # the class token is token 0; its row says where it gathers from
        pooling, flow, kind = _distribution(attentions[-1][:, 0, 1:]), _distribution(rollout[:, 0, 1:]), "class_token"
    top = logits.float().softmax(dim=1).topk(min(topk, logits.shape[1]), dim=1)
    return Explanation(pooling=pooling.reshape(-1, rows, cols), rollout=flow.reshape(-1, rows, cols),
                       top_probs=top.values, top_classes=top.indices, pooling_kind=kind)


def overlay(image: torch.Tensor, heat: torch.Tensor, min_side: int = 256, alpha: float = 0.55) -> np.ndarray:
    """A map drawn over its image: the map bilinearly upsampled to the image, scaled to its own range and
    coloured, blended with the image (small images are first enlarged by an integer factor, pixels kept sharp).

    Args:
        image: 3 x H x W uint8 RGB, the image the map belongs to (as the model saw it).
        heat: rows x cols map.
        min_side: the shorter side of the result is at least this many pixels.
        alpha: weight of the colour map in the blend.

    Returns:
        H' x W' x 3 uint8 RGB array.
    """
    import matplotlib

    image = _enlarged(image, min_side)
    size = tuple(image.shape[-2:])
    up = F.interpolate(heat[None, None].float().cpu(), size=size, mode="bilinear", align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min()).clamp(min=1e-12)
    colours = matplotlib.colormaps["inferno"](up.numpy())[..., :3]
    rgb = image.permute(1, 2, 0).numpy().astype(np.float64) / 255
    return np.round(((1 - alpha) * rgb + alpha * colours) * 255).astype(np.uint8)


def _enlarged(image: torch.Tensor, min_side: int) -> torch.Tensor:
    factor = max(1, math.ceil(min_side / min(image.shape[-2:])))
    return image.cpu().repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def save_explanation_png(path: str | os.PathLike, image: torch.Tensor, explanation: Explanation, index: int,
                         class_names: Sequence[str]) -> None:
    """Write one image's explanation as a PNG: the image, its pooling map and its rollout map over it, and the
    top-k classes as the title.

    Args:
        path: the PNG file to write.
        image: 3 x H x W uint8 RGB, the image as the model saw it.
        explanation: the `Explanation` of a batch holding this image.
        index: the image's position in that batch.
        class_names: label of each class index.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("image", _enlarged(image, 256).permute(1, 2, 0).numpy()),
              (POOLING_TITLES[explanation.pooling_kind], overlay(image, explanation.pooling[index])),
              ("attention rollout", overlay(image, explanation.rollout[index]))]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.8))
    for ax, (title, picture) in zip(axes, panels, strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    top = zip(explanation.top_probs[index].tolist(), explanation.top_classes[index].tolist(), strict=True)
    fig.suptitle("   ".join(f"{class_names[c]} {p:.1%}" for p, c in top), fontsize=11)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
