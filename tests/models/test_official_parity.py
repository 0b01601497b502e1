"""Official checkpoints load and give the official logits (fixtures made by running the official code once,
outside this repository; see tests/fixtures/official/manifest.json for the exact calls and commit)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cct
from cct.models import CCT, convert_official_state_dict, read_state_dict
from cct.models.complexity import count_params

FIXTURES = Path(__file__).parent.parent / "fixtures" / "official"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
PARAM_COUNTS = json.loads((FIXTURES / "param_counts.json").read_text())


def _our_kwargs(official: dict) -> dict:
    """Official constructor arguments -> ours."""
    return dict(img_size=official["img_size"], embed_dim=official["embedding_dim"], depth=official["num_layers"],
                num_heads=official["num_heads"], mlp_ratio=official["mlp_ratio"],
                num_classes=official["num_classes"], kernel_size=official["kernel_size"],
                stride=official["stride"], padding=official["padding"], n_conv_layers=official["n_conv_layers"],
                conv_bias=official["conv_bias"], conv_activation=official["activation"] == "relu",
                max_pool=official["max_pool"], seq_pool=official["seq_pool"],
                pos_embed=official["positional_embedding"])


@pytest.mark.parametrize("entry", MANIFEST["entries"], ids=lambda e: e["name"])
def test_official_logits(entry):
    model = CCT(**_our_kwargs(entry["kwargs"])).eval()
    model.load_state_dict(convert_official_state_dict(read_state_dict(FIXTURES / entry["file"])))
    io = load_file(FIXTURES / entry["io_file"])
    with torch.no_grad():
        logits = model(io["input"])
    assert torch.allclose(logits, io["logits"], atol=1e-4, rtol=0), (logits - io["logits"]).abs().max()


def test_registered_variant_loads_official_checkpoint_by_path():
    entry = next(e for e in MANIFEST["entries"] if e["name"] == "cct_2_3x2_32")
    model = cct.create_model("cct_2_3x2_32", checkpoint=FIXTURES / entry["file"]).eval()
    io = load_file(FIXTURES / entry["io_file"])
    with torch.no_grad():
        assert torch.allclose(model(io["input"]), io["logits"], atol=1e-4, rtol=0)


def test_sine_table_equals_the_official_one():
    official = read_state_dict(FIXTURES / "cct_2_3x2_32_sine.pth")["classifier.positional_emb"]
    assert torch.equal(cct.create_model("cct_2_3x2_32_sine").pos_embed, official)
    official_vit = read_state_dict(FIXTURES / "vit_2_4_32_sine.pth")["classifier.positional_emb"]
    assert torch.equal(cct.create_model("vit_2_4_32_sine").pos_embed, official_vit)


@pytest.mark.parametrize("name", sorted(n for n in PARAM_COUNTS if n in cct.list_models()))
def test_parameter_counts_equal_the_official(name):
    official = PARAM_COUNTS[name]
    model = cct.create_model(name) if official["img_size"] <= 32 else cct.create_model(name).to("meta")
    ours = count_params(model)
    if name.endswith(("_sine", "_sine_c100")):
        # Our sine table is a buffer. The official registered cct/cvt `_sine` functions drop the argument and
        # build a learnable table; vit `_sine` builds a frozen Parameter. Either way it is not a parameter here.
        table = model.pos_embed.numel()
        assert ours == official["params_total"] - table
    else:
        assert ours == official["params_total"]
