"""Fine-tuning: a run that starts from trained weights (`init`), with parts of the model frozen (`freeze`), a
learning rate that decays towards the input (`layer_decay`) and a faster head (`head_lr_scale`)."""

from __future__ import annotations

import logging
from typing import Any

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from .config import Config
from .runs import load_weights_into

logger = logging.getLogger("cct.train")


def initialise(model: nn.Module, cfg: Config, load_weights: bool = True) -> None:
    """Load the run's initial weights (`cfg.init`) into `model` and freeze what `cfg.freeze` names.

    Args:
        model: the freshly built model of the run.
        cfg: `init` and `freeze` are used.
        load_weights: False for a resumed run, whose saved state replaces every weight (nothing is fetched).
    """
    if cfg.init != "none" and load_weights:
        load_weights_into(model, cfg.init)
        logger.info("initial weights: %s", cfg.init)
    freeze(model, cfg.freeze)


def freeze(model: nn.Module, part: str) -> None:
    """Stop the parameters of `part` from training (`requires_grad=False`; the optimizer leaves them out).

    Args:
        model: a CCT model.
        part: `none`; `tokenizer` (the convolutional tokenizer); `backbone` (all but the head: a linear probe
            on the pooled features, the sequence pooling included, as timm's linear-probe convention).
    """
    if part == "none":
        return
    head = {id(p) for p in model.get_classifier().parameters()}
    for name, param in model.named_parameters():
        if (part == "tokenizer" and name.startswith("tokenizer.")) or (part == "backbone" and id(param) not in head):
            param.requires_grad_(False)


def optimizer_params(model: nn.Module, cfg: Config) -> nn.Module | list[dict[str, Any]]:
    """What the optimizer is built from: the model itself (timm's own grouping, as every run without these
    keys has it) or, for a fine-tuning run, parameter groups of the trainable parameters only, each with its
    `lr_scale` (layer-wise decay through the model's `group_matcher`, times `head_lr_scale` for the head).

    Args:
        model: the model, with its frozen parameters already marked.
        cfg: `layer_decay`, `head_lr_scale`, `freeze` and `weight_decay` are used.

    Returns:
        The first argument of `timm.optim.create_optimizer_v2`.
    """
    if cfg.layer_decay is None and cfg.head_lr_scale == 1.0 and cfg.freeze == "none":
        return model
    no_decay = model.no_weight_decay()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(model, cfg.weight_decay, no_decay, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_decay)
    head = {id(p) for p in model.get_classifier().parameters()}
    split = []
    for group in groups:
        for in_head in (False, True):
            params = [p for p in group["params"] if (id(p) in head) == in_head]
            if params:
                scale = group.get("lr_scale", 1.0) * (cfg.head_lr_scale if in_head else 1.0)
                split.append({**group, "params": params, "lr_scale": scale})
    return split
