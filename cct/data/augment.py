"""Batched training augmentation: every op runs on the whole batch, each image with its own random draw.

Why not `torchvision.transforms.v2` per image: on a CPU the per-image Python transforms cost more than the
model itself (a per-image RandAugment of a CIFAR batch takes about a third of the smallest CCT's training step;
docs/cpu-speed.md), and they need DataLoader worker processes to hide that cost. Here
each op is a handful of tensor kernels over the batch (or over the subset of the batch that drew it,
gathered with `index_select` and scattered back with `index_copy_`), so the full CIFAR pipeline (crop,
flip, AutoAugment, Mixup/CutMix, random erasing, normalise) costs a few milliseconds per batch and runs on
whatever device the batch lives on (CPU or GPU).

Semantics follow torchvision (ops, magnitude bins, signed magnitudes, fill 0, nearest interpolation for the
geometric ops, uint8 rounding after every op) and timm (RandAugment strings, Mixup/CutMix "batch" mode,
random erasing "pixel" mode). Images travel between ops as float32 tensors holding uint8 values (0..255,
integral), truncated or rounded wherever torchvision's uint8 kernels truncate or round, so results match
torchvision to within one grey level. All randomness comes from the `torch.Generator` passed to
`BatchAugment.__call__`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cct.errors import UsageError

__all__ = ["OPS", "BatchAugment", "apply_op", "crop_flip", "erase", "normalize", "resized_crop"]

#: Names of the ops understood by `apply_op`: torchvision's AutoAugment family + timm's SolarizeAdd.
OPS: tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
    "SolarizeAdd",
)
_OP_ID = {name: i for i, name in enumerate(OPS)}
_GEOMETRIC = frozenset(_OP_ID[n] for n in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"))


# ----------------------------------------------------------------------------------------------------
# Per-op kernels.  x: float [n, C, H, W] holding uint8 values; p: float64 [n] per-sample native argument.
# ----------------------------------------------------------------------------------------------------


def _col(p: torch.Tensor) -> torch.Tensor:
    return p.to(torch.float32).view(-1, 1, 1, 1)


def _grayscale_floor(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze_(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # torchvision: image * f + other * (1 - f), clamped, then truncated by the cast to uint8.
    f = factor.view(-1, 1, 1, 1)
    out = x * f.to(torch.float32)
    out.addcmul_(other, (1.0 - f).to(torch.float32))
    return out.clamp_(0, 255).floor_()


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _col(f)).clamp_(0, 255).floor_()


def _color(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _grayscale_floor(x), f)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _grayscale_floor(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _sharpness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    # torchvision: blur with [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (rounded), blend the interior, keep
    # the border.
    # The 3x3 sum is done with shifted adds (exact on integers), much cheaper than a 1-channel conv2d.
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return x
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = x.clone()
    inner = out[..., 1:-1, 1:-1]
    blur = box.add_(inner, alpha=4.0).div_(13.0).round_()
    inner.addcmul_(blur.sub_(inner), (1.0 - f.view(-1, 1, 1, 1)).to(x.dtype))
    return out.clamp_(0, 255).floor_()


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    q = torch.pow(2.0, 8.0 - bits.clamp(0, 8)).to(x.dtype).view(-1, 1, 1, 1)
    return x.div(q).floor_().mul_(q)


def _solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= _col(threshold), 255.0 - x, x)


def _solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    # timm's SolarizeAdd: pixels below 128 get `add` added (saturating at 255).
    return torch.where(x < 128.0, (x + _col(add)).clamp_(max=255.0), x)


def _autocontrast(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    same = hi == lo
    inv_scale = torch.where(same, 1.0, (hi - lo).mul_(1.0 / 255.0))
    lo = torch.where(same, 0.0, lo)
    return (x - lo).div_(inv_scale).clamp_(0, 255).floor_()


def _equalize(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    # PIL's / torchvision's equalisation LUT, one histogram per (image, channel), all in one bincount.
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).to(torch.int64)
    offsets = torch.arange(n * c, device=x.device).mul_(256).unsqueeze_(1)
    hist = torch.bincount((flat + offsets).view(-1), minlength=n * c * 256).view(n * c, 256)
    cum = hist.cumsum(dim=1)
    last = cum.argmax(dim=1, keepdim=True)  # first bin reaching the total = last non-empty bin
    step = (h * w - hist.gather(1, last)).div_(255, rounding_mode="floor")
    lut = (cum[:, :-1] + step.div(2, rounding_mode="floor")).div_(step.clamp(min=1), rounding_mode="floor")
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut.clamp_(0, 255)], dim=1)
    out = lut.gather(1, flat).to(x.dtype)
    out = torch.where(step > 0, out, x.reshape(n * c, h * w))
    return out.view(n, c, h, w)


def _invert(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return 255.0 - x


def _identity(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return x


_COLOUR_FNS = {
    _OP_ID["Identity"]: _identity,
    _OP_ID["Brightness"]: _brightness,
    _OP_ID["Color"]: _color,
    _OP_ID["Contrast"]: _contrast,
    _OP_ID["Sharpness"]: _sharpness,
    _OP_ID["Posterize"]: _posterize,
    _OP_ID["Solarize"]: _solarize,
    _OP_ID["AutoContrast"]: _autocontrast,
    _OP_ID["Equalize"]: _equalize,
    _OP_ID["Invert"]: _invert,
    _OP_ID["SolarizeAdd"]: _solarize_add,
}


def _geometric_theta(op: torch.Tensor, p: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse affine matrices [n, 2, 3] (float64, pixel units, origin at the image centre), as torchvision's
    `_get_inverse_affine_matrix` builds them for its AutoAugment calls of `affine`/`rotate`."""
    n = op.shape[0]
    zero, one = torch.zeros_like(p), torch.ones_like(p)
    rad = torch.deg2rad(-torch.remainder(p, 360.0))
    cos, sin = torch.cos(rad), torch.sin(rad)
    is_ = {name: op == _OP_ID[name] for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")}
    # ShearX (centre (0, 0)): src_x = x + m * (y + h/2);  ShearY: src_y = y + m * (x + w/2)
    # Translate: src = dst - t;  Rotate by a degrees (counter-clockwise): rotation by -a about the centre.
    a00 = torch.where(is_["Rotate"], cos, one)
    a01 = torch.where(is_["ShearX"], p, torch.where(is_["Rotate"], sin, zero))
    a02 = torch.where(is_["ShearX"], p * (h * 0.5), torch.where(is_["TranslateX"], -p, zero))
    a10 = torch.where(is_["ShearY"], p, torch.where(is_["Rotate"], -sin, zero))
    a11 = torch.where(is_["Rotate"], cos, one)
    a12 = torch.where(is_["ShearY"], p * (w * 0.5), torch.where(is_["TranslateY"], -p, zero))
    return torch.stack([a00, a01, a02, a10, a11, a12], dim=1).view(n, 2, 3)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp with zero fill, each image with its own inverse matrix (as torchvision's
    `_affine_grid` + `grid_sample` do for one image: pixel-centre coordinates about the image centre,
    normalised by half the size, align_corners=False)."""
    n, _, h, w = x.shape
    dev = x.device
    bx = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev).view(1, 1, w)
    by = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).view(1, h, 1)
    scale = torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32, device=dev)
    r = theta.to(torch.float32).div(scale.view(1, 2, 1))  # row 0 -> grid x, row 1 -> grid y
    r = r.view(n, 2, 3, 1, 1)
    # grid = [bx, by, 1] @ r^T, as separable outer sums (a batched matmul is slow for small batches on a CPU)
    gx = bx * r[:, 0, 0] + (by * r[:, 0, 1] + r[:, 0, 2])
    gy = bx * r[:, 1, 0] + (by * r[:, 1, 1] + r[:, 1, 2])
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _apply_ops(x: torch.Tensor, op: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Applies op `op[i]` (index into OPS; -1 = none) with argument `p[i]` to image `i`, in place.

    The images that drew an op are gathered once, sorted by op, so that each op runs on one contiguous slice
    (and the geometric ops, adjacent in OPS, on one slice with a single warp); then scattered back."""
    counts = torch.bincount(op + 1, minlength=len(OPS) + 1).tolist()
    skip = counts[0] + counts[_OP_ID["Identity"] + 1]
    if skip == op.shape[0]:
        return x
    order = torch.argsort(op, stable=True)[skip:]
    xs, ps = x.index_select(0, order), p.index_select(0, order)
    start = 0
    geo_start = geo_end = 0
    for k in range(_OP_ID["Identity"] + 1, len(OPS)):
        c = counts[k + 1]
        if not c:
            continue
        if k in _GEOMETRIC:
            geo_start = start if geo_end == 0 else geo_start
            geo_end = start + c
        else:
            seg = xs[start : start + c]
            seg.copy_(_COLOUR_FNS[k](seg, ps[start : start + c]))
        start += c
    if geo_end:
        ops = op.index_select(0, order[geo_start:geo_end])
        theta = _geometric_theta(ops, ps[geo_start:geo_end], x.shape[-2], x.shape[-1])
        xs[geo_start:geo_end] = _warp(xs[geo_start:geo_end], theta)
    return x.index_copy_(0, order, xs)


def apply_op(
    images: torch.Tensor, op: str, arg: float | Sequence[float] | torch.Tensor = 0.0
) -> torch.Tensor:
    """Applies one named op to a batch of images, each with its own argument (for tests and ad-hoc use).

    `images`: uint8, or float holding uint8 values, [n, C, H, W]; the result has the same dtype.
    `arg` (scalar or one per image) is the op's *native* argument, the one torchvision's functional takes:
    factor for Brightness/Color/Contrast/Sharpness, bits for Posterize, threshold in pixel values for
    Solarize, pixels for TranslateX/Y, degrees (counter-clockwise) for Rotate, the shear factor m for ShearX/Y
    (torchvision's `affine(shear=degrees(atan(m)), center=[0, 0])`), the added value for SolarizeAdd;
    ignored by Identity/AutoContrast/Equalize/Invert.
    """
    if op not in _OP_ID:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    n = images.shape[0]
    dev = images.device
    p = torch.as_tensor(arg, dtype=torch.float64, device=dev).expand(n).clone()
    x = images.to(torch.float32, copy=True)
    x = _apply_ops(x, torch.full((n,), _OP_ID[op], dtype=torch.int64, device=dev), p)
    return x.round_().clamp_(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else x


# ----------------------------------------------------------------------------------------------------
# Policies: each turns a generator into per-image (op, argument) columns, one per sequential stage.
# ----------------------------------------------------------------------------------------------------


def _tv_magnitudes(
    op: str, num_bins: int, h: int, w: int, wide: bool = False
) -> tuple[torch.Tensor | None, bool]:
    """torchvision's magnitude bins (float32 linspace, as torchvision builds them) and sign for one op."""
    lin = torch.linspace
    if wide:  # TrivialAugmentWide's augmentation space
        table = {
            "ShearX": lin(0.0, 0.99, num_bins),
            "ShearY": lin(0.0, 0.99, num_bins),
            "TranslateX": lin(0.0, 32.0, num_bins),
            "TranslateY": lin(0.0, 32.0, num_bins),
            "Rotate": lin(0.0, 135.0, num_bins),
            "Posterize": 6,
        }
        enh = lin(0.0, 0.99, num_bins)
    else:
        table = {
            "ShearX": lin(0.0, 0.3, num_bins),
            "ShearY": lin(0.0, 0.3, num_bins),
            "TranslateX": lin(0.0, 150.0 / 331.0 * w, num_bins),
            "TranslateY": lin(0.0, 150.0 / 331.0 * h, num_bins),
            "Rotate": lin(0.0, 30.0, num_bins),
            "Posterize": 4,
        }
        enh = lin(0.0, 0.9, num_bins)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return enh, True
    if op == "Posterize":
        span = table["Posterize"]
        return (8 - (torch.arange(num_bins) / ((num_bins - 1) / span))).round().int().double(), False
    if op == "Solarize":
        return lin(1.0, 0.0, num_bins), False
    if op in table:
        return table[op], True
    return None, False


def _tv_native(op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """torchvision's signed magnitude -> the op's native argument (`_apply_image_or_video_transform`)."""
    enh = (
        (op == _OP_ID["Brightness"])
        | (op == _OP_ID["Color"])
        | (op == _OP_ID["Contrast"])
        | (op == _OP_ID["Sharpness"])
    )
    trans = (op == _OP_ID["TranslateX"]) | (op == _OP_ID["TranslateY"])
    out = torch.where(enh, 1.0 + m, m)
    out = torch.where(trans | (op == _OP_ID["Posterize"]), torch.trunc(m), out)
    return torch.where(op == _OP_ID["Solarize"], 255.0 * m, out)


_AA_POLICIES: dict[str, list[tuple[tuple[str, float, int | None], tuple[str, float, int | None]]]] = {
    "imagenet": [
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ],
    "cifar10": [
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ],
}


def _rand(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device, dtype=torch.float64)


class _AutoAugment:
    """torchvision AutoAugment: one of 25 sub-policies per image, two ops each with its own probability."""

    def __init__(self, policy: str, h: int, w: int) -> None:
        table = _AA_POLICIES[policy]
        ops, probs, mags, signed = [], [], [], []
        for sub in table:
            for name, prob, bin_ in sub:
                mag, sgn = _tv_magnitudes(name, 10, h, w)
                ops.append(_OP_ID[name])
                probs.append(prob)
                mags.append(float(mag[bin_]) if mag is not None and bin_ is not None else 0.0)
                signed.append(sgn)
        shape = (len(table), 2)
        self.op = torch.tensor(ops).view(shape)
        self.prob = torch.tensor(probs, dtype=torch.float64).view(shape)
        self.mag = torch.tensor(mags, dtype=torch.float64).view(shape)
        self.signed = torch.tensor(signed).view(shape)
        self._dev: torch.device | None = None

    def _to(self, device: torch.device) -> None:
        if self._dev != device:
            self.op, self.prob, self.mag, self.signed = (
                t.to(device) for t in (self.op, self.prob, self.mag, self.signed)
            )
            self._dev = device

    def stages(self, n: int, gen: torch.Generator, device: torch.device):
        self._to(device)
        sub = torch.randint(0, self.op.shape[0], (n,), generator=gen, device=device)
        u = _rand(4 * n, gen, device).view(4, n)
        out = []
        for s in range(2):
            op = self.op[sub, s]
            apply = u[s] <= self.prob[sub, s]
            neg = self.signed[sub, s] & (u[2 + s] <= 0.5)
            m = torch.where(neg, -self.mag[sub, s], self.mag[sub, s])
            out.append((torch.where(apply, op, -1), _tv_native(op, m)))
        return out


class _TrivialAugment:
    """torchvision TrivialAugmentWide: one op per image, uniform op and magnitude bin (of 31), random sign."""

    NAMES = OPS[:OPS.index("Invert")]  # Identity .. Equalize, in torchvision's order

    def __init__(self, h: int, w: int, num_bins: int = 31) -> None:
        rows, signed = [], []
        for name in self.NAMES:
            mag, sgn = _tv_magnitudes(name, num_bins, h, w, wide=True)
            rows.append(mag.double() if mag is not None else torch.zeros(num_bins, dtype=torch.float64))
            signed.append(sgn)
        self.mag = torch.stack(rows)
        self.signed = torch.tensor(signed)
        self.ids = torch.tensor([_OP_ID[n] for n in self.NAMES])
        self.num_bins = num_bins

    def stages(self, n: int, gen: torch.Generator, device: torch.device):
        if self.mag.device != device:
            self.mag, self.signed, self.ids = self.mag.to(device), self.signed.to(device), self.ids.to(device)
        k = torch.randint(0, len(self.NAMES), (n,), generator=gen, device=device)
        b = torch.randint(0, self.num_bins, (n,), generator=gen, device=device)
        neg = self.signed[k] & (_rand(n, gen, device) <= 0.5)
        m = self.mag[k, b]
        op = self.ids[k]
        return [(op, _tv_native(op, torch.where(neg, -m, m)))]


# timm RandAugment: op name -> (base op, level-to-argument rule)
_TIMM_OPS = {
    "AutoContrast": ("AutoContrast", "none"),
    "Equalize": ("Equalize", "none"),
    "Invert": ("Invert", "none"),
    "Rotate": ("Rotate", "rotate"),
    "Posterize": ("Posterize", "posterize"),
    "PosterizeIncreasing": ("Posterize", "posterize_inc"),
    "Solarize": ("Solarize", "solarize"),
    "SolarizeIncreasing": ("Solarize", "solarize_inc"),
    "SolarizeAdd": ("SolarizeAdd", "solarize_add"),
    "Color": ("Color", "enhance"),
    "ColorIncreasing": ("Color", "enhance_inc"),
    "Contrast": ("Contrast", "enhance"),
    "ContrastIncreasing": ("Contrast", "enhance_inc"),
    "Brightness": ("Brightness", "enhance"),
    "BrightnessIncreasing": ("Brightness", "enhance_inc"),
    "Sharpness": ("Sharpness", "enhance"),
    "SharpnessIncreasing": ("Sharpness", "enhance_inc"),
    "ShearX": ("ShearX", "shear"),
    "ShearY": ("ShearY", "shear"),
    "TranslateXRel": ("TranslateX", "translate_rel_x"),
    "TranslateYRel": ("TranslateY", "translate_rel_y"),
}
_TIMM_RAND = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
_TIMM_RAND_INC = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
_RULES = (
    "none",
    "rotate",
    "posterize",
    "posterize_inc",
    "solarize",
    "solarize_inc",
    "solarize_add",
    "enhance",
    "enhance_inc",
    "shear",
    "translate_rel_x",
    "translate_rel_y",
)


class _RandAugment:
    """timm RandAugment from a config string such as `rand-m9-n2-mstd0.5` (keys m, n, mstd, mmax, p, inc).

    Per image and layer: an op drawn uniformly (with replacement), applied with probability p (0.5), magnitude
    `m + mstd * N(0, 1)` (uniform in [0, m] if mstd > 100) clipped to [0, mmax], mapped to the op's argument
    with timm's level rules.  Ops are timm's (PIL) ops with torchvision's tensor semantics: nearest
    interpolation and fill 0 for the geometric ops (timm: PIL, random bilinear/bicubic, mean-colour fill).
    """

    def __init__(self, config: str, h: int, w: int) -> None:
        parts = config.split("-")
        if parts[0] != "rand":
            raise UsageError(f"RandAugment string must start with 'rand-': {config!r}")
        self.m, self.n, self.mstd, self.mmax, self.p, inc = 10.0, 2, 0.0, 10.0, 0.5, False
        for part in parts[1:]:
            key = "".join(ch for ch in part if not (ch.isdigit() or ch == "."))
            val = part[len(key) :]
            if not val:
                raise UsageError(f"bad RandAugment option {part!r} in {config!r}")
            if key == "m":
                self.m = float(int(val))
            elif key == "n":
                self.n = int(val)
            elif key == "mstd":
                self.mstd = float(val) if float(val) <= 100 else math.inf
            elif key == "mmax":
                self.mmax = float(int(val))
            elif key == "p":
                self.p = float(val)
            elif key == "inc":
                inc = bool(int(val))
            else:
                raise UsageError(
                    f"unknown RandAugment option {part!r} in {config!r} (known: m, n, mstd, mmax, p, inc)"
                )
        names = _TIMM_RAND_INC if inc else _TIMM_RAND
        self.ops = torch.tensor([_OP_ID[_TIMM_OPS[k][0]] for k in names])
        self.rules = torch.tensor([_RULES.index(_TIMM_OPS[k][1]) for k in names])
        self.h, self.w = h, w

    def _args(self, rule: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        r = {name: rule == i for i, name in enumerate(_RULES)}
        frac = level / 10.0
        post = torch.floor(frac * 4)
        sol = torch.clamp(torch.floor(frac * 256), max=256)
        out = torch.zeros_like(level)
        out = torch.where(r["rotate"], sign * frac * 30.0, out)
        out = torch.where(r["posterize"], post, out)
        out = torch.where(r["posterize_inc"], 4 - post, out)
        out = torch.where(r["solarize"], sol, out)
        out = torch.where(r["solarize_inc"], 256 - sol, out)
        out = torch.where(r["solarize_add"], torch.clamp(torch.floor(frac * 110), max=128), out)
        out = torch.where(r["enhance"], frac * 1.8 + 0.1, out)
        out = torch.where(r["enhance_inc"], torch.clamp(1.0 + sign * frac * 0.9, min=0.1), out)
        out = torch.where(r["shear"], sign * frac * 0.3, out)
        out = torch.where(r["translate_rel_x"], sign * frac * 0.45 * self.w, out)
        return torch.where(r["translate_rel_y"], sign * frac * 0.45 * self.h, out)

    def stages(self, n: int, gen: torch.Generator, device: torch.device):
        if self.ops.device != device:
            self.ops, self.rules = self.ops.to(device), self.rules.to(device)
        out = []
        for _ in range(self.n):
            k = torch.randint(0, len(self.ops), (n,), generator=gen, device=device)
            u = _rand(3 * n, gen, device).view(3, n)
            if math.isinf(self.mstd):
                level = u[2] * self.m
            elif self.mstd > 0:
                level = self.m + self.mstd * torch.randn(n, generator=gen, device=device, dtype=torch.float64)
            else:
                level = torch.full((n,), self.m, dtype=torch.float64, device=device)
            level = level.clamp(0.0, self.mmax)
            sign = torch.where(u[1] > 0.5, -1.0, 1.0).to(torch.float64)
            op = torch.where(u[0] <= self.p, self.ops[k], -1)
            out.append((op, self._args(self.rules[k], level, sign)))
        return out


# ----------------------------------------------------------------------------------------------------
# Crops, erasing, normalisation
# ----------------------------------------------------------------------------------------------------


def _aa_weights(
    start: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """[n, size_out, size_in] resampling matrices for a bilinear resize of the window [start, start+length)
    to size_out pixels, with antialiasing when shrinking (the triangle filter widened by the scale, as
    `interpolate(mode="bilinear", antialias=True)` does).  `flip` mirrors the output."""
    dev = start.device
    scale = (length.to(torch.float64) / size_out).view(-1, 1, 1)
    support = scale.clamp(min=1.0)
    i = torch.arange(size_out, device=dev, dtype=torch.float64).view(1, -1, 1)
    if flip is not None:
        i = torch.where(flip.view(-1, 1, 1), size_out - 1 - i, i)
    centre = start.to(torch.float64).view(-1, 1, 1) + scale * (i + 0.5)
    j = torch.arange(size_in, device=dev, dtype=torch.float64).view(1, 1, -1)
    wgt = (1.0 - (j + 0.5 - centre).abs() / support).clamp_(min=0.0)
    inside = (j >= start.view(-1, 1, 1)) & (j < (start + length).view(-1, 1, 1))
    wgt = wgt * inside
    return (wgt / wgt.sum(dim=2, keepdim=True)).to(torch.float32)


def resized_crop(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    size: int,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crops box i (top, left, height, width) of each image and resizes it to size x size (bilinear,
    antialias=True like torchvision v2's default), optionally mirrored; returns float holding rounded uint8
    values.  Done as two batched matrix products, so every image can have its own box."""
    x = images.to(torch.float32)
    _, _, h, w = x.shape
    ry = _aa_weights(top, height, h, size)
    rx = _aa_weights(left, width, w, size, flip)
    out = torch.matmul(torch.matmul(ry.unsqueeze(1), x), rx.transpose(1, 2).unsqueeze(1))
    return out.round_().clamp_(0, 255)


def _box_mask(
    shape: torch.Size, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor, width: torch.Tensor
) -> torch.Tensor:
    """[n, 1, H, W] bool, True inside box i (top, left, height, width) of image i."""
    h, w = shape[-2:]
    rows = torch.arange(h, device=top.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=top.device).view(1, 1, 1, w)
    t, le = top.view(-1, 1, 1, 1), left.view(-1, 1, 1, 1)
    return (
        (rows >= t)
        & (rows < t + height.view(-1, 1, 1, 1))
        & (cols >= le)
        & (cols < le + width.view(-1, 1, 1, 1))
    )


def erase(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """Returns images with box i (top, left, height, width; height 0 = none) of image i replaced by the same
    pixels of `values` (broadcastable to images): torchvision's `erase`, batched with per-image boxes."""
    mask = _box_mask(images.shape, top, left, height, width)
    return torch.where(mask, values.to(images.dtype), images)


def crop_flip(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    size: int,
    flip: torch.Tensor,
    padding: int = 0,
) -> torch.Tensor:
    """Zero-pads every side by `padding`, crops size x size at (top, left) of the padded image i (per-image
    offsets) and mirrors the images where `flip` is set: torchvision's pad + crop + hflip.

    As one gather, except for large crops on a CPU: the gather reads an int64 index per output pixel, eight times
    the bytes it copies, so from about 100 px up one slice per image (a few microseconds of Python each) is faster
    (`benchmarks/loader.py` feeds 128 and 224 px crops through it). The slices keep a channels-last batch (file
    datasets deliver them so) in its layout, so that its conversion to channels-last floats does not transpose."""
    slices = images.device.type == "cpu" and size >= 96
    src = images if slices else images.contiguous()
    if padding:
        src = F.pad(src, (padding, padding, padding, padding))
    return (_crop_flip_slices if slices else _crop_flip_gather)(src, top, left, size, flip)


def _crop_flip_slices(src: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int,
                      flip: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if src.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((len(top), src.shape[1], size, size), dtype=src.dtype, device=src.device, memory_format=fmt)
    for i, (y, x, mirror) in enumerate(zip(top.tolist(), left.tolist(), flip.tolist(), strict=True)):
        crop = src[i, :, y : y + size, x : x + size]
        out[i].copy_(crop.flip(-1) if mirror else crop)
    return out


def _crop_flip_gather(src: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int,
                      flip: torch.Tensor) -> torch.Tensor:
    b, c, hp, wp = src.shape
    ar = torch.arange(size, device=src.device)
    rows = top.view(b, 1) + ar
    cols = torch.where(flip.view(b, 1), left.view(b, 1) + (size - 1 - ar), left.view(b, 1) + ar)
    idx = (
        (rows.view(b, size, 1) * wp + cols.view(b, 1, size)).view(b, 1, size * size).expand(b, c, size * size)
    )
    return src.view(b, c, hp * wp).gather(2, idx).view(b, c, size, size)


def _mean_std(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor([float(v) for v in mean], dtype=torch.float64)
    s = torch.tensor([float(v) for v in std], dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).to(torch.float32).view(1, -1, 1, 1).to(device)
    shift = (-m / s).to(torch.float32).view(1, -1, 1, 1).to(device)
    return scale, shift


def normalize(
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels_last: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Eval-time path: uint8 [B, C, H, W] -> (x / 255 - mean) / std as `dtype`, channels_last if asked.

    One fused multiply-add per pixel, done in float32 on the images' device, then cast."""
    scale, shift = _mean_std(mean, std, images_uint8.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(images_uint8.shape, dtype=torch.float32, device=images_uint8.device, memory_format=fmt)
    torch.addcmul(shift, images_uint8.to(torch.float32), scale, out=out)
    return out if dtype == torch.float32 else out.to(dtype)


def _randint_below(hi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Integers uniform in [0, hi) per element, from uniforms u in [0, 1)."""
    return torch.minimum(torch.floor(u * hi), hi - 1).clamp_(min=0).to(torch.int64)


class BatchAugment:
    """The training-time augmentation pipeline, run on a whole batch on its own device.

    Order (as in timm's / torchvision's per-image pipelines): crop ("pad": random crop after zero padding;
    "resized": random resized crop; "none"), horizontal flip, AutoAugment / RandAugment / TrivialAugmentWide,
    normalise, random erasing (timm "pixel" mode: N(0, 1) noise in normalised space), Mixup/CutMix (timm
    "batch" mode: one lambda and one mixup-or-cutmix choice per batch, partner = the flipped batch, CutMix's
    lambda corrected by the clipped box area) with label smoothing folded into the soft targets.
    Every image draws its own crop, flip, ops, magnitudes, signs and erasing box from `generator`, so one
    seed fixes a batch exactly.  `auto_augment`: None, "cifar10" / "imagenet" (torchvision AutoAugment
    policies), "trivial" (TrivialAugmentWide), or a timm RandAugment string such as "rand-m9-n2-mstd0.5"
    (keys m, n, mstd, mmax, p, inc).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        out_size: int | None = None,
        crop: str = "pad",
        padding: int = 4,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        erasing: float = 0.0,
        channels_last: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if crop not in ("pad", "resized", "none"):
            raise UsageError(f"crop must be 'pad', 'resized' or 'none', not {crop!r}")
        if len(mean) != len(std):
            raise UsageError("mean and std must have the same length")
        if (
            auto_augment is not None
            and auto_augment not in ("cifar10", "imagenet", "trivial")
            and not (auto_augment.startswith("rand"))
        ):
            raise UsageError(
                f"auto_augment must be None, 'cifar10', 'imagenet', 'trivial' or a 'rand-...' string, "
                f"not {auto_augment!r}"
            )
        if auto_augment is not None and auto_augment.startswith("rand"):
            _RandAugment(auto_augment, 32, 32)  # validate the string early
        self.num_classes = num_classes
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.out_size, self.crop, self.padding = out_size, crop, padding
        self.scale, self.ratio, self.hflip = (
            (float(scale[0]), float(scale[1])),
            (float(ratio[0]), float(ratio[1])),
            hflip,
        )
        self.auto_augment = auto_augment
        self.mixup, self.cutmix, self.mix_prob, self.switch_prob = mixup, cutmix, mix_prob, switch_prob
        self.label_smoothing, self.erasing = label_smoothing, erasing
        self.channels_last, self.dtype = channels_last, dtype
        self._policy: tuple[int, object] | None = None
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"BatchAugment(crop={self.crop!r}, out_size={self.out_size}, hflip={self.hflip}, "
            f"auto_augment={self.auto_augment!r}, mixup={self.mixup}, cutmix={self.cutmix}, "
            f"label_smoothing={self.label_smoothing}, erasing={self.erasing})"
        )

    # -- stages ----------------------------------------------------------------------------------------------
    def _crop_flip(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, c, h, w = images.shape
        s = self.out_size or h
        dev = images.device
        u = _rand(3 * b, gen, dev).view(3, b)
        flip = u[2] < self.hflip
        if self.crop == "pad" or (self.crop == "none" and s <= min(h, w)):
            pad = self.padding if self.crop == "pad" else 0
            if self.crop == "pad":
                oy = _randint_below(torch.tensor(h + 2 * pad - s + 1, device=dev), u[0])
                ox = _randint_below(torch.tensor(w + 2 * pad - s + 1, device=dev), u[1])
            else:
                oy = torch.full((b,), (h - s) // 2, device=dev)
                ox = torch.full((b,), (w - s) // 2, device=dev)
            return crop_flip(images, oy, ox, s, flip, padding=pad).to(torch.float32)
        if self.crop == "none":
            zero = torch.zeros(b, dtype=torch.int64, device=dev)
            return resized_crop(
                images, zero, zero, torch.full_like(zero, h), torch.full_like(zero, w), s, flip
            )
        top, left, ch, cw = self._resized_params(b, h, w, gen, dev)
        return resized_crop(images, top, left, ch, cw, s, flip)

    def _resized_params(self, b: int, h: int, w: int, gen: torch.Generator, dev: torch.device):
        # torchvision RandomResizedCrop.get_params: 10 tries per image, first valid wins, else a centre crop.
        tries = 10
        u = _rand(4 * b * tries, gen, dev).view(4, b, tries)
        area = float(h * w)
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
        aspect = torch.exp(lo + (hi - lo) * u[1])
        cw = torch.round(torch.sqrt(target * aspect))
        ch = torch.round(torch.sqrt(target / aspect))
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = ok.to(torch.int8).argmax(dim=1, keepdim=True)
        has = ok.any(dim=1)
        cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
        top = _randint_below(h - ch + 1, u[2].gather(1, first).squeeze(1))
        left = _randint_below(w - cw + 1, u[3].gather(1, first).squeeze(1))
        in_ratio = w / h
        if in_ratio < min(self.ratio):
            fw, fh = w, int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            fh, fw = h, int(round(h * max(self.ratio)))
        else:
            fw, fh = w, h
        ch = torch.where(has, ch.to(torch.int64), fh)
        cw = torch.where(has, cw.to(torch.int64), fw)
        top = torch.where(has, top, (h - fh) // 2)
        left = torch.where(has, left, (w - fw) // 2)
        return top, left, ch, cw

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        if self._policy is None or self._policy[0] != h * 100000 + w:
            name = self.auto_augment
            assert name is not None
            if name in _AA_POLICIES:
                pol: object = _AutoAugment(name, h, w)
            elif name == "trivial":
                pol = _TrivialAugment(h, w)
            else:
                pol = _RandAugment(name, h, w)
            self._policy = (h * 100000 + w, pol)
        for op, p in self._policy[1].stages(b, gen, x.device):  # type: ignore[attr-defined]
            x = _apply_ops(x, op, p)
        return x

    def _erase(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # timm RandomErasing(mode="pixel", min_area=0.02, max_area=1/3, min_aspect=0.3, max_count=1)
        b, c, h, w = x.shape
        dev = x.device
        tries = 10
        u = _rand(b * (1 + 2 * tries + 2), gen, dev)
        apply = u[:b] <= self.erasing
        ua = u[b : b + b * tries].view(b, tries)
        ur = u[b + b * tries : b + 2 * b * tries].view(b, tries)
        ut, ul = u[b + 2 * b * tries :].view(2, b)
        target = (0.02 + (1.0 / 3.0 - 0.02) * ua) * (h * w)
        lo, hi = math.log(0.3), math.log(1 / 0.3)
        aspect = torch.exp(lo + (hi - lo) * ur)
        eh = torch.round(torch.sqrt(target * aspect))
        ew = torch.round(torch.sqrt(target / aspect))
        ok = (ew < w) & (eh < h)
        first = ok.to(torch.int8).argmax(dim=1, keepdim=True)
        apply &= ok.any(dim=1)
        eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)
        top = _randint_below(h - eh + 1, ut)
        left = _randint_below(w - ew + 1, ul)
        idx = apply.nonzero().squeeze_(1)
        if idx.numel() == 0:
            return x
        top, left, eh, ew = (t.index_select(0, idx).to(torch.int64) for t in (top, left, eh, ew))
        sub = x.index_select(0, idx)
        mask = _box_mask(sub.shape, top, left, eh, ew).expand_as(sub)
        # N(0, 1) noise for the erased pixels only (drawn in mask order), as timm draws one patch per image.
        count = int(eh.mul(ew).sum().item()) * c
        sub.masked_scatter_(mask, torch.randn(count, generator=gen, device=dev, dtype=x.dtype))
        return x.index_copy_(0, idx, sub)

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_classes
        on = 1.0 - self.label_smoothing + off
        y = torch.full((labels.shape[0], self.num_classes), off, dtype=torch.float32, device=labels.device)
        return y.scatter_(1, labels.view(-1, 1).to(torch.int64), on)

    def _mix_params(self, gen: torch.Generator, dev: torch.device) -> tuple[float, bool, float, float]:
        """timm Mixup._params_per_batch (+ the two uniforms for the CutMix box centre); one host sync."""
        draws = [_rand(4, gen, dev)]
        for alpha in (self.mixup, self.cutmix):
            if alpha > 0:
                g = torch._standard_gamma(
                    torch.full((2,), float(alpha), dtype=torch.float64, device=dev), generator=gen
                )
                draws.append(g)
        vals = torch.cat(draws).tolist()
        u_mix, u_switch, u_cy, u_cx = vals[:4]
        gammas = vals[4:]
        lam, use_cutmix = 1.0, False
        if u_mix < self.mix_prob and (self.mixup > 0 or self.cutmix > 0):
            if self.mixup > 0 and self.cutmix > 0:
                use_cutmix = u_switch < self.switch_prob
                g1, g2 = gammas[2:4] if use_cutmix else gammas[0:2]
            else:
                use_cutmix = self.cutmix > 0
                g1, g2 = gammas[0:2]
            lam = g1 / (g1 + g2) if g1 + g2 > 0 else 0.5
        return lam, use_cutmix, u_cy, u_cx

    def _mix(
        self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam, use_cutmix, u_cy, u_cx = self._mix_params(gen, x.device)
        if lam == 1.0:
            return x, y
        if use_cutmix:
            h, w = x.shape[-2:]
            r = math.sqrt(1.0 - lam)
            cut_h, cut_w = int(h * r), int(w * r)
            cy, cx = min(int(u_cy * h), h - 1), min(int(u_cx * w), w - 1)
            yl, yh = min(max(cy - cut_h // 2, 0), h), min(max(cy + (cut_h + 1) // 2, 0), h)
            xl, xh = min(max(cx - cut_w // 2, 0), w), min(max(cx + (cut_w + 1) // 2, 0), w)
            x[:, :, yl:yh, xl:xh] = x[:, :, yl:yh, xl:xh].flip(0)
            lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
        else:
            x = x.mul(lam).add_(x.flip(0), alpha=1.0 - lam)
        return x, y.mul(lam).add_(y.flip(0), alpha=1.0 - lam)

    # -- entry point -----------------------------------------------------------------------------------------
    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images: uint8 [B, C, H, W] on any device; labels: int64 [B].  Returns normalised images
        [B, C, S, S] (`dtype`, channels_last if set) and float32 soft targets [B, num_classes] with label
        smoothing and Mixup/CutMix folded in."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
        x = self._crop_flip(images, generator)
        if self.auto_augment:
            x = self._augment(x, generator)
        dev = x.device
        if dev not in self._norm:
            self._norm[dev] = _mean_std(self.mean, self.std, dev)
        scale, shift = self._norm[dev]
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty(x.shape, dtype=torch.float32, device=dev, memory_format=fmt)
        x = torch.addcmul(shift, x, scale, out=out)
        if self.erasing > 0:
            x = self._erase(x, generator)
        y = self._targets(labels)
        if self.mixup > 0 or self.cutmix > 0:
            x, y = self._mix(x, y, generator)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.channels_last and not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y
