"""Tests of cct.data.augment against torchvision (per image) on real CIFAR-10 images.

Tolerances (uint8 values): colour ops max |diff| <= 1 and at most 1% of pixels off (float rounding at
truncation boundaries); geometric ops (nearest) at most 0.2% of pixels differ (grid rounding at exact
half-pixel positions); crop/pad/flip and erase exact; resized crop (bilinear, antialias=True) max |diff| <= 1
(torchvision's uint8 kernel uses fixed-point weights).
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cct.data import augment as A
from cct.errors import UsageError

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def cifar() -> tuple[torch.Tensor, torch.Tensor]:
    root = os.environ.get("CCT_DATA")
    if not root:
        pytest.skip("CCT_DATA is not set")
    path = Path(root) / "cifar-10-batches-py" / "data_batch_1"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    x = torch.from_numpy(np.ascontiguousarray(batch[b"data"][:128].reshape(-1, 3, 32, 32)))
    y = torch.tensor(batch[b"labels"][:128], dtype=torch.int64)
    return x, y


def _tv_per_image(x: torch.Tensor, fn, args) -> torch.Tensor:
    return torch.stack([fn(img, a) for img, a in zip(x, args, strict=True)])


def _alternate(n: int, *values: float) -> list[float]:
    return [values[i % len(values)] for i in range(n)]


# (op, per-image arguments, torchvision per-image function)
_COLOUR_CASES = [
    ("Brightness", (1.63, 0.37, 1.9, 0.1), TF.adjust_brightness),
    ("Color", (1.63, 0.37, 1.9, 0.1), TF.adjust_saturation),
    ("Contrast", (1.63, 0.37, 1.9, 0.1), TF.adjust_contrast),
    ("Sharpness", (1.63, 0.37, 1.9, 0.1), TF.adjust_sharpness),
    ("Posterize", (4, 5, 6, 8, 0), lambda im, b: TF.posterize(im, int(b))),
    ("Solarize", (255 * 0.4444444477558136, 255 * 0.7777777910232544, 0.0, 255.0), TF.solarize),
    ("AutoContrast", (0,), lambda im, _: TF.autocontrast(im)),
    ("Equalize", (0,), lambda im, _: TF.equalize(im)),
    ("Invert", (0,), lambda im, _: TF.invert(im)),
    ("Identity", (0,), lambda im, _: im),
]


@pytest.mark.parametrize("op,values,tv_fn", _COLOUR_CASES, ids=[c[0] for c in _COLOUR_CASES])
def test_colour_ops_match_torchvision(cifar, op, values, tv_fn):
    x = cifar[0][:64]
    args = _alternate(len(x), *values)
    ours = A.apply_op(x, op, args)
    ref = _tv_per_image(x, tv_fn, args)
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    diff = (ours.int() - ref.int()).abs()
    assert diff.max().item() <= 1, f"{op}: max diff {diff.max().item()}"
    assert (diff > 0).float().mean().item() <= 0.01, (
        f"{op}: {(diff > 0).float().mean().item():.4f} of pixels off"
    )


def _shear(axis: int):
    def fn(img, m):
        shear = [0.0, 0.0]
        shear[axis] = math.degrees(math.atan(m))
        return TF.affine(
            img,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=shear,
            interpolation=InterpolationMode.NEAREST,
            center=[0, 0],
        )

    return fn


def _translate(axis: int):
    def fn(img, t):
        tr = [0, 0]
        tr[axis] = int(t)
        return TF.affine(
            img, angle=0.0, translate=tr, scale=1.0, shear=[0.0, 0.0], interpolation=InterpolationMode.NEAREST
        )

    return fn


_GEOMETRIC_CASES = [
    ("ShearX", (0.3, -0.2667, 0.0333, -0.99), _shear(0)),
    ("ShearY", (0.3, -0.2667, 0.0333, -0.99), _shear(1)),
    ("TranslateX", (14, -14, 3, -32, 0), _translate(0)),
    ("TranslateY", (14, -14, 3, -32, 0), _translate(1)),
    (
        "Rotate",
        (30.0, -26.666667, 3.3333, -135.0, 0.0),
        lambda im, a: TF.rotate(im, a, interpolation=InterpolationMode.NEAREST),
    ),
]


@pytest.mark.parametrize("op,values,tv_fn", _GEOMETRIC_CASES, ids=[c[0] for c in _GEOMETRIC_CASES])
def test_geometric_ops_match_torchvision(cifar, op, values, tv_fn):
    x = cifar[0][:64]
    args = _alternate(len(x), *values)
    ours = A.apply_op(x, op, args)
    ref = _tv_per_image(x, tv_fn, args)
    off = (ours != ref).float().mean().item()
    assert off <= 0.002, f"{op}: {off:.4%} of pixels differ"


def test_solarize_add_matches_timm_lut(cifar):
    x = cifar[0][:64]
    args = _alternate(len(x), 0, 49, 99, 110)
    ours = A.apply_op(x, "SolarizeAdd", args)
    ref = torch.stack(
        [
            torch.where(im < 128, (im.int() + int(a)).clamp(max=255), im.int())
            for im, a in zip(x, args, strict=True)
        ]
    )
    assert torch.equal(ours.int(), ref)


@pytest.mark.parametrize("crop", [A.crop_flip, A._crop_flip_slices, A._crop_flip_gather])
def test_crop_flip_matches_torchvision(cifar, crop):
    """Both ways of cropping (per-image slices on a CPU, one gather on an accelerator) are torchvision's."""
    x = cifar[0][:64]
    g = torch.Generator().manual_seed(1)
    top = torch.randint(0, 9, (64,), generator=g)
    left = torch.randint(0, 9, (64,), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    if crop is A.crop_flip:
        ours = crop(x, top, left, 32, flip, padding=4)
    else:
        ours = crop(torch.nn.functional.pad(x, (4, 4, 4, 4)), top, left, 32, flip)
    for i in range(64):
        ref = TF.crop(TF.pad(x[i], [4]), int(top[i]), int(left[i]), 32, 32)
        if flip[i]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(ours[i], ref)


def test_large_crops_keep_a_channels_last_batch_in_its_layout(cifar):
    """File batches arrive channels-last (`collate_skip_bad`): large CPU crops keep that layout, so the float
    conversion does not transpose; the pixels are those of the same crops of a contiguous batch."""
    x = torch.nn.functional.interpolate(cifar[0][:8].float(), size=112).round().to(torch.uint8)
    top, left = torch.arange(8), torch.arange(8).flip(0)
    flip = torch.arange(8) % 2 == 0
    plain = A.crop_flip(x, top, left, 100, flip)
    ours = A.crop_flip(x.contiguous(memory_format=torch.channels_last), top, left, 100, flip)
    assert plain.is_contiguous() and ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("size", [32, 24])
def test_resized_crop_matches_torchvision(cifar, size):
    x = cifar[0][:64]
    g = torch.Generator().manual_seed(2)
    h = torch.randint(6, 33, (64,), generator=g)
    w = torch.randint(6, 33, (64,), generator=g)
    top = (torch.rand(64, generator=g) * (33 - h)).long()
    left = (torch.rand(64, generator=g) * (33 - w)).long()
    flip = torch.rand(64, generator=g) < 0.5
    ours = A.resized_crop(x, top, left, h, w, size, flip)
    for i in range(64):
        ref = TF.resized_crop(
            x[i],
            int(top[i]),
            int(left[i]),
            int(h[i]),
            int(w[i]),
            [size, size],
            interpolation=InterpolationMode.BILINEAR,
            antialias=True,
        )
        if flip[i]:
            ref = TF.horizontal_flip(ref)
        assert (ours[i] - ref.float()).abs().max().item() <= 1.0, i


def test_erase_matches_torchvision(cifar):
    x = cifar[0][:16].float()
    g = torch.Generator().manual_seed(3)
    eh = torch.randint(0, 20, (16,), generator=g)
    ew = torch.randint(1, 20, (16,), generator=g)
    top = torch.randint(0, 12, (16,), generator=g)
    left = torch.randint(0, 12, (16,), generator=g)
    noise = torch.randn(16, 3, 32, 32, generator=g)
    ours = A.erase(x, top, left, eh, ew, noise)
    for i in range(16):
        t, le, hh, ww = int(top[i]), int(left[i]), int(eh[i]), int(ew[i])
        ref = TF.erase(x[i], t, le, hh, ww, noise[i, :, t : t + hh, le : le + ww])
        assert torch.equal(ours[i], ref)


# ----------------------------------------------------------------------------------------------------
# policy tables against torchvision's
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["cifar10", "imagenet"])
def test_autoaugment_tables_match_torchvision(policy):
    from torchvision.transforms.v2 import AutoAugment, AutoAugmentPolicy

    tv = AutoAugment(AutoAugmentPolicy.CIFAR10 if policy == "cifar10" else AutoAugmentPolicy.IMAGENET)
    ours = A._AutoAugment(policy, 32, 32)
    for i, sub in enumerate(tv._policies):
        for s, (name, prob, bin_) in enumerate(sub):
            assert A.OPS[int(ours.op[i, s])] == name
            assert float(ours.prob[i, s]) == prob
            mags, signed = tv._AUGMENTATION_SPACE[name]
            mags = mags(10, 32, 32)
            expect = float(mags[bin_]) if mags is not None and bin_ is not None else 0.0
            assert float(ours.mag[i, s]) == expect
            assert bool(ours.signed[i, s]) == signed


def test_trivial_tables_match_torchvision():
    from torchvision.transforms.v2 import TrivialAugmentWide

    tv = TrivialAugmentWide()
    ours = A._TrivialAugment(32, 32)
    assert set(ours.NAMES) == set(tv._AUGMENTATION_SPACE)
    for k, name in enumerate(ours.NAMES):
        mags, signed = tv._AUGMENTATION_SPACE[name]
        mags = mags(31, 32, 32)
        if mags is not None:
            assert torch.equal(ours.mag[k], mags.double())
        assert bool(ours.signed[k]) == signed


def test_tv_native_arguments():
    op = torch.tensor(
        [A.OPS.index(n) for n in ("Brightness", "TranslateX", "Solarize", "Posterize", "Rotate")]
    )
    m = torch.tensor([-0.3, -14.9, 0.5, 6.0, -20.0], dtype=torch.float64)
    assert A._tv_native(op, m).tolist() == [0.7, -14.0, 127.5, 6.0, -20.0]


def test_randaugment_strings():
    ra = A._RandAugment("rand-m9-n2-mstd0.5", 32, 32)
    assert (ra.m, ra.n, ra.mstd, ra.p) == (9.0, 2, 0.5, 0.5)
    inc = A._RandAugment("rand-m7-n3-mstd101-inc1-mmax12-p0.7", 32, 32)
    assert (inc.m, inc.n, math.isinf(inc.mstd), inc.mmax, inc.p) == (7.0, 3, True, 12.0, 0.7)
    with pytest.raises(UsageError):
        A._RandAugment("rand-m9-x2", 32, 32)
    with pytest.raises(UsageError):
        A.BatchAugment(num_classes=10, mean=(0, 0, 0), std=(1, 1, 1), auto_augment="autoaug")
    # timm level rules at m=9 (no noise): rotate 27 deg, enhance 1.72, posterize 3 bits, solarize 230, add 99
    rules = torch.tensor(
        [
            A._RULES.index(r)
            for r in (
                "rotate",
                "enhance",
                "posterize",
                "solarize",
                "solarize_add",
                "posterize_inc",
                "enhance_inc",
                "translate_rel_x",
            )
        ]
    )
    level = torch.full((8,), 9.0, dtype=torch.float64)
    sign = torch.ones(8, dtype=torch.float64)
    args = ra._args(rules, level, sign).tolist()
    assert args == pytest.approx([27.0, 1.72, 3.0, 230.0, 99.0, 1.0, 1.81, 0.405 * 32])


# ----------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------

_IDENTITY_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}  # normalise = x (uint8 values)


def _position_image() -> torch.Tensor:
    """Channel 0 holds row + 1, channel 1 column + 1, so that crops and flips can be read back."""
    r = torch.arange(1, 33).view(32, 1).expand(32, 32)
    c = torch.arange(1, 33).view(1, 32).expand(32, 32)
    return torch.stack([r, c, r + c]).to(torch.uint8)


def test_pad_crop_and_flip_are_per_sample():
    n = 2048
    x = _position_image().expand(n, 3, 32, 32)
    aug = A.BatchAugment(
        num_classes=10, crop="pad", padding=4, hflip=0.5, channels_last=False, **_IDENTITY_NORM
    )
    out, _ = aug(x, torch.zeros(n, dtype=torch.int64), torch.Generator().manual_seed(0))
    oy = out[:, 0, 16, 16].long() - 13  # output row 16 = original row oy + 12 -> value oy + 13
    flipped = out[:, 1, 16, 16] < out[:, 1, 16, 15]
    col16 = out[:, 1, 16, 16].long()
    ox = torch.where(flipped, col16 - 12, col16 - 13)  # flipped: orig col ox + 11; else ox + 12
    assert oy.min() == 0 and oy.max() == 8 and ox.min() == 0 and ox.max() == 8
    counts = torch.bincount(oy * 9 + ox, minlength=81).float()
    assert (counts > 0).all()
    assert counts.max() < 2.5 * n / 81 and counts.min() > 0.2 * n / 81
    assert abs(flipped.float().mean().item() - 0.5) < 0.05
    # each output is exactly the torchvision crop+flip at the recovered offsets
    src = x[:1].expand(n, 3, 32, 32)
    assert torch.equal(out, A.crop_flip(src, oy, ox, 32, flipped, padding=4).float())


def test_same_seed_same_batch(cifar):
    x, y = cifar
    kw = dict(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    full = A.BatchAugment(
        auto_augment="cifar10", mixup=0.8, cutmix=1.0, erasing=0.25, label_smoothing=0.1, **kw
    )
    a1 = full(x, y, torch.Generator().manual_seed(7))
    a2 = full(x, y, torch.Generator().manual_seed(7))
    a3 = full(x, y, torch.Generator().manual_seed(8))
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])
    assert not torch.equal(a1[0], a3[0])


def _reference_policy(policy: str, img: torch.Tensor, n: int) -> torch.Tensor:
    """n draws of the per-image reference implementation (torchvision; timm + PIL for RandAugment)."""
    import random

    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    from torchvision.transforms import v2

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    if policy.startswith("rand"):
        tf = rand_augment_transform(policy, {})
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        return torch.stack([torch.from_numpy(np.array(tf(pil))).permute(2, 0, 1) for _ in range(n)])
    tf = {
        "cifar10": v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
        "imagenet": v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
        "trivial": v2.TrivialAugmentWide(),
    }[policy]
    return torch.stack([tf(img) for _ in range(n)])


@pytest.mark.parametrize("policy", ["cifar10", "imagenet", "trivial", "rand-m9-n2-mstd0.5"])
def test_policy_diversity_matches_reference(cifar, policy):
    # n copies of one image: our per-sample draws give as many distinct results, and leave as many images
    # unchanged, as n independent draws of the per-image reference do (within sampling noise).
    n = 256
    img = cifar[0][5]
    aug = A.BatchAugment(
        num_classes=10, crop="none", hflip=0.0, auto_augment=policy, channels_last=False, **_IDENTITY_NORM
    )
    ours, _ = aug(
        img.expand(n, 3, 32, 32), torch.zeros(n, dtype=torch.int64), torch.Generator().manual_seed(0)
    )
    ref = _reference_policy(policy, img, n).float()

    def stats(out: torch.Tensor) -> tuple[int, float]:
        distinct = torch.unique(out.flatten(1), dim=0).shape[0]
        return distinct, (out == img.float()).flatten(1).all(1).float().mean().item()

    (d_ours, u_ours), (d_ref, u_ref) = stats(ours), stats(ref)
    assert 0.75 * d_ref <= d_ours <= 1.33 * d_ref, (d_ours, d_ref)
    assert abs(u_ours - u_ref) <= 0.12, (u_ours, u_ref)
    assert d_ours >= 20


def test_autoaugment_op_frequencies():
    # which op each image draws: stage 0 of the CIFAR-10 policy, compared with the policy's probabilities
    pol = A._AutoAugment("cifar10", 32, 32)
    n = 20000
    (op0, _), _ = pol.stages(n, torch.Generator().manual_seed(0), torch.device("cpu"))
    expect = torch.zeros(len(A.OPS), dtype=torch.float64)
    for k in range(25):
        expect[pol.op[k, 0]] += float(pol.prob[k, 0]) / 25
    got = torch.bincount(op0[op0 >= 0], minlength=len(A.OPS)).double() / n
    assert torch.allclose(got, expect, atol=0.012)


def _const_batch(n: int) -> torch.Tensor:
    return (torch.arange(n) * 10 + 5).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()


def test_cutmix_lambda_is_box_area():
    n = 16
    x = _const_batch(n)
    labels = torch.arange(n)
    aug = A.BatchAugment(
        num_classes=n, crop="none", hflip=0.0, cutmix=1.0, channels_last=False, **_IDENTITY_NORM
    )
    seen = 0
    for seed in range(20):
        out, t = aug(x, labels, torch.Generator().manual_seed(seed))
        assert torch.allclose(t.sum(1), torch.ones(n))
        own = (out == x.float()).all(1).float().mean(dim=(1, 2))  # fraction of pixels still from image i
        partner = (out == x.flip(0).float()).all(1).float().mean(dim=(1, 2))
        assert torch.allclose(own + partner, torch.ones(n))
        assert torch.allclose(t[torch.arange(n), labels], own)
        assert torch.allclose(t[torch.arange(n), labels.flip(0)], partner)
        seen += bool((partner > 0).any())
    assert seen >= 15


def test_mixup_and_label_smoothing_targets():
    n, ls = 16, 0.1
    x = _const_batch(n)
    labels = torch.arange(n)
    off, on = ls / n, 1 - ls + ls / n
    aug = A.BatchAugment(
        num_classes=n,
        crop="none",
        hflip=0.0,
        mixup=0.8,
        label_smoothing=ls,
        channels_last=False,
        **_IDENTITY_NORM,
    )
    lams = []
    for seed in range(10):
        out, t = aug(x, labels, torch.Generator().manual_seed(seed))
        xf = x.float()
        lam = ((out - xf.flip(0)) / (xf - xf.flip(0)))[:, 0, 0, 0]  # pixel = lam * own + (1 - lam) * partner
        assert torch.allclose(lam, lam[0].expand(n), atol=1e-5)
        lam0 = lam[0].item()
        lams.append(lam0)
        assert torch.allclose(t.sum(1), torch.ones(n), atol=1e-6)
        assert torch.allclose(
            t[torch.arange(n), labels], torch.full((n,), lam0 * on + (1 - lam0) * off), atol=1e-5
        )
        assert torch.allclose(
            t[torch.arange(n), labels.flip(0)], torch.full((n,), lam0 * off + (1 - lam0) * on), atol=1e-5
        )
    assert len({round(v, 4) for v in lams}) == 10 and all(0 <= v <= 1 for v in lams)
    # no mixing: smoothed one-hot
    plain = A.BatchAugment(num_classes=n, crop="none", hflip=0.0, label_smoothing=ls, **_IDENTITY_NORM)
    _, t = plain(x, labels, torch.Generator().manual_seed(0))
    assert torch.allclose(t, torch.full((n, n), off) + torch.eye(n) * (on - off))
    never = A.BatchAugment(num_classes=n, crop="none", mixup=0.8, cutmix=1.0, mix_prob=0.0, **_IDENTITY_NORM)
    _, t = never(x, labels, torch.Generator().manual_seed(0))
    assert torch.equal(t, torch.eye(n))


def test_erasing_fraction_and_noise(cifar):
    x, y = cifar
    aug = A.BatchAugment(
        num_classes=10,
        crop="none",
        hflip=0.0,
        erasing=0.25,
        channels_last=False,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    out, _ = aug(x, y, torch.Generator().manual_seed(0))
    ref = A.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last=False)
    changed = (out != ref).any(1)  # [B, H, W]
    erased = changed.flatten(1).any(1)
    assert 0.1 < erased.float().mean().item() < 0.42
    for i in erased.nonzero().flatten().tolist():  # one axis-aligned box per erased image
        rows = changed[i].any(1).nonzero().flatten()
        cols = changed[i].any(0).nonzero().flatten()
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert 0.02 * 1024 * 0.5 <= area <= 1024 / 3 * 1.3


def test_output_format_and_normalisation(cifar):
    x, y = cifar
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ev = A.normalize(x, mean, std)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert ev.is_contiguous(memory_format=torch.channels_last) and ev.dtype == torch.float32
    assert torch.allclose(ev, ref, atol=1e-5)
    assert A.normalize(x, mean, std, channels_last=False, dtype=torch.bfloat16).dtype == torch.bfloat16
    plain = A.BatchAugment(num_classes=10, mean=mean, std=std, crop="none", hflip=0.0)
    out, t = plain(x, y, torch.Generator().manual_seed(0))
    assert torch.allclose(out, ref, atol=1e-5) and out.is_contiguous(memory_format=torch.channels_last)
    assert t.dtype == torch.float32 and t.shape == (128, 10) and torch.equal(t.argmax(1), y)
    aug = A.BatchAugment(
        num_classes=10,
        mean=mean,
        std=std,
        crop="resized",
        out_size=24,
        auto_augment="trivial",
        mixup=0.8,
        cutmix=1.0,
        erasing=0.25,
        channels_last=False,
        dtype=torch.bfloat16,
    )
    out, t = aug(x, y, torch.Generator().manual_seed(0))
    assert out.shape == (128, 3, 24, 24) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert t.shape == (128, 10) and t.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_semantics(cifar):
    x, y = cifar
    aug = A.BatchAugment(
        num_classes=10,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        auto_augment="cifar10",
        mixup=0.8,
        cutmix=1.0,
        erasing=0.25,
        label_smoothing=0.1,
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    out, t = aug(x.cuda(), y.cuda(), g)
    assert (
        out.is_cuda
        and out.shape == (128, 3, 32, 32)
        and torch.allclose(t.sum(1), torch.ones(128, device="cuda"))
    )
    for op, values, _ in _COLOUR_CASES + _GEOMETRIC_CASES:
        args = _alternate(64, *values)
        cpu = A.apply_op(x[:64], op, args)
        gpu = A.apply_op(x[:64].cuda(), op, args).cpu()
        assert (cpu.int() - gpu.int()).abs().max() <= 1 and (cpu != gpu).float().mean() < 0.01, op
