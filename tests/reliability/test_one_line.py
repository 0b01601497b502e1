"""One line for everything: names the system refuses, recipes that are not text, damaged run records, forged
training states and weights headers, NaN weights, and memory errors each end in one honest line."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cct
from cct.cli import main
from cct.models.checkpoint import model_metadata
from cct.train.state import save_state, save_weights
from tests.reliability.test_hostile_data import _fake_cifar10

LONG = "x" * 300  # one path component over the 255-byte limit of every common file system
MODEL = "cct_2_3x2_32"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one-line")
    model = cct.create_model(MODEL, num_classes=10)
    save_weights(folder / "w.safetensors", model,
                 model_metadata(model, MODEL, [str(i) for i in range(10)], (0.5,) * 3, (0.5,) * 3, "cifar10"))
    Image.new("RGB", (32, 32), "red").save(folder / "cat.png")
    return folder / "w.safetensors"


LONG_NAME_CASES = [  # {w}: a weights file, {d}: its folder, {L}: the long component
    "train keras-example --out {d}/{L}",
    "train {d}/{L}.yaml",
    "train keras-example --out {d}/run --data-dir {d}/{L}",
    "train keras-example --out {d}/{L} --resume",
    "eval {d}/{L}.safetensors",
    "eval {w} --out {d}/{L}",
    "predict {w} {d}/{L}.png",
    "predict {d}/{L}.safetensors {d}/cat.png",
    "export {d}/{L}.safetensors --format onnx -o {d}/m.onnx",
    "export {w} --format safetensors -o {d}/{L}.safetensors",
    "export {w} --format hub -o {d}/{L}",
    "push {d}/{L} me/model",
    "bench --recipe {d}/{L}.yaml",
]


@pytest.mark.parametrize("case", LONG_NAME_CASES)
def test_a_path_component_over_255_bytes_is_one_line_everywhere(weights, capsys, case):
    argv = case.format(w=weights, d=weights.parent, L=LONG).split()
    assert main(argv) in (1, 2)
    line = _one_line(capsys)
    assert "too long" in line or "not found" in line or "unknown recipe" in line or "cannot" in line, line


def test_a_recipe_that_is_not_utf8_is_a_usage_error(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("model: cct_2_3x2_32\n# caf\xe9\n".encode("latin-1"))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "is not UTF-8 text" in _one_line(capsys)


@pytest.mark.parametrize("name, text", [("config.yaml", "epochs: [1,\n"), ("summary.json", "{not json"),
                                        ("config.yaml", "- a list\n"), ("summary.json", "\xff\xfe")])
def test_a_damaged_run_record_is_one_line(weights, tmp_path, capsys, name, text):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(weights, run_dir / "best.safetensors")
    (run_dir / name).write_bytes(text.encode("latin-1"))
    for argv in (["eval", str(run_dir)], ["export", str(run_dir), "--format", "hub", "-o", str(tmp_path / "hub")],
                 ["train", "keras-example", "--out", str(run_dir), "--resume"]):
        assert main(argv) == 1
        assert f"{run_dir / name} is damaged" in _one_line(capsys)


FORGED_STATES = {
    "a list": [1, 2, 3],
    "no step": None,
    "step as text": "step",
    "negative step": -5,
    "bad epoch stats": dict(epoch_stats={"evil": 1}),
    "weights of another shape": dict(model={"head.weight": torch.zeros(1)}),
    "config not a mapping": dict(config="cct"),
}


@pytest.mark.parametrize("forgery", sorted(FORGED_STATES))
def test_a_forged_training_state_is_refused_in_one_line(one_epoch_run, data_root, tmp_path, capsys, forgery):
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch_run, run_dir)
    before = (run_dir / "last.safetensors").read_bytes()
    change = FORGED_STATES[forgery]
    real = torch.load(run_dir / "last.state.pt", weights_only=True)
    if isinstance(change, list):
        forged = change
    elif forgery == "no step":
        forged = {k: v for k, v in real.items() if k != "step"}
    elif forgery == "step as text":
        forged = {**real, "step": "8"}
    elif forgery == "negative step":
        forged = {**real, "step": -5}
    else:
        forged = {**real, **change}
    save_state(run_dir / "last.state.pt", forged)
    argv = ["train", "keras-example", "--out", str(run_dir), "--data-dir", str(data_root), "--resume",
            "--set", "train_samples=256", "--set", "batch_size=32", "--set", "eval_samples=256", "--set", "epochs=2"]
    assert main(argv) == 1
    assert "cannot resume" in _one_line(capsys)
    assert (run_dir / "last.safetensors").read_bytes() == before


HEADER_FORGERIES = {
    "num_classes": -3, "img_size": [10**9, 10**9], "classes": [1, 2], "mean": ["a"], "model": 7,
}


@pytest.mark.parametrize("key", sorted(HEADER_FORGERIES))
def test_a_tampered_weights_header_is_one_line(weights, tmp_path, capsys, key):
    with safe_open(str(weights), "pt") as f:
        meta = dict(f.metadata())
    meta[key] = json.dumps(HEADER_FORGERIES[key])
    forged = tmp_path / "forged.safetensors"
    save_file(load_file(weights), str(forged), metadata=meta)
    for argv in (["predict", str(forged), str(weights.parent / "cat.png")],
                 ["export", str(forged), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]):
        assert main(argv) == 1
        assert f"{forged} has a damaged or forged header: {key}" in _one_line(capsys)


def test_nan_weights_warn_and_json_stays_strict(weights, tmp_path, capsys, caplog):
    tensors = load_file(weights)
    tensors = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in tensors.items()}
    with safe_open(str(weights), "pt") as f:
        meta = dict(f.metadata())
    nan_file = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan_file), metadata=meta)
    assert main(["predict", str(nan_file), str(weights.parent / "cat.png"), "--json", "--topk", "2"]) == 0
    out = capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if "NaN or infinite weight" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], caplog.text
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert [p["probability"] for p in result[0]["predictions"]] == [None, None]


def test_a_memory_error_is_not_blamed_on_the_dataset(tmp_path, capsys):
    """A process whose address space is too small for the batch it loads: the line names memory and the
    settings, not the dataset file, and does not advise deleting it."""
    _fake_cifar10(tmp_path, rows=3000)
    code = ("import resource, re, sys; from cct.cli import main; import cct.train.loop, numpy, torch, yaml; "
            "size = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024; "
            "resource.setrlimit(resource.RLIMIT_AS, (size + (4 << 20), size + (4 << 20))); "
            f"sys.exit(main(['train', 'keras-example', '--data-dir', '{tmp_path}', '--out', '{tmp_path}/run']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "not enough memory to load CIFAR-10 file" in done.stderr and "not at fault" in done.stderr, done.stderr
    assert "delete" not in done.stderr and "corrupt" not in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("low_byte", [0x50, 0x80], ids=["zip-magic", "pickle-magic"])
def test_a_safetensors_header_length_that_looks_like_a_pytorch_magic_is_still_safetensors(weights, tmp_path,
                                                                                          capsys, low_byte):
    """The first byte of a safetensors file is the low byte of its header length: `P` or 0x80 there once made
    the file be read as a PyTorch zip or pickle (about 1 weights file in 128)."""
    with safe_open(str(weights), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(weights)
    path = tmp_path / "w.safetensors"
    for pad in range(512):
        save_file(tensors, str(path), metadata={**meta, "note": json.dumps("x" * pad)})
        if path.read_bytes()[0] == low_byte:
            break
    assert path.read_bytes()[0] == low_byte
    assert main(["predict", str(path), str(weights.parent / "cat.png"), "--topk", "1"]) == 0
    assert "Traceback" not in capsys.readouterr().err
