"""Reading weights safely and fitting them to a model: our safetensors files, official `.pth` state dicts,
other resolutions (position tables resampled) and other class counts (head re-initialised).

Nothing here unpickles arbitrary objects: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..errors import CCTError
from .cct import resize_pos_embed

logger = logging.getLogger("cct.models")

# Official (SHI-Labs/Compact-Transformers) key -> ours. Order matters: the first matching rule wins.
_OFFICIAL_KEY_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(a), b) for a, b in [
    (r"^tokenizer\.conv_layers\.(\d+)\.0\.", r"tokenizer.convs.\1.conv."),
    (r"^classifier\.positional_emb$", "pos_embed"),
    (r"^classifier\.class_emb$", "cls_token"),
    (r"^classifier\.attention_pool\.", "pool.score."),
    (r"^classifier\.blocks\.(\d+)\.pre_norm\.", r"blocks.\1.norm1."),
    (r"^classifier\.blocks\.(\d+)\.self_attn\.", r"blocks.\1.attn."),
    (r"^classifier\.blocks\.(\d+)\.linear1\.", r"blocks.\1.mlp.fc1."),
    (r"^classifier\.blocks\.(\d+)\.norm1\.", r"blocks.\1.norm2."),
    (r"^classifier\.blocks\.(\d+)\.linear2\.", r"blocks.\1.mlp.fc2."),
    (r"^classifier\.norm\.", "norm."),
    (r"^classifier\.fc\.", "head."),
]]
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


def is_official_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """True when the keys are the official implementation's (`tokenizer.conv_layers...`, `classifier...`)."""
    return any(k.startswith(("classifier.", "tokenizer.conv_layers.")) for k in state_dict)


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official CCT/CVT/ViT-Lite state dict to this package's key names (tensors are shared)."""
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in _OFFICIAL_KEY_RULES:
            new_key, hits = pattern.subn(replacement, key)
            if hits:
                converted[new_key] = value
                break
        else:
            converted[key] = value
    return converted


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common checkpoint wrappers and strip DDP/compile prefixes."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CCTError(f"{path} is not a model checkpoint: it holds no state dict of tensors")
    state_dict = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        state_dict[key] = value
    return state_dict


def is_pytorch_file(path: str | os.PathLike) -> bool:
    """Whether a file is a PyTorch zip or pickle rather than safetensors (anything else is read as safetensors,
    whose reader names what is wrong). The first byte alone cannot tell: in a safetensors file it is the low
    byte of the header length, which can be that of the zip (`P`) or pickle (`0x80`) magic; a safetensors
    header then starts with `{` at byte 8."""
    with open(path, "rb") as f:
        head = f.read(9)
    return head[8:] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from a safetensors file or a PyTorch `.pth` (tensors only, never arbitrary pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CCTError(f"checkpoint not found: {path}")
    try:
        if not is_pytorch_file(path):
            return _unwrap(load_file(path), path)
        with open(path, "rb") as f:  # a file object: torch.load would treat a *.safetensors name by its suffix
            return _unwrap(torch.load(f, map_location="cpu", weights_only=True), path)
    except pickle.UnpicklingError as e:
        raise CCTError(f"refusing to load {path}: it contains pickled Python objects, not only tensors "
                       f"({str(e).splitlines()[0][:200]})") from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CCTError(f"{path} is not a readable checkpoint (truncated or not a safetensors/PyTorch file): "
                       f"{reason}") from None


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fit a state dict to `model`: official keys converted, position tables resampled (learnable) or taken
    from the model (sine), and a head of another class count dropped with a warning (the model's own stays).
    Also used by timm when it loads pretrained weights into a registered variant."""
    if is_official_state_dict(state_dict):
        state_dict = convert_official_state_dict(state_dict)
    state_dict = dict(state_dict)
    own = model.state_dict()
    pos = state_dict.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        if getattr(model, "pos_embed_kind", "learnable") == "sine":
            state_dict["pos_embed"] = own["pos_embed"]
        else:
            state_dict["pos_embed"] = resize_pos_embed(pos, model.grid_size, model.num_prefix_tokens)
    head = state_dict.get("head.weight")
    own_head = own.get("head.weight")
    if head is not None and own_head is not None and head.shape[0] != own_head.shape[0] \
            and head.shape[1:] == own_head.shape[1:]:
        logger.warning("checkpoint head has %d classes, model has %d: the head is re-initialised",
                       head.shape[0], own["head.weight"].shape[0])
        state_dict["head.weight"], state_dict["head.bias"] = own["head.weight"], own["head.bias"]
    return state_dict


def describe_mismatch(state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str | None:
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if keys]
    return "; ".join(parts) or None


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights from `path` into `model` (in place), adapting official keys, resolution and head.
    A checkpoint that does not fit raises CCTError naming the first mismatched keys and shapes."""
    state_dict = checkpoint_filter_fn(read_state_dict(path), model)
    problem = describe_mismatch(state_dict, model.state_dict())
    if problem:
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise CCTError(f"checkpoint {path} does not fit {name}: {problem}")
    model.load_state_dict(state_dict)
    warn_non_finite(model, path)
    return model


def warn_non_finite(model: nn.Module, source: str | os.PathLike) -> int:
    """Log one warning line when the weights hold NaN or infinite values (what it computes is then NaN, not a
    prediction); returns how many values are not finite."""
    count = sum(int((~torch.isfinite(t)).sum()) for t in model.state_dict().values() if t.is_floating_point())
    if count:
        logger.warning("warning: %s holds %d NaN or infinite weight value(s): its outputs are not meaningful",
                       source, count)
    return count


def model_metadata(model: nn.Module, model_name: str, classes: list[str], mean, std, dataset: str,
                   extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The safetensors header of a trained model: what `cct eval/predict/export` need to rebuild and use it
    from the weights file alone (architecture name, classes and their names, input size, normalisation)."""
    meta = dict(format="cct", model=model_name, num_classes=model.num_classes, img_size=list(model.img_size),
                classes=list(classes), mean=list(mean), std=list(std), dataset=dataset, **(extra or {}))
    return {k: json.dumps(v) for k, v in meta.items()}


#: Bounds on what a weights file's header may claim (far above any real model of this library).
MAX_CLASSES = 100_000
MAX_IMG_SIZE = 4096


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The cct metadata of a safetensors weights file ({} when it has none, e.g. a bare state dict)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises several exception types for a bad header
        if "Cannot allocate memory" in str(e):  # an address-space limit, not a bad file
            raise CCTError(f"not enough memory to map {path} (the file is not at fault)") from None
        raise CCTError(f"{path} is not a readable safetensors file: {str(e).splitlines()[0][:200]}") from None
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        return {}
    return check_metadata(meta, path)


def _is_number_list(value: object, length: int) -> bool:
    return (isinstance(value, list) and len(value) == length
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def check_metadata(meta: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """`meta` itself when the fields a model is rebuilt from have sane types and sizes; a header edited by hand
    (a negative or huge class count or image size, class names that are not strings) is one line, not a
    traceback or an allocation of the size it claims."""
    problems = []
    if "model" in meta and not isinstance(meta["model"], str):
        problems.append("model is not a name")
    classes = meta.get("num_classes")
    if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool)
                                or not 1 <= classes <= MAX_CLASSES):
        problems.append(f"num_classes is not an integer in 1..{MAX_CLASSES}")
    size = meta.get("img_size")
    if size is not None and not (_is_number_list(size, 2) and all(isinstance(v, int) and 1 <= v <= MAX_IMG_SIZE
                                                                  for v in size)):
        problems.append(f"img_size is not two integers in 1..{MAX_IMG_SIZE}")
    names = meta.get("classes")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)
                                  and (classes is None or len(names) == classes)):
        problems.append("classes is not a list of num_classes names")
    problems += [f"{key} is not 3 finite numbers" for key in ("mean", "std")
                 if key in meta and not _is_number_list(meta[key], 3)]
    if problems:
        raise CCTError(f"{path} has a damaged or forged header: {'; '.join(problems)}")
    return meta

