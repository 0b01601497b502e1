"""A hostile-input campaign beyond the named cases: file names that are not UTF-8, safetensors headers that
claim huge sizes, recipes and outputs that are special files or link loops, resource limits, and SIGTERM at
random moments of a run. Each case ends in its exit code and one line (or succeeds), never a hang or a
traceback; docs/reliability.md has the tally."""

from __future__ import annotations

import os
import random
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cct.cli import main
from cct.data.datasets import build_dataset
from cct.errors import CCTError
from cct.train.state import RunLock, load_state
from tests.helpers import TINY_RUN, cct_process

PRETRAINED = ["--model", "cct_2_3x2_32", "--pretrained", "cifar10"]
NOT_UTF8 = os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 bytes: not UTF-8


def _png(path: Path | str, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return Path(path)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_file_name_that_is_not_utf8_is_classified_and_printed_on_a_strict_utf8_stream(tmp_path):
    image = _png(tmp_path / NOT_UTF8)
    for extra in ([], ["--json"]):
        done = subprocess.run([sys.executable, "-m", "cct", "predict", *PRETRAINED, str(image), "--topk", "1",
                               *extra], capture_output=True, timeout=120,
                              env=dict(os.environ, PYTHONIOENCODING="utf-8"))  # strict: surrogates refused
        assert done.returncode == 0, done.stderr.decode()
        assert b"caf\\\\xe9-\\\\xff.png" in done.stdout or b"caf\\xe9-\\xff.png" in done.stdout, done.stdout


def test_a_dataset_tree_with_names_that_are_not_utf8_loads(tmp_path):
    root = tmp_path / "tree"
    for cls in ("a", os.fsdecode(b"cl\xe9")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            _png(root / cls / f"{i}-{NOT_UTF8}", seed=i)
    splits = [build_dataset(f"folder:{root}", split) for split in ("train", "val")]
    assert sum(len(d) for d in splits) == 6
    assert all(d[i] is not None for d in splits for i in range(len(d)))


def _header(text: bytes, declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if declared is None else declared) + text


HUGE_TENSOR = b'{"a":{"dtype":"F32","shape":[1000000000,1000000000],"data_offsets":[0,4]}}'


@pytest.mark.parametrize("header", [_header(b"{}", 1 << 62),  # claims 4 EiB of header
                                    _header(b"{" + b" " * (8 << 20)),  # 8 MiB, never closed
                                    _header(b"{", 100),  # claims more than the file holds
                                    _header(HUGE_TENSOR) + b"\x00" * 4],  # a 4-byte tensor claiming 4 EB
                         ids=["4-EiB", "8-MiB-open", "short", "huge-tensor"])
def test_a_safetensors_header_claiming_huge_sizes_is_one_line(tmp_path, capsys, header):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(header)
    image = _png(tmp_path / "x.png")
    for argv in (["predict", str(path), str(image), "--model", "cct_2_3x2_32"],
                 ["export", str(path), "--format", "onnx", "-o", str(tmp_path / "m.onnx"), "--model",
                  "cct_2_3x2_32"]):
        assert main(argv) == 1
        _one_line(capsys)


def test_a_recipe_that_is_a_fifo_or_a_folder_is_refused_without_reading_it(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.yaml")  # reading it would wait for a writer forever
    (tmp_path / "dir.yaml").mkdir()
    for name in ("fifo.yaml", "dir.yaml"):
        assert main(["train", str(tmp_path / name), "--out", str(tmp_path / "run")]) == 2
        assert "is not a regular file" in _one_line(capsys)


def test_link_loops_as_checkpoint_output_or_run_folder_are_one_line(tmp_path, capsys, data_root):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    cases = [(["eval", str(loop)], 1), (["predict", str(loop), str(_png(tmp_path / "x.png"))], 1),
             (["export", *PRETRAINED, "--format", "onnx", "-o", str(loop)], 1),
             (["export", *PRETRAINED, "--format", "onnx", "-o", str(loop / "m.onnx")], 1),
             (["train", "keras-example", "--out", str(loop), "--data-dir", str(data_root)], 1)]
    for argv, code in cases:
        assert main(argv) == code, argv
        _one_line(capsys)


def _limited(limit: int, value: int):
    def apply() -> None:
        resource.setrlimit(limit, (value, value))
    return apply


@pytest.mark.parametrize("name, limit, value, argv", [
    ("file size", resource.RLIMIT_FSIZE, 100_000, ["export", *PRETRAINED, "--format", "onnx", "-o", "{t}/m.onnx"]),
    ("open files", resource.RLIMIT_NOFILE, 12, ["predict", *PRETRAINED, "{t}/x.png"]),
    ("address space", resource.RLIMIT_AS, 4 << 30, ["bench", "--img-size", "4096", "--batch-size", "4",
                                                   "--nproc-per-node", "1", "--windows", "1"]),
])
def test_resource_limits_end_in_one_line_or_success(tmp_path, name, limit, value, argv):
    _png(tmp_path / "x.png")
    done = subprocess.run([sys.executable, "-m", "cct", *(a.format(t=tmp_path) for a in argv)], capture_output=True,
                          text=True, timeout=300, preexec_fn=_limited(limit, value))
    assert done.returncode in (0, 1), (done.returncode, done.stderr[-2000:])
    if done.returncode:
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert not list(tmp_path.glob(".*.tmp"))


def _how_to_go_on(run_dir: Path) -> list[str]:
    """--resume where the run has a checkpoint; --overwrite where it stopped before its first one."""
    if (run_dir / "last.state.pt").exists():
        return ["--resume"]
    return ["--overwrite"] if run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir()) else []


def test_sigterm_at_random_moments_never_loses_the_run(tmp_path, data_root):
    """Five SIGTERMs at seeded random moments of one run (from interpreter start-up to evaluation), each
    followed by a --resume: every stop leaves no temporary file, a released lock, a loadable state, and one
    line (or none, where the signal came before `cct` started); the last --resume finishes the run."""
    run_dir = tmp_path / "run"
    args = ["train", "keras-example", *TINY_RUN, "--set", "epochs=3", "--set", "checkpoint_every_steps=2",
            "--out", str(run_dir)]
    rng = random.Random(11)
    outcomes = []
    for attempt in range(5):
        job = cct_process(*args, *_how_to_go_on(run_dir), data_root=data_root)
        time.sleep(rng.uniform(0.2, 12.0))
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=120)
        outcomes.append(job.returncode)
        assert job.returncode in (0, 143, -signal.SIGTERM), (attempt, job.returncode, stderr)
        assert "Traceback" not in stderr
        if job.returncode == 143:
            assert [line for line in stderr.splitlines() if line.startswith(("terminated", "error"))] == [
                stderr.strip().splitlines()[-1]] and stderr.strip().splitlines()[-1].startswith("terminated")
        assert not list(run_dir.glob(".*.tmp")) if run_dir.exists() else True
        if (run_dir / "last.state.pt").exists():
            load_state(run_dir / "last.state.pt")
        if run_dir.exists():
            with RunLock(run_dir):  # free: the stopped run released it (or the kernel did)
                pass
    final = cct_process(*args, *_how_to_go_on(run_dir), data_root=data_root)
    _, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr
    assert load_state(run_dir / "last.state.pt")["step"] == 3 * 8
    print(f"SIGTERM outcomes: {outcomes}")


def test_a_weights_file_that_is_a_fifo_is_not_opened_for_ever(tmp_path, capsys):
    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    assert main(["predict", str(fifo), str(_png(tmp_path / "x.png"))]) == 1
    _one_line(capsys)


def test_runlock_on_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CCTError, match="cannot write"):
        RunLock(tmp_path / "file").__enter__()
