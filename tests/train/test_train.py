"""Training through the real CLI: outputs of a run, exact resume after kill -9, eval/predict/export round trips,
every bundled recipe building its model and data, configuration errors."""

import copy
import csv
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cct.cli import main
from cct.data import prepare_dataset
from cct.errors import CCTError, UsageError
from cct.train import bundled_recipes, evaluate_checkpoint, load_config, train
from cct.train.config import Config
from cct.train.loop import learning_rate
from tests.data.test_datasets import _flowers_tree, fake_cifar100_download
from tests.helpers import cct_process, metrics_without_timing, run_cct, state_step

SUMMARY_KEYS = {"model", "params", "dataset", "epochs", "best_top1", "final_top1", "final_top5", "train_seconds",
                "img_per_s", "device", "torch", "git_commit", "skipped_images", "test_time_flip",
                "test_time_shift"}


def test_run_directory_holds_every_output(trained_run):
    files = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "metrics.csv", "curves.png", "summary.json", "last.safetensors", "best.safetensors",
            "last.state.pt", "tensorboard"} <= files
    assert any(p.name.startswith("events.out.tfevents") for p in (trained_run / "tensorboard").iterdir())
    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [int(r["step"]) for r in rows] == [8, 16]
    assert set(rows[0]) == {"epoch", "step", "lr", "train_loss", "train_top1", "test_loss", "test_top1",
                            "test_top5", "img_per_s", "seconds"}
    summary = json.loads((trained_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["params"] == 283_723 and summary["epochs"] == 2 and summary["skipped_images"] == 0
    assert summary["final_top1"] == pytest.approx(float(rows[-1]["test_top1"]))
    assert summary["final_top1"] > 15  # 2 epochs on 512 images: better than chance (10%)
    assert (trained_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in trained_run.iterdir() if p.name.endswith(".tmp")]


def test_existing_run_is_not_overwritten(trained_run, data_root, capsys):
    before = (trained_run / "last.safetensors").read_bytes()
    assert main(["train", "keras-example", "--data-dir", str(data_root), "--out", str(trained_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (trained_run / "last.safetensors").read_bytes() == before


def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(data_root, tmp_path):
    args = ["train", "keras-example", "--set", "epochs=2", "--set", "train_samples=1024", "--set", "batch_size=32",
            "--set", "checkpoint_every_steps=4", "--set", "eval_batch_size=2000"]
    reference = cct_process(*args, "--out", str(tmp_path / "ref"), data_root=data_root)
    killed = cct_process(*args, "--out", str(tmp_path / "run"), data_root=data_root)
    state = tmp_path / "run" / "last.state.pt"
    deadline = time.time() + 300
    while state_step(state) < 12 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    step_at_kill = state_step(state)
    assert 12 <= step_at_kill < 64 and step_at_kill % 32  # killed mid-epoch, a checkpoint every 4 steps
    load_file(tmp_path / "run" / "last.safetensors")  # the weights left behind load
    resumed = run_cct(*args, "--out", str(tmp_path / "run"), "--resume", data_root=data_root)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait() == 0, reference.communicate()
    ref = load_file(tmp_path / "ref" / "last.safetensors")
    got = load_file(tmp_path / "run" / "last.safetensors")
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert metrics_without_timing(tmp_path / "ref") == metrics_without_timing(tmp_path / "run")


def test_eval_matches_training_and_writes_confusion(trained_run, data_root, tmp_path, capsys):
    assert main(["eval", str(trained_run), "--data-dir", str(data_root), "--json", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert report["images"] == 10_000
    assert report["top1"] == pytest.approx(summary["best_top1"], abs=1e-6)
    assert len(report["per_class_top1"]) == 10 and "airplane" in report["per_class_top1"]
    assert (report["precision"], report["precision_reason"]) == (summary["precision"], summary["precision_reason"])
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_checkpoint_is_the_library_side_of_cct_eval(trained_run, data_root, tmp_path):
    report = evaluate_checkpoint(trained_run / "last.safetensors", data_root=data_root, out=tmp_path / "report")
    summary = json.loads((trained_run / "summary.json").read_text())
    assert (report["dataset"], report["split"], report["images"]) == ("cifar10", "test", 10_000)
    assert report["top1"] == pytest.approx(summary["final_top1"], abs=1e-6)
    assert json.loads((tmp_path / "report" / "eval.json").read_text()) == report


def test_eval_compiled_for_inference_agrees(trained_run, data_root, capsys):
    """`cct eval --compile` (frozen weights, fused kernels) scores like the eager model: the same 10,000 images,
    top-1 within 0.1 point (bf16 sums in another order may flip an image or two)."""
    reports = []
    for flags in ([], ["--compile"]):
        assert main(["eval", str(trained_run), "--data-dir", str(data_root), "--json", *flags]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    eager, compiled = reports
    assert compiled["images"] == eager["images"] == 10_000
    assert abs(compiled["top1"] - eager["top1"]) <= 0.1 and abs(compiled["loss"] - eager["loss"]) < 0.01


def test_predict_any_image_mode(trained_run, tmp_path, capsys):
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    paths = [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"]
    Image.fromarray(rgb).save(paths[0])
    Image.fromarray(rgb).convert("L").save(paths[1])
    Image.fromarray(rgb).convert("RGBA").save(paths[2])
    assert main(["predict", str(trained_run), *map(str, paths), "--topk", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == list(map(str, paths))
    for r in results:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert main(["predict", str(trained_run), str(bad)]) == 1
    assert "bad.jpg" in capsys.readouterr().err


def test_export_onnx_pt2_torchscript_safetensors(trained_run, tmp_path):
    import onnxruntime

    from cct.train.runs import load_trained

    model, meta = load_trained(trained_run)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    assert main(["export", str(trained_run), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {"images": x.numpy()})[0]  # batch 5 through a model exported with batch 1
    assert np.abs(got - expected).max() < 1e-4
    assert main(["export", str(trained_run), "--format", "pt2", "-o", str(tmp_path / "m.pt2")]) == 0
    program = torch.export.load(str(tmp_path / "m.pt2")).module()  # exported with batch 2, run with batch 5
    assert np.abs(program(x).detach().numpy() - expected).max() < 1e-5
    assert main(["export", str(trained_run), "--format", "torchscript", "-o", str(tmp_path / "m.pt")]) == 0
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    assert np.abs(scripted(x).detach().numpy() - expected).max() < 1e-5
    assert main(["export", str(trained_run), "--format", "safetensors", "-o", str(tmp_path / "w.safetensors")]) == 0
    reloaded, meta2 = load_trained(tmp_path / "w.safetensors")
    assert meta2["classes"] == meta["classes"]
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def _tiny_trees(root: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rgb).save(folder / f"{i}.JPEG")
    labels = [1 + i % 102 for i in range(204)]
    _flowers_tree(root, labels, {"trnid": list(range(1, 103)), "valid": list(range(103, 154)),
                                 "tstid": list(range(154, 205))}, make_files=204)


@pytest.mark.parametrize("recipe", sorted(bundled_recipes()))
def test_every_bundled_recipe_builds_model_and_data(recipe, data_root, tmp_path, capsys, monkeypatch):
    cfg = load_config(recipe)
    if cfg.dataset == "cifar100":  # not on this machine: the error must say what to put where
        assert main(["train", recipe, "--data-dir", str(tmp_path), "--set", "epochs=0",
                     "--out", str(tmp_path / "run")]) == 1
        assert "cifar-100-python" in capsys.readouterr().err
        return
    root = data_root
    if cfg.dataset in ("flowers102", "imagenet") or cfg.dataset.startswith("prepared:"):
        root = tmp_path / "data"
        _tiny_trees(root)
    if cfg.dataset.startswith("prepared:"):  # a store of the tiny ImageNet, where the recipe looks for it
        monkeypatch.chdir(tmp_path)
        prepare_dataset("imagenet", 72, cfg.dataset.removeprefix("prepared:"), root=root, workers=0)
    args = ["train", recipe, "--data-dir", str(root), "--set", "epochs=0", "--set", "workers=0",
            "--set", "eval_samples=100", "--set", "processes=1", "--out", str(tmp_path / "run")]
    if cfg.dataset.startswith("folder:"):  # a recipe for the user's own images
        _tiny_trees(tmp_path / "data")
        args += ["--set", f"dataset=folder:{tmp_path / 'data' / 'imagenet'}"]
    if cfg.img_size and cfg.img_size > 32:
        args += ["--set", "img_size=64", "--set", "eval_batch_size=64"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == cfg.model and summary["steps"] == 0


@pytest.mark.parametrize("override, message", [
    ("epoch=3", "unknown recipe key 'epoch'; did you mean 'epochs'"),
    ("epochs=three", "'epochs' expects int"),
    ("epochs=-1", "epochs must be >= 0"),
    ("batch_size=0", "batch_size must be >= 1"),
    ("precision=fp8", "must be one of auto, fp32, bf16, fp16"),
    ("lr", "--set expects KEY=VALUE"),
])
def test_bad_overrides_are_usage_errors(override, message):
    with pytest.raises(UsageError, match=message):
        load_config("keras-example", [override])


def test_unknown_recipe_and_cli_exit_codes(tmp_path, capsys):
    with pytest.raises(UsageError, match="did you mean 'keras-example'"):
        load_config("keras-exampel")
    assert main(["train", "keras-exampel", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_train_and_eval_download_a_missing_dataset(tmp_path, monkeypatch, capsys):
    """`--download` fetches a missing dataset into the data folder before training (in the launching process)
    and before evaluating; without it the same command stops with the one-line "not found"."""
    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_cifar100_download)
    data, run = tmp_path / "data", tmp_path / "run"
    argv = ["train", "keras-example", "--set", "dataset=cifar100", "--set", "epochs=0", "--data-dir", str(data),
            "--out", str(run)]
    assert main(argv) == 1 and "CIFAR-100 not found" in capsys.readouterr().err
    assert main([*argv, "--download"]) == 0
    assert (data / "cifar-100-python" / "meta").is_file()
    assert json.loads((run / "summary.json").read_text())["dataset"] == "cifar100"
    capsys.readouterr()
    other = tmp_path / "other-data"
    assert main(["eval", str(run), "--data-dir", str(other), "--download", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 4  # the fake test split
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "by-hand")  # a torchrun the user started: each process would fetch
    assert main([*argv, "--out", str(tmp_path / "run2"), "--download"]) == 2
    assert "--download under torchrun" in capsys.readouterr().err


def test_resume_with_another_model_optimizer_or_batch_is_one_line_and_keeps_the_run(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "keras-example", "--set", "epochs=1", "--set", "train_samples=256", "--set",
            "eval_batch_size=2000", "--data-dir", str(data_root), "--out", str(run)]
    assert main(argv) == 0
    saved = (run / "last.state.pt").read_bytes()
    capsys.readouterr()
    for change, message in (("model=cct_4_3x2_32", "another model cct_4_3x2_32 (was cct_2_3x2_32)"),
                            ("optimizer=sgd", "another optimizer sgd (was adamw)"),
                            ("batch_size=64", "another batch_size 64 (was 128)")):
        assert main([*argv, "--set", change, "--set", "epochs=2", "--resume"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: cannot resume {run} with {message}" in err, err
    cfg = load_config("keras-example", ["model=cct_4_3x2_32", "epochs=2", "train_samples=256"])
    with pytest.raises(CCTError, match=r"another model cct_4_3x2_32 \(was cct_2_3x2_32\)"):
        train(cfg, run, data_root, resume=True)  # the library checks the saved state itself
    assert (run / "last.state.pt").read_bytes() == saved


def test_eval_of_a_folder_run_uses_the_runs_held_out_images(tmp_path, capsys):
    """A folder's val split depends on val_fraction and seed: `cct eval RUN` takes them from the run, so it
    measures the images the run held out (with the defaults it would take others, some of them trained on); and
    it evaluates with the run's test-time views unless told (`--no-flip`, `--no-shift`)."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "tree" / label).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "tree" / label / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "keras-example", "--set", f"dataset=folder:{tmp_path / 'tree'}", "--set", "epochs=1",
                 "--set", "batch_size=4", "--set", "img_size=32", "--set", "val_fraction=0.3", "--set", "seed=5",
                 "--set", "workers=0", "--set", "test_time_flip=true", "--set", "test_time_shift=true",
                 "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_time_flip"] and summary["test_time_shift"]
    capsys.readouterr()
    reports = []
    for views in ([], ["--no-flip"], ["--no-shift"]):
        assert main(["eval", str(run), "--json", "--workers", "0", *views]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["images"] == 6  # 30% of 20, not the default 10%
    assert reports[0]["top1"] == pytest.approx(summary["final_top1"], abs=0.01)
    assert reports[0]["loss"] == pytest.approx(summary["final_loss"], abs=1e-4)
    assert (reports[1]["test_time_flip"], reports[2]["test_time_shift"]) == (False, False)
    for fewer_views in reports[1:]:  # another loss without either view
        assert fewer_views["loss"] != pytest.approx(summary["final_loss"], abs=1e-4)
    # the run exported as a Hub folder carries the same held-out part and views in its config.json
    assert main(["export", str(run), "--format", "hub", "-o", str(tmp_path / "hub")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "hub"), "--json", "--workers", "0"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert (exported["images"], exported["test_time_flip"], exported["test_time_shift"]) == (6, True, True)
    assert exported["loss"] == pytest.approx(summary["final_loss"], abs=1e-4)


def test_a_cpu_run_from_files_leaves_its_workers_a_core_unless_told(tmp_path):
    """Where `threads` is unset, a CPU run from image files keeps one torch thread per core its decoding workers
    leave free (at least one); `threads` set is obeyed; either way the caller's thread count is given back."""
    for label in ("a", "b"):
        (tmp_path / "tree" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "tree" / label / f"{i}.png")
    before = torch.get_num_threads()
    for threads, expected in ((None, max(1, before - 1)), (before, before)):
        overrides = [f"dataset=folder:{tmp_path / 'tree'}", "epochs=1", "batch_size=4", "img_size=32", "workers=1",
                     "val_fraction=0.3", *([f"threads={threads}"] if threads else [])]
        run = tmp_path / f"run-{threads}"
        summary = train(load_config("keras-example", overrides), run, device="cpu")
        assert summary["threads"] == expected
        assert torch.get_num_threads() == before


def test_view_logits_average_the_flipped_and_shifted_images():
    """Flip: the mean of the image's and its mirror's logits. Shift: half on that, a quarter on each copy moved
    one pixel up-left and down-right, the edges reflected (computed here by hand, pixel by pixel)."""
    from cct.train.loop import view_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 6, 4))  # position-sensitive
    x = torch.randn(2, 3, 5, 6)

    def moved(dy: int, dx: int) -> torch.Tensor:  # out[i, j] = x[i - dy, j - dx], reflected at the edges
        rows = [abs(i - dy) if i - dy >= 0 else -(i - dy) for i in range(5)]
        rows = [r if r < 5 else 2 * 4 - r for r in rows]
        cols = [abs(j - dx) if j - dx >= 0 else -(j - dx) for j in range(6)]
        cols = [c if c < 6 else 2 * 5 - c for c in cols]
        return x[:, :, rows][:, :, :, cols]

    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return (model(v) + model(v.flip(3))) / 2

    with torch.no_grad():
        assert torch.allclose(view_logits(model, x), model(x))
        assert torch.allclose(view_logits(model, x, flip=True), mirrored(x))
        expected = mirrored(x) / 2 + (mirrored(moved(1, 1)) + mirrored(moved(-1, -1))) / 4
        assert torch.allclose(view_logits(model, x, flip=True, shift=True), expected, atol=1e-6)
        assert not torch.allclose(expected, mirrored(x), atol=1e-3)


def test_ema_turned_on_at_a_resume_starts_from_the_loaded_weights():
    """Before, the average kept the new engine's random initial weights, and the resumed run evaluated those."""
    from cct.train.loop import Engine

    def engine(ema: bool, seed: int) -> Engine:
        torch.manual_seed(seed)
        cfg = Config(model="cct_2_3x2_32", ema=ema, optimizer="adamw", lr=1e-3)
        return Engine(cfg, 10, 32, (0.5,) * 3, (0.25,) * 3, True, torch.device("cpu"))

    saved = engine(ema=False, seed=1).state_dict()
    resumed = engine(ema=True, seed=2)
    resumed.load_state_dict(saved)
    assert all(torch.equal(resumed.ema.module.state_dict()[k], v) for k, v in saved["model"].items())


def test_learning_rate_schedule():
    cfg = Config(lr=1.0, min_lr=0.1, warmup_epochs=1, warmup_lr=0.0, scheduler="cosine", cooldown_epochs=1)
    spe, total = 10, 50
    assert learning_rate(cfg, 0, total, spe) == 0.0
    assert learning_rate(cfg, 5, total, spe) == pytest.approx(0.5)
    assert learning_rate(cfg, 10, total, spe) == pytest.approx(1.0)
    assert learning_rate(cfg, 25, total, spe) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert learning_rate(cfg, 40, total, spe) == pytest.approx(0.1)
    assert learning_rate(cfg, 49, total, spe) == pytest.approx(0.1)


def test_compile_on_cpu_compiles_the_encoder_blocks_and_keeps_the_function():
    """`compile: true` on a CPU compiles the encoder blocks only (inductor's max-pool backward is slower than
    eager's there); a compiled training step runs, and the compiled model computes what the eager one does."""
    from cct.train.loop import Engine

    def engine(compile_: bool) -> Engine:
        torch.manual_seed(0)
        cfg = load_config("cifar10-fast", [f"compile={str(compile_).lower()}", "precision=fp32", "batch_size=8"])
        return Engine(cfg, 10, 32, (0.5,) * 3, (0.25,) * 3, True, torch.device("cpu"))

    compiled, eager = engine(True), engine(False)
    assert all(block._compiled_call_impl is not None for block in compiled.model.blocks)
    assert compiled.model.tokenizer._compiled_call_impl is None
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8)
    losses = [e.step(images, labels, 0, 1e-3)[0] for e in (compiled, eager)]
    assert math.isfinite(losses[0]) and abs(losses[0] - losses[1]) < 1e-4
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    compiled.model.eval()
    eager.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled.model(x), eager.model(x), atol=1e-4, rtol=1e-4)


def test_a_step_with_non_finite_gradients_changes_nothing():
    """A finite loss whose backward overflows (here: one gradient made infinite by a hook) is reported as a
    non-finite step and leaves weights and optimiser state as they were, instead of writing inf into them."""
    from cct.train.loop import Engine

    torch.manual_seed(0)
    engine = Engine(load_config("cifar10-fast", ["batch_size=8"]), 10, 32, (0.5,) * 3, (0.25,) * 3, True,
                    torch.device("cpu"))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8)
    engine.step(images, labels, 0, 1e-3)  # a normal step first, so that the optimiser has state to keep
    before = copy.deepcopy(engine.state_dict())
    hook = engine.model.head.weight.register_hook(lambda grad: grad * math.inf)
    loss, _, _ = engine.step(images, labels, 1, 1e-3)
    assert math.isnan(loss)
    after = engine.state_dict()
    for part in ("model", "optimizer"):
        torch.testing.assert_close(after[part], before[part], rtol=0, atol=0)
    assert all(p.grad is None for p in engine.model.parameters())
    hook.remove()
    assert math.isfinite(engine.step(images, labels, 1, 1e-3)[0])


def test_accumulating_two_micro_batches_equals_one_step_of_both():
    """SGD in fp32 without dropout, mixing or random augmentation: 2 accumulated micro-batches of 8 move the
    weights as one step on the 16 images (the gradients of the two halves weighted by their share)."""
    from cct.train.loop import Engine

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 10

    def stepped(accumulate: int) -> tuple[Engine, float]:
        torch.manual_seed(0)
        cfg = Config(model="cct_2_3x2_32", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4,
                     precision="fp32", accumulate_steps=accumulate, drop_path_rate=0.0, attn_drop_rate=0.0,
                     drop_rate=0.0, label_smoothing=0.0, padding=0, hflip=0.0)
        engine = Engine(cfg, 10, 32, (0.5,) * 3, (0.25,) * 3, True, torch.device("cpu"))
        losses = [engine.step(images, labels, step, cfg.lr)[0] for step in range(2)]
        return engine, losses[0]

    (one, loss_one), (two, loss_two) = stepped(1), stepped(2)
    torch.manual_seed(0)
    initial = Engine(Config(model="cct_2_3x2_32"), 10, 32, (0.5,) * 3, (0.25,) * 3, True, torch.device("cpu"))
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    for name, weight in one.model.state_dict().items():
        torch.testing.assert_close(two.model.state_dict()[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    moved = max((one.model.state_dict()[k] - v).abs().max().item() for k, v in initial.model.state_dict().items()
                if v.is_floating_point())
    assert moved > 1e-3  # the steps did move the weights: the comparison is not of two untouched models
