"""Sequence-pooling and attention-rollout maps: they are distributions, they are the model's own weights, they
move with the image; and `cct explain` draws them for CCT, CVT and ViT-Lite."""

import json

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import Attention

import cct
from cct.cli import main
from cct.models.explain import attention_rollout, explain, head_averaged_attention
from tests.helpers import write_cifar_test_pngs

KINDS = {"cct_2_3x2_32": "seq_pool", "cvt_2_4_32": "seq_pool", "vit_2_4_32": "class_token"}


@pytest.mark.parametrize("name", KINDS)
def test_maps_are_distributions_on_the_token_grid(name):
    torch.manual_seed(0)
    model = cct.create_model(name).train()
    result = cct.explain(model, torch.randn(3, 3, 32, 32), topk=4)
    assert result.pooling_kind == KINDS[name]
    for maps in (result.pooling, result.rollout):
        assert maps.shape == (3, *model.grid_size)
        assert (maps >= 0).all()
        torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(3))
    assert result.top_classes.shape == result.top_probs.shape == (3, 4)
    assert (result.top_probs[:, :-1] >= result.top_probs[:, 1:]).all()
    assert model.training  # its mode is restored
    assert not any(m._forward_hooks for m in model.modules())  # and the hooks are gone


def test_pooling_map_is_the_models_own_sequence_pooling_weights():
    torch.manual_seed(0)
    model = cct.create_model("cct_2_3x2_32").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = model.pool.score(tokens).squeeze(-1).softmax(dim=1)
        logits = model(x)
    result = explain(model, x, topk=10)
    torch.testing.assert_close(result.pooling.flatten(1), expected)
    torch.testing.assert_close(result.top_probs, logits.softmax(dim=1).sort(dim=1, descending=True).values)


def test_recomputed_attention_reproduces_timms_output():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=1).eval()  # one head: the average is the head's own matrix
    x = torch.randn(2, 5, 16)
    weights = head_averaged_attention(attn, x)
    v = attn.qkv(x)[..., 32:]
    with torch.no_grad():
        torch.testing.assert_close(attn.proj(weights @ v), attn(x))


def test_rollout_rows_sum_to_one_and_one_block_mixes_in_the_identity():
    attention = torch.rand(2, 6, 6).softmax(dim=-1)
    one = attention_rollout([attention])
    torch.testing.assert_close(one, (attention + torch.eye(6)) / 2)
    three = attention_rollout([attention, attention.flip(1), attention.flip(2)])
    torch.testing.assert_close(three.sum(dim=-1), torch.ones(2, 6))
    assert not torch.allclose(three, one)
    with pytest.raises(ValueError):
        attention_rollout([])


def _one_square(row: int, col: int) -> torch.Tensor:
    """A normalised image that is zero (the padding's value) except for one bright square."""
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, row:row + 6, col:col + 6] = 3.0
    return image


@pytest.mark.parametrize("name", KINDS)
def test_maps_move_with_the_object(name):
    # Without position embeddings the tokenizer is translation-equivariant and the encoder permutation-
    # equivariant, so an object moved by whole tokens (the stride is 4 pixels) moves both maps by as many cells.
    torch.manual_seed(0)
    model = cct.create_model(name, pos_embed="none")
    before, after = explain(model, _one_square(8, 8)), explain(model, _one_square(16, 12))
    for maps in ("pooling", "rollout"):
        moved = getattr(before, maps)[0].roll((2, 1), dims=(0, 1))
        torch.testing.assert_close(getattr(after, maps)[0], moved)
        assert getattr(before, maps)[0].std() > 0  # not a flat map, which would move trivially


@pytest.fixture(scope="module")
def cifar_pngs(data_root, tmp_path_factory):
    return write_cifar_test_pngs(data_root, tmp_path_factory.mktemp("cifar"), 3)


def test_cli_draws_each_image_and_agrees_with_predict(cifar_pngs, tmp_path, capsys):
    shipped = ["--model", "cct_2_3x2_32", "--pretrained", "cifar10"]
    images = [str(p) for p in cifar_pngs]
    assert main(["predict", *shipped, *images, "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    out = tmp_path / "maps"
    assert main(["explain", *shipped, *images, "-o", str(out), "--topk", "3", "--json"]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in explained] == images
    for r, p in zip(explained, predicted, strict=True):
        assert r["pooling_shape"] == r["rollout_shape"] == [8, 8] and r["pooling"] == "seq_pool"
        assert r["predictions"] == p["predictions"][:3]
        assert r["png"] == str(out / (r["image"].rsplit("/", 1)[1]))
        assert (out / r["png"].rsplit("/", 1)[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["cvt_2_4_32", "vit_2_4_32"])
def test_cli_explains_cvt_and_vit_lite_checkpoints(name, cifar_pngs, tmp_path, capsys):
    weights = tmp_path / f"{name}.safetensors"
    save_file(cct.create_model(name, num_classes=10).state_dict(), str(weights))
    assert main(["explain", "--model", name, str(weights), str(cifar_pngs[0]), "-o", str(tmp_path), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["pooling"] == KINDS[name] and result["rollout_shape"] == [8, 8]
    assert (tmp_path / cifar_pngs[0].with_suffix(".png").name).is_file()


def test_cli_refuses_two_images_of_one_name_and_draws_the_readable_ones(cifar_pngs, tmp_path, capsys):
    shipped = ["--model", "cct_2_3x2_32", "--pretrained", "cifar10"]
    twin = tmp_path / "twin" / cifar_pngs[0].name
    twin.parent.mkdir()
    twin.write_bytes(cifar_pngs[0].read_bytes())
    out = tmp_path / "maps"
    assert main(["explain", *shipped, str(cifar_pngs[0]), str(twin), "-o", str(out)]) == 2
    assert "different file names" in capsys.readouterr().err and not out.exists()

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["explain", *shipped, str(broken), str(cifar_pngs[1]), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(broken) in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == [cifar_pngs[1].name]
