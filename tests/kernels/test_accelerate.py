"""`cct.kernels.accelerate`: swaps a plain model's modules for the kernel-backed ones in place, keeps its state
dict, can be called twice or on any machine, and computes what the plain model computes (bit for bit where the
kernels do not run, to bf16 rounding where they do)."""

import pytest
import torch
from timm.layers import Attention as TimmAttention
from timm.layers import Mlp as TimmMlp
from torch import nn

import cct
from cct.kernels import Attention, Conv2d, MaxPoolReLU, Mlp, TokenizerLayer, accelerate, available
from cct.train.loop import configure_attention


def _twins(name: str) -> tuple[nn.Module, nn.Module]:
    """A plain model and an accelerated copy with the same weights."""
    torch.manual_seed(0)
    plain = cct.create_model(name).eval()
    fast = cct.create_model(name).eval()
    fast.load_state_dict(plain.state_dict())
    return plain, accelerate(fast)


@pytest.mark.parametrize("name", ["cct_2_3x2_32", "vit_2_4_32"])
def test_accelerate_swaps_modules_in_place_and_keeps_the_state_dict(name):
    model = cct.create_model(name)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    parameters = list(model.parameters())
    assert accelerate(model) is model
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    kinds = {type(module) for module in model.modules()}
    assert {Conv2d, Attention, Mlp} <= kinds and not {nn.Conv2d, TimmAttention, TimmMlp} & kinds
    layer = model.tokenizer.convs[0]
    assert isinstance(layer, TokenizerLayer)
    if name.startswith("cct"):  # the ReLU moves into the pool, which applies it
        assert isinstance(layer.pool, MaxPoolReLU) and isinstance(layer.act, nn.Identity)
    else:  # a patch tokenizer has neither
        assert isinstance(layer.pool, nn.Identity) and isinstance(layer.act, nn.Identity)
    classes = [type(module) for module in model.modules()]
    accelerate(model)  # idempotent
    assert [type(module) for module in model.modules()] == classes
    assert list(model.state_dict()) == list(before)


@pytest.mark.parametrize("name", ["cct_2_3x2_32", "cvt_2_4_32", "vit_2_4_32"])
def test_accelerated_model_is_the_plain_one_bit_for_bit_in_fp32(name):
    """In fp32 no kernel applies: every swapped module runs PyTorch's code, so the logits are identical."""
    plain, fast = _twins(name)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))


@pytest.mark.parametrize("train", [False, True])
def test_accelerated_model_gives_the_plain_logits_to_bf16_rounding(train):
    """CPU bf16 under autocast in timm's explicit attention path, as training and evaluation set it up: where the
    kernels are built they run, and the logits agree with the plain model's to bf16 rounding."""
    plain, fast = _twins("cct_2_3x2_32")
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    logits = []
    for model in (plain, fast):
        model.train(train)
        if train:  # the attention kernel has no attention dropout, as the fast recipes train
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        configure_attention(model, torch.device("cpu"), "bf16")
        with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16):
            logits.append(model(x).float())
    torch.testing.assert_close(logits[1], logits[0], rtol=0.05, atol=0.05)
    assert not torch.equal(logits[1], logits[0]) or not available()  # the kernels did run where they can


def test_accelerate_leaves_foreign_subclasses_alone():
    """Only the exact plain classes are swapped: a subclass may compute something else."""

    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(3, 16, 3), nn.MaxPool2d(2), nn.ReLU())
    accelerate(model)
    assert type(model[0]) is MyConv and isinstance(model[1], MaxPoolReLU) and isinstance(model[2], nn.Identity)
