"""Nothing hangs, nothing grows without bound: image inputs must be regular files under a size cap (a FIFO,
/dev/zero or a folder is one line for `cct predict`, skipped and counted in a dataset), folder walks survive
link cycles, `cct predict` holds one batch at a time, and settings that size the work are bounded by the
machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cct.data.datasets as datasets
from cct.cli import IMAGE_BATCH, main
from cct.data.datasets import BadImage, build_dataset, decode_image_file
from cct.train.config import machine_limits

PREDICT = ["predict", "--model", "cct_2_3x2_32", "--pretrained", "cifar10", "--topk", "1"]


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


class _Alarm:
    """Fail instead of hanging: SIGALRM after `seconds`."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        signal.signal(signal.SIGALRM, lambda *_: pytest.fail("hung"))
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)


@pytest.mark.parametrize("kind, message", [("fifo", "not a regular file (a FIFO)"),
                                           ("/dev/zero", "not a regular file (a character device)"),
                                           ("link-to-dev-zero", "not a regular file (a character device)"),
                                           ("dir", "cannot read file (Is a directory)")])
def test_predict_refuses_special_files_in_one_line_without_hanging(tmp_path, capsys, kind, message):
    target = tmp_path / "image.png"
    if kind == "fifo":
        os.mkfifo(target)  # no writer: a plain open() would wait forever
    elif kind == "dir":
        target.mkdir()
    elif kind == "link-to-dev-zero":
        target.symlink_to("/dev/zero")
    else:
        target = Path(kind)
    with _Alarm(60):
        assert main([*PREDICT, str(target)]) == 1
    assert f"{target}: {message}" in _one_line(capsys)


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path, monkeypatch):
    path = _png(tmp_path / "big.png")
    monkeypatch.setattr(datasets, "MAX_IMAGE_BYTES", path.stat().st_size - 1)
    with pytest.raises(BadImage, match="file too large"):
        decode_image_file(path)


def test_a_dataset_tree_skips_special_files_and_walks_a_link_cycle_once(tmp_path, caplog):
    root = tmp_path / "tree"
    for cls in ("a", "b"):
        for i in range(4):
            _png(root / "train" / cls / f"{i}.png", seed=i)
    os.mkfifo(root / "train" / "a" / "fifo.png")
    (root / "train" / "a" / "zero.png").symlink_to("/dev/zero")
    (root / "train" / "a" / "dangling.png").symlink_to(root / "nowhere.png")
    (root / "train" / "b" / "loop").symlink_to(root / "train" / "b")  # b/loop/loop/loop/...
    (root / "train" / "b" / "up").symlink_to(root / "train")  # b/up/b/up/...
    with _Alarm(60):
        sizes = [len(build_dataset(f"folder:{root}", split)) for split in ("train", "val")]
    assert sum(sizes) == 8 + 4  # b/up/a once more; b/loop and b/up/b are b itself, walked once
    assert "skipped 3 special files" in caplog.text and "link cycles" in caplog.text


def test_a_special_file_that_appears_after_listing_is_skipped_and_counted(tmp_path):
    root = tmp_path / "tree"
    for cls in ("a", "b"):
        for i in range(4):
            _png(root / "train" / cls / f"{i}.png", seed=i)
    data = build_dataset(f"folder:{root}", "train")
    victim = data.path(0)
    victim.unlink()
    os.mkfifo(victim)  # swapped for a FIFO after the walk
    with _Alarm(60):
        assert data[0] is None
    assert data.skipped == 1


def test_predict_classifies_more_images_than_one_batch_in_order(tmp_path, capsys):
    images = [str(_png(tmp_path / f"{i:04d}.png", seed=i)) for i in range(2 * IMAGE_BATCH + 3)]
    images.insert(IMAGE_BATCH + 1, str(tmp_path / "missing.png"))
    assert main([*PREDICT, *images, "--json"]) == 1
    out, err = capsys.readouterr()
    results = json.loads(out)
    assert [r["image"] for r in results] == [i for i in images if "missing" not in i]
    assert err.count("\n") == 1 and "missing.png" in err


def _peak_rss_kib(*args: str) -> int:
    process = subprocess.Popen([sys.executable, "-m", "cct", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0
    return usage.ru_maxrss


def test_predict_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Peak RSS for 1,000 images is that of one batch: holding them all in one batch took about 0.5 GB more
    (the activations of a 1,000-image batch)."""
    images = [str(_png(tmp_path / f"{i:04d}.png", seed=i)) for i in range(1000)]
    few = _peak_rss_kib(*PREDICT, *images[:IMAGE_BATCH])
    many = _peak_rss_kib(*PREDICT, *images)
    assert many - few < 100 * 1024, (few, many)


LIMITS = machine_limits()


@pytest.mark.parametrize("argv, message", [
    ("train keras-example --set processes=100000", "processes must be <= "),
    ("train keras-example --set threads=100000", "threads must be <= "),
    ("train keras-example --set workers=100000", "workers must be <= "),
    ("train keras-example --set batch_size=1000000000", "batch_size must be <= "),
    ("train keras-example --set eval_batch_size=1000000000", "eval_batch_size must be <= "),
    ("train keras-example --set img_size=1000000 --set crop=resized", "img_size must be <= "),
    ("train keras-example --nproc-per-node 100000", "argument --nproc-per-node: must be <= "),
    ("bench --batch-size 1000000000", "argument --batch-size: must be <= "),
    ("bench --img-size 1000000", "argument --img-size: must be <= "),
    ("bench --img-size 8000 --batch-size 4096", "batch_size must be <= "),
    ("bench --nproc-per-node 100000", "argument --nproc-per-node: must be <= "),
    ("bench --threads 100000", "argument --threads: must be <= "),
    ("eval x --batch-size 1000000000", "argument --batch-size: must be <= "),
    ("eval x --workers 100000", "argument --workers: must be <= "),
])
def test_settings_that_size_the_work_are_bounded_by_the_machine(tmp_path, capsys, argv, message):
    assert main([*argv.split(), *(["--out", str(tmp_path / "run")] if argv.startswith("train") else [])]) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_bench_at_the_largest_allowed_image_fails_in_one_line_not_a_crash(tmp_path):
    """An image size that passes the bounds but not this process's memory: one line, no segfault."""
    code = ("import resource, sys; from cct.cli import main; "
            "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
            f"sys.exit(main(['bench', '--img-size', '{LIMITS.img_size}', '--batch-size', '1', "
            "'--nproc-per-node', '1', '--windows', '1']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert done.stderr.startswith("error: out of memory") and done.stderr.count("\n") == 1, done.stderr
