"""Nothing lost: `cct train` refuses a folder that holds another run (unless --overwrite), and `cct export`
never writes over its own input, over what is not a regular file, or over an existing file without
--overwrite; each refusal is one line and leaves every file as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cct.cli import main
from cct.train.state import RUN_FILES
from tests.helpers import TINY_RUN


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("name", [*RUN_FILES, "epoch3.safetensors"])
def test_train_refuses_a_folder_holding_any_file_of_another_run(data_root, tmp_path, capsys, name):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).write_bytes(b"the earlier run")
    assert main(["train", "keras-example", "--out", str(run_dir), "--data-dir", str(data_root)]) == 2
    err = _one_line(capsys)
    assert name in err and "--resume" in err and "fresh --out" in err, err
    assert ("already holds a run" if name == "last.state.pt" else "stopped before its first checkpoint") in err
    assert (run_dir / name).read_bytes() == b"the earlier run"


def test_overwrite_replaces_the_earlier_run(data_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("config.yaml", "best.safetensors", "summary.json"):
        (run_dir / name).write_text("the earlier run")
    (run_dir / "notes.txt").write_text("mine")
    args = ["train", "keras-example", *TINY_RUN, "--set", "epochs=0", "--out", str(run_dir), "--data-dir",
            str(data_root)]
    assert main([*args, "--overwrite", "--resume"]) == 2
    assert "give one of them" in _one_line(capsys)
    assert main([*args, "--overwrite"]) == 0
    assert not (run_dir / "best.safetensors").exists()  # the earlier run's best is not mixed with the new run
    assert "model: cct_2_3x2_32" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "notes.txt").read_text() == "mine"  # not a run file: left alone


def test_train_into_an_empty_or_unrelated_folder_is_fine(data_root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "README").write_text("mine")
    assert main(["train", "keras-example", *TINY_RUN, "--set", "epochs=0", "--out", str(run_dir), "--data-dir",
                 str(data_root)]) == 0


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    assert main(["export", "--model", "cct_2_3x2_32", "--pretrained", "cifar10", "--format", "safetensors",
                 "-o", str(folder / "w.safetensors")]) == 0
    return folder / "w.safetensors"


def _export(source: Path, output: str, *extra: str) -> int:
    return main(["export", str(source), "--format", "safetensors", "-o", output, *extra])


def test_export_refuses_its_own_input_even_with_overwrite(weights, capsys):
    before = weights.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert _export(weights, str(weights), *extra) == 2
        assert "is the checkpoint being exported" in _one_line(capsys)
    link = weights.with_name("alias.safetensors")
    link.symlink_to(weights.name)
    assert _export(weights, str(link), "--overwrite") == 2  # the same file under another name
    assert "is the checkpoint being exported" in _one_line(capsys)
    assert weights.read_bytes() == before


def test_export_refuses_an_existing_file_unless_overwrite(weights, tmp_path, capsys):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"precious")
    assert _export(weights, str(target)) == 2
    assert "exists: pass --overwrite" in _one_line(capsys)
    assert target.read_bytes() == b"precious"
    assert _export(weights, str(target), "--overwrite") == 0
    assert load_file(target).keys() == load_file(weights).keys()
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temporary file left


@pytest.mark.parametrize("kind", ["dir", "fifo", "device", "link-to-dir", "dangling-link"])
def test_export_refuses_what_is_not_a_regular_file(weights, tmp_path, capsys, kind):
    target = tmp_path / "target"
    if kind == "dir":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        target = Path("/dev/null")
    elif kind == "link-to-dir":
        target.symlink_to(tmp_path)
    else:
        target.symlink_to(tmp_path / "nowhere")
    assert _export(weights, str(target), "--overwrite") == 1
    err = _one_line(capsys)
    assert "is not a regular file" in err or "cannot write" in err, err
    assert os.path.lexists(target)


@pytest.mark.parametrize("output", ["", "  "])
def test_export_to_an_empty_name_is_a_usage_error(weights, capsys, output):
    assert _export(weights, output) == 2
    assert "-o/--output: give the file to write" in _one_line(capsys)


def test_export_ignores_a_planted_link_at_the_old_temporary_name(weights, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / ".out.onnx.tmp").symlink_to(victim)
    assert main(["export", str(weights), "--format", "onnx", "-o", str(tmp_path / "out.onnx")]) == 0
    assert victim.read_text() == "precious"
