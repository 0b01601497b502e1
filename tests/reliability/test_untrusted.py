"""Untrusted files: a checkpoint whose pickle runs a command when unpickled is refused by every entry point
that reads weights or training state, whatever its name or PyTorch serialisation, and the command never runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cct
from cct.cli import main
from cct.errors import CCTError

MODEL = "cct_2_3x2_32"


class Exploit:
    """Pickles to `os.system("touch TARGET")`: a plain unpickler that loads it creates the file TARGET."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _write_exploit(path: Path, marker: Path, zipped: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": Exploit(marker)}, path, _use_new_zipfile_serialization=zipped)
    return path


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_the_exploit_runs_when_loaded_unsafely(tmp_path, zipped):
    marker = tmp_path / "pwned"
    torch.load(_write_exploit(tmp_path / "evil.pt", marker, zipped), weights_only=False)
    assert marker.exists()  # so its absence below means the loader refused it


def _image(tmp_path: Path) -> str:
    path = tmp_path / "cat.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


# entry point -> (file to plant, arguments of `cct`; None: the Python API)
ENTRY_POINTS = {
    "cct eval": ("evil.pt", lambda f, t: ["eval", str(f), "--model", MODEL, "--dataset", "cifar10"]),
    "cct eval RUN_DIR": ("run/best.safetensors", lambda f, t: ["eval", str(f.parent), "--model", MODEL]),
    "cct predict": ("evil.pth", lambda f, t: ["predict", str(f), _image(t), "--model", MODEL]),
    "cct export": ("evil.bin", lambda f, t: ["export", str(f), "--format", "onnx", "-o", str(t / "m.onnx"),
                                             "--model", MODEL]),
    "cct train --resume": ("run/last.state.pt", lambda f, t: ["train", "keras-example", "--out", str(f.parent),
                                                              "--resume"]),
    "cct.create_model": ("evil.pt", None),
}


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_malicious_pickle_is_refused_everywhere_and_never_runs(entry, zipped, tmp_path, capsys):
    marker = tmp_path / "pwned"
    name, argv = ENTRY_POINTS[entry]
    path = _write_exploit(tmp_path / name, marker, zipped)
    if argv is None:
        with pytest.raises(CCTError, match=f"refusing to load {path}: it contains pickled Python objects"):
            cct.create_model(MODEL, checkpoint=path)
    else:
        assert main(argv(path, tmp_path)) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert f"refusing to load {path}" in err, err
    assert not marker.exists()
