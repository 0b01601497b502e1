"""Forged dataset files: a CIFAR batch or meta file whose pickle would run a command is refused with one line
and the command never runs; the real files' contents (dicts, lists, bytes, numpy arrays) still load."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cct.cli import main
from cct.data.datasets import build_dataset
from cct.errors import CCTError

CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"]


class Exploit:
    """Pickles to `os.system("touch TARGET")`."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _fake_cifar10(root: Path, rows: int = 4) -> Path:
    """A CIFAR-10 folder with the real files' layout and types (protocol 2, bytes keys), `rows` images each."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in CIFAR10_FILES[:-1]:
        batch = {b"batch_label": name.encode(), b"labels": [int(x) for x in rng.integers(0, 10, rows)],
                 b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(rows)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": rows,
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def _plant(folder: Path, name: str, marker: Path) -> None:
    """Replace one file by a dict that holds the exploit beside plausible keys."""
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"label_names": [b"x"] * 10,
               b"evil": Exploit(marker)}
    (folder / name).write_bytes(pickle.dumps(payload, protocol=2))


def test_the_fake_cifar_loads_and_the_exploit_runs_when_unpickled_plainly(tmp_path):
    folder = _fake_cifar10(tmp_path)
    assert len(build_dataset("cifar10", "train", tmp_path)) == 20
    assert len(build_dataset("cifar10", "test", tmp_path)) == 4
    marker = tmp_path / "pwned"
    _plant(folder, "test_batch", marker)
    with open(folder / "test_batch", "rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.exists()  # so its absence below means the loader refused it


@pytest.mark.parametrize("name", CIFAR10_FILES)
def test_a_forged_cifar_file_is_refused_and_never_runs(tmp_path, name):
    folder = _fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    _plant(folder, name, marker)
    split = "test" if name == "test_batch" else "train"
    with pytest.raises(CCTError, match=f"file {folder / name} is not plain data .*refusing posix.system"):
        build_dataset("cifar10", split, tmp_path)
    assert not marker.exists()


def test_a_forged_cifar_file_is_one_line_through_cct(tmp_path, capsys):
    folder = _fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    _plant(folder, "data_batch_3", marker)
    assert main(["train", "keras-example", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nothing in it was run" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"x": slice(1)}, protocol=2),  # builtins.slice
    pickle.dumps({b"x": __import__("collections").OrderedDict()}, protocol=2),  # a class to build
    b"cos\nsystem\n(S'true'\ntR.",  # protocol 0 GLOBAL + REDUCE
], ids=["builtin", "class", "protocol0"])
def test_other_globals_are_refused(tmp_path, payload):
    folder = _fake_cifar10(tmp_path)
    (folder / "batches.meta").write_bytes(payload)
    with pytest.raises(CCTError, match="is not plain data"):
        build_dataset("cifar10", "test", tmp_path)
