"""Weights shipped inside the package load offline through cct and timm, and `cct eval` reproduces the
accuracy recorded when they were trained."""

import json
from pathlib import Path

import pytest
import timm
import torch

from cct.cli import main
from cct.models.registry import SHIPPED_WEIGHTS, WEIGHTS_DIR, shipped_weights
from cct.train.runs import load_trained


@pytest.mark.parametrize("key", sorted(SHIPPED_WEIGHTS))
def test_shipped_weights_reproduce_their_record(key, data_root, capsys):
    path = WEIGHTS_DIR / SHIPPED_WEIGHTS[key]
    record = json.loads(path.with_suffix(".json").read_text())
    model, meta = load_trained(path)
    via_timm = timm.create_model(key, pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(via_timm(x), model(x))
    name, tag = key.split(".")
    # no --flip: cct eval evaluates as the record says the run did (test-time flip for cifar10_fast); in one
    # thread, as the recipes' processes train and evaluate on a CPU, so on the same (C) kernels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["eval", "--model", name, "--pretrained", tag, "--data-dir", str(data_root), "--json",
                     "--precision", record["precision"]]) == 0  # as recorded, whatever `auto` gives here
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 10_000
    # bf16 evaluation: a different kernel or batch split than at training time moves a few borderline images (the
    # keras weights: 83.40% recorded with SDPA, 83.41% on the C kernels of inference; the cifar10_fast weights:
    # 80.77% recorded, 80.75% on them, 80.84% on PyTorch's in a process of 2 threads)
    assert report["top1"] == pytest.approx(record["final_top1"], abs=0.05)


def test_default_pretrained_is_the_keras_example_model():
    model = timm.create_model("cct_2_3x2_32", pretrained=True)
    assert model.pretrained_cfg["tag"] == "cifar10_keras"


def test_shipped_weights_export_like_a_checkpoint(tmp_path, capsys):
    """`cct export --model M --pretrained TAG` takes the shipped weights, as `cct eval` and `cct predict` do."""
    out = tmp_path / "keras.safetensors"
    assert main(["export", "--model", "cct_2_3x2_32", "--pretrained", "cifar10", "--format", "safetensors",
                 "-o", str(out)]) == 0
    exported, _ = load_trained(out)
    shipped = timm.create_model("cct_2_3x2_32", pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), shipped.state_dict().values(),
                                                 strict=True))
    assert main(["export", "--format", "onnx", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "give a CHECKPOINT, or --model NAME --pretrained TAG" in capsys.readouterr().err


def test_a_dataset_name_finds_the_shipped_tag():
    """`--pretrained cifar10` names each model's CIFAR-10 weights whatever recipe made them."""
    assert shipped_weights("cct_2_3x2_32", "cifar10") == WEIGHTS_DIR / SHIPPED_WEIGHTS["cct_2_3x2_32.cifar10_keras"]
    assert shipped_weights("cct_2_3x2_32_h32", "cifar10") == \
        WEIGHTS_DIR / SHIPPED_WEIGHTS["cct_2_3x2_32_h32.cifar10_fast"]
    assert shipped_weights("cct_2_3x2_32_h32", "cifar10_fast") == shipped_weights("cct_2_3x2_32_h32", "cifar10")
    assert shipped_weights("cct_2_3x2_32_h32", "cifar") is None  # a whole word before the underscore, not a prefix
    assert shipped_weights("cct_4_3x2_32", "cifar10") == WEIGHTS_DIR / SHIPPED_WEIGHTS["cct_4_3x2_32.cifar10_hour"]
    assert shipped_weights("cct_7_3x1_32", "cifar10") is None


@pytest.mark.parametrize("key", sorted(SHIPPED_WEIGHTS))
def test_hub_folder_of_the_repository_holds_the_shipped_weights(key):
    """hub/<model>.<tag>/ is what `cct push` would upload for the shipped weights: the same tensors, its card
    quoting their recorded accuracy, its config the record that `cct eval FOLDER` repeats (test-time views)."""
    from safetensors.torch import load_file

    folder = Path(__file__).resolve().parents[2] / "hub" / key
    shipped, hub = load_file(WEIGHTS_DIR / SHIPPED_WEIGHTS[key]), load_file(folder / "model.safetensors")
    assert shipped.keys() == hub.keys() and all(torch.equal(shipped[k], hub[k]) for k in shipped)
    record = json.loads((WEIGHTS_DIR / SHIPPED_WEIGHTS[key]).with_suffix(".json").read_text())
    assert f"| accuracy | {record['final_top1']:.2f}% top-1" in (folder / "README.md").read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config["pretrained_cfg"]["tag"] == key.split(".")[1]
    recorded = ("final_top1", "test_time_flip", "test_time_shift")
    assert [config["summary"].get(k) for k in recorded] == [record.get(k) for k in recorded]
