"""Shared fixtures: the real CIFAR-10 (through CCT_DATA) and one small trained run reused by several tests."""

import os
from pathlib import Path

import pytest

from cct.cli import main


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder holding cifar-10-batches-py, from CCT_DATA; tests that need it skip without it."""
    root = os.environ.get("CCT_DATA")
    if not root or not (Path(root) / "cifar-10-batches-py").is_dir():
        pytest.skip("CCT_DATA does not point at a folder with cifar-10-batches-py")
    return Path(root)


SMALL_RUN = ["--set", "epochs=2", "--set", "train_samples=512", "--set", "batch_size=64",
             "--set", "eval_batch_size=2000"]


@pytest.fixture(scope="session")
def trained_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch keras-example run on 512 real CIFAR-10 images, through the real CLI."""
    run_dir = tmp_path_factory.mktemp("runs") / "small"
    assert main(["train", "keras-example", "--data-dir", str(data_root), "--out", str(run_dir), *SMALL_RUN]) == 0
    return run_dir
