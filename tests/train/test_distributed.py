"""DDP (torchrun, gloo on CPU) against the real training code: ranks stay identical, 2 ranks x B equal 1 process
x 2B, a killed worker fails the job with one line and --resume finishes it, and `processes: 2` leaves the
same files as a single process. Needs the real CIFAR-10 (env CCT_DATA)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

DATA = os.environ.get("CCT_DATA")
pytestmark = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar-10-batches-py").is_dir(),
                                reason="needs CIFAR-10 under $CCT_DATA")

STEPS = 4
# Deterministic per image (no flip, no crop, no dropout, fp32); `skip` stochastic depth at 0.5 is kept on purpose:
# its decisions are rank-independent, and a branch skipped in a step must get no update at all, as alone.
EXACT = ["precision=fp32", "hflip=0", "crop=none", "attn_drop_rate=0", "drop_path_rate=0.5",
         "stochastic_depth=skip", "channels_last=false"]
# The recipe's own randomness (flip, crop, drop path, attention dropout, bf16), which differs between ranks.
NOISY = ["precision=bf16"]


def _steps(cfg_overrides: list[str], batch: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """STEPS optimiser steps of the real Engine on this rank's share of epoch 0; the resulting weights."""
    from cct.data.datasets import build_dataset
    from cct.data.loader import BatchSource, train_batch_indices
    from cct.train.config import load_config
    from cct.train.loop import Engine

    cfg = load_config("keras-example", [f"batch_size={batch}", *cfg_overrides])
    data = build_dataset("cifar10", "train", root=DATA)
    source = BatchSource(data, torch.device("cpu"))
    batches = train_batch_indices(batch * world * STEPS, batch, cfg.seed, 0, rank, world)
    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    engine = Engine(cfg, 10, 32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), True, torch.device("cpu"))
    for step, (images, labels, _) in enumerate(source.batches(batches)):
        engine.step(images, labels, step, lr=1e-3)
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def _join_gloo(rank: int, world: int, port: int):
    """Set this spawned process up as rank `rank` of `world` (one thread), through the real `dist.setup()`: gloo
    from the environment, as torchrun gives it; returns cct's distributed module."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from cct.train import distributed as dist

    dist.setup()
    assert dist.is_distributed() and dist.rank() == rank
    return dist


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist = _join_gloo(rank, world, port)
    result = {"noisy": _steps(NOISY, 16, rank, world), "exact": _steps(EXACT, 16, rank, world),
              "accumulated": _steps([*EXACT, "accumulate_steps=2"], 16, rank, world)}  # 2 micro-batches of 8
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()


def _nan_on_one_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    """Three steps on 2 ranks; in the second, rank 1's loss is NaN (its logits are made NaN by a hook)."""
    from cct.train.config import load_config
    from cct.train.loop import Engine

    _join_gloo(rank, world, port)
    engine = Engine(load_config("cifar10-fast", ["batch_size=4"]), 10, 32, (0.5,) * 3, (0.25,) * 3, True,
                    torch.device("cpu"))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(rank))
    losses, weights = [], []
    for step in range(3):
        poison = step == 1 and rank == 1
        hook = engine.model.head.register_forward_hook(lambda m, i, o: o * math.nan) if poison else None
        losses.append(engine.step(images, torch.arange(4), step, 1e-3)[0])
        weights.append({k: v.clone() for k, v in engine.model.state_dict().items()})
        if hook:
            hook.remove()
    torch.save(dict(losses=losses, weights=weights), Path(out) / f"rank{rank}.pt")


def test_a_non_finite_loss_on_one_rank_makes_every_rank_skip_that_step(tmp_path):
    """Every rank skips the same step and reports it as non-finite (the all-reduced gradients carry the NaN to
    the other rank), nobody hangs, and the ranks carry on with identical weights."""
    mp.spawn(_nan_on_one_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert [math.isfinite(loss) for loss in r["losses"]] == [True, False, True], r["losses"]
        assert all(torch.equal(v, r["weights"][0][k]) for k, v in r["weights"][1].items())  # step 1 changed nothing
        assert not torch.equal(r["weights"][2]["head.weight"], r["weights"][1]["head.weight"])  # step 2 trained
    for step in range(3):
        assert all(torch.equal(v, ranks[1]["weights"][step][k]) for k, v in ranks[0]["weights"][step].items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_stay_identical_and_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for kind in ("noisy", "exact", "accumulated"):  # (a) bit-identical weights on both ranks, even with noise
        for key, value in ranks[0][kind].items():
            assert torch.equal(value, ranks[1][kind][key]), (kind, key)

    alone = _steps(EXACT, 32, 0, 1)  # (b) one process, batch 2 x 16, the same images in the same steps
    # pool.score.bias shifts every token's score equally, so softmax cancels it: its true gradient is 0 and its
    # computed one is rounding noise, which AdamW scales up to +-lr per step (with SGD it matches to 1e-8 too)
    for kind in ("exact", "accumulated"):  # (c) so do 2 ranks each accumulating 2 micro-batches of 8
        worst = max((alone[k] - v).abs().max().item() for k, v in ranks[0][kind].items()
                    if v.is_floating_point() and k != "pool.score.bias")
        assert worst < 2e-5, (kind, worst)


def test_the_equivalence_run_skips_a_branch_after_it_was_trained():
    """So that (b) tells `find_unused_parameters=True` (a globally skipped branch has no gradient, AdamW leaves it
    alone, as in one process) from a zero-gradient work-around (AdamW's momentum would still move it)."""
    from cct.models import create_model
    from cct.train.loop import step_seed

    model = create_model("cct_2_3x2_32", num_classes=10, drop_path_rate=0.5, stochastic_depth="skip").train()
    keep = []
    for step in range(STEPS):
        model.seed_stochastic_depth(step_seed(0, step))
        keep.append(torch.tensor(model._skip_decisions()))
    keep = torch.stack(keep)  # step x block x branch
    trained_then_skipped = [(keep[:s].any(0) & ~keep[s]).any() for s in range(1, STEPS)]
    assert any(trained_then_skipped)


def _cct(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, CCT_DATA=DATA, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cct", "train", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


TINY = ["--set", "train_samples=512", "--set", "eval_batch_size=2000"]


def _descendants(pid: int) -> list[int]:
    kids = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return kids + [d for k in kids for d in _descendants(k)]


def _started_until_first_checkpoint(args: list[str], out: Path, **popen: object) -> subprocess.Popen:
    """`cct train ARGS` (one thread per process) started in the background, returned once the run in `out` has
    saved its first checkpoint; stderr is captured."""
    env = dict(os.environ, CCT_DATA=DATA, OMP_NUM_THREADS="1")
    job = subprocess.Popen([sys.executable, "-m", "cct", "train", *args], env=env, stderr=subprocess.PIPE, text=True,
                           **popen)
    try:
        deadline = time.monotonic() + 180
        while not (out / "last.state.pt").exists():  # the first mid-epoch checkpoint
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    except BaseException:
        job.kill()
        raise
    return job


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc")
def test_killed_worker_fails_the_job_with_one_line_and_resume_finishes_it(tmp_path):
    out = tmp_path / "run"
    args = ["keras-example", *TINY, "--set", "epochs=3", "--set", "batch_size=32", "--set", "eval_every=100",
            "--set", "checkpoint_every_steps=2", "--out", str(out), "--nproc-per-node", "2"]
    job = _started_until_first_checkpoint(args, out, stdout=subprocess.PIPE)
    try:
        victims = [pid for pid in _descendants(job.pid)
                   if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert lines[-1].startswith("error: a worker failed (rank 1 killed by SIGKILL"), stderr
    assert "--resume" in lines[-1]
    assert not (out / "summary.json").exists()

    done = _cct(*args, "--resume")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 * 512 // 64 and summary["processes"] == 2
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 2 and metrics[1].startswith("3,24,")


def test_ctrl_c_stops_every_process_with_one_line(tmp_path):
    """Ctrl-C in a terminal signals the launcher and its workers together (one process group): one line comes
    back, not one per process nor torchrun's own warning, and it says that the checkpoint can be resumed."""
    out = tmp_path / "run"
    args = ["keras-example", *TINY, "--set", "epochs=3", "--set", "batch_size=32", "--set", "checkpoint_every_steps=2",
            "--out", str(out), "--nproc-per-node", "2"]
    job = _started_until_first_checkpoint(args, out, start_new_session=True)
    try:
        os.killpg(job.pid, signal.SIGINT)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if "interrupted" in line or "signal" in line] == [
        "interrupted: the last checkpoint is kept, run the same command with --resume to continue"], stderr
    assert "Traceback" not in stderr


def test_recipe_processes_writes_one_run_directory_like_a_single_process(tmp_path):
    """A recipe's `processes: 2` starts torchrun like --nproc-per-node 2 (the kill test above uses the flag)."""
    one = _cct("keras-example", *TINY, "--set", "epochs=1", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = _cct("keras-example", *TINY, "--set", "epochs=1", "--set", "batch_size=64", "--out", str(tmp_path / "two"),
               "--set", "processes=2")
    assert two.returncode == 0, two.stderr

    def files(run: Path) -> list[str]:
        return sorted(str(p.relative_to(run).parent if "tfevents" in p.name else p.relative_to(run))
                      for p in run.rglob("*") if p.is_file())

    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 1 wrote nowhere else
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 512 // 128
    assert "Traceback" not in two.stderr
