"""Tests for cct.data.datasets: CIFAR from the real files (via CCT_DATA), small synthetic image trees, bad files.

Real data are reached only through the environment variable CCT_DATA; those tests skip when it is unset.
Everything else is written into tmp_path, so the whole file runs in a few seconds on a CPU.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cct.data import datasets as D
from cct.data.datasets import (
    DATASETS,
    ImageFiles,
    InMemoryImages,
    build_dataset,
    collate_skip_bad,
    ensure_dataset,
    eval_transform,
    resolve_data_root,
    train_transform,
)
from cct.errors import CCTError, UsageError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------------------- helpers


def _cifar_root() -> Path:
    root = os.environ.get("CCT_DATA")
    if not root:
        pytest.skip("CCT_DATA is not set")
    if not (Path(root) / "cifar-10-batches-py" / "batches.meta").is_file():
        pytest.skip(f"no CIFAR-10 under CCT_DATA={root}")
    return Path(root)


@pytest.fixture(scope="module")
def cifar_train() -> InMemoryImages:
    ds = build_dataset("cifar10", "train", _cifar_root())
    assert isinstance(ds, InMemoryImages)
    return ds


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, img: Image.Image, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A small PNG file whose header claims width x height pixels (a decompression-bomb stand-in)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _write_bad_files(folder: Path) -> list[Path]:
    """Zero-byte, truncated, non-image and oversized-header files; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    zero = folder / "zero.jpg"
    zero.write_bytes(b"")
    good = _save(folder / "_tmp.jpg", Image.fromarray(_rgb(64, 64, 9)))
    trunc = folder / "truncated.jpg"
    trunc.write_bytes(good.read_bytes()[:300])
    good.unlink()
    text = folder / "notes_not_image.png"
    text.write_text("this is not an image\n")
    bomb = _png_header(folder / "bomb.png", 20000, 20000)
    return [zero, trunc, text, bomb]


def _odd_images(folder: Path) -> dict[str, Path]:
    """One file per awkward mode/format/size; returns name -> path."""
    rgb = Image.fromarray(_rgb(40, 50, 1))
    g16 = (np.arange(30 * 20, dtype=np.uint32).reshape(30, 20) * 109).astype(np.uint16)  # up to 65291
    files = {
        "gray": _save(folder / "gray.jpg", rgb.convert("L")),
        "gray_alpha": _save(folder / "gray_alpha.png", rgb.convert("LA")),
        "palette": _save(folder / "palette.png", rgb.convert("P")),
        "rgba": _save(folder / "rgba.PNG", rgb.convert("RGBA")),
        "gray16": _save(folder / "gray16.png", Image.fromarray(g16)),
        "cmyk": _save(folder / "cmyk.jpeg", rgb.convert("CMYK")),
        "bmp": _save(folder / "img.bmp", rgb),
        "tiff": _save(folder / "img.tif", rgb),
        "gif": _save(folder / "img.gif", rgb),
        "webp": _save(folder / "img.webp", rgb),
        "tiny": _save(folder / "tiny.png", Image.fromarray(_rgb(1, 1, 2))),
        "large": _save(folder / "large.jpg", Image.new("RGB", (1500, 1000), (200, 30, 60)), "JPEG"),
    }
    return files


def _flowers_tree(root: Path, labels: list[int], setid: dict[str, list[int]], make_files: int = 0) -> Path:
    """<root>/flowers-102 with imagelabels.mat / setid.mat and the first ``make_files`` JPEGs."""
    from scipy.io import savemat

    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    savemat(base / "imagelabels.mat", {"labels": np.asarray(labels, dtype=np.uint8)[None, :]})
    savemat(base / "setid.mat", {k: np.asarray(v, dtype=np.uint16)[None, :] for k, v in setid.items()})
    sizes = [(1, 1), (1000, 1500), (37, 53), (64, 48)]
    for i in range(1, make_files + 1):
        h, w = sizes[i % len(sizes)]
        img = Image.fromarray(_rgb(h, w, i))
        _save(base / "jpg" / f"image_{i:05d}.jpg", img.convert("L") if i % 3 == 0 else img)
    return root


# --------------------------------------------------------------------------------------- CIFAR (real)


def test_cifar10_train_real(cifar_train: InMemoryImages) -> None:
    ds = cifar_train
    assert ds.images.shape == (50_000, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.images.is_contiguous()
    assert ds.labels.shape == (50_000,) and ds.labels.dtype == torch.int64
    assert ds.classes == CIFAR10_CLASSES
    assert torch.bincount(ds.labels, minlength=10).tolist() == [5000] * 10
    # Per-channel mean over [0, 1]-scaled pixels, exact integer sums (no float accumulation error).
    sums = ds.images.numpy().reshape(50_000, 3, -1).sum(axis=(0, 2), dtype=np.uint64)  # numpy: much faster
    mean = sums.astype(np.float64) / (50_000 * 32 * 32 * 255)
    np.testing.assert_allclose(mean, [0.49139968, 0.48215841, 0.44653091], rtol=0, atol=1e-6)
    # Order and layout match the pickle: first label, and image 0 as the README reshape gives it.
    with open(_cifar_root() / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert ds.labels[0].item() == batch[b"labels"][0]
    assert int(ds.labels[:10_000].eq(torch.tensor(batch[b"labels"])).all()) == 1
    first = torch.from_numpy(batch[b"data"][0].reshape(3, 32, 32))
    image, label = ds[0]
    assert torch.equal(image, first) and label == batch[b"labels"][0] and isinstance(label, int)


def test_cifar10_test_split_and_val_alias() -> None:
    root = _cifar_root()
    test = build_dataset("cifar10", "test", root)
    val = build_dataset("cifar10", "VAL", root / "cifar-10-batches-py")  # the folder itself works as root
    assert len(test) == 10_000 and torch.bincount(test.labels).tolist() == [1000] * 10
    assert torch.equal(test.images, val.images) and torch.equal(test.labels, val.labels)


def test_cifar_root_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    root = _cifar_root()
    monkeypatch.setenv("CCT_DATA", str(root))
    assert len(build_dataset("cifar10", "test")) == 10_000


# ------------------------------------------------------------------------- names, roots, missing data


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CCT_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("CCT_DATA")
    assert resolve_data_root() == tmp_path / "data"
    assert resolve_data_root("~/x") == Path.home() / "x"


def test_missing_cifar_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(CCTError) as err:
        build_dataset("cifar10", "train", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{tmp_path}/cifar-10-batches-py/{{data_batch_1..5,test_batch,batches.meta}}" in msg
    assert "cifar-10-python.tar.gz" in msg and "--download" in msg
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "meta").write_bytes(b"x")
    with pytest.raises(CCTError, match=r"CIFAR-100 not found: .*cifar-100-python/\{train,test,meta\} "
                                       r"\(missing: train, test\)"):
        build_dataset("cifar100", "test", tmp_path)


def test_corrupt_cifar_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(CCTError, match="unreadable or corrupt"):
        build_dataset("cifar100", "train", tmp_path)


def fake_cifar100_download(url: str, download_root: str, **kwargs: object) -> None:
    """Stands in for torchvision's downloader of the real archive: a tiny CIFAR-100 in the original pickle
    format (train 6 images, test 4)."""
    folder = Path(download_root) / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 4)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": list(range(n)), b"coarse_labels": [0] * n}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f, protocol=2)


def test_download_failure_and_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tvu

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("Temporary failure in name resolution\nsecond line")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(CCTError) as err:
        build_dataset("cifar100", "train", tmp_path, download=True)
    assert "\n" not in str(err.value) and "could not download CIFAR-100" in str(err.value)

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_cifar100_download)
    ds = build_dataset("cifar100", "train", tmp_path / "new", download=True)
    assert ds.images.shape == (6, 3, 32, 32) and ds.labels.tolist() == list(range(6))
    assert ds.classes[:2] == ["c0", "c1"] and len(ds.classes) == 100


def test_ensure_dataset_checks_the_files_without_reading_them(tmp_path: Path, data_root: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_dataset("cifar10", ("train", "test"), data_root)  # the real CIFAR-10: present, nothing raised
    with pytest.raises(CCTError) as early:
        ensure_dataset("cifar10", ("train", "test"), tmp_path)
    with pytest.raises(CCTError) as late:
        build_dataset("cifar10", "train", tmp_path)
    assert str(early.value) == str(late.value)  # the same one line, before any reading
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    ensure_dataset("imagenet", ("train",), tmp_path)
    with pytest.raises(CCTError, match=r"ImageNet not found: .*\(missing: .*imagenet/val\)"):
        ensure_dataset("imagenet", ("train", "val"), tmp_path)
    with pytest.raises(UsageError, match="unknown split 'tset'"):
        ensure_dataset("cifar10", ("tset",), data_root)
    with pytest.raises(CCTError, match="image folder not found"):
        ensure_dataset(f"folder:{tmp_path / 'none'}", ("train", "val"), tmp_path)
    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_cifar100_download)
    ensure_dataset("cifar100", ("train", "test"), tmp_path / "new", download=True)
    assert build_dataset("cifar100", "test", tmp_path / "new").images.shape == (4, 3, 32, 32)


def test_wrong_name_or_split_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"unknown dataset 'cifar1O'; did you mean 'cifar10'\? \(valid: cifar10, "
                                         r"cifar100, flowers102, imagenet, folder:PATH\)"):
        build_dataset("cifar1O", "train", tmp_path)
    with pytest.raises(CCTError, match=r"unknown split 'tran' for cifar10; did you mean 'train'\? "
                                       r"\(valid: train, test, val\)"):
        build_dataset("cifar10", "tran", tmp_path)
    with pytest.raises(UsageError, match=r"valid: train, val\)"):
        build_dataset("imagenet", "test", tmp_path)
    with pytest.raises(UsageError, match="folder:PATH"):
        build_dataset("folder", "train", tmp_path)
    with pytest.raises(UsageError, match=r"flowers split 'paper'.*valid: official, cct"):
        build_dataset("flowers102", "train", tmp_path, flowers_split="paper")
    with pytest.raises(UsageError, match="val_fraction"):
        build_dataset(f"folder:{tmp_path}", "train", val_fraction=1.0)


def test_dataset_table() -> None:
    assert set(DATASETS) == {"cifar10", "cifar100", "flowers102", "imagenet", "folder"}
    assert DATASETS["cifar10"].num_classes == 10 and DATASETS["cifar10"].in_memory
    assert DATASETS["cifar10"].img_size == 32 and DATASETS["cifar10"].mean[0] == pytest.approx(0.49139968)
    assert DATASETS["flowers102"].num_classes == 102 and not DATASETS["flowers102"].in_memory
    assert DATASETS["imagenet"].num_classes == 1000 and DATASETS["folder"].num_classes is None
    assert D.dataset_info("folder:/some/where") is DATASETS["folder"]


# --------------------------------------------------------------------------------------- flowers102


def test_flowers_official_split_and_decoding(tmp_path: Path) -> None:
    labels = [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    setid = {"trnid": [1, 4, 7, 8], "valid": [2, 5, 9], "tstid": [3, 6, 10]}
    root = _flowers_tree(tmp_path, labels, setid, make_files=10)
    train = build_dataset("flowers102", "train", root)
    assert isinstance(train, ImageFiles) and len(train) == 4
    assert train.labels.tolist() == [0, 1, 2, 2]
    assert [Path(p).name for p, _ in train.samples] == [f"image_{i:05d}.jpg" for i in (1, 4, 7, 8)]
    assert len(train.classes) == 102 and train.classes[:2] == ["pink primrose", "hard-leaved pocket orchid"]
    assert len(build_dataset("flowers102", "val", root)) == 3
    assert build_dataset("flowers102", "test", root).labels.tolist() == [0, 1, 2]
    # 1x1, 1500x1000 and grayscale JPEGs all come out 3 x S x S uint8.
    train.transform = train_transform(48)
    test = build_dataset("flowers102", "test", root)
    test.transform = eval_transform(48, crop_pct=0.9)
    for ds in (train, test):
        for i in range(len(ds)):
            item = ds[i]
            assert item is not None
            image, label = item
            assert image.shape == (3, 48, 48) and image.dtype == torch.uint8 and label == int(ds.labels[i])


def test_flowers_cct_split_is_large_stratified_and_deterministic(tmp_path: Path) -> None:
    # 102 classes of 40..258 images, 8,189 in all, like the real dataset (no image files needed).
    rng = np.random.default_rng(1)
    sizes = np.full(102, 40)
    while sizes.sum() < 8189:
        sizes[rng.integers(0, 102)] += 1
    labels = np.repeat(np.arange(1, 103), sizes)
    rng.shuffle(labels)
    root = _flowers_tree(tmp_path, labels.tolist(), {"trnid": [1], "valid": [2], "tstid": [3]})
    parts = {s: build_dataset("flowers102", s, root, flowers_split="cct") for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [6552, 818, 819]
    names = [{p for p, _ in parts[s].samples} for s in ("train", "val", "test")]
    assert set.union(*names) == {str(root / "flowers-102" / "jpg" / f"image_{i:05d}.jpg") for i in range(1, 8190)}
    assert sum(len(n) for n in names) == 8189
    counts = {s: np.bincount(parts[s].labels.numpy(), minlength=102) for s in parts}
    assert (np.abs(counts["val"] - sizes * 818 / 8189) < 1).all()  # stratified: each class its share
    assert (counts["train"] > 0).all()
    again = build_dataset("flowers102", "val", root, flowers_split="cct")
    assert again.samples == parts["val"].samples
    other = build_dataset("flowers102", "val", root, flowers_split="cct", seed=1)
    assert other.samples != parts["val"].samples and len(other) == 818


def test_flowers_missing(tmp_path: Path) -> None:
    with pytest.raises(CCTError) as err:
        build_dataset("flowers102", "train", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and f"{tmp_path}/flowers-102/" in msg
    assert "imagelabels.mat" in msg and "setid.mat" in msg and "--download" in msg


# ----------------------------------------------------------------------------------------- imagenet


def test_imagenet_tree(tmp_path: Path) -> None:
    base = tmp_path / "imagenet"
    for split, n in (("train", 3), ("val", 2)):
        for k, wnid in enumerate(("n01440764", "n99999999")):
            for i in range(n):
                _save(base / split / wnid / f"{wnid}_{i}.JPEG", Image.fromarray(_rgb(20 + i, 30, k)))
    (base / "train" / "n01440764" / "._n01440764_0.JPEG").write_bytes(b"AppleDouble junk")  # hidden: ignored
    train = build_dataset("imagenet", "train", tmp_path)
    val = build_dataset("imagenet", "val", tmp_path)
    assert train.classes == ["tench, Tinca tinca", "n99999999"]
    assert train.class_ids == ["n01440764", "n99999999"] == val.class_ids
    assert len(train) == 6 and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(val) == 4 and val.class_counts() == [2, 2]
    val.transform = eval_transform(16)
    item = val[3]
    assert item is not None and item[0].shape == (3, 16, 16) and item[1] == 1
    # A val class that training does not know would silently shift labels: refused.
    _save(base / "val" / "n00000001" / "x.JPEG", Image.fromarray(_rgb(8, 8)))
    with pytest.raises(CCTError, match="n00000001"):
        build_dataset("imagenet", "val", tmp_path)


def test_imagenet_class_table_and_missing(tmp_path: Path) -> None:
    names = D._imagenet_names()
    assert len(names) == 1000 and names["n01443537"].startswith("goldfish")
    with pytest.raises(CCTError, match=r"ImageNet not found: expected .*imagenet/\{train,val\}/<wnid>/\*\.JPEG"):
        build_dataset("imagenet", "train", tmp_path)
    _save(tmp_path / "imagenet" / "val" / "ILSVRC2012_val_00000001.JPEG", Image.fromarray(_rgb(8, 8)))
    with pytest.raises(CCTError, match="one folder per class"):
        build_dataset("imagenet", "val", tmp_path)


# ----------------------------------------------------------------------------------- folder datasets


def test_folder_holdout_split(tmp_path: Path) -> None:
    for c, n in (("cat", 10), ("dog", 7), ("emu", 1)):
        for i in range(n):
            _save(tmp_path / "pets" / c / f"{i:02d}.png", Image.fromarray(_rgb(6, 6, i)))
    (tmp_path / "pets" / "cat" / "readme.txt").write_text("ignored: not an image extension")
    (tmp_path / "pets" / "cat" / ".DS_Store").write_bytes(b"\0")
    name = f"folder:{tmp_path / 'pets'}"
    train = build_dataset(name, "train", val_fraction=0.2)
    val = build_dataset(name, "val", val_fraction=0.2)
    assert train.classes == ["cat", "dog", "emu"]
    assert len(train) + len(val) == 18 and len(val) == round(18 * 0.2)
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    assert train.class_counts()[2] == 1  # a single-image class stays in train
    assert build_dataset(name, "test", val_fraction=0.2).samples == val.samples  # alias
    assert build_dataset(name, "val", val_fraction=0.2).samples == val.samples  # deterministic
    assert build_dataset(name, "val", val_fraction=0.2, seed=3).samples != val.samples


def test_folder_with_train_val(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c in ("a", "b"):
            _save(tmp_path / split / c / "x.jpg", Image.fromarray(_rgb(9, 9)))
    _save(tmp_path / "train" / "c" / "y.jpg", Image.fromarray(_rgb(9, 9)))
    train = build_dataset(f"folder:{tmp_path}", "train")
    val = build_dataset(f"folder:{tmp_path}", "val")
    assert train.classes == ["a", "b", "c"] and len(train) == 3
    assert val.classes == ["a", "b", "c"] and val.labels.tolist() == [0, 1]
    assert all("/val/" in p for p, _ in val.samples)
    assert build_dataset(f"folder:{tmp_path}", "test").samples == val.samples


def test_folder_empty_or_missing(tmp_path: Path) -> None:
    with pytest.raises(CCTError, match="image folder not found"):
        build_dataset(f"folder:{tmp_path / 'nope'}", "train")
    with pytest.raises(CCTError, match="no class subfolders"):
        build_dataset(f"folder:{tmp_path}", "train")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.txt").write_text("x")
    with pytest.raises(CCTError, match="holds no images"):
        build_dataset(f"folder:{tmp_path}", "train")


def test_odd_image_modes_decode_to_rgb_uint8(tmp_path: Path) -> None:
    files = _odd_images(tmp_path)
    for key, path in files.items():
        image = D.decode_image_file(path)
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3, key
        for tf in (train_transform(24), eval_transform(24)):
            out = tf(image)
            assert out.shape == (3, 24, 24) and out.dtype == torch.uint8 and out.is_contiguous(), key
    assert D.decode_image_file(files["large"]).shape == (3, 1000, 1500)
    # 16-bit grey is scaled to 8 bits (v >> 8), not clipped to 255.
    g16 = np.asarray(Image.open(files["gray16"])).astype(np.int64)
    got = D.decode_image_file(files["gray16"])
    assert torch.equal(got, torch.from_numpy((g16 >> 8).astype(np.uint8)).expand(3, -1, -1))
    assert 0 < int(got.max()) == 65291 >> 8
    for key in ("palette", "rgba", "bmp", "tiff"):  # exact: lossless formats, alpha dropped
        ref = np.asarray(Image.open(files[key]).convert("RGB")).transpose(2, 0, 1)
        assert torch.equal(D.decode_image_file(files[key]), torch.from_numpy(ref.copy())), key


def test_bad_files_yield_none_and_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _write_bad_files(tmp_path / "data" / "cls")
    _save(tmp_path / "data" / "cls" / "good.jpg", Image.fromarray(_rgb(20, 20)))
    ds = build_dataset(f"folder:{tmp_path / 'data'}", "train", val_fraction=0.01)
    assert len(ds) == 5
    ds.transform = eval_transform(16)
    by_name = {Path(p).name: i for i, (p, _) in enumerate(ds.samples)}
    for path in bad:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cct.data"):
            assert ds[by_name[path.name]] is None
        records = [r for r in caplog.records if r.name == "cct.data"]
        assert len(records) == 1 and str(path) in records[0].getMessage(), path.name
        assert "\n" not in records[0].getMessage()
    assert "too many pixels" in caplog.text
    assert ds.skipped == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cct.data"):
        assert ds[by_name["zero.jpg"]] is None  # counted again, but not logged again
    assert ds.skipped == 5 and not caplog.records
    batch = [ds[i] for i in range(len(ds))]
    images, labels, n_skipped = collate_skip_bad(batch)
    assert images.shape == (1, 3, 16, 16) and images.dtype == torch.uint8
    assert images.is_contiguous(memory_format=torch.channels_last)  # the layout the batch is normalised into
    assert torch.equal(images[0], batch[by_name["good.jpg"]][0])
    assert labels.tolist() == [0] and labels.dtype == torch.int64 and n_skipped == 4
    empty = collate_skip_bad([None, None])
    assert empty[0].shape[0] == 0 and empty[1].shape == (0,) and empty[2] == 2

    strict = build_dataset(f"folder:{tmp_path / 'data'}", "train", val_fraction=0.01, strict_images=True)
    with pytest.raises(CCTError, match=r"bad image .*truncated\.jpg"):
        strict[by_name["truncated.jpg"]]


def test_pixel_limit_is_a_module_constant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = _save(tmp_path / "x.png", Image.fromarray(_rgb(20, 20)))
    assert D.decode_image_file(small).shape == (3, 20, 20)
    monkeypatch.setattr(D, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(D.BadImage, match="too many pixels"):
        D.decode_image_file(small)
    # Just above Pillow's own limit but below twice it: Pillow would only warn, cct refuses.
    monkeypatch.setattr(D, "MAX_IMAGE_PIXELS", 89_478_485)
    with pytest.raises(D.BadImage, match="10000x10000"):
        D.decode_image_file(_png_header(tmp_path / "b.png", 10000, 10000))


def test_dataloader_with_workers_skips_bad_files(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    odd = _odd_images(root / "odd")
    bad = _write_bad_files(root / "bad")
    for i in range(6):
        _save(root / "plain" / f"{i}.jpg", Image.fromarray(_rgb(30, 40, i)))
    ds = build_dataset(f"folder:{root}", "train", val_fraction=0.1)
    held = build_dataset(f"folder:{root}", "val", val_fraction=0.1)
    ds.transform = train_transform(32)
    total = len(odd) + len(bad) + 6
    assert len(ds) + len(held) == total
    n_bad = sum(1 for p, _ in ds.samples if Path(p).parent.name == "bad")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_skip_bad)
    seen = skipped = 0
    for images, labels, n in loader:
        skipped += n
        if images.shape[0] == 0:  # a batch of bad files only: the trainer skips such a step
            continue
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
        assert images.shape[0] == labels.shape[0]
        seen += images.shape[0]
    assert skipped == n_bad > 0 and seen == len(ds) - n_bad


def test_transforms_validate_and_bound_memory() -> None:
    with pytest.raises(UsageError):
        eval_transform(32, crop_pct=1.5)
    with pytest.raises(UsageError):
        train_transform(32, scale=(0.5, 0.1))
    with pytest.raises(UsageError, match="interpolation"):
        train_transform(32, interpolation="bicubik")
    strip = torch.zeros((3, 2, 40_000), dtype=torch.uint8)
    assert eval_transform(32)(strip).shape == (3, 32, 32)
    assert train_transform(32)(strip).shape == (3, 32, 32)
    image = torch.from_numpy(_rgb(50, 70).transpose(2, 0, 1).copy())
    tf = eval_transform(32)
    assert torch.equal(tf(image), tf(image))
    torch.manual_seed(0)
    a = train_transform(32)(image)
    torch.manual_seed(0)
    assert torch.equal(a, train_transform(32)(image))
    assert "crop_pct=0.875" in repr(tf)
    assert pickle.loads(pickle.dumps(tf)).size == 32  # picklable for spawn-started workers


def test_in_memory_images_validates_and_transforms() -> None:
    images = torch.zeros((4, 3, 8, 8), dtype=torch.uint8)
    ds = InMemoryImages(images, torch.arange(4), ["a", "b", "c", "d"], name="x", split="train")
    assert len(ds) == 4 and ds[2][1] == 2 and ds.labels.dtype == torch.int64
    ds.transform = eval_transform(4)
    assert ds[0][0].shape == (3, 4, 4)
    with pytest.raises(ValueError):
        InMemoryImages(images.float(), torch.arange(4), ["a"])
