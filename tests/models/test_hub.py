"""Hub model folders: a trained run round-trips with identical logits through cct and timm; push without a
network fails with one clear line."""

import json

import pytest
import timm
import torch

import cct
from cct.cli import main
from cct.train.runs import load_trained


def test_trained_run_round_trips_through_a_hub_folder(trained_run, tmp_path, capsys):
    folder = tmp_path / "hub"
    assert main(["export", str(trained_run), "--format", "hub", "-o", str(folder)]) == 0
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md", "app.py",
                                                 "requirements.txt"}
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "cct_2_3x2_32" and config["num_classes"] == 10
    assert config["label_names"][0] == "airplane" and config["recipe"]["model"] == "cct_2_3x2_32"
    card = (folder / "README.md").read_text()
    assert "283,723" in card and "arXiv:2104.05704" in card and "license: apache-2.0" in card
    summary = json.loads((trained_run / "summary.json").read_text())
    assert f"{summary['final_top1']:.2f}% top-1" in card

    trained, _ = load_trained(trained_run)
    via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    via_cct = cct.create_model(pretrained=folder)
    via_folder, meta = load_trained(folder)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = trained(x)
        for model in (via_timm, via_cct, via_folder):
            assert torch.equal(model(x), expected)
    assert meta["classes"] == config["label_names"]

    capsys.readouterr()
    assert main(["predict", str(folder), str(tmp_path / "missing.png")]) == 1
    assert main(["export", str(trained_run), "--format", "hub", "-o", str(folder)]) == 1  # never overwrites
    assert "not empty" in capsys.readouterr().err


def test_push_without_network_is_one_clean_line(trained_run, capsys):
    # These machines reach no Hub (and the token is invalid anyway): either way, one line and exit 1.
    assert main(["push", str(trained_run), "someone/cct-test", "--token", "hf_invalid"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot push to the Hugging Face Hub") and "\n" not in err


def test_create_model_rejects_a_folder_of_another_architecture(trained_run, tmp_path):
    folder = tmp_path / "hub"
    assert main(["export", str(trained_run), "--format", "hub", "-o", str(folder)]) == 0
    with pytest.raises(cct.errors.CCTError, match="holds cct_2_3x2_32, not cct_4_3x2_32"):
        cct.create_model("cct_4_3x2_32", pretrained=folder)
