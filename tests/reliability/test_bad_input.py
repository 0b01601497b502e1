"""Bad input through the real command line, one row per case: a one-line error, exit 2 for usage errors and 1
for problems with data or files, no traceback (unless --debug); odd but valid images are accepted. Cases that
other test files already check at the library level are run here once more through `cct` for the exit code;
docs/reliability.md says where each one is tested."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cct
from cct.cli import main
from cct.errors import UsageError
from cct.models.checkpoint import model_metadata
from cct.train.state import save_weights
from tests.data.test_datasets import _odd_images, _write_bad_files

MODEL = "cct_2_3x2_32"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints (10 and 3 classes, truncated, empty), recipes and images, good and bad, in one folder."""
    folder = tmp_path_factory.mktemp("bad-input")
    for classes in (10, 3):
        model = cct.create_model(MODEL, num_classes=classes)
        meta = model_metadata(model, MODEL, [str(i) for i in range(classes)], (0.5,) * 3, (0.5,) * 3, "cifar10")
        save_weights(folder / f"c{classes}.safetensors", model, meta)
    (folder / "truncated.safetensors").write_bytes((folder / "c10.safetensors").read_bytes()[:5000])
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "wrong-type.yaml").write_text("model: cct_2_3x2_32\nepochs: three\n")
    (folder / "list.yaml").write_text("- epochs\n- 3\n")
    (folder / "broken.yaml").write_text("epochs: [1,\n")
    (folder / "empty-dir").mkdir()
    _write_bad_files(folder)  # zero.jpg, truncated.jpg, notes_not_image.png, bomb.png (20000 x 20000 header)
    _odd_images(folder)  # gray.jpg, rgba.PNG, palette.png, gray16.png, ...
    for image in ("a/1.jpg", "b/1.jpg", "b/2.jpg"):  # too few images to hold any out for evaluation
        (folder / "tiny-tree" / image).parent.mkdir(parents=True, exist_ok=True)
        (folder / "tiny-tree" / image).write_bytes((folder / "gray.jpg").read_bytes())
    return folder


TRAIN = "train keras-example --out {d}/run --data-dir {data}"
PREDICT = "predict {d}/c10.safetensors"
CASES = [  # (argv; {d}: the folder above, {data}: CIFAR-10's), exit code, a part of the one-line error
    (f"{TRAIN} --set model=cct_nope", 2, "unknown model 'cct_nope'"),
    (f"{TRAIN} --set dataset=cifar11", 2, "unknown dataset 'cifar11'; did you mean 'cifar10'?"),
    (f"{TRAIN} --set epoch=2", 2, "unknown recipe key 'epoch'; did you mean 'epochs'?"),
    (f"{TRAIN} --set lr=fast", 2, "recipe key 'lr' expects float, got 'fast'"),
    (f"{TRAIN} --set epochs=-1", 2, "epochs must be >= 0, got -1"),
    (f"{TRAIN} --set batch_size=0", 2, "batch_size must be >= 1, got 0"),
    (f"{TRAIN} --set img_size=48", 2, "img_size 48 does not fit crop=pad on cifar10: its 32 px images padded by 4"),
    ("train {d}/wrong-type.yaml --out {d}/run", 2, "recipe key 'epochs' expects int, got 'three'"),
    ("train {d}/list.yaml --out {d}/run", 2, "must be a mapping of keys to values"),
    ("train {d}/broken.yaml --out {d}/run", 2, "is not valid YAML"),
    ("train keras-example --out {d}/run --data-dir {d}/no-such-dir", 1, "cifar-10-batches-py"),
    ("train keras-example --out {d}/run --data-dir {d}/empty-dir", 1, "cifar-10-batches-py"),
    ("train keras-example --out {d}/run --set dataset=folder:{d}/empty-dir", 1, "has no class subfolders"),
    ("train keras-example --out {d}/run --set dataset=folder:{d}/tiny-tree --set batch_size=2", 1,
     "the val split of folder:{d}/tiny-tree holds no images (3 for training)"),  # was a conv's RuntimeError
    ("eval {d}/c10.safetensors --batch-size 0", 2, "argument --batch-size: must be >= 1, got 0"),
    (f"{PREDICT} {{d}}/gray.jpg --topk 0", 2, "argument --topk: must be >= 1, got 0"),
    (f"{PREDICT} {{d}}/gray.jpg --topk -3", 2, "argument --topk: must be >= 1, got -3"),
    (PREDICT, 2, "give a CHECKPOINT and at least one image"),
    (f"{PREDICT} {{d}}/zero.jpg", 1, "zero.jpg: empty file (0 bytes)"),
    (f"{PREDICT} {{d}}/truncated.jpg", 1, "truncated.jpg: "),
    (f"{PREDICT} {{d}}/notes_not_image.png", 1, "notes_not_image.png: "),
    (f"{PREDICT} {{d}}/bomb.png", 1, "bomb.png: too many pixels"),
    (f"{PREDICT} {{d}}/no-such.png", 1, "no-such.png: cannot read file (No such file or directory)"),
    (f"{PREDICT} {{d}}/empty-dir", 1, "empty-dir: cannot read file (Is a directory)"),
    ("eval {d}/c3.safetensors --data-dir {data}", 1, "cifar10 has 10 classes but the model predicts 3"),
    ("eval {d}/truncated.safetensors --data-dir {data}", 1, "truncated.safetensors is not a readable"),
    ("eval {d}/empty.safetensors --model cct_2_3x2_32 --data-dir {data}", 1, "empty.safetensors is not a readable"),
    ("eval {d}/c10.safetensors --model cct_7_3x1_32 --data-dir {data}", 1, "does not fit cct_7_3x1_32: missing"),
    ("bench --batch-size 15 --nproc-per-node 2", 2, "--batch-size 15 does not split over 2 processes"),
    # output below a file (not a folder): checked before evaluating; torchscript, safetensors and hub were tracebacks
    ("eval {d}/c10.safetensors --out {d}/c10.safetensors/report", 1, "cannot write {d}/c10.safetensors/report"),
    *[(f"export {{d}}/c10.safetensors --format {fmt} -o {{d}}/c10.safetensors/x", 1,
       "cannot write {d}/c10.safetensors/x") for fmt in ("onnx", "torchscript", "safetensors", "hub")],
]
IN_THE_LAUNCHER = [  # cifar10-fast and `cct bench` start 2 processes
    ("train cifar10-fast --out {d}/fast --set model=cct_nope", 2, "unknown model 'cct_nope'"),
    ("train cifar10-fast --out {d}/fast --data-dir {d}/empty-dir", 1, "cifar-10-batches-py"),
    ("train cifar10-fast --out {d}/fast --set img_size=48", 2, "img_size 48 does not fit crop=pad"),
    ("bench --model cct_nope", 2, "unknown model 'cct_nope'"),
]
NO_GPU = [f"{TRAIN} --device cuda", "bench --device cuda", "eval {d}/c10.safetensors --device cuda"]


def _fails_in_one_line(argv: str, code: int, message: str, files: Path, data_root: Path, capsys) -> None:
    assert main(argv.format(d=files, data=data_root).split()) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(d=files) in err, err


@pytest.mark.parametrize("argv, code, message", CASES, ids=[c[0].split("{d}/")[-1][:60] for c in CASES])
def test_bad_input_is_one_line_and_an_exit_code(argv, code, message, files, data_root, capsys):
    _fails_in_one_line(argv, code, message, files, data_root, capsys)


@pytest.mark.parametrize("argv, code, message", IN_THE_LAUNCHER, ids=[c[0][:60] for c in IN_THE_LAUNCHER])
def test_a_multi_process_command_stops_before_its_workers_start(argv, code, message, files, data_root, capsys):
    """Checked in the launching process: one line, not one per worker and then torchrun's, and no run directory.
    Were the workers started, their lines would not reach capsys and the launcher's would not match."""
    _fails_in_one_line(argv, code, message, files, data_root, capsys)
    assert not (files / "fast").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("argv", NO_GPU)
def test_device_cuda_without_a_gpu(argv, files, data_root, capsys):
    assert main(argv.format(d=files, data=data_root).split()) == 2
    err = capsys.readouterr().err
    assert err == "error: --device cuda: no CUDA device is available on this machine (use --device cpu)\n", err


def test_odd_image_modes_are_accepted(files, capsys):
    images = [str(files / name) for name in ("gray.jpg", "rgba.PNG", "palette.png", "gray16.png", "tiny.png")]
    assert main(["predict", str(files / "c10.safetensors"), *images, "--topk", "2"]) == 0
    assert capsys.readouterr().out.count("%") == 2 * len(images)


def test_predict_classifies_the_readable_images_and_names_each_unreadable_one(files, capsys):
    """Like `cat` or `file`: one bad file among good ones costs its own line and the exit code, not the others'
    predictions (before, the whole command stopped at the first bad file)."""
    argv = ["predict", str(files / "c10.safetensors"), str(files / "gray.jpg"), str(files / "zero.jpg"),
            str(files / "rgba.PNG"), str(files / "no-such.png"), "--json"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert [r["image"] for r in json.loads(out)] == [str(files / "gray.jpg"), str(files / "rgba.PNG")]
    assert err.splitlines() == [f"error: {files / 'zero.jpg'}: empty file (0 bytes)",
                                f"error: {files / 'no-such.png'}: cannot read file (No such file or directory)"]


def test_debug_shows_the_traceback(files):
    with pytest.raises(UsageError, match="unknown recipe key 'epoch'"):
        main(["--debug", "train", "keras-example", "--set", "epoch=2", "--out", str(files / "run")])
