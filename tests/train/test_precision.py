"""`precision: auto` in the recipes and the commands: what it resolves to is recorded with its reason, an explicit
precision wins, and `cct bench` under PyTorch capped at AVX2 (a CPU without native bf16) runs fp32."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
import yaml

from cct.cli import main
from cct.kernels.dispatch import detected_kind
from cct.train import bundled_recipes, load_config
from cct.train.config import Config
from cct.train.precision import resolve_precision

EMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def test_every_recipe_and_the_default_ask_for_auto():
    assert Config().precision == "auto"
    for name, path in bundled_recipes().items():
        assert yaml.safe_load(path.read_text())["precision"] == "auto", name
    assert load_config("keras-example", ["precision=fp32"]).precision == "fp32"


def test_auto_follows_the_device():
    precision, reason = resolve_precision("auto", torch.device("cpu"))
    assert precision in ("bf16", "fp32") and reason.startswith("auto: CPU kind ")
    assert resolve_precision("auto", torch.device("mps"))[0] == "fp32"  # not measured there
    assert resolve_precision("fp16", torch.device("cpu")) == ("fp16", "fp16 asked for")


def test_bench_json_says_which_precision_ran_and_why(capsys):
    assert main(["bench", "--batch-size", "8", "--windows", "1", "--json", "--nproc-per-node", "1",
                 "--precision", "auto"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["precision"], result["precision_reason"]) == resolve_precision("auto", torch.device("cpu"))
    assert result["cpu_kind"] == detected_kind()


@pytest.mark.skipif(platform.machine() != "x86_64" or detected_kind() == "other",
                    reason="needs an x86-64 CPU with at least AVX2")
def test_bench_on_pytorch_capped_at_avx2_runs_fp32_without_the_c_kernels():
    out = subprocess.run([sys.executable, "-m", "cct", "bench", "--batch-size", "8", "--windows", "1", "--json",
                          "--nproc-per-node", "1", "--threads", "1"], env={**os.environ, **EMULATED_AVX2},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["precision"], result["cpu_kind"], result["cpu_kernels"]) == ("fp32", "avx2", False)
    assert "emulated" in result["precision_reason"]


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_device_mps_without_an_apple_gpu_is_one_error_line(capsys):
    assert main(["bench", "--device", "mps", "--batch-size", "8", "--windows", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device mps: no Apple GPU (MPS)") and err.count("\n") == 1
