"""Prepared stores (`cct prepare`, `dataset=prepared:PATH`): the pixels and labels come back as written, bad
source files are skipped and counted, writing is atomic and refuses to overwrite, and a run trains on a store."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cct.cli import main
from cct.data import BatchSource
from cct.data.jpeg import eval_file_transform
from cct.data.prepared import PreparedImages, build_dataset, dataset_info, prepare_dataset
from cct.errors import CCTError, UsageError
from tests.helpers import run_cct

COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "emu": (40, 40, 200)}


def _tree(root: Path, bad: int = 1) -> Path:
    """train/ and val/ of three classes, each image a flat colour with a class-specific tint and its own size
    (wider and taller than the stored squares); `bad` truncated JPEGs in train/cat."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                pixels = np.broadcast_to(np.array(colour, dtype=np.uint8), (h, w, 3))
                Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{i}.jpg", quality=95)
    for i in range(bad):
        path = root / "train" / "cat" / f"{i}.jpg"
        path.write_bytes(path.read_bytes()[:200])
    return root


def test_round_trip_pixels_labels_and_skipped_count(tmp_path):
    tree = _tree(tmp_path / "tree")
    metas = prepare_dataset(f"folder:{tree}", 24, tmp_path / "store", workers=0)
    assert (metas["train"]["count"], metas["train"]["skipped"]) == (11, 1)
    assert (metas["val"]["count"], metas["val"]["skipped"]) == (6, 0)
    meta = json.loads((tmp_path / "store" / "train" / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog", "emu"] and meta["size"] == 24 and meta["skipped"] == 1
    assert (tmp_path / "store" / "train" / "images.u8").stat().st_size == 11 * 3 * 24 * 24

    train = build_dataset(f"prepared:{tmp_path / 'store'}", "train")
    assert isinstance(train, PreparedImages) and train.images.shape == (11, 3, 24, 24)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    for image, label in zip(train.images, train.labels, strict=True):  # each image keeps its class colour
        colour = torch.tensor(list(COLOURS.values())[label], dtype=torch.float32)
        assert (image.float().mean(dim=(1, 2)) - colour).abs().max() < 6
    # the same pixels as the evaluation transform gives for the file (shorter side to S, central square)
    first_dog = eval_file_transform(24, crop_pct=1.0).load_file(tree / "train" / "dog" / "0.jpg")
    assert torch.equal(train.images[3], first_dog)

    info = dataset_info(f"prepared:{tmp_path / 'store'}")
    assert (info.in_memory, info.img_size, info.num_classes, info.eval_split) == (True, 24, 3, "val")
    val = build_dataset(f"prepared:{tmp_path / 'store'}", "val", img_size=16)
    assert val.images.shape == (6, 3, 16, 16) and torch.equal(val.images[0], val.images.__getitem__(0))


def test_a_truncated_store_is_one_clean_error(tmp_path):
    prepare_dataset(f"folder:{_tree(tmp_path / 'tree', bad=0)}", 16, tmp_path / "store", workers=0)
    pixels = tmp_path / "store" / "train" / "images.u8"
    pixels.write_bytes(pixels.read_bytes()[:1000])
    with pytest.raises(CCTError, match="is incomplete .*: prepare it again"):
        build_dataset(f"prepared:{tmp_path / 'store'}", "train")


def test_batches_are_gathered_on_the_host_from_the_mapped_file(tmp_path):
    prepare_dataset(f"folder:{_tree(tmp_path / 'tree', bad=0)}", 16, tmp_path / "store", workers=0)
    train = build_dataset(f"prepared:{tmp_path / 'store'}", "train")
    source = BatchSource(train, torch.device("cpu"))
    images, labels, skipped = next(source.batches([torch.tensor([5, 0])]))
    assert torch.equal(images, train.images[[5, 0]]) and labels.tolist() == [1, 0] and skipped == 0


def test_an_existing_store_is_kept_unless_overwrite(tmp_path):
    tree = _tree(tmp_path / "tree")
    prepare_dataset(f"folder:{tree}", 16, tmp_path / "store", workers=0)
    with pytest.raises(UsageError, match="already exists: pass --overwrite"):
        prepare_dataset(f"folder:{tree}", 20, tmp_path / "store", workers=0)
    assert json.loads((tmp_path / "store" / "val" / "meta.json").read_text())["size"] == 16
    prepare_dataset(f"folder:{tree}", 20, tmp_path / "store", workers=0, overwrite=True)
    assert json.loads((tmp_path / "store" / "val" / "meta.json").read_text())["size"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "tree"]  # no staging folder left behind
    (tmp_path / "store" / "val" / "notes.txt").write_text("mine")  # no longer only a store: never deleted
    with pytest.raises(UsageError, match="is not a prepared store: refusing"):
        prepare_dataset(f"folder:{tree}", 16, tmp_path / "store", workers=0, overwrite=True)
    with pytest.raises(UsageError, match="is not a prepared store: refusing"):
        prepare_dataset(f"folder:{tree}", 16, tmp_path / "tree", workers=0, overwrite=True)
    assert (tmp_path / "store" / "val" / "notes.txt").is_file() and (tmp_path / "tree" / "val").is_dir()


def test_a_failed_prepare_leaves_nothing(tmp_path, capsys):
    assert main(["prepare", f"folder:{tmp_path / 'missing'}", "--size", "16", "-o", str(tmp_path / "store")]) == 1
    assert "image folder not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["prepare", "cifar10", "--size", "16", "-o", str(tmp_path / "store")]) == 2
    assert "nothing to prepare" in capsys.readouterr().err


def test_training_one_step_on_a_prepared_store(tmp_path):
    tree = _tree(tmp_path / "tree")
    done = run_cct("prepare", f"folder:{tree}", "--size", "36", "-o", str(tmp_path / "store"), "--workers", "0",
                   data_root=tmp_path, timeout=120)
    assert done.returncode == 0 and "train 11 images (1 bad skipped)" in done.stdout, done.stderr
    run = tmp_path / "run"
    done = run_cct("train", "keras-example", "--out", str(run), "--set", f"dataset=prepared:{tmp_path / 'store'}",
                   "--set", "epochs=1", "--set", "batch_size=8", "--set", "img_size=32", "--set", "crop=resized",
                   "--set", "eval_batch_size=4", data_root=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["dataset"] == f"prepared:{tmp_path / 'store'}"
    eval_report = run_cct("eval", str(run), "--json", data_root=tmp_path, timeout=120)
    assert eval_report.returncode == 0, eval_report.stderr
    assert json.loads(eval_report.stdout)["images"] == 6
