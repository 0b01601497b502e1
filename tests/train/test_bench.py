"""`cct bench --json`: one JSON document with every figure the speed issue asks for."""

import json

from cct.cli import main

KEYS = {"model", "batch_size", "precision", "device", "threads", "train_img_per_s", "infer_img_per_s",
        "gflops_per_img_train", "achieved_gflops", "peak_matmul_gflops", "fraction_of_peak"}


def test_bench_json(capsys):
    assert main(["bench", "--batch-size", "16", "--windows", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result)
    assert result["model"] == "cct_2_3x2_32" and result["batch_size"] == 16
    assert result["train_img_per_s"] > 0 and result["infer_img_per_s"] > 0
    assert abs(result["gflops_per_img_train"] - 0.212) < 0.001  # 3 x 2 x 35.3 MMACs
    assert abs(result["achieved_gflops"] - result["train_img_per_s"] * result["gflops_per_img_train"]) < 1
    assert 0 < result["fraction_of_peak"] < 1
