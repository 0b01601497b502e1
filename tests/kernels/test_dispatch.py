"""The fast paths per kind of CPU, as PyTorch and oneDNN report it: the table itself, a forced kind (`CCT_CPU_KIND`),
PyTorch capped at AVX2 as on a CPU without native bf16, and a machine that is not x86-64 (no compiler call)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cct
from cct.errors import UsageError
from cct.kernels import accelerate, available, cpu_kind, fast_paths
from cct.kernels.dispatch import FAST_PATHS, KINDS, detected_kind
from cct.kernels.native import library
from cct.train.loop import configure_for_device
from cct.train.precision import resolve_precision
from tests.helpers import OpsSeen

CPU = torch.device("cpu")
# kind: (bf16 computed natively, C kernels, explicit attention in bf16)
EXPECTED = {"amx": (True, True, True), "avx512_bf16": (True, True, True), "avx512": (False, False, False),
            "avx2": (False, False, False), "arm_bf16": (True, False, False), "other": (False, False, False)}
EMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _python(script: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_cpu_gets_its_row_of_the_table(kind, monkeypatch):
    monkeypatch.setenv("CCT_CPU_KIND", kind)
    paths = fast_paths()
    assert cpu_kind() == kind and paths is FAST_PATHS[kind]
    assert (paths.bf16_native, paths.c_kernels, paths.explicit_attention) == EXPECTED[kind]
    assert set(paths.reasons) == {"bf16_native", "c_kernels", "explicit_attention"}
    assert all(len(reason) > 20 for reason in paths.reasons.values())
    precision, reason = resolve_precision("auto", CPU)
    assert precision == ("bf16" if EXPECTED[kind][0] else "fp32") and kind in reason
    assert available() == (EXPECTED[kind][1] and library() is not None)
    for explicit in ("bf16", "fp32"):  # an explicit precision always wins
        assert resolve_precision(explicit, CPU) == (explicit, f"{explicit} asked for")


def test_an_unknown_forced_kind_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("CCT_CPU_KIND", "avx1024")
    with pytest.raises(UsageError, match="CCT_CPU_KIND='avx1024' is not one of amx, avx512_bf16"):
        cpu_kind()


@pytest.mark.parametrize("kind", ["avx512", "avx2", "other"])
def test_a_kind_without_the_fast_paths_runs_pytorchs_path(kind, monkeypatch):
    """The accelerated model, set up as training sets it up for bf16 on that kind, dispatches no C kernel and gives
    the plain model's numbers bit for bit: in fp32, and in bf16 forward + backward (both on SDPA)."""
    monkeypatch.setenv("CCT_CPU_KIND", kind)
    torch.manual_seed(0)
    plain = cct.create_model("cct_2_3x2_32", attn_drop_rate=0.0).to(memory_format=torch.channels_last)
    fast = cct.create_model("cct_2_3x2_32", attn_drop_rate=0.0).to(memory_format=torch.channels_last)
    fast.load_state_dict(plain.state_dict())
    accelerate(fast)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(fast.eval()(x), plain.eval()(x))
    results = []
    for model in (fast.train(), plain.train()):
        configure_for_device(model, CPU, "bf16")
        assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
        torch.manual_seed(1)
        with OpsSeen() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        F.cross_entropy(logits.float(), torch.arange(8) % 10).backward()
        assert not any(name.startswith("cct.") for name in seen.names)
        results.append([logits, *(p.grad for p in model.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def _x86_with_avx2() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and detected_kind() in ("amx", "avx512_bf16", "avx512", "avx2")


@pytest.mark.skipif(not _x86_with_avx2(), reason="needs an x86-64 CPU with at least AVX2")
def test_pytorch_capped_at_avx2_runs_fp32_and_no_c_kernel():
    """What a CPU without native bf16 looks like (PyTorch and oneDNN capped at AVX2): `auto` gives fp32 and the C
    kernels are off, whatever /proc/cpuinfo says; bf16 asked for explicitly still runs bf16."""
    script = ("import json, torch\nfrom cct.kernels import available, cpu_kind\n"
              "from cct.train.precision import resolve_precision\n"
              "cpu = torch.device('cpu')\n"
              "print(json.dumps([cpu_kind(), resolve_precision('auto', cpu)[0], resolve_precision('bf16', cpu)[0], "
              "available()]))\n")
    assert json.loads(_python(script, EMULATED_AVX2)) == ["avx2", "fp32", "bf16", False]


@pytest.mark.skipif(detected_kind() not in ("amx", "avx512_bf16"), reason="needs a CPU with native bf16")
def test_onednn_capped_below_bf16_makes_an_avx512_kind():
    """oneDNN alone capped at AVX-512 without bf16 (`_is_mkldnn_bf16_supported` still says yes there, emulating):
    the kind is plain AVX-512, fp32 under `auto`."""
    script = ("import torch\nfrom cct.kernels import cpu_kind\nfrom cct.train.precision import resolve_precision\n"
              "print(cpu_kind(), resolve_precision('auto', torch.device('cpu'))[0])\n")
    assert _python(script, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}) == "avx512 fp32"


def test_off_x86_the_kernels_are_skipped_without_calling_a_compiler(tmp_path):
    """On an Arm machine (Apple silicon, Graviton) the x86 kernels are not even built: `available()` is false
    before any compiler runs, and the accelerated model runs PyTorch's kernels."""
    marker = tmp_path / "compiler-called"
    compiler = tmp_path / "cc"
    compiler.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    compiler.chmod(0o755)
    script = ("import platform\nplatform.machine = lambda: 'aarch64'\n"
              "import torch, cct\nfrom cct.kernels import accelerate, available, cpu_kind\n"
              "from cct.kernels.native import library\n"
              "m = accelerate(cct.create_model('cct_2_3x2_32')).eval()\n"
              "torch.set_num_threads(1)\n"
              "with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):\n"
              "    shape = tuple(m(torch.randn(2, 3, 32, 32)).shape)\n"
              "print(cpu_kind(), available(), library() is None, shape)\n")
    out = _python(script, {"CC": str(compiler), "CCT_CACHE": str(tmp_path / "cache"), "CCT_CPU_KIND": ""})
    assert out == "other False True (2, 10)"
    assert not marker.exists()
