"""Helpers shared by several test modules: `cct` in a real subprocess and reading what a run left behind."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TIMING_COLUMNS = ("img_per_s", "seconds")
# keras-example (cct_2_3x2_32) on 256 real CIFAR-10 images, 8 steps of 32 an epoch, evaluated on 256 test images
TINY_RUN = ("--set", "train_samples=256", "--set", "batch_size=32", "--set", "eval_samples=256")


def cct_process(*args: str, data_root: Path, **popen: object) -> subprocess.Popen:
    """Start `python -m cct ARGS` with CCT_DATA set; stdout and stderr are captured as text."""
    env = dict(os.environ, CCT_DATA=str(data_root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.Popen([sys.executable, "-m", "cct", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def run_cct(*args: str, data_root: Path, timeout: float = 300, **popen: object) -> subprocess.CompletedProcess:
    """Run `python -m cct ARGS` to the end; returns its exit code, stdout and stderr."""
    process = cct_process(*args, data_root=data_root, **popen)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def state_step(state_path: Path) -> int:
    """The step saved in a training state, or -1 while there is none (or it is being replaced)."""
    try:
        return torch.load(state_path, weights_only=True)["step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def metrics_without_timing(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv less the columns that depend on the machine's speed."""
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def write_cifar_test_pngs(data_root: Path, folder: Path, count: int) -> list[Path]:
    """The first `count` CIFAR-10 test images as PNG files named `<index>_<class>.png`, as a person would have
    them on disk."""
    from PIL import Image

    from cct.data.datasets import build_dataset

    test = build_dataset("cifar10", "test", root=data_root)
    paths = []
    for i in range(count):
        paths.append(folder / f"{i}_{test.classes[int(test.labels[i])]}.png")
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


class OpsSeen(TorchDispatchMode):
    """Records the name of every operator dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))
