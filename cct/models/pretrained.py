"""The official trained checkpoints (SHI-Labs/Compact-Transformers), by timm-style tag: where they are
published, and a download that checks a file before anything uses it.

A file is kept in torch hub's cache (`$TORCH_HOME/hub/checkpoints`, as `torch.hub.load_state_dict_from_url`
keeps its files) only once it has passed every check: its SHA-256 where one is recorded, a load with
`torch.load(weights_only=True)` (no code runs), and keys and shapes that fit the model after conversion. A file
that fails one is deleted and refused in one line. `CCT_WEIGHTS_URL` replaces the official prefix (a mirror).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CCTError
from .checkpoint import checkpoint_filter_fn, describe_mismatch, read_state_dict

OFFICIAL_URL = "http://ix.cs.uoregon.edu/~alih/compact-transformers"
URL_ENV = "CCT_WEIGHTS_URL"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class OfficialWeights:
    """One published checkpoint: its path under the official prefix and, where known, its SHA-256."""

    path: str
    sha256: str | None = None


# "<model>.<tag>" -> the checkpoint, with the paths the official implementation lists. No SHA-256 is published
# for them; a checksum added here is then checked on every download.
OFFICIAL_WEIGHTS: dict[str, OfficialWeights] = {
    "cct_7_3x1_32.official_cifar10_300ep":
        OfficialWeights("checkpoints/pretrained/cct_7_3x1_32_cifar10_300epochs.pth"),
    "cct_7_3x1_32_sine.official_cifar10_5000ep":
        OfficialWeights("checkpoints/pretrained/cct_7_3x1_32_sine_cifar10_5000epochs.pth"),
    "cct_7_3x1_32_c100.official_cifar100_300ep":
        OfficialWeights("checkpoints/pretrained/cct_7_3x1_32_cifar100_300epochs.pth"),
    "cct_7_3x1_32_sine_c100.official_cifar100_5000ep":
        OfficialWeights("checkpoints/pretrained/cct_7_3x1_32_sine_cifar100_5000epochs.pth"),
    "cct_7_7x2_224_sine.official_flowers102":
        OfficialWeights("checkpoints/pretrained/cct_7_7x2_224_flowers102.pth"),
    "cct_14_7x2_224.official_in1k":
        OfficialWeights("checkpoints/pretrained/cct_14_7x2_224_imagenet.pth"),
    "cct_14_7x2_384.official_in1k_ft384":
        OfficialWeights("checkpoints/finetuned/cct_14_7x2_384_imagenet.pth"),
    "cct_14_7x2_384_fl.official_in1k_ft_flowers102":
        OfficialWeights("checkpoints/finetuned/cct_14_7x2_384_flowers102.pth"),
}


def official_url(key: str, base: str | None = None) -> str:
    """The URL of an official checkpoint (`"<model>.<tag>"`), under `base`, else `$CCT_WEIGHTS_URL`, else the
    official prefix."""
    base = base or os.environ.get(URL_ENV) or OFFICIAL_URL
    return f"{base.rstrip('/')}/{OFFICIAL_WEIGHTS[key].path}"


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept: torch hub's checkpoint cache (honours `TORCH_HOME`)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path) -> None:
    """Fetch `url` into `target` through a temporary file beside it (an interrupted download leaves no file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310
            while chunk := response.read(_CHUNK):
                out.write(chunk)
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, ValueError) as e:
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        raise CCTError(f"cannot download {url} ({reason}): fetch it another way and pass the file instead, "
                       f"e.g. --set init=/path/to/{target.name}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_weights_file(path: Path, model: nn.Module, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Refuse a checkpoint unless it has the expected SHA-256 (when given), loads as tensors only and fits
    `model` after key conversion (position tables resampled, another head re-initialised).

    Args:
        path: the file to check.
        model: the model it must fit.
        sha256: the expected hex digest, or None to skip that check.

    Returns:
        The state dict fitted to `model`.
    """
    if sha256 is not None and (found := _sha256(path)) != sha256.lower():
        raise CCTError(f"{path} has SHA-256 {found}, expected {sha256}")
    state_dict = checkpoint_filter_fn(read_state_dict(path), model)
    problem = describe_mismatch(state_dict, model.state_dict())
    if problem:
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise CCTError(f"{path} does not fit {name}: {problem}")
    return state_dict


def fetch_official(key: str, model: nn.Module) -> Path:
    """The checked local file of an official checkpoint, downloaded into `cache_dir()` if not there yet.

    Args:
        key: `"<model>.<tag>"`, a key of `OFFICIAL_WEIGHTS`.
        model: a model of that architecture, which the file must fit.

    Returns:
        The cached file. A file that fails a check (see `check_weights_file`) is deleted and refused.
    """
    url = official_url(key)
    path = cache_dir() / Path(OFFICIAL_WEIGHTS[key].path).name
    if not path.is_file():
        _download(url, path)
    try:
        check_weights_file(path, model, OFFICIAL_WEIGHTS[key].sha256)
    except CCTError as e:
        path.unlink(missing_ok=True)
        raise CCTError(f"refused the checkpoint downloaded from {url} (deleted): {e}") from None
    return path


def load_official(model: nn.Module, key: str) -> nn.Module:
    """Load the official checkpoint `key` into `model` in place (downloaded and checked by `fetch_official`)."""
    model.load_state_dict(check_weights_file(fetch_official(key, model), model))
    return model
