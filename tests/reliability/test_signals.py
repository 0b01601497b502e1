"""No orphans and clean stops: the workers of a multi-process run die with their launcher however it dies
(SIGKILL too), and SIGTERM stops a run like Ctrl-C: one line, the last checkpoint kept, the lock released,
exit 143."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from cct.train.distributed import die_with_launcher
from cct.train.state import load_state
from tests.helpers import TINY_RUN, cct_process

LINUX = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds processes through /proc")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        found += [int(c) for c in children]
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _started_until_first_checkpoint(args: list[str], run_dir: Path, data_root: Path):
    job = cct_process(*args, data_root=data_root, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "last.state.pt").exists():
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return job


def _train_args(run_dir: Path, *extra: str) -> list[str]:
    return ["train", "keras-example", *TINY_RUN, "--set", "epochs=4", "--set", "checkpoint_every_steps=2",
            "--out", str(run_dir), *extra]


def test_die_with_launcher_is_taken_by_the_kernel():
    if not Path("/proc/self/status").exists():
        pytest.skip("Linux only")
    assert die_with_launcher() is True  # LAUNCHER_PID unset: nothing to compare, the request is made


@LINUX
def test_workers_die_when_their_launcher_is_killed_with_sigkill(tmp_path, data_root):
    run_dir = tmp_path / "run"
    job = _started_until_first_checkpoint(_train_args(run_dir, "--nproc-per-node", "2"), run_dir, data_root)
    try:
        workers = _children(job.pid)
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        job.kill()  # SIGKILL to the launcher alone: it cannot stop its workers itself
        job.wait()
        # the kernel kills them at once; without the death signal they ran on as orphans until their store
        # connection timed out, writing checkpoints meanwhile
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "orphaned workers"
    finally:
        for pid in [job.pid, *(w for w in locals().get("workers", []) if _alive(w))]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert load_state(run_dir / "last.state.pt")["step"] >= 2


@pytest.mark.parametrize("nproc", [1, 2], ids=["one process", "torchrun"])
def test_sigterm_stops_like_ctrl_c_with_exit_143(tmp_path, data_root, nproc):
    run_dir = tmp_path / "run"
    extra = ["--nproc-per-node", "2"] if nproc == 2 else []
    job = _started_until_first_checkpoint(_train_args(run_dir, *extra), run_dir, data_root)
    try:
        job.send_signal(signal.SIGTERM)  # to the launcher alone, as a service manager or `kill` does
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == "terminated: the last checkpoint is kept, run the same command with --resume to continue"
    assert "Traceback" not in stderr and sum("terminated" in line for line in lines) == 1, stderr
    assert (run_dir / ".lock").read_text() == ""  # released
    assert load_state(run_dir / "last.state.pt")["step"] >= 2
    assert not list(run_dir.glob(".*.tmp"))
