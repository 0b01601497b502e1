"""Hugging Face Hub model folders, in timm's own layout (config.json + model.safetensors, written by timm's
`save_for_hf`), plus a model card. Such a folder loads with `timm.create_model("local-dir:DIR", pretrained=True)`
as well as with `cct.create_model(pretrained=DIR)`, `cct predict DIR` and `cct eval DIR`, with no custom code."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import timm
from timm.models import save_for_hf
from torch import nn

from ..errors import CCTError
from .complexity import count_macs, count_params
from .space import write_space_files

CITATION = """@article{hassani2021escaping,
  title   = {Escaping the Big Data Paradigm with Compact Transformers},
  author  = {Ali Hassani and Steven Walton and Nikhil Shah and Abulikemu Abuduweili and Jiachen Li and
             Humphrey Shi},
  journal = {arXiv preprint arXiv:2104.05704},
  year    = {2021}
}"""


def is_hub_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding a timm/Hub `config.json` and weights."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


HUB_PREFIX = "hf-hub:"
HUB_FILES = ("config.json", "model.safetensors", "README.md")


def weights_of_hub_folder(path: str | os.PathLike) -> Path:
    """The `model.safetensors` of a Hub folder; a folder with pickled weights only (`pytorch_model.bin`) is
    refused, like any file that could run code when loaded."""
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise CCTError(f"{path} holds no model.safetensors: pickled weights (pytorch_model.bin) are not loaded")
    return weights


def download_hub_model(repo_id: str) -> Path:
    """The local snapshot of the Hub model `repo_id` (`ORG/NAME`), through huggingface_hub's cache.

    Only the files a cct model folder has are fetched (never a pickle); `HF_HUB_OFFLINE=1` uses the cache alone.

    Args:
        repo_id: the Hub repository, `ORG/NAME`.

    Returns:
        The snapshot folder.
    """
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(HUB_FILES)))
    except Exception as e:  # offline, missing repo, auth and HTTP errors come as many different types
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CCTError(f"cannot fetch {HUB_PREFIX}{repo_id} from the Hugging Face Hub ({type(e).__name__}): "
                       f"{reason}") from None
    if not is_hub_folder(folder):
        raise CCTError(f"{HUB_PREFIX}{repo_id} is not a model folder: it has no config.json")
    weights_of_hub_folder(folder)
    return folder


def load_hub_folder(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model of a Hub folder through timm's own `local-dir:` loader; return it (eval) and metadata."""
    path = Path(path)
    weights_of_hub_folder(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CCTError(f"{path / 'config.json'} is not a readable model config: {e}") from None
    name = config.get("architecture")
    if name not in timm.list_models():
        raise CCTError(f"{path} holds an unknown architecture {name!r}")
    try:
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise CCTError(f"cannot load {path}: {str(e).splitlines()[0][:200]}") from None
    cfg = config.get("pretrained_cfg", {})
    meta = dict(model=name, num_classes=config["num_classes"], img_size=list(model.img_size),
                classes=config.get("label_names") or [str(i) for i in range(config["num_classes"])],
                mean=cfg.get("mean"), std=cfg.get("std"), dataset=config.get("dataset", ""))
    return model.eval(), meta


def _model_card(model: nn.Module, meta: dict[str, Any], summary: dict[str, Any] | None,
                recipe: dict[str, Any] | None) -> str:
    name = meta["model"]
    params, macs = count_params(model), count_macs(model)
    if summary:
        accuracy = (f"{summary['final_top1']:.2f}% top-1 / {summary['final_top5']:.2f}% top-5 on the "
                    f"{summary['dataset']} test set, measured at the end of training by `cct train` "
                    f"(re-measure with `cct eval <this folder>`)")
    else:
        accuracy = "not recorded: measure it with `cct eval <this folder> --dataset NAME`"
    recipe_text = json.dumps(recipe, indent=2) if recipe else "not recorded"
    classes = ", ".join(meta["classes"][:20]) + (" ..." if len(meta["classes"]) > 20 else "")
    init = next((v for v in ((summary or {}).get("init"), (recipe or {}).get("init")) if v and v != "none"), None)
    origin = f"fine-tuned from the weights `{init}`" if init else "trained from scratch"
    init_text = f"`{init}`" if init else "random (from scratch)"
    return f"""---
license: apache-2.0
library_name: timm
tags: [image-classification, timm, cct, compact-transformers]
datasets: [{meta.get('dataset') or 'unknown'}]
---
# {name} trained with cct

A Compact Convolutional Transformer (Hassani et al., 2021) {origin} with
[cct](https://pypi.org/project/compact-transformers/) (`pip install compact-transformers`).

| | |
|---|---|
| architecture | `{name}` |
| parameters | {params:,} |
| MACs per image | {macs / 1e9:.3f} G at {model.img_size[0]} px |
| input | {model.img_size[0]}x{model.img_size[1]} RGB, normalised with mean {meta['mean']} and std {meta['std']} |
| classes | {len(meta['classes'])}: {classes} |
| data | {meta.get('dataset') or 'unknown'} |
| accuracy | {accuracy} |
| initial weights | {init_text} |

## Use

```python
import timm, cct  # importing cct registers the architecture with timm
model = timm.create_model("local-dir:path/to/this/folder", pretrained=True).eval()
```
or `cct predict path/to/this/folder image.jpg`.

## Training recipe

```json
{recipe_text}
```

## Citation

```bibtex
{CITATION}
```
"""


def export_hub_folder(model: nn.Module, meta: dict[str, Any], out_dir: Path,
                      summary: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None) -> Path:
    """Write `out_dir` as a Hub model folder (config.json, model.safetensors, README.md model card).
    It is assembled in a temporary folder and moved into place, so a failure leaves nothing half-written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CCTError(f"{out_dir} exists and is not empty: choose a new folder")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as e:
        raise CCTError(f"cannot write {out_dir}: {e.strerror or e}") from None
    try:
        model_config = dict(label_names=list(meta["classes"]), dataset=meta.get("dataset", ""))
        # the run's record, so that `cct eval FOLDER` repeats its held-out part and test-time views
        model_config.update((key, value) for key, value in (("summary", summary), ("recipe", recipe)) if value)
        model_args = dict(num_classes=model.num_classes, img_size=list(model.img_size))
        data_config = dict(input_size=(3, *model.img_size), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                           interpolation="bicubic", crop_pct=1.0, crop_mode="center")
        save_for_hf(model, str(staging), model_config=model_config, model_args=model_args,
                    safe_serialization=True, data_config=data_config)
        (staging / "README.md").write_text(_model_card(model, meta, summary, recipe))
        write_space_files(staging)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except OSError as e:  # e.g. the disk filled up
        shutil.rmtree(staging, ignore_errors=True)
        raise CCTError(f"cannot write {out_dir}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def push_to_hub(folder: Path, repo_id: str, token: str | None = None) -> str:
    """Upload a Hub folder with huggingface_hub; any network or auth failure becomes one clear line."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Add model (cct)")
    except Exception as e:  # network, DNS, auth and HTTP errors come as many different types
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CCTError(f"cannot push to the Hugging Face Hub ({type(e).__name__}): {reason}") from None
    return str(getattr(info, "commit_url", repo_id))
