"""timm's model contract on CCT, CVT and ViT-Lite (class token), small and large: features and heads,
intermediate layers and pruning, `features_only`, gradient checkpointing, layer-wise LR decay, classifier reset,
a pretrained cfg that says how evaluation crops, TorchScript, FX feature extraction and `torch.export`."""

import io
import warnings

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from timm.optim import create_optimizer_v2
from torchvision.models.feature_extraction import create_feature_extractor

import cct
from cct.data.datasets import eval_transform

# (name, extra arguments): sequence pooling with a conv tokenizer, a patch tokenizer, a class token, a deeper
# model with a sine table, and the ImageNet model at a small input to keep the tests fast
VARIANTS = [("cct_2_3x2_32", {}), ("cvt_2_4_32", {}), ("vit_2_4_32", {}), ("cct_7_3x1_32_sine", {}),
            ("cct_14_7x2_224", dict(img_size=64))]


@pytest.fixture(params=VARIANTS, ids=[name for name, _ in VARIANTS])
def model(request):
    name, kwargs = request.param
    torch.manual_seed(0)
    return cct.create_model(name, **kwargs).eval()


def _images(model, n=2):
    return torch.randn(n, 3, *model.img_size, generator=torch.Generator().manual_seed(1))


def test_features_and_head(model):
    x = _images(model)
    dim, (rows, cols) = model.embed_dim, model.grid_size
    assert model.num_features == model.head_hidden_size == dim
    assert [info["module"] for info in model.feature_info] == [f"blocks.{i}" for i in range(len(model.blocks))]
    assert all(info["num_chs"] == dim and info["reduction"] == model.img_size[0] // rows
               for info in model.feature_info)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, model.num_prefix_tokens + rows * cols, dim)
        assert model.forward_head(tokens, pre_logits=True).shape == (2, dim)
        assert torch.equal(model.forward_head(tokens), model(x))


def test_forward_intermediates(model):
    x = _images(model)
    depth, prefix, (rows, cols) = len(model.blocks), model.num_prefix_tokens, model.grid_size
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(maps) == depth and all(m.shape == (2, model.embed_dim, rows, cols) for m in maps)
        # the last block's output, normalised, is the final tokens laid out on the grid
        last = model.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NLC", intermediates_only=True)
        assert len(last) == 1 and torch.allclose(last[0], final[:, prefix:])
        nchw = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        assert torch.equal(nchw.flatten(2).transpose(1, 2), last[0])
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], maps[0])
        two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(two, maps[-2:], strict=True)] == [True, True]
        paired = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    if prefix:
        assert paired[0][1].shape == (2, prefix, model.embed_dim)
    else:
        assert torch.is_tensor(paired[0])
    with pytest.raises(ValueError):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError):
        model.forward_intermediates(x, indices=depth + 1)


def test_prune_intermediate_layers(model):
    x = _images(model)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers(indices=[0, -len(model.blocks) + 1]) == [0, 1]
        assert len(model.blocks) == 2 and isinstance(model.get_classifier(), torch.nn.Identity)
        kept = model.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(kept, maps[:2], strict=True))
        assert model(x).shape == (2, model.num_prefix_tokens + model.grid_size[0] * model.grid_size[1],
                                  model.embed_dim)  # no pooling, no head: the tokens


def test_features_only(model):
    name = model.pretrained_cfg["architecture"]
    features = timm.create_model(name, features_only=True, out_indices=(0, -1), img_size=model.img_size[0])
    x = _images(model)
    with torch.no_grad():
        maps = features(x)
    assert features.feature_info.channels() == [model.embed_dim] * 2
    assert [m.shape[-2:] for m in maps] == [torch.Size(model.grid_size)] * 2


def _saved_activation_bytes(model, x) -> int:
    """Bytes that autograd keeps for the backward of one forward, parameters excepted."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).logsumexp(1).mean()
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("name", ["cct_2_3x2_32", "vit_2_4_32"])
def test_gradient_checkpointing_recomputes_the_blocks_and_keeps_less(name):
    torch.manual_seed(0)
    model = cct.create_model(name, drop_path_rate=0.0, attn_drop_rate=0.0).train()
    x = torch.randn(4, 3, 32, 32)
    calls = []
    for block in model.blocks:  # a pre-hook: the recomputation stops once it has what the backward needs
        block.attn.register_forward_pre_hook(lambda *_: calls.append(1))
    plain_bytes = _saved_activation_bytes(model, x)
    plain_grads = [p.grad.clone() for p in model.parameters()]
    assert len(calls) == len(model.blocks)
    model.zero_grad()
    calls.clear()
    model.set_grad_checkpointing(True)
    checkpointed_bytes = _saved_activation_bytes(model, x)
    assert len(calls) == 2 * len(model.blocks)  # each block runs again in the backward
    assert checkpointed_bytes < 0.6 * plain_bytes
    for p, grad in zip(model.parameters(), plain_grads, strict=True):
        torch.testing.assert_close(p.grad, grad)
    with torch.no_grad():  # nothing to recompute without gradients
        calls.clear()
        model(x)
        assert len(calls) == len(model.blocks)


def test_gradient_checkpointing_keeps_skip_stochastic_depth():
    """`skip` decisions are drawn once per step: the recomputation runs the same branches."""
    model = cct.create_model("cct_4_3x2_32", drop_path_rate=0.9, stochastic_depth="skip").train()
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)  # the same attention dropout too
    model.seed_stochastic_depth(3)
    model(x).sum().backward()
    checkpointed = [p.grad for p in model.parameters()]
    model.set_grad_checkpointing(False)
    model.zero_grad()
    torch.manual_seed(3)
    model.seed_stochastic_depth(3)
    model(x).sum().backward()
    for p, grad in zip(model.parameters(), checkpointed, strict=True):
        assert (p.grad is None) == (grad is None)
        if grad is not None:
            torch.testing.assert_close(p.grad, grad)


def test_layer_decay_groups_by_depth(model):
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, layer_decay=0.75)
    scale_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale_of[names[id(p)]] = group["lr_scale"]
    depth = len(model.blocks)
    assert scale_of["tokenizer.convs.0.conv.weight"] == pytest.approx(0.75 ** (depth + 1))
    assert scale_of["blocks.0.attn.qkv.weight"] == pytest.approx(0.75 ** depth)
    assert scale_of[f"blocks.{depth - 1}.mlp.fc1.weight"] == pytest.approx(0.75)
    assert scale_of["norm.weight"] >= 0.75 and scale_of["head.weight"] == 1.0  # grouped as timm's ViT groups them
    assert len(scale_of) == len(names)


def test_classifier_reset(model):
    x = _images(model)
    assert model.get_classifier() is model.head
    assert model.no_weight_decay() <= {"pos_embed", "cls_token"} | {n for n, _ in model.named_parameters()}
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.embed_dim)
        model.reset_classifier(0, "")
        assert model(x).shape == model.forward_features(x).shape
        model.reset_classifier(3, "seq")
        assert model(x).shape == (2, 3)
    with pytest.raises(ValueError):
        model.reset_classifier(3, "max")


def test_pretrained_cfg_states_how_evaluation_crops():
    """`cct eval` resizes image files with `eval_transform`'s defaults; the cfg must say the same."""
    transform = eval_transform(224)
    for name in ("cct_14_7x2_224", "cct_7_7x2_224_sine", "cct_14_7x2_384_fl"):
        cfg = timm.create_model(name).pretrained_cfg
        assert cfg["crop_pct"] == transform.crop_pct and cfg["interpolation"] == transform.interpolation.value
        assert cfg["crop_mode"] == "center"
    assert timm.create_model("cct_7_3x1_32").pretrained_cfg["crop_pct"] == 1.0  # CIFAR is used whole


def test_torchscript(model):
    x = _images(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still used by deployments
        scripted = torch.jit.script(model)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(scripted(x), expected)
        torch.testing.assert_close(loaded(x), expected)


def test_fx_feature_extraction(model):
    x = _images(model)
    last = len(model.blocks) - 1
    extractor = create_feature_extractor(
        model, return_nodes={f"blocks.{last}": "tokens", "head": "logits"},
        tracer_kwargs={"leaf_modules": list(get_notrace_modules()),
                       "autowrap_functions": list(get_notrace_functions())})
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["logits"], model(x))
        torch.testing.assert_close(model.norm(out["tokens"]), model.forward_features(x))


def test_torch_export(model):
    x = _images(model)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


def test_other_input_sizes_resample_the_position_table():
    """Eager models run at other sizes (progressive resizing); FX keeps that, the table being a traced leaf."""
    model = cct.create_model("cct_2_3x2_32").eval()
    x = torch.randn(2, 3, 48, 48)
    extractor = create_feature_extractor(model, return_nodes={"head": "logits"})
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        torch.testing.assert_close(extractor(x)["logits"], model(x))
