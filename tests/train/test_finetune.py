"""Fine-tuning from trained weights: `--set init=` with every way of naming weights (shipped and official tags,
files, run directories, Hub folders, `hf-hub:`), frozen parts, layer-wise and head learning rates, exact
resume; official checkpoints fetched from a loopback HTTP server and checked (checksum, code in a pickle,
shapes, no network); Hub models resolved offline from a local huggingface_hub cache."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import cct
from cct.cli import main
from cct.errors import CCTError
from cct.models.checkpoint import convert_official_state_dict
from cct.models.pretrained import OFFICIAL_WEIGHTS, OfficialWeights, cache_dir, official_url
from cct.models.registry import shipped_weights
from cct.train.config import load_config
from cct.train.finetune import freeze, optimizer_params
from cct.train.loop import Engine
from cct.train.runs import load_trained, resolve_weights

FIXTURES = Path(__file__).parent.parent / "fixtures" / "official"
KEY = "cct_7_3x1_32.official_cifar10_300ep"
# ours -> the official implementation's names (the inverse of cct.models.checkpoint's conversion)
_TO_OFFICIAL = [(re.compile(a), b) for a, b in [
    (r"^tokenizer\.convs\.(\d+)\.conv\.", r"tokenizer.conv_layers.\1.0."),
    (r"^pos_embed$", "classifier.positional_emb"),
    (r"^pool\.score\.", "classifier.attention_pool."),
    (r"^blocks\.(\d+)\.norm1\.", r"classifier.blocks.\1.pre_norm."),
    (r"^blocks\.(\d+)\.attn\.", r"classifier.blocks.\1.self_attn."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"classifier.blocks.\1.linear1."),
    (r"^blocks\.(\d+)\.norm2\.", r"classifier.blocks.\1.norm1."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"classifier.blocks.\1.linear2."),
    (r"^norm\.", "classifier.norm."),
    (r"^head\.", "classifier.fc."),
]]


def _to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _TO_OFFICIAL:
            key = pattern.sub(replacement, key)
        out[key] = value.clone()
    return out


class _CodeInPickle:
    """Unpickling this would create `marker`: a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """A loopback HTTP server standing in for the official host (`CCT_WEIGHTS_URL`), torch hub's cache in
    tmp_path; yields the folder it serves."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("CCT_WEIGHTS_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    yield root
    server.shutdown()
    server.server_close()


def _serve(root: Path, key: str, write) -> Path:
    path = root / OFFICIAL_WEIGHTS[key].path
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    return path


def _official_cct7(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return _to_official(cct.create_model("cct_7_3x1_32").state_dict())


def test_inverse_key_mapping_of_these_tests_is_exact():
    official = torch.load(FIXTURES / "cct_2_3x2_32.pth", weights_only=True)
    assert _to_official(convert_official_state_dict(official)).keys() == official.keys()


def test_official_tag_downloads_into_the_cache_checks_and_loads(weights_server, caplog):
    source = _official_cct7()
    _serve(weights_server, KEY, lambda p: torch.save(source, p))
    expected = convert_official_state_dict(source)
    for model in (cct.create_model(KEY, pretrained=True), timm.create_model(KEY, pretrained=True),
                  cct.create_model("cct_7_3x1_32", pretrained=True)):  # the default tag is the official one
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert (cache_dir() / "cct_7_3x1_32_cifar10_300epochs.pth").is_file()
    shutil.rmtree(weights_server)  # from now on the cache alone serves it
    model = cct.create_model(KEY, pretrained=True, num_classes=5, img_size=64)
    assert model.head.weight.shape == (5, 256) and "re-initialised" in caplog.text
    assert torch.equal(model.blocks[3].attn.qkv.weight, expected["blocks.3.attn.qkv.weight"])


def test_official_url_is_the_published_one_unless_overridden(monkeypatch):
    monkeypatch.delenv("CCT_WEIGHTS_URL", raising=False)
    assert official_url("cct_14_7x2_384_fl.official_in1k_ft_flowers102") == (
        "http://ix.cs.uoregon.edu/~alih/compact-transformers/checkpoints/finetuned/cct_14_7x2_384_flowers102.pth")
    assert timm.get_pretrained_cfg(KEY).url == (
        "http://ix.cs.uoregon.edu/~alih/compact-transformers/checkpoints/pretrained/"
        "cct_7_3x1_32_cifar10_300epochs.pth")
    assert timm.list_pretrained("cct_2_3x2_32")[0] == "cct_2_3x2_32.cifar10_keras"  # shipped stays the default


def test_a_recorded_sha256_is_checked_and_a_bad_file_deleted(weights_server, monkeypatch):
    served = _serve(weights_server, KEY, lambda p: torch.save(_official_cct7(), p))
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    monkeypatch.setitem(OFFICIAL_WEIGHTS, KEY, OfficialWeights(OFFICIAL_WEIGHTS[KEY].path, "0" * 64))
    with pytest.raises(CCTError, match=f"refused the checkpoint downloaded from .*SHA-256 {digest}, expected 0+"):
        cct.create_model(KEY, pretrained=True)
    assert not any(cache_dir().iterdir())
    monkeypatch.setitem(OFFICIAL_WEIGHTS, KEY, OfficialWeights(OFFICIAL_WEIGHTS[KEY].path, digest))
    cct.create_model(KEY, pretrained=True)


def test_a_pickle_with_code_is_refused_unrun_and_deleted(weights_server, tmp_path):
    marker = tmp_path / "code-ran"
    _serve(weights_server, KEY, lambda p: torch.save({"model": _CodeInPickle(marker)}, p))
    with pytest.raises(CCTError, match="pickled Python objects"):
        cct.create_model(KEY, pretrained=True)
    assert not marker.exists() and not any(cache_dir().iterdir())


def test_a_checkpoint_of_other_shapes_is_refused_naming_the_keys(weights_server):
    _serve(weights_server, KEY, lambda p: shutil.copy(FIXTURES / "cct_2_3x2_32.pth", p))  # a real, smaller one
    with pytest.raises(CCTError, match=r"does not fit cct_7_3x1_32: missing .*blocks\.2\..*shape"):
        cct.create_model(KEY, pretrained=True)
    assert not any(cache_dir().iterdir())


def test_no_network_is_one_line_naming_the_url_and_a_local_file(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CCT_WEIGHTS_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["predict", "--model", "cct_7_3x1_32", "--pretrained", "official_cifar10_300ep", "x.png"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot download http://127.0.0.1:{port}/checkpoints/pretrained/" in err
    assert "--set init=/path/to/cct_7_3x1_32_cifar10_300epochs.pth" in err


def _image_tree(root: Path, classes=("a", "b", "c"), per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def _finetune(tmp_path: Path, out: str, *sets: str, resume: bool = False) -> int:
    tree = tmp_path / "tree"
    if not tree.is_dir():
        _image_tree(tree)
    argv = ["train", "finetune", "--out", str(tmp_path / out), "--set", f"dataset=folder:{tree}",
            "--set", "workers=0", "--set", "batch_size=8", "--set", "epochs=1", "--set", "val_fraction=0.25"]
    for s in sets:
        argv += ["--set", s]
    return main([*argv, "--resume"] if resume else argv)


def test_finetune_recipe_starts_from_shipped_weights_and_records_them(tmp_path, caplog):
    assert _finetune(tmp_path, "run", "freeze=backbone") == 0
    assert "checkpoint head has 10 classes, model has 3: the head is re-initialised" in caplog.text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["init"] == "cct_2_3x2_32.cifar10_keras"
    shipped, trained = load_file(shipped_weights("cct_2_3x2_32", "cifar10")), load_file(tmp_path / "run" /
                                                                                       "last.safetensors")
    assert all(torch.equal(trained[k], v) for k, v in shipped.items() if not k.startswith("head."))  # a probe
    assert trained["head.weight"].shape == (3, 128)
    assert main(["export", str(tmp_path / "run"), "--format", "hub", "-o", str(tmp_path / "hub")]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "fine-tuned from the weights `cct_2_3x2_32.cifar10_keras`" in card


def test_init_from_a_run_directory_a_file_and_an_official_pth(tmp_path):
    assert _finetune(tmp_path, "first") == 0
    first = load_file(tmp_path / "first" / "best.safetensors")
    for source in (tmp_path / "first", tmp_path / "first" / "best.safetensors"):
        cfg = load_config("finetune", [f"init={source}", "dataset=folder:x"])
        engine = Engine(cfg, 3, 32, (0.5,) * 3, (0.5,) * 3, False, torch.device("cpu"))
        assert all(torch.equal(engine.model.state_dict()[k], v) for k, v in first.items())
    official = torch.load(FIXTURES / "cct_2_3x2_32.pth", weights_only=True)
    cfg = load_config("finetune", [f"init={FIXTURES / 'cct_2_3x2_32.pth'}", "dataset=folder:x", "img_size=48"])
    engine = Engine(cfg, 10, 48, (0.5,) * 3, (0.5,) * 3, False, torch.device("cpu"))
    assert torch.equal(engine.model.blocks[1].mlp.fc2.weight, official["classifier.blocks.1.linear2.weight"])
    assert engine.model.pos_embed.shape == (1, 144, 128)  # resampled to 48 px


def test_init_that_does_not_fit_is_one_line_naming_the_keys(tmp_path, capsys):
    assert _finetune(tmp_path, "run", f"init={FIXTURES / 'cvt_2_4_32.pth'}") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit cct_2_3x2_32: missing tokenizer.convs.1.conv.weight" in err
    assert _finetune(tmp_path, "run2", "init=cct_2_3x2_32.nothing") == 1
    assert "weights 'cct_2_3x2_32.nothing' not found" in capsys.readouterr().err


def test_frozen_parts_stay_out_of_the_optimizer_and_groups_carry_their_lr_scale():
    cfg = load_config("finetune", ["dataset=folder:x", "freeze=tokenizer", "layer_decay=0.5", "head_lr_scale=10"])
    engine = Engine(cfg, 3, 32, (0.5,) * 3, (0.5,) * 3, False, torch.device("cpu"))
    model, optimizer = engine.model, engine.optimizer
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for n, p in model.named_parameters() if n.startswith("tokenizer.")}.isdisjoint(in_optimizer)
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    # timm's grouping through group_matcher: embeddings 0, block 0 1, block 1 with the norm 2, pool and head 3
    assert scale[id(model.head.weight)] == 10.0 and scale[id(model.pool.score.weight)] == 1.0
    assert scale[id(model.norm.weight)] == scale[id(model.blocks[1].mlp.fc1.weight)] == 0.5
    assert scale[id(model.blocks[0].attn.qkv.weight)] == 0.25 and scale[id(model.pos_embed)] == 0.125
    images, labels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])
    before = model.tokenizer.convs[0].conv.weight.clone()
    engine.step(images, labels, step=0, lr=1e-3)
    assert torch.equal(model.tokenizer.convs[0].conv.weight, before)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3 * s for s in (10.0, 1.0, 0.5, 0.25, 0.125)}

    probe = cct.create_model("cct_2_3x2_32", num_classes=3)
    freeze(probe, "backbone")
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    plain = load_config("keras-example")
    assert optimizer_params(probe, plain) is probe  # runs without fine-tuning keys keep timm's own grouping


def test_resume_of_a_finetuning_run_is_exact_and_fetches_nothing(tmp_path, capsys):
    init = tmp_path / "init.pth"
    shutil.copy(FIXTURES / "cct_2_3x2_32.pth", init)
    sets = (f"init={init}", "freeze=tokenizer", "layer_decay=0.7", "scheduler=constant", "warmup_epochs=0")
    assert _finetune(tmp_path, "straight", *sets, "epochs=2") == 0
    assert _finetune(tmp_path, "resumed", *sets) == 0
    init.unlink()  # a resume takes every weight from the saved state
    assert _finetune(tmp_path, "resumed", *sets, "epochs=2", resume=True) == 0
    straight = load_file(tmp_path / "straight" / "last.safetensors")
    resumed = load_file(tmp_path / "resumed" / "last.safetensors")
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())
    capsys.readouterr()
    assert _finetune(tmp_path, "resumed", *sets[:-1], "warmup_epochs=0", "freeze=none", "epochs=3",
                     resume=True) == 1
    assert "another freeze none (was tokenizer)" in capsys.readouterr().err


def _hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """Place `folder` in huggingface_hub's cache layout as the `main` revision of model `repo`."""
    revision = "0" * 40
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)


def test_hub_models_resolve_offline_in_every_command(tmp_path):
    folder, cache = tmp_path / "exported", tmp_path / "hf" / "hub"
    assert main(["export", "--model", "cct_2_3x2_32", "--pretrained", "cifar10", "--format", "hub",
                 "-o", str(folder)]) == 0
    _hub_cache(cache, "someone/cct2", folder)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled)
    torch.save(load_file(folder / "model.safetensors"), pickled / "pytorch_model.bin")
    _hub_cache(cache, "someone/pickled", pickled)
    _image_tree(tmp_path / "tree")
    image = next((tmp_path / "tree" / "a").iterdir())
    # huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported: a fresh process
    script = f"""
import json, sys
from cct.cli import main
from cct.train.runs import load_trained
assert main(["predict", "hf-hub:someone/cct2", {str(image)!r}, "--json"]) == 0
assert main(["export", "hf-hub:someone/cct2", "--format", "onnx", "-o", {str(tmp_path / "m.onnx")!r}]) == 0
assert main(["train", "finetune", "--set", "init=hf-hub:someone/cct2", "--set", "dataset=folder:{tmp_path / 'tree'}",
             "--set", "epochs=1", "--set", "workers=0", "--set", "batch_size=8", "--set", "val_fraction=0.25",
             "--out", {str(tmp_path / "run")!r}]) == 0
assert main(["predict", "hf-hub:someone/pickled", {str(image)!r}]) == 1
assert main(["predict", "hf-hub:someone/absent", {str(image)!r}]) == 1
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.JSONDecoder().raw_decode(done.stdout)[0][0]["image"] == str(image)  # predict's JSON comes first
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "no model.safetensors: pickled weights (pytorch_model.bin) are not loaded" in errors[0]
    assert "cannot fetch hf-hub:someone/absent" in errors[1]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["init"] == "hf-hub:someone/cct2"
    resolved, _ = resolve_weights(folder)
    assert load_trained(resolved)[1]["model"] == "cct_2_3x2_32"


def test_ddp_trains_a_partly_frozen_model(tmp_path):
    """Two torchrun processes: DDP leaves the frozen tokenizer out (no unused-parameter error) and it stays as
    loaded while the rest trains."""
    tree = _image_tree(tmp_path / "tree")
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "cct", "train", "finetune", "--nproc-per-node", "2", "--out", str(out),
         "--set", f"dataset=folder:{tree}", "--set", "freeze=tokenizer", "--set", "epochs=1", "--set", "workers=0",
         "--set", "batch_size=4", "--set", "val_fraction=0.25"],
        env=dict(os.environ, PYTHONPATH=os.getcwd()), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shipped, trained = load_file(shipped_weights("cct_2_3x2_32", "cifar10")), load_file(out / "last.safetensors")
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    assert all(torch.equal(trained[k], v) for k, v in shipped.items() if k.startswith("tokenizer."))
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], shipped["blocks.0.attn.qkv.weight"])
