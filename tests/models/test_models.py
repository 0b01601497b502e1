"""Model family: parameter counts, shapes, stochastic depth, timm registry, resolution/head changes."""

import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

import cct
from cct.errors import CCTError, UsageError
from cct.models import VARIANTS
from cct.models.complexity import count_macs, count_params

# Parameter counts of the official implementation (learnable position embeddings).
KNOWN_COUNTS = {"cct_2_3x2_32": 283_723, "cct_7_3x1_32": 3_760_139, "cct_14_7x2_224": 22_367_273}


@pytest.mark.parametrize("name", sorted(KNOWN_COUNTS))
def test_known_parameter_counts(name):
    assert count_params(cct.create_model(name)) == KNOWN_COUNTS[name]


def test_every_official_name_is_registered():
    expected = {f"cct_{s}{suffix}" for s in ("2_3x2_32", "4_3x2_32", "6_3x1_32", "6_3x2_32", "7_3x1_32",
                                           "7_3x2_32", "7_7x2_224", "14_7x2_224", "14_7x2_384")
                for suffix in ("", "_sine")}
    expected |= {f"{f}_{n}_4_32{suffix}" for f in ("cvt", "vit") for n in (2, 4, 6, 7) for suffix in ("", "_sine")}
    expected |= {"cct_7_3x1_32_c100", "cct_7_3x1_32_sine_c100", "cct_14_7x2_384_fl"}
    assert set(cct.list_models()) == expected | {"cct_2_3x2_32_h32"}  # plus our own cifar10-fast variant
    assert cct.list_models("cct_7_3x1*") == ["cct_7_3x1_32", "cct_7_3x1_32_c100", "cct_7_3x1_32_sine",
                                             "cct_7_3x1_32_sine_c100"]


def test_h32_variant_differs_from_cct_2_only_in_the_tokenizer_width():
    base, narrow = cct.create_model("cct_2_3x2_32"), cct.create_model("cct_2_3x2_32_h32")
    assert sum(p.numel() for p in narrow.parameters()) == 245_995
    assert narrow.tokenizer.convs[0].conv.out_channels == 32 and narrow.tokenizer.convs[1].conv.in_channels == 32
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    changed = {k for k, v in narrow.state_dict().items() if v.shape != shapes[k]}
    assert narrow.state_dict().keys() == shapes.keys()
    assert changed == {"tokenizer.convs.0.conv.weight", "tokenizer.convs.1.conv.weight"}


def test_sine_table_is_a_fixed_buffer():
    learnable, sine = cct.create_model("cct_2_3x2_32"), cct.create_model("cct_2_3x2_32_sine")
    assert "pos_embed" not in dict(sine.named_parameters())
    assert "pos_embed" in dict(sine.named_buffers())
    assert count_params(learnable) - count_params(sine) == 64 * 128
    table = sine.pos_embed[0]
    assert torch.allclose(table[:, 0], torch.sin(torch.arange(64.0)), atol=1e-6)
    assert torch.allclose(table[:, 1], torch.cos(torch.arange(64.0)), atol=1e-6)
    assert torch.allclose(table[3, 2], torch.sin(torch.tensor(3 / 10000 ** (2 / 128))), atol=1e-6)


@pytest.mark.parametrize("name", [n for n in sorted(VARIANTS) if VARIANTS[n]["img_size"] == 32])
def test_forward_shapes_32px(name):
    model = cct.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, VARIANTS[name]["num_classes"])
    assert torch.isfinite(out).all()


def test_forward_shape_224_and_macs():
    model = cct.create_model("cct_7_7x2_224", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)
    # 0.07 GFLOP forward for the smallest model: 0.035 GMACs.
    assert 0.034e9 < count_macs(cct.create_model("cct_2_3x2_32")) < 0.036e9


def test_keras_example_comparison_figures():
    """docs/models.md compares our attention with the Keras example's (2 layers, dim 128, 2 heads, key_dim 128)."""
    model = cct.create_model("cct_2_3x2_32")
    ours = sum(count_params(block.attn) for block in model.blocks)
    keras_per_layer = 3 * (128 * 2 * 128 + 2 * 128) + (2 * 128 * 128 + 128)  # q, k, v and output
    assert keras_per_layer * 2 == 263_936
    assert ours == 2 * (128 * 384 + 128 * 128 + 128) == 131_328
    assert ours / 263_936 < 0.5


def test_attention_is_fused_qkv_without_bias():
    block = cct.create_model("cct_2_3x2_32").blocks[0]
    assert block.attn.qkv.bias is None and block.attn.proj.bias is not None
    assert block.attn.fused_attn  # timm routes it through F.scaled_dot_product_attention


def _count_branch_calls(model):
    calls = {"attn": 0, "mlp": 0}
    for block in model.blocks:
        block.attn.register_forward_hook(lambda *_: calls.__setitem__("attn", calls["attn"] + 1))
        block.mlp.register_forward_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))
    return calls


def test_skip_stochastic_depth_runs_no_forward_for_dropped_branches():
    model = cct.create_model("cct_4_3x2_32", drop_path_rate=0.9, stochastic_depth="skip").train()
    calls = _count_branch_calls(model)
    x = torch.randn(4, 3, 32, 32)
    steps = 50
    for step in range(steps):
        model.seed_stochastic_depth(step)
        model(x)
    total = steps * len(model.blocks)
    # Rates rise 0, 0.3, 0.6, 0.9 over the 4 blocks: expected fraction of branches run is 1 - mean = 0.55.
    for name in ("attn", "mlp"):
        assert 0.4 * total < calls[name] < 0.7 * total, calls
    # droppath computes every branch anyway
    dp = cct.create_model("cct_4_3x2_32", drop_path_rate=0.9, stochastic_depth="droppath").train()
    dp_calls = _count_branch_calls(dp)
    dp(x)
    assert dp_calls == {"attn": 4, "mlp": 4}


def test_skip_decisions_follow_the_seed_and_keep_expectation():
    model = cct.create_model("cct_2_3x2_32", drop_path_rate=0.5, stochastic_depth="skip").train()
    model.seed_stochastic_depth(7)
    first = model._skip_decisions()
    model.seed_stochastic_depth(7)
    assert model._skip_decisions() == first
    # a kept branch is scaled by 1/(1-p): the expectation over decisions equals the eval-mode branch
    block = model.blocks[1]
    x = torch.randn(2, 64, 128)
    kept = block._residual(x, block.mlp, True)
    assert torch.allclose((kept - x) * (1 - block.drop_prob), block.mlp(x), atol=1e-5)
    assert torch.equal(block._residual(x, block.mlp, False), x)


@pytest.mark.parametrize("mode", ["droppath", "skip"])
def test_eval_is_deterministic(mode):
    model = cct.create_model("cct_2_3x2_32", drop_path_rate=0.5, stochastic_depth=mode).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_timm_registry_builds_the_same_model():
    ours = cct.create_model("cct_2_3x2_32", num_classes=5)
    theirs = timm.create_model("cct_2_3x2_32", num_classes=5)
    assert type(theirs) is type(ours)
    assert count_params(theirs) == count_params(ours)
    cfg = theirs.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10 and len(cfg["mean"]) == 3
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs.eval()(x))


def test_checkpoint_at_other_resolution_and_class_count(tmp_path, caplog):
    source = cct.create_model("cct_2_3x2_32")
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="cct.models"):
        bigger = cct.create_model("cct_2_3x2_32", img_size=64, num_classes=3, checkpoint=path)
    assert "re-initialised" in caplog.text
    assert bigger.pos_embed.shape == (1, 256, 128)
    grid = source.pos_embed.detach().reshape(1, 8, 8, 128).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(bigger.pos_embed.detach(), expected.permute(0, 2, 3, 1).reshape(1, 256, 128), atol=1e-6)
    assert torch.equal(bigger.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert bigger.head.weight.shape == (3, 128)
    # sine tables are recomputed for the new grid, not interpolated
    sine = cct.create_model("cct_2_3x2_32_sine")
    save_file(sine.state_dict(), tmp_path / "s.safetensors")
    sine64 = cct.create_model("cct_2_3x2_32_sine", img_size=64, checkpoint=tmp_path / "s.safetensors")
    assert torch.equal(sine64.pos_embed, cct.create_model("cct_2_3x2_32_sine", img_size=64).pos_embed)


def test_vit_lite_keeps_class_token_when_resized(tmp_path):
    source = cct.create_model("vit_2_4_32")
    save_file(source.state_dict(), tmp_path / "v.safetensors")
    resized = cct.create_model("vit_2_4_32", img_size=48, checkpoint=tmp_path / "v.safetensors")
    assert resized.pos_embed.shape == (1, 1 + 144, 128)
    assert torch.equal(resized.pos_embed[:, 0], source.pos_embed[:, 0])


def test_unknown_model_names_closest():
    with pytest.raises(UsageError, match="did you mean cct_7_3x1_32"):
        cct.create_model("cct_7_3x1")


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    save_file(cct.create_model("cct_7_3x1_32").state_dict(), tmp_path / "big.safetensors")
    with pytest.raises(CCTError, match=r"does not fit cct_2_3x2_32: missing tokenizer\.convs\.1\.conv\.weight; "
                                       r"unexpected blocks\.2\..*; shape pos_embed \(1, 64, 256\) vs model "
                                       r"\(1, 64, 128\)"):
        cct.create_model("cct_2_3x2_32", checkpoint=tmp_path / "big.safetensors")


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", b"PK\x03\x04garbage"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CCTError, match="not a readable checkpoint"):
        cct.create_model("cct_2_3x2_32", checkpoint=path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(cct.create_model("cct_2_3x2_32").state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CCTError, match="not a readable checkpoint"):
        cct.create_model("cct_2_3x2_32", checkpoint=path)
    with pytest.raises(CCTError, match="checkpoint not found"):
        cct.create_model("cct_2_3x2_32", checkpoint=tmp_path / "nope.pth")
