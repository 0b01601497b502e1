"""Datasets for training and evaluating CCT models: CIFAR-10/100, Oxford Flowers-102, ImageNet, image folders.

Two kinds of dataset come out of `build_dataset`:

* `InMemoryImages` (CIFAR-10/100): every image of the split as one contiguous uint8 tensor
  `N x 3 x H x W`. Loading is a numpy reshape of the pickled batches (well under a second for CIFAR-10
  train), so the trainer can move the whole split to the GPU and augment it there in batches.
* `ImageFiles` (flowers102, imagenet, `folder:PATH`): a list of image files decoded on demand in
  DataLoader workers. Its `transform` (see `train_transform` and `eval_transform`, or
  `cct.data.jpeg`'s, which decode only the crop) turns one image into a fixed-size uint8 `3 x S x S`
  crop; flips, normalisation and other augmentations happen later, batched. A bad file (corrupt,
  truncated, empty, not an image, too many pixels) yields `None` and one logged warning instead of
  killing the epoch; `collate_skip_bad` drops those items and counts them.

Where data lives: `--data-dir`, else the environment variable `CCT_DATA`, else `./data`
(`resolve_data_root`). Missing files raise `CCTError` with a one-line message
naming the expected files and how to get them; wrong names raise `UsageError`.
"""

from __future__ import annotations

import difflib
import io
import logging
import math
import os
import pickle
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cct.errors import CCTError, UsageError

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "IMAGE_EXTENSIONS",
    "ImageFiles",
    "InMemoryImages",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "build_dataset",
    "collate_skip_bad",
    "dataset_info",
    "decode_image_file",
    "ensure_dataset",
    "open_image_file",
    "eval_transform",
    "resolve_data_root",
    "train_transform",
]

log = logging.getLogger("cct.data")

#: Images whose header claims more pixels than this are refused as bad files before decoding
#: (a decompression bomb guard; the same figure as Pillow's default `Image.MAX_IMAGE_PIXELS`).
#: A module constant so that a deployment (or a test) can change it.
MAX_IMAGE_PIXELS: int = 89_478_485

#: Image files larger than this are refused unread: above what any image of `MAX_IMAGE_PIXELS` pixels
#: needs (4 bytes a pixel, uncompressed), so a huge file never fills the memory.
MAX_IMAGE_BYTES: int = 384 << 20

#: File name endings that `ImageFiles` picks up from a folder tree (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# Formats (as Pillow names them) that torchvision.io decodes natively; others go through Pillow. Not PNG:
# torchvision 0.29.1's decode_png kills the process (SIGSEGV) when libpng reports an error inside the image
# data (one flipped byte: "IDAT: CRC error"), found by tests/reliability/test_fuzz.py; Pillow reports it.
_TORCHVISION_FORMATS = frozenset({"JPEG", "GIF", "WEBP"})

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset before loading it.

    `num_classes` is None for `folder:PATH` (it depends on the tree). `mean`/`std` are per-channel
    statistics of pixels scaled to [0, 1], used for normalisation. `in_memory` says whether
    `build_dataset` returns an `InMemoryImages` (True) or an `ImageFiles` (False).
    """

    name: str
    num_classes: int | None
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    in_memory: bool
    splits: tuple[str, ...]

    @property
    def eval_split(self) -> str:
        """The split that training and `cct eval` evaluate on: the test split, or "val" where there is none
        (a folder's held-out part)."""
        return "test" if "test" in self.splits and self.name != "folder" else "val"


DATASETS: dict[str, DatasetInfo] = {
    # CIFAR-10 statistics: the per-channel train mean/std of the real data (see the data README).
    "cifar10": DatasetInfo(
        "cifar10", 10, 32, (0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784),
        True, ("train", "test", "val"),
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
        True, ("train", "test", "val"),
    ),
    "flowers102": DatasetInfo(
        "flowers102", 102, 224, IMAGENET_MEAN, IMAGENET_STD, False, ("train", "val", "test"),
    ),
    "imagenet": DatasetInfo("imagenet", 1000, 224, IMAGENET_MEAN, IMAGENET_STD, False, ("train", "val")),
    # "folder:PATH": an ImageFolder-style tree anywhere on disk.
    "folder": DatasetInfo("folder", None, 224, IMAGENET_MEAN, IMAGENET_STD, False, ("train", "val", "test")),
}

_NAMES_FOR_HELP = ("cifar10", "cifar100", "flowers102", "imagenet", "folder:PATH")
_FLOWERS_SPLITS = ("official", "cct")


# --------------------------------------------------------------------------------------------- helpers


def _one_line(text: object, limit: int = 200) -> str:
    """First non-empty line of `text`, shortened: log lines and CLI errors must stay on one line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unknown(kind: str, value: str, valid: Sequence[str], context: str = "") -> UsageError:
    """A UsageError for a wrong name, listing the valid ones and the closest match."""
    close = difflib.get_close_matches(value, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    where = f" for {context}" if context else ""
    return UsageError(f"unknown {kind} '{value}'{where}{hint} (valid: {', '.join(valid)})")


def resolve_data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder that holds the datasets: `data_dir` (`--data-dir`), else env `CCT_DATA`, else ./data.

    Returned as an absolute path so that error messages say exactly where files were looked for.
    """
    if data_dir is not None and str(data_dir) != "":
        root = Path(data_dir)
    elif os.environ.get("CCT_DATA"):
        root = Path(os.environ["CCT_DATA"])
    else:
        root = Path("data")
    return root.expanduser().absolute()


def _parse_name(name: str) -> tuple[str, Path | None]:
    """Split `folder:PATH` into ("folder", PATH); check that other names are known."""
    if not isinstance(name, str):
        raise UsageError(f"dataset name must be a string, got {name!r}")
    key = name.strip()
    if key.lower().startswith("folder:"):
        path = key[len("folder:"):].strip()
        if not path:
            raise UsageError("dataset 'folder:' needs a path, e.g. folder:/data/my_images")
        return "folder", Path(path).expanduser()
    key = key.lower()
    if key == "folder":
        raise UsageError("dataset 'folder' needs a path: write folder:PATH, e.g. folder:/data/my_images")
    if key not in DATASETS:
        raise _unknown("dataset", name, _NAMES_FOR_HELP)
    return key, None


def dataset_info(name: str) -> DatasetInfo:
    """The `DatasetInfo` for a dataset name, accepting the `folder:PATH` form."""
    key, _ = _parse_name(name)
    return DATASETS[key]


def _check_split(key: str, split: str) -> str:
    split_l = str(split).strip().lower()
    valid = DATASETS[key].splits
    if split_l not in valid:
        raise _unknown("split", str(split), valid, context=key)
    return split_l


# ------------------------------------------------------------------------------------ in-memory (CIFAR)


class InMemoryImages(Dataset):
    """A whole split held as one uint8 tensor (CIFAR-10/100).

    Attributes: `images` (uint8, `N x 3 x H x W`, contiguous), `labels` (int64, `N`), `classes`
    (names, index = label). `transform`, if set, is applied to each image in `__getitem__`; by default
    items are the raw stored images, because the trainer augments in-memory data in batches.
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str], name: str = "", split: str = ""):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 N x 3 x H x W, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.transform: Callable[[Tensor], Tensor] | None = None
        self.skipped = 0  # never incremented: in-memory images cannot be bad; kept for a uniform interface

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __repr__(self) -> str:
        return (f"InMemoryImages({self.name}/{self.split}: {len(self)} images "
                f"{tuple(self.images.shape[1:])}, {len(self.classes)} classes)")


_CIFAR = {
    "cifar10": {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "names_key": b"label_names",
        "labels_key": b"labels",
        "listing": "{data_batch_1..5,test_batch,batches.meta}",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "tv_class": "CIFAR10",
    },
    "cifar100": {
        "title": "CIFAR-100",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "names_key": b"fine_label_names",
        "labels_key": b"fine_labels",
        "listing": "{train,test,meta}",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "tv_class": "CIFAR100",
    },
}


def _cifar_folder(spec: dict[str, Any], root: Path) -> Path:
    """`<root>/<folder>`; also accept `root` being that folder itself (a common --data-dir mistake)."""
    if root.name == spec["folder"] and (root / spec["meta"]).is_file():
        return root
    return root / spec["folder"]


def _cifar_missing(spec: dict[str, Any], folder: Path) -> list[str]:
    names = [*spec["train"], *spec["test"], spec["meta"]]
    return [n for n in names if not (folder / n).is_file()]


def _download_cifar(spec: dict[str, Any], root: Path) -> None:
    """Fetch and unpack the CIFAR archive into `root` with torchvision's downloader (checks its MD5)."""
    from torchvision import datasets as tvd
    from torchvision.datasets.utils import download_and_extract_archive

    tv = getattr(tvd, spec["tv_class"])
    url = getattr(tv, "url", spec["url"])
    log.info("downloading %s from %s into %s", spec["title"], url, root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(url, download_root=str(root), filename=getattr(tv, "filename", None),
                                     md5=getattr(tv, "tgz_md5", None))
    except Exception as exc:  # network down, proxy, disk full, bad checksum: the same for the user
        raise CCTError(f"could not download {spec['title']} from {url} ({_one_line(exc)}); download it "
                       f"by hand and extract it into {root} (expected {root / spec['folder']}/"
                       f"{spec['listing']})") from exc


class _DataOnlyUnpickler(pickle.Unpickler):
    """Rebuilds only what CIFAR pickles hold: dicts, lists, tuples, strings, bytes, numbers and numpy arrays.
    Any other global (a function to call, a class to build) is refused before it is looked up, so a forged
    batch file cannot run code."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 spells bytes when Python 3 wrote the file
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only plain data and numpy arrays are "
                                         "allowed")
        return super().find_class(module, name)


def _load_pickle(path: Path, title: str) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            obj = _DataOnlyUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refusing "):
            raise CCTError(f"{title} file {path} is not plain data ({_one_line(exc)}); nothing in it was run: "
                           f"download the dataset again from its official source") from None
        raise CCTError(f"{title} file {path} is unreadable or corrupt ({_one_line(exc)}); "
                       f"delete it and download the dataset again") from None
    except MemoryError:
        raise CCTError(f"not enough memory to load {title} file {path} (the file is not at fault: free memory, "
                       "or lower the settings that take it: batch_size, workers, processes)") from None
    except Exception as exc:
        raise CCTError(f"{title} file {path} is unreadable or corrupt ({_one_line(exc)}); "
                       f"delete it and download the dataset again") from None
    if not isinstance(obj, dict):
        raise CCTError(f"{title} file {path} does not hold a CIFAR batch (a dict); "
                       f"download the dataset again")
    return obj


def _cifar_present(spec: dict[str, Any], root: Path, download: bool) -> Path:
    """The folder holding every file of a CIFAR dataset (downloaded first if files are missing and `download`)."""
    folder = _cifar_folder(spec, root)
    if _cifar_missing(spec, folder) and download:
        _download_cifar(spec, root)
        folder = root / spec["folder"]
    missing = _cifar_missing(spec, folder)
    if missing:
        raise CCTError(
            f"{spec['title']} not found: expected {folder}/{spec['listing']} "
            f"(missing: {', '.join(missing)}); "
            f"download {spec['url']} and extract it into {folder.parent}, or pass --download"
        )
    return folder


def _load_cifar(key: str, split: str, root: Path, download: bool) -> InMemoryImages:
    spec = _CIFAR[key]
    folder = _cifar_present(spec, root, download)
    title = spec["title"]
    meta = _load_pickle(folder / spec["meta"], title)
    classes = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in meta.get(spec["names_key"], [])]
    datas, labels = [], []
    for fname in spec["train" if split == "train" else "test"]:
        batch = _load_pickle(folder / fname, title)
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            lab = np.asarray(batch[spec["labels_key"]], dtype=np.int64)
        except KeyError as exc:
            raise CCTError(f"{title} file {folder / fname} lacks the key {exc}; "
                           f"download the dataset again") from exc
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or lab.shape != (data.shape[0],):
            raise CCTError(f"{title} file {folder / fname} has data of shape {data.shape} and {lab.shape[0]} "
                           f"labels, expected N x 3072 and N; download the dataset again")
        datas.append(data)
        labels.append(lab)
    # Each row is 1024 red, 1024 green, 1024 blue values, row-major: a plain reshape gives N x 3 x 32 x 32.
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(datas).reshape(-1, 3, 32, 32)))
    label_t = torch.from_numpy(np.concatenate(labels))
    n_classes = DATASETS[key].num_classes
    assert n_classes is not None
    if len(classes) != n_classes:
        raise CCTError(f"{title} meta file {folder / spec['meta']} lists {len(classes)} class names, "
                       f"expected {n_classes}; download the dataset again")
    if label_t.numel() and (int(label_t.min()) < 0 or int(label_t.max()) >= n_classes):
        raise CCTError(f"{title} labels in {folder} fall outside 0..{n_classes - 1}; "
                       f"download the dataset again")
    return InMemoryImages(images, label_t, classes, name=key, split=split)


# ------------------------------------------------------------------------------------- image decoding


class BadImage(Exception):
    """Raised by `decode_image_file` for a file that is not a usable image; the message says why."""


def _pil_to_tensor(img: Any) -> Tensor:
    """A decoded Pillow image as uint8 3 x H x W RGB, scaling 16/32-bit grey levels (not clipping them)."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img)
        if mode == "I":  # 32-bit ints; Pillow uses this for 16-bit data in some formats
            arr = np.clip(arr, 0, 65535)
        arr = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        arr = np.nan_to_num(arr * 255.0 if peak <= 1.0 else arr)
        arr = np.repeat(np.clip(np.rint(arr), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # a writable copy, even of a 1-pixel image


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def _read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a regular file of at most `MAX_IMAGE_BYTES`, or `BadImage`. The file is opened
    without blocking (a FIFO with no writer would wait forever), checked with `fstat` on the open descriptor
    (no race with a rename), and read with a limit (a device such as /dev/zero never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadImage(f"cannot read file ({_one_line(exc.strerror or exc)})") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise BadImage("cannot read file (Is a directory)")
        if not stat.S_ISREG(info.st_mode):
            raise BadImage(f"not a regular file ({_not_regular(info.st_mode)})")
        if info.st_size > MAX_IMAGE_BYTES:
            raise BadImage(f"file too large ({info.st_size} bytes > limit {MAX_IMAGE_BYTES})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_IMAGE_BYTES + 1)  # the file may have grown since fstat
    except OSError as exc:
        raise BadImage(f"cannot read file ({_one_line(exc.strerror or exc)})") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"file too large (more than {MAX_IMAGE_BYTES} bytes)")
    if not data:
        raise BadImage("empty file (0 bytes)")
    return data


def _checked_header(data: bytes) -> Any:
    """`data` opened by Pillow, which reads only the header: its size checked against `MAX_IMAGE_PIXELS`, not
    decoded yet; `BadImage` for a file that is no image or too large."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data))
        width, height = header.size
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too many pixels ({_one_line(exc)})") from exc
    except UnidentifiedImageError as exc:
        raise BadImage("not a recognised image format") from exc
    except Exception as exc:
        raise BadImage(f"unreadable image header ({_one_line(exc)})") from exc
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImage(f"too many pixels ({width}x{height} = {width * height} > limit {MAX_IMAGE_PIXELS})")
    if width <= 0 or height <= 0:
        raise BadImage(f"empty image ({width}x{height})")
    return header


def open_image_file(path: str | os.PathLike[str]) -> Any:
    """One image file opened by Pillow with its header checked (as `decode_image_file` does) but its pixels not
    decoded yet, for a caller that decodes only what it needs (`Image.draft`); raises `BadImage` saying why not."""
    return _checked_header(_read_image_bytes(path))


def decode_image_file(path: str | os.PathLike[str]) -> Tensor:
    """Decode one image file to a uint8 `3 x H x W` RGB tensor, or raise `BadImage` saying why.

    The header is read first (Pillow reads only the header on open) and images with more than
    `MAX_IMAGE_PIXELS` pixels are refused, so a decompression bomb never gets decoded. JPEG, GIF and
    WebP are decoded by torchvision.io (libjpeg-turbo; fast); PNG (see `_TORCHVISION_FORMATS`), other
    formats (BMP, TIFF) and files torchvision cannot handle go through Pillow. Grey, grey+alpha, palette,
    RGBA and CMYK images become 3-channel RGB (alpha is dropped); 16-bit images are scaled to 8 bits
    (value >> 8), not clipped.
    EXIF orientation is not applied, matching the usual Pillow-based ImageNet pipelines.
    """
    from PIL import Image

    data = _read_image_bytes(path)
    fmt = _checked_header(data).format or ""

    tv_error: Exception | None = None
    if fmt in _TORCHVISION_FORMATS:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates decoders
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                image = tv_decode(encoded, mode=ImageReadMode.RGB)
            if image.dtype != torch.uint8:
                raise RuntimeError(f"unexpected decoded dtype {image.dtype}")
            if image.ndim == 3 and image.shape[0] == 3:
                return image.contiguous()
            raise RuntimeError(f"unexpected decoded shape {tuple(image.shape)}")
        except Exception as exc:  # fall back to Pillow, which reads a few variants libjpeg/libpng reject
            tv_error = exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        return _pil_to_tensor(img)
    except Exception as exc:  # Pillow's messages read better than torchvision's C++ ones
        raise BadImage(f"corrupt or truncated image data ({_one_line(exc)})") from (tv_error or exc)


# ------------------------------------------------------------------------------------------ transforms


def _interp(name: str) -> Any:
    from torchvision.transforms.v2 import InterpolationMode

    valid = ("bicubic", "bilinear", "nearest")  # the modes torchvision supports on tensors
    key = str(name).strip().lower()
    if key not in valid:
        raise _unknown("interpolation", str(name), valid)
    return InterpolationMode(key)


class _TrainCrop:
    """Random-resized crop of a uint8 CHW tensor to S x S (see `train_transform`)."""

    def __init__(self, img_size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 interpolation: str):
        if img_size <= 0:
            raise UsageError(f"img_size must be positive, got {img_size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise UsageError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not (0 < ratio[0] <= ratio[1]):
            raise UsageError(f"crop ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        self.size = int(img_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = _interp(interpolation)

    def params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a random box covering `scale` of the area with aspect ratio in `ratio`."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(self.scale[0], self.scale[1]))
            aspect = math.exp(float(torch.empty(1).uniform_(log_lo, log_hi)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)))
                left = int(torch.randint(0, width - w + 1, (1,)))
                return top, left, h, w
        # Fallback: the largest central box whose aspect ratio is within range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, max(1, round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, max(1, round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as F

        top, left, h, w = self.params(int(image.shape[-2]), int(image.shape[-1]))
        out = F.resized_crop(image, top, left, h, w, [self.size, self.size],
                             interpolation=self.interpolation, antialias=True)
        return out.contiguous()

    def __repr__(self) -> str:
        return (f"train_transform(img_size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation.value!r})")


class _EvalCrop:
    """Resize the shorter side to S / crop_pct, then a central S x S crop (see `eval_transform`)."""

    # Images more elongated than this are first cut to this aspect ratio around their centre, so that a
    # 1 x 50000 strip is not resized into a gigantic tensor; the final central crop lies inside that cut.
    max_aspect = 4.0

    def __init__(self, img_size: int, crop_pct: float, interpolation: str):
        if img_size <= 0:
            raise UsageError(f"img_size must be positive, got {img_size}")
        if not (0 < crop_pct <= 1):
            raise UsageError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size = int(img_size)
        self.crop_pct = float(crop_pct)
        self.resize_to = math.floor(self.size / self.crop_pct)
        self.interpolation = _interp(interpolation)

    def __call__(self, image: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as F

        h, w = int(image.shape[-2]), int(image.shape[-1])
        short, long_ = min(h, w), max(h, w)
        if long_ > self.max_aspect * short:
            keep = math.ceil(self.max_aspect * short)
            image = F.center_crop(image, [keep, w] if h > w else [h, keep])
        image = F.resize(image, self.resize_to, interpolation=self.interpolation, antialias=True)
        return F.center_crop(image, [self.size, self.size]).contiguous()

    def __repr__(self) -> str:
        return (f"eval_transform(img_size={self.size}, crop_pct={self.crop_pct}, "
                f"interpolation={self.interpolation.value!r})")


def train_transform(img_size: int, scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    interpolation: str = "bicubic") -> Callable[[Tensor], Tensor]:
    """Per-image training transform for `ImageFiles`: random-resized crop to `img_size`.

    Runs in DataLoader workers on one decoded uint8 `3 x H x W` tensor and returns uint8
    `3 x img_size x img_size`. It samples a box covering a fraction in `scale` of the image area with
    aspect ratio (log-uniform) in `ratio` (10 tries, then the largest central box with an allowed aspect
    ratio), like torchvision's RandomResizedCrop, using torch's RNG (`BatchSource` seeds it per image).
    There is no flip here: flips and the other augmentations run later on whole batches.
    The returned object is picklable (works with the `spawn` start method).
    """
    return _TrainCrop(img_size, scale, ratio, interpolation)


def eval_transform(img_size: int, crop_pct: float = 0.875,
                   interpolation: str = "bicubic") -> Callable[[Tensor], Tensor]:
    """Per-image evaluation transform: shorter side to `floor(img_size / crop_pct)`, central square crop.

    Returns uint8 `3 x img_size x img_size`; deterministic. The standard ImageNet evaluation protocol
    (crop_pct 0.875 is the classic 256 -> 224; CCT's timm recipes use 0.9). Images more elongated than 4:1
    are first cut to 4:1 around their centre to bound the memory of the resize; the output is the same
    central region either way.
    """
    return _EvalCrop(img_size, crop_pct, interpolation)


# -------------------------------------------------------------------------------------- image files


class ImageFiles(Dataset):
    """Image files decoded on demand (flowers102, imagenet, folder:PATH).

    Attributes: `samples` (list of (path, label), built on demand), `labels` (int64 tensor),
    `classes` (human-readable names, index = label), `class_ids` (the folder names / WordNet ids),
    `transform` (`train_transform` / `eval_transform` on the decoded image, or one with a `load_file(path)`
    method that decodes the file straight to its crop, as training sets from `cct.data.jpeg`; with None,
    items are full-size decoded images), `strict_images`, and `skipped`.

    `__getitem__` returns `(uint8 3 x S x S tensor, label)`, or `None` for a bad file after logging one
    warning line naming it on the "cct.data" logger (once per file per process), unless `strict_images`
    is set, in which case it raises `CCTError` naming the file.

    `skipped` counts the `None` items returned *by this process's copy* of the dataset. DataLoader
    workers each have their own copy, so with `num_workers > 0` the counter in the main process stays 0:
    sum the third element returned by `collate_skip_bad` instead.

    Paths are stored as one numpy byte-string array relative to `root` (not a list of Python strings),
    which keeps a 1.28M-image ImageNet index small and avoids copy-on-read memory growth in forked workers.
    """

    def __init__(self, root: str | os.PathLike[str], samples: Sequence[tuple[str, int]],
                 classes: Sequence[str], *, class_ids: Sequence[str] | None = None,
                 transform: Callable[[Tensor], Tensor] | None = None, strict_images: bool = False,
                 name: str = "", split: str = ""):
        self.root = Path(root)
        rel = [os.fsencode(p) for p, _ in samples]
        self._rel = np.array(rel, dtype=bytes) if rel else np.zeros(0, dtype="S1")
        self.labels = torch.tensor([int(lab) for _, lab in samples], dtype=torch.int64)
        self.classes = list(classes)
        self.class_ids = list(class_ids) if class_ids is not None else list(classes)
        self.transform = transform
        self.strict_images = strict_images
        self.name = name
        self.split = split
        self.skipped = 0
        self._warned: set[int] = set()

    def path(self, index: int) -> Path:
        """The file of item `index`."""
        return self.root / os.fsdecode(bytes(self._rel[index]))

    @property
    def samples(self) -> list[tuple[str, int]]:
        """All items as (path, label) pairs; built on each access (O(N)): keep the result if used often."""
        root = str(self.root)
        return [(os.path.join(root, os.fsdecode(bytes(r))), int(lab))
                for r, lab in zip(self._rel, self.labels.tolist(), strict=True)]

    def __len__(self) -> int:
        return int(self._rel.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path = self.path(index)
        load_file = getattr(self.transform, "load_file", None)  # a transform that decodes just its crop (cct.data.jpeg)
        try:
            image = load_file(path) if load_file else decode_image_file(path)
        except BadImage as exc:
            if self.strict_images:
                raise CCTError(f"bad image {path}: {exc} "
                               f"(run without --strict-images to skip bad files)") from exc
            self.skipped += 1
            if index not in self._warned:
                self._warned.add(index)
                log.warning("skipping bad image %s: %s", path, exc)
            return None
        if self.transform is not None and not load_file:
            image = self.transform(image)
        return image, int(self.labels[index])

    def class_counts(self) -> list[int]:
        """Number of items per class (index = label)."""
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def __repr__(self) -> str:
        return (f"ImageFiles({self.name}/{self.split}: {len(self)} files under {self.root}, "
                f"{len(self.classes)} classes)")


def collate_skip_bad(batch: Sequence[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor, int]:
    """DataLoader `collate_fn` that drops bad items: returns (uint8 B x 3 x S x S in channels-last memory, int64 B,
    n_skipped).

    `None` items (bad files, see `ImageFiles`) are removed and counted, so one bad file never ends
    an epoch; the trainer sums `n_skipped` into the run summary. A batch made only of bad files gives
    `B = 0` (images of shape `0 x 3 x 0 x 0`): skip such a step. All images must have the same size,
    i.e. the dataset needs a `transform`.
    """
    good = [item for item in batch if item is not None]
    n_skipped = len(batch) - len(good)
    if not good:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.int64), n_skipped
    # channels-last, the layout the models compute in: the batch's conversion to normalised floats then reads and
    # writes memory in order instead of transposing it (at 224 px that transpose halved what a 2-core machine
    # delivers); decoders' height-width-channel pixels are copied in as they are
    first = good[0][0]
    images = torch.empty((len(good), *first.shape), dtype=first.dtype, memory_format=torch.channels_last)
    for i, (img, _) in enumerate(good):
        images[i].copy_(img)
    labels = torch.tensor([int(lab) for _, lab in good], dtype=torch.int64)
    return images, labels, n_skipped


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_class_dirs(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders of `folder` (one per class)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def _list_images(folder: Path) -> list[str]:
    """Sorted relative paths of the regular image files under `folder` (recursively, following links to
    folders). A folder reached twice (a link cycle, or two links to one folder) is walked once; special files
    (FIFOs, devices, sockets, dangling links) with an image name are skipped, and both are counted in one
    warning."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    skipped = {"special files": 0, "folders reached twice (link cycles)": 0}
    pending = [(folder, "")]
    while pending:
        directory, rel_dir = pending.pop()
        try:
            info = directory.stat()
            if (info.st_dev, info.st_ino) in seen:
                skipped["folders reached twice (link cycles)"] += 1
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue  # unreadable, or gone since it was listed
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = entry.name if not rel_dir else os.path.join(rel_dir, entry.name)
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                pending.append((Path(entry.path), rel))
            elif _is_image_name(entry.name):
                if is_file:
                    found.append(rel)
                else:
                    skipped["special files"] += 1
    if any(skipped.values()):
        log.warning("%s: skipped %s", folder, ", ".join(f"{n} {what}" for what, n in skipped.items() if n))
    found.sort()
    return found


def _scan_class_tree(folder: Path, classes: Sequence[str], what: str) -> list[tuple[str, int]]:
    """(path relative to `folder`, label) for every image in `folder/<class>/`, in a stable order.

    Class folders of `folder` must all be in `classes` (the training split's classes), otherwise labels
    would silently mean different things in train and val.
    """
    present = _list_class_dirs(folder)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in present if c not in index]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise CCTError(f"{what}: class folder(s) {shown} under {folder} are not in the training classes")
    samples: list[tuple[str, int]] = []
    for cls in present:
        samples.extend((os.path.join(cls, rel), index[cls]) for rel in _list_images(folder / cls))
    return samples


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split `n` into parts proportional to `fractions` (largest-remainder rounding; sums to `n`)."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Deterministic stratified split of item indices into `len(fractions)` parts.

    The totals of each part follow `fractions` exactly (largest remainder over the whole set); each class
    then gets its proportional share of each part (largest remainder again, with the per-part totals
    respected), and its items are shuffled with a generator seeded by (seed, class). Part 0 (train) always
    keeps at least one item of every class. Depends only on the labels, their order and the seed.
    """
    labels_a = np.asarray(labels, dtype=np.int64)
    n_parts = len(fractions)
    totals = _allocate(len(labels_a), fractions)
    class_ids = np.unique(labels_a)
    members = {int(c): np.flatnonzero(labels_a == c) for c in class_ids}
    # Per-class quotas for parts 1.. (held-out parts), by largest remainder within each part's total.
    quotas = {int(c): [0] * n_parts for c in class_ids}
    for p in range(1, n_parts):
        exact = {c: len(m) * fractions[p] for c, m in members.items()}
        base = {c: math.floor(v) for c, v in exact.items()}
        for c in base:
            room = len(members[c]) - 1 - sum(quotas[c][1:p])
            base[c] = max(0, min(base[c], room))
        extra = totals[p] - sum(base.values())
        order = sorted(exact, key=lambda c: (-(exact[c] - math.floor(exact[c])), c))
        for c in order:
            if extra <= 0:
                break
            if base[c] < len(members[c]) - 1 - sum(quotas[c][1:p]):
                base[c] += 1
                extra -= 1
        for c in base:
            quotas[c][p] = base[c]
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for c, idx in members.items():
        perm = idx[np.random.default_rng([int(seed), c]).permutation(len(idx))]
        start = 0
        for p in range(1, n_parts):
            parts[p].extend(perm[start:start + quotas[c][p]].tolist())
            start += quotas[c][p]
        parts[0].extend(perm[start:].tolist())
    return [sorted(p) for p in parts]


def _flowers_class_names() -> list[str]:
    """The 102 Oxford flower names in label order, from torchvision (`class_001`.. if it lacks them)."""
    try:
        from torchvision.datasets import Flowers102

        names = list(getattr(Flowers102, "classes", []))
    except Exception:
        names = []
    return names if len(names) == 102 else [f"class_{i:03d}" for i in range(1, 103)]


_FLOWERS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
# Sizes of the larger split the CCT authors trained on (train / val / test of all 8,189 images).
_FLOWERS_CCT_SIZES = (6552, 818, 819)


def _load_mat(path: Path) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise CCTError("flowers102 needs scipy to read its .mat files: pip install scipy") from exc
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as exc:
        raise CCTError(f"Flowers-102 file {path} is unreadable ({_one_line(exc)}); "
                       f"download it again") from exc


def _flowers_present(root: Path, download: bool) -> Path:
    """The Flowers-102 folder with its images and both .mat files (downloaded first if missing and `download`)."""
    base = root / "flowers-102"  # torchvision.datasets.Flowers102 uses this folder name too

    def missing() -> list[str]:
        need = [base / "jpg", base / "imagelabels.mat", base / "setid.mat"]
        return [p.name for p in need if not p.exists()]

    if missing() and download:
        try:
            from torchvision.datasets import Flowers102

            root.mkdir(parents=True, exist_ok=True)
            Flowers102(str(root), split="train", download=True)
        except Exception as exc:
            raise CCTError(f"could not download Flowers-102 from {_FLOWERS_URL} ({_one_line(exc)}); download "
                           f"102flowers.tgz, imagelabels.mat and setid.mat by hand into {base}") from exc
    if missing():
        raise CCTError(
            f"Flowers-102 not found: expected "
            f"{base}/{{jpg/image_00001..08189.jpg,imagelabels.mat,setid.mat}} "
            f"(missing: {', '.join(missing())}); download 102flowers.tgz (extract it there), imagelabels.mat "
            f"and setid.mat from {_FLOWERS_URL} into {base}, or pass --download"
        )
    return base


def _load_flowers(split: str, root: Path, download: bool, flowers_split: str, seed: int,
                  strict_images: bool) -> ImageFiles:
    """Oxford Flowers-102 in torchvision's layout; see `build_dataset` for the two split schemes."""
    base = _flowers_present(root, download)
    labels_all = np.asarray(_load_mat(base / "imagelabels.mat").get("labels"), dtype=np.int64).reshape(-1) - 1
    if labels_all.size == 0 or labels_all.min() < 0 or labels_all.max() >= 102:
        raise CCTError(f"Flowers-102 file {base / 'imagelabels.mat'} holds no valid labels 1..102")
    if flowers_split == "official":
        key = {"train": "trnid", "val": "valid", "test": "tstid"}[split]
        setid = _load_mat(base / "setid.mat")
        if key not in setid:
            raise CCTError(f"Flowers-102 file {base / 'setid.mat'} lacks '{key}'; download it again")
        ids = np.asarray(setid[key], dtype=np.int64).reshape(-1)  # 1-based image numbers
        if ids.size and (ids.min() < 1 or ids.max() > labels_all.size):
            raise CCTError(f"Flowers-102 file {base / 'setid.mat'} refers to images outside "
                           f"1..{labels_all.size}")
        ids = np.sort(ids)
    else:
        fractions = [s / sum(_FLOWERS_CCT_SIZES) for s in _FLOWERS_CCT_SIZES]
        parts = _stratified_split(labels_all.tolist(), fractions, seed)
        ids = np.asarray(parts[("train", "val", "test").index(split)], dtype=np.int64) + 1
    samples = [(os.path.join("jpg", f"image_{i:05d}.jpg"), int(labels_all[i - 1])) for i in ids.tolist()]
    return ImageFiles(base, samples, _flowers_class_names(), strict_images=strict_images,
                      name="flowers102", split=split)


@lru_cache(maxsize=1)
def _imagenet_names() -> dict[str, str]:
    """wnid -> human name for the 1,000 ILSVRC-2012 classes, from the bundled imagenet_classes.json."""
    import json

    path = Path(__file__).with_name("imagenet_classes.json")
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        log.warning("cannot read %s; ImageNet classes will be named by their WordNet ids", path)
        return {}


def _imagenet_present(split: str, root: Path) -> Path:
    """The folder of an ImageNet split (ImageNet cannot be downloaded automatically)."""
    base = root / "imagenet"
    folder = base / split
    if not folder.is_dir():
        raise CCTError(
            f"ImageNet not found: expected {base}/{{train,val}}/<wnid>/*.JPEG (missing: {folder}); ImageNet "
            f"cannot be downloaded automatically: get ILSVRC-2012 from https://image-net.org, extract it "
            f"there and put the val images into one folder per class"
        )
    return folder


def _load_imagenet(split: str, root: Path, strict_images: bool) -> ImageFiles:
    folder = _imagenet_present(split, root)
    base = folder.parent
    class_src = base / "train" if (base / "train").is_dir() else folder
    class_ids = _list_class_dirs(class_src)
    if not class_ids:
        loose = [n for n in os.listdir(folder) if _is_image_name(n)]
        hint = " (it holds loose images: move the val images into one folder per class)" if loose else ""
        raise CCTError(f"ImageNet {split}: no class folders under {class_src}{hint}")
    samples = _scan_class_tree(folder, class_ids, f"ImageNet {split}")
    if not samples:
        raise CCTError(f"ImageNet {split}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<wnid>/")
    names = _imagenet_names()
    classes = [names.get(w, w) for w in class_ids]
    return ImageFiles(folder, samples, classes, class_ids=class_ids, strict_images=strict_images,
                      name="imagenet", split=split)


def _folder_present(path: Path) -> None:
    if not path.is_dir():
        raise CCTError(f"image folder not found: {path} (expected {path}/<class>/<image files>)")


def _load_folder(path: Path, split: str, val_fraction: float, seed: int, strict_images: bool) -> ImageFiles:
    """An ImageFolder-style tree; see `build_dataset`."""
    _folder_present(path)
    subdirs = set(_list_class_dirs(path))
    split_layout = "train" in subdirs and subdirs <= {"train", "val", "test"}
    name = f"folder:{path}"
    if split_layout:
        held = "val" if "val" in subdirs else ("test" if "test" in subdirs else None)
        class_ids = _list_class_dirs(path / "train")
        if not class_ids:
            raise CCTError(f"image folder {path / 'train'} has no class subfolders "
                           f"(expected train/<class>/<image files>)")
        if held is not None:
            if split == "train":
                folder = path / "train"
            else:
                folder = path / (split if split in subdirs else held)
            samples = _scan_class_tree(folder, class_ids, name)
            if not samples:
                raise CCTError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            return ImageFiles(folder, samples, class_ids, strict_images=strict_images, name=name, split=split)
        base = path / "train"
    else:
        class_ids = sorted(subdirs)
        base = path
        if not class_ids:
            raise CCTError(f"image folder {path} has no class subfolders "
                           f"(expected {path}/<class>/<image files>)")
    all_samples = _scan_class_tree(base, class_ids, name)
    if not all_samples:
        raise CCTError(f"image folder {base} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    parts = _stratified_split([lab for _, lab in all_samples], [1.0 - val_fraction, val_fraction], seed)
    chosen = parts[0] if split == "train" else parts[1]
    samples = [all_samples[i] for i in chosen]
    return ImageFiles(base, samples, class_ids, strict_images=strict_images, name=name, split=split)


# ------------------------------------------------------------------------------------------- entry


def ensure_dataset(name: str, splits: Sequence[str], root: str | os.PathLike[str] | None = None, *,
                   download: bool = False) -> None:
    """Check that the files of dataset `name` for `splits` are where `build_dataset` looks, without
    reading them, downloading them first where that is possible and `download` is set. The same one-line
    errors as `build_dataset`, early: `cct train` calls it before it starts its training processes, so a
    missing dataset is one message rather than one per process, and one download rather than a race."""
    key, folder_path = _parse_name(name)
    checked = [_check_split(key, split) for split in splits]
    data_root = resolve_data_root(root)
    if key in _CIFAR:
        _cifar_present(_CIFAR[key], data_root, download)
    elif key == "flowers102":
        _flowers_present(data_root, download)
    elif key == "imagenet":
        for split in checked:
            _imagenet_present(split, data_root)
    else:
        assert folder_path is not None
        _folder_present(folder_path)


def build_dataset(name: str, split: str, root: str | os.PathLike[str] | None = None, *,
                  download: bool = False, flowers_split: str = "official", val_fraction: float = 0.1,
                  seed: int = 0, strict_images: bool = False) -> InMemoryImages | ImageFiles:
    """Load split `split` of dataset `name` from `root` (default: `resolve_data_root`).

    Names and layouts under `root`:

    * `cifar10`: `cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`; `cifar100`:
      `cifar-100-python/{train,test,meta}` (fine labels). Splits train / test ("val" is an alias of test).
      Read straight from the pickles (no MD5 check, so re-packed copies load too). `download=True` fetches
      the archive with torchvision's downloader when files are missing.
    * `flowers102`: `flowers-102/{jpg/image_NNNNN.jpg,imagelabels.mat,setid.mat}` (torchvision's layout,
      so `download=True` uses torchvision). `flowers_split="official"` gives the official splits from
      setid.mat (train 1,020 / val 1,020 / test 6,149). `flowers_split="cct"` gives the much larger
      training split the CCT authors used (6,552 train / 818 val / 819 test of all 8,189 images; training
      on the small official split gives about 62% instead of the paper's ~97%). The authors' file lists are
      not available, so this is *not* their exact split: it is a deterministic split stratified by class,
      with exactly those sizes, shuffled per class with `seed`.
    * `imagenet`: `imagenet/{train,val}/<wnid>/*.JPEG` (ILSVRC-2012, val sorted into class folders).
      Class names come from the bundled wnid table; an unknown wnid is its own name.
    * `folder:PATH`: an ImageFolder tree (PATH relative to the working directory, not to `root`). If
      PATH holds `train/` and `val/` (or `test/`), those are the splits; otherwise `val_fraction` of
      each class is held out as "val" (stratified, deterministic for a given `seed`; keep the seed fixed
      to compare runs) and the rest is "train". "test" is accepted as an alias of "val" when there is no
      separate test folder. Classes are the sorted subfolder names of the training folder.

    Args:
        name: `cifar10`, `cifar100`, `flowers102`, `imagenet` or `folder:PATH`.
        split: `train`, `val` or `test` (aliases as above).
        root: the folder holding the datasets (default: `resolve_data_root`).
        download: fetch a missing CIFAR or Flowers-102 archive first.
        flowers_split: `official` or `cct` (Flowers-102 only).
        val_fraction: the part of each class held out as "val" (a folder without a val split).
        seed: the seed of the held-out split (Flowers-102 `cct`, folders without a val split).
        strict_images: a bad image file raises instead of being skipped.

    Returns:
        `InMemoryImages` (CIFAR: one uint8 tensor) or `ImageFiles` (decoded on demand; set its `transform`).

    Raises:
        UsageError: an unknown name, split or option.
        CCTError: missing data (one line, naming the expected files).
    """
    key, folder_path = _parse_name(name)
    split_l = _check_split(key, split)
    data_root = resolve_data_root(root)
    if key in _CIFAR:
        return _load_cifar(key, "train" if split_l == "train" else "test", data_root, download)
    if key == "flowers102":
        fs = str(flowers_split).strip().lower()
        if fs not in _FLOWERS_SPLITS:
            raise _unknown("flowers split", str(flowers_split), _FLOWERS_SPLITS)
        return _load_flowers(split_l, data_root, download, fs, seed, strict_images)
    if key == "imagenet":
        return _load_imagenet(split_l, data_root, strict_images)
    assert folder_path is not None
    if not (0.0 < float(val_fraction) < 1.0):
        raise UsageError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    return _load_folder(folder_path, split_l, float(val_fraction), seed, strict_images)
