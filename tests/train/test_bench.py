"""`cct bench --json`: one JSON document with every figure of a speed comparison, in one process and in the
torchrun layout of a recipe that trains with `processes: 2`."""

import json
import subprocess
import sys

from cct.cli import main
from cct.kernels import available

KEYS = {"model", "batch_size", "precision", "device", "threads", "train_img_per_s", "infer_img_per_s",
        "gflops_per_img_train", "achieved_gflops", "peak_matmul_gflops", "fraction_of_peak", "processes",
        "batch_per_process"}


def _check_figures(result: dict) -> None:
    assert KEYS <= set(result)
    assert result["train_img_per_s"] > 0 and result["infer_img_per_s"] > 0
    assert abs(result["gflops_per_img_train"] - 0.212) < 0.001  # 3 x 2 x 35.3 MMACs
    assert abs(result["achieved_gflops"] - result["train_img_per_s"] * result["gflops_per_img_train"]) < 1
    assert 0 < result["fraction_of_peak"] < 1
    assert result["cpu_kernels"] == (result["threads"] == 1 and available())  # one-thread processes


def test_bench_json_one_process(capsys):
    assert main(["bench", "--batch-size", "16", "--windows", "1", "--json", "--nproc-per-node", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    _check_figures(result)
    assert result["model"] == "cct_2_3x2_32" and result["batch_size"] == 16 and result["processes"] == 1


def test_bench_json_two_ddp_processes():
    """The default recipe (cifar10-fast) trains in 2 processes: the bench starts torchrun the same way, shares
    the batch out and reports one document (rank 0's) with the figures of both processes together."""
    out = subprocess.run([sys.executable, "-m", "cct", "bench", "--batch-size", "16", "--windows", "1", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    _check_figures(result)
    assert (result["processes"], result["batch_size"], result["batch_per_process"]) == (2, 16, 8)


def test_bench_at_another_size_than_the_recipes_dataset(capsys):
    """The bench makes its images at the size it measures, so the recipe's CIFAR crop does not limit it (an
    img_size check meant for training once refused --img-size 48 here)."""
    assert main(["bench", "--img-size", "48", "--batch-size", "8", "--windows", "1", "--json",
                 "--nproc-per-node", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["img_size"] == 48 and result["train_img_per_s"] > 0
    assert result["gflops_per_img_train"] > 2 * 0.212  # 2.25x the pixels of 32 px
