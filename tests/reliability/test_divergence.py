"""A diverging run: resumed from a good checkpoint with lr=1e30, the first step (on good weights) is finite and
blows the weights up, the second one's loss is NaN. `on_nan=stop` stops right there with one line and leaves
the good checkpoint untouched; `on_nan=skip` skips every non-finite step and never saves a non-finite value."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from cct.cli import main
from cct.train.state import load_state
from tests.helpers import TINY_RUN

DIVERGE = ("train", "keras-example", *TINY_RUN, "--set", "epochs=2", "--set", "lr=1e30", "--resume")
NAN_STEPS = 7  # the resumed epoch's 8 steps: the first blows the weights up, the other 7 are NaN


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a nested state (dicts and lists)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else []
    return [t for v in values for t in _tensors(v)]


def test_nan_loss_stops_at_its_step_and_keeps_the_good_checkpoint(one_epoch_run, data_root, tmp_path, capsys):
    run_dir = shutil.copytree(one_epoch_run, tmp_path / "run")
    good = {name: (run_dir / name).read_bytes() for name in ("last.safetensors", "last.state.pt")}
    assert main([*DIVERGE, "--out", str(run_dir), "--data-dir", str(data_root)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: loss became nan at step 9 (epoch 1): stopped; the last "
                                                   f"good checkpoint in {run_dir} is kept"), err
    assert "Traceback" not in err
    assert {name: (run_dir / name).read_bytes() for name in good} == good


def test_nan_loss_skipped_never_reaches_a_checkpoint(one_epoch_run, data_root, tmp_path):
    run_dir = shutil.copytree(one_epoch_run, tmp_path / "run")
    args = [*DIVERGE, "--set", "on_nan=skip", "--set", "checkpoint_every_steps=1"]
    assert main([*args, "--out", str(run_dir), "--data-dir", str(data_root)]) == 0
    state = load_state(run_dir / "last.state.pt")
    assert state["step"] == 16
    saved = _tensors(state) + list(load_file(run_dir / "last.safetensors").values())
    assert len(saved) > 100 and all(torch.isfinite(t).all() for t in saved if t.is_floating_point())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["nan_steps_skipped"] == NAN_STEPS, summary
