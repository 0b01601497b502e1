"""The named variants of the CCT family, as data, registered with timm.

Names follow the official implementation: `cct_L_KxC_S` is L encoder layers, a tokenizer of C convolutions
of kernel K, input size S; `cvt_L_P_S` / `vit_L_P_S` use a P x P patch tokenizer (ViT-Lite has a class token,
CVT pools the sequence). `_sine` twins use a fixed sinusoidal position table; `_c100` and `_fl` are the
same architectures with CIFAR-100 and Flowers-102 heads; `_h32` has 32 hidden tokenizer channels (ours).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model

from .cct import CCT
from .checkpoint import checkpoint_filter_fn
from .pretrained import OFFICIAL_URL, OFFICIAL_WEIGHTS, load_official

# Encoder sizes of the paper: layers, heads, MLP ratio, width.
ENCODER_SIZES: dict[int, dict[str, Any]] = {
    2: dict(depth=2, num_heads=2, mlp_ratio=1.0, embed_dim=128),
    4: dict(depth=4, num_heads=2, mlp_ratio=1.0, embed_dim=128),
    6: dict(depth=6, num_heads=4, mlp_ratio=2.0, embed_dim=256),
    7: dict(depth=7, num_heads=4, mlp_ratio=2.0, embed_dim=256),
    14: dict(depth=14, num_heads=6, mlp_ratio=3.0, embed_dim=384),
}
PATCH_TOKENIZER = dict(kernel_size=4, stride=4, padding=0, n_conv_layers=1, conv_bias=True,
                       conv_activation=False, max_pool=False)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FLOWERS_MEAN, FLOWERS_STD = (0.4353, 0.3773, 0.2872), (0.2966, 0.2455, 0.2698)
POS_SUFFIXES = (("", "learnable"), ("_sine", "sine"))
# How `cct eval` / training evaluate image files (`cct.data.datasets.eval_transform`'s defaults): shorter side to
# size / 0.875 by bicubic resampling, then a central crop; CIFAR-sized (32 px) inputs are used whole.
EVAL_CROP_PCT, EVAL_INTERPOLATION = 0.875, "bicubic"

# Top-1 accuracy reported by the authors (official README / paper), for the model table.
PAPER_TOP1: dict[str, str] = {
    "cct_2_3x2_32": "89.17 (CIFAR-10, 200 ep)",
    "cct_4_3x2_32": "91.45 (CIFAR-10, 200 ep)",
    "cct_6_3x2_32": "93.56 (CIFAR-10, 200 ep)",
    "cct_7_3x2_32": "93.83 (CIFAR-10, 200 ep)",
    "cct_6_3x1_32": "94.81 (CIFAR-10, 200 ep); 95.29 (500 ep)",
    "cct_7_3x1_32": "96.53 (CIFAR-10, 300 ep)",
    "cct_7_3x1_32_sine": "97.48 (CIFAR-10, 1500 ep); 98.00 (5000 ep)",
    "cct_7_3x1_32_c100": "80.92 (CIFAR-100, 300 ep)",
    "cct_7_3x1_32_sine_c100": "82.72 (CIFAR-100, 1500 ep); 82.87 (5000 ep)",
    "cct_7_7x2_224_sine": "97.19 (Flowers-102, from scratch)",
    "cct_14_7x2_224": "80.67 (ImageNet-1k, 310 ep)",
    "cct_14_7x2_384": "82.71 (ImageNet-1k, 310+30 ep)",
    "cct_14_7x2_384_fl": "99.76 (Flowers-102, fine-tuned from ImageNet)",
}


def _build_variants() -> dict[str, dict[str, Any]]:
    variants: dict[str, dict[str, Any]] = {}
    cct_shapes = [(2, 3, 2, 32, 10), (4, 3, 2, 32, 10), (6, 3, 1, 32, 10), (6, 3, 2, 32, 10), (7, 3, 1, 32, 10),
                  (7, 3, 2, 32, 10), (7, 7, 2, 224, 102), (14, 7, 2, 224, 1000), (14, 7, 2, 384, 1000)]
    for size, kernel, n_conv, img, classes in cct_shapes:
        for suffix, pos in POS_SUFFIXES:
            variants[f"cct_{size}_{kernel}x{n_conv}_{img}{suffix}"] = dict(
                ENCODER_SIZES[size], kernel_size=kernel, n_conv_layers=n_conv, img_size=img,
                num_classes=classes, pos_embed=pos)
    for family, seq_pool in (("cvt", True), ("vit", False)):
        for size in (2, 4, 6, 7):
            for suffix, pos in POS_SUFFIXES:
                variants[f"{family}_{size}_4_32{suffix}"] = dict(
                    ENCODER_SIZES[size], **PATCH_TOKENIZER, seq_pool=seq_pool, img_size=32, num_classes=10,
                    pos_embed=pos)
    for alias, base, classes in (("cct_7_3x1_32_c100", "cct_7_3x1_32", 100),
                                 ("cct_7_3x1_32_sine_c100", "cct_7_3x1_32_sine", 100),
                                 ("cct_14_7x2_384_fl", "cct_14_7x2_384", 102)):
        variants[alias] = dict(variants[base], num_classes=classes)
    # This package's own variant, not the paper's: cct_2_3x2_32 with 32 instead of 64 hidden tokenizer channels,
    # which halves its most expensive layer (the second convolution): 245,995 parameters, ~25% faster training on
    # a CPU at the same CIFAR-10 accuracy in the `cifar10-fast` schedule (benchmarks/README.md).
    variants["cct_2_3x2_32_h32"] = dict(variants["cct_2_3x2_32"], conv_hidden_dim=32)
    return variants


VARIANTS: dict[str, dict[str, Any]] = _build_variants()


def _pretrained_cfg(arch: dict[str, Any]) -> dict[str, Any]:
    img = arch["img_size"]
    if img == 32:
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    elif arch["num_classes"] == 102:
        mean, std = FLOWERS_MEAN, FLOWERS_STD
    else:
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return dict(input_size=(3, img, img), mean=mean, std=std, num_classes=arch["num_classes"],
                interpolation=EVAL_INTERPOLATION, crop_pct=1.0 if img == 32 else EVAL_CROP_PCT, crop_mode="center",
                first_conv="tokenizer.convs.0.conv", classifier="head", license="apache-2.0",
                paper_ids="arXiv:2104.05704")


# Weights trained with this package and shipped inside it: "<model>.<tag>" -> file in cct/weights/.
# The first tag of a model is its default (`pretrained=True`); each file's header records its classes,
# normalisation and the run it came from, and a JSON file beside it the metrics of that run.
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
SHIPPED_WEIGHTS: dict[str, str] = {
    "cct_2_3x2_32.cifar10_keras": "cct_2_3x2_32.cifar10_keras.safetensors",
    "cct_2_3x2_32_h32.cifar10_fast": "cct_2_3x2_32_h32.cifar10_fast.safetensors",
    "cct_4_3x2_32.cifar10_hour": "cct_4_3x2_32.cifar10_hour.safetensors",
}


def shipped_weights(model: str, tag: str | None = None) -> Path | None:
    """The shipped weights file of `model` (its default tag when `tag` is None), if there is one. A tag may name
    the dataset alone: `cifar10` finds `cifar10` itself, else the model's first `cifar10_*` tag."""
    tags = [key for key, file in SHIPPED_WEIGHTS.items()
            if key.split(".")[0] == model and (WEIGHTS_DIR / file).is_file()]
    if tag is not None:
        tags = [key for key in tags if key.split(".", 1)[1] == tag] or \
            [key for key in tags if key.split(".", 1)[1].startswith(f"{tag}_")]
    return WEIGHTS_DIR / SHIPPED_WEIGHTS[tags[0]] if tags else None


def _cfgs() -> dict[str, dict[str, Any]]:
    """Every variant's tags: shipped weights first (the default tag where there are any), then the official
    checkpoints (their `url` as published; `load_official` fetches and checks them), else an untagged entry."""
    cfgs: dict[str, dict[str, Any]] = {}
    for name, arch in VARIANTS.items():
        tagged = {key: dict(_pretrained_cfg(arch), file=str(WEIGHTS_DIR / file))
                  for key, file in SHIPPED_WEIGHTS.items()
                  if key.split(".")[0] == name and (WEIGHTS_DIR / file).is_file()}
        tagged.update({key: dict(_pretrained_cfg(arch), url=f"{OFFICIAL_URL}/{weights.path}",
                                 origin_url="https://github.com/SHI-Labs/Compact-Transformers")
                       for key, weights in OFFICIAL_WEIGHTS.items() if key.split(".")[0] == name})
        cfgs.update(tagged or {name: _pretrained_cfg(arch)})
    return cfgs


def official_key(name: str, tag: str | None) -> str | None:
    """The `OFFICIAL_WEIGHTS` key that `timm.create_model(name[.tag], pretrained=True)` loads, if any."""
    if not tag:
        default = get_pretrained_cfg(name)
        tag = default.tag if default is not None else None
    key = f"{name}.{tag}"
    return key if key in OFFICIAL_WEIGHTS else None


# timm reads this module-level table when the entrypoints below are registered.
default_cfgs = generate_default_cfgs(_cfgs())


def _register(name: str) -> None:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> CCT:
        # features_only models are the model itself behind timm's getter, which calls forward_intermediates
        # (every block by default: the small variants have fewer blocks than timm's default of the last 4)
        feature_cfg = dict(feature_cls="getter", out_indices=VARIANTS[name]["depth"])
        # timm passes the requested tag as `pretrained_cfg`; official checkpoints are fetched and checked here
        # rather than by timm's downloader (which neither checks a SHA-256 nor deletes a bad file)
        tag = kwargs.get("pretrained_cfg")
        by_tag = (tag is None or isinstance(tag, str)) and not kwargs.get("pretrained_cfg_overlay")
        official = official_key(name, tag) if pretrained and by_tag else None
        model = build_model_with_cfg(CCT, name, pretrained and official is None,
                                     pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg,
                                     **{**VARIANTS[name], **kwargs})
        return load_official(model, official) if official else model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: {VARIANTS[name]}"
    register_model(entrypoint)


for _name in VARIANTS:
    _register(_name)
