"""kill -9 campaign: one run directory is killed 12 times at seeded random moments, some of them aimed at a
checkpoint being written or at an evaluation, and resumed after each kill. After every kill the last
checkpoint must load; at the end the metrics and weights must equal those of an uninterrupted run."""

from __future__ import annotations

import collections
import ctypes
import os
import random
import re
import select
import signal
import statistics
import struct
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cct.train.state import load_state
from tests.helpers import cct_process, metrics_without_timing, run_cct, state_step

SPE, EPOCHS = 8, 3  # steps per epoch (256 images / 32), 24 steps in all
ARGS = ("train", "keras-example", "--set", f"epochs={EPOCHS}", "--set", "train_samples=256", "--set", "batch_size=32",
        "--set", "checkpoint_every_steps=1", "--set", "eval_samples=2000", "--set", "eval_batch_size=250")
# What each kill aims at: "step" a random moment 1-3 checkpoints into the run; "write" the moment a checkpoint's
# temporary file appears; "eval" a random moment after an epoch's last mid-epoch checkpoint (step 8k-1), when
# the last step (one step's time) is followed by the evaluation of 2,000 images (many steps' time).
PLAN = ("step", "write", "step", "eval", "write", "step", "write", "eval", "step", "write", "eval", "write")
CHECKPOINT_TMP = re.compile(r"^\.last\.(safetensors|state\.pt)\..*\.tmp$")
IN_CREATE = 0x100  # <sys/inotify.h>


class Watcher:
    """Follows one training process through its run directory: the state's step (re-read only when the file
    was replaced), when each new state appeared, and the temporary files it creates."""

    def __init__(self, run_dir: Path, process):
        self.run_dir, self.process = run_dir, process
        self.state = run_dir / "last.state.pt"
        self.old_tmp = {p.name for p in run_dir.glob(".*.tmp")}
        self.config_inode, self.training_since = _inode(run_dir / "config.yaml"), None
        self.inode, self.step, self.changes = _inode(self.state), state_step(self.state), []

    def poll(self) -> None:
        assert self.process.poll() is None, f"the run ended before it was killed: {self.process.communicate()}"
        if self.training_since is None and _inode(self.run_dir / "config.yaml") != self.config_inode:
            self.training_since = time.perf_counter()  # config.yaml written: data and model ready, steps next
        inode = _inode(self.state)
        if inode != self.inode:
            self.inode, self.step = inode, state_step(self.state)
            self.changes.append((time.perf_counter(), self.step))

    def new_tmp(self) -> list[str]:
        return [p.name for p in self.run_dir.glob(".*.tmp") if p.name not in self.old_tmp]

    def wait_until(self, condition, timeout: float = 300) -> None:
        deadline = time.perf_counter() + timeout
        while not condition():
            self.poll()
            assert time.perf_counter() < deadline, "timed out"
            time.sleep(0.01)

    def kill_at_checkpoint_file(self, nth: int, timeout: float = 300) -> None:
        """SIGKILL the process the moment it creates its nth checkpoint temporary file. The files live well under
        a millisecond on a fast disk (one write and an fsync), too short to find by listing the folder: inotify
        reports each creation as it happens, and while it waits this process runs at real-time priority (where
        allowed), so that it preempts the training threads on the event instead of queueing behind them (at
        normal priority about 1 in 5 such kills landed in the write)."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(self.run_dir), IN_CREATE) >= 0
        deadline, seen = time.perf_counter() + timeout, 0
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError:
            pass  # not permitted here: the kill still lands, in the write or just after it
        try:
            while seen < nth:
                select.select([fd], [], [], 0.05)
                try:
                    events = os.read(fd, 1 << 16)
                except BlockingIOError:
                    self.poll()
                    assert time.perf_counter() < deadline, "timed out"
                    continue
                offset = 0
                while offset < len(events):  # struct inotify_event: wd, mask, cookie, len, name[len]
                    length = struct.unpack_from("iIII", events, offset)[3]
                    name = events[offset + 16:offset + 16 + length].rstrip(b"\0").decode()
                    seen += bool(CHECKPOINT_TMP.match(name))
                    offset += 16 + length
            self.process.send_signal(signal.SIGKILL)
        finally:
            os.sched_setscheduler(0, policy, param)  # before the next training process is started
            os.close(fd)

    def started(self) -> bool:
        """The process holds the run's lock (it is past its imports: data loading comes next)."""
        try:
            return f"pid {self.process.pid} " in (self.run_dir / ".lock").read_text()
        except FileNotFoundError:
            return False


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _kill(watcher: Watcher, aim: str, rng: random.Random, step_seconds: float) -> float:
    """Kill the process at a moment of kind `aim`; returns the seconds from its last new state (or from the
    start of its training) to the kill. An evaluation of 2,000 images takes about 20 steps' time (forward
    only, 62 batches of 32): a kill 4-8 steps' time after the last step began lands in it."""
    start_step = max(watcher.step, 0)
    watcher.wait_until(watcher.started)
    if aim == "step":
        target = start_step + rng.randint(1, 3)
        watcher.wait_until(lambda: watcher.step >= target)
        time.sleep(rng.uniform(0, 0.05))
    elif aim == "write":
        nth = rng.randint(1, 2)  # the weights' or the state's temporary file
        watcher.kill_at_checkpoint_file(nth)
    else:
        if start_step % SPE == SPE - 1:  # resumed before an epoch's last step: it and the evaluation come first
            watcher.wait_until(lambda: watcher.training_since is not None)
        else:
            watcher.wait_until(lambda: watcher.step > start_step and watcher.step % SPE == SPE - 1)
        time.sleep(step_seconds * rng.uniform(4, 8))
    if aim != "write":  # killed already, at the event
        watcher.process.send_signal(signal.SIGKILL)
    killed_at = time.perf_counter()
    watcher.process.wait()
    return killed_at - (watcher.changes[-1][0] if watcher.changes else watcher.training_since or killed_at)


def _phase(watcher: Watcher, stdout: str, since_state: float, step_seconds: float) -> str:
    """Where the kill landed, from what the dead process left: a temporary file it was writing, the step of
    its last state, whether it printed the epoch's evaluation line, and the time from its last new state."""
    left = watcher.new_tmp()
    if any(CHECKPOINT_TMP.match(n) for n in left):
        return "writing a checkpoint"
    if left:
        return f"writing {left[0]}"
    step = state_step(watcher.state)
    if step % SPE != SPE - 1:
        return "a training step"
    if f"epoch {step // SPE + 1}/" in stdout:
        return "end of epoch, after the evaluation"
    return "evaluation" if since_state > 3 * step_seconds else "an epoch's last training step"


def test_twelve_kill_9s_then_resume_equal_an_uninterrupted_run(data_root, tmp_path):
    started = time.perf_counter()
    reference = run_cct(*ARGS, "--out", str(tmp_path / "ref"), data_root=data_root)
    assert reference.returncode == 0, reference.stderr
    run_dir = tmp_path / "run"
    rng = random.Random(7)
    phases, intervals, last_step = [], [], 0
    for i, aim in enumerate(PLAN):
        process = cct_process(*ARGS, "--out", str(run_dir), *(["--resume"] if i else []), data_root=data_root)
        watcher = Watcher(run_dir, process)
        since_state = _kill(watcher, aim, rng, statistics.median(intervals or [0.1]))
        stdout, _ = process.communicate()
        intervals += [b[0] - a[0] for a, b in zip(watcher.changes, watcher.changes[1:], strict=False)
                      if b[1] == a[1] + 1 and b[1] % SPE]  # one mid-epoch step and its checkpoint
        phase = _phase(watcher, stdout, since_state, statistics.median(intervals or [0.1]))
        phases.append(phase)
        load_file(run_dir / "last.safetensors")  # the weights load
        step = load_state(run_dir / "last.state.pt")["step"]  # and so does the training state
        assert last_step <= step, (i, aim, phase, step)  # nothing lost
        last_step = step
        print(f"kill {i + 1:2d}: aimed at {aim:<5}  landed in {phase:<36} state at step {step}")
    stale_lock = (run_dir / ".lock").read_text().strip()  # empty if the last kill came after a clean exit
    resumed = run_cct(*ARGS, "--out", str(run_dir), "--resume", data_root=data_root)
    assert resumed.returncode == 0, resumed.stderr
    assert ("taking it over" in resumed.stderr) == bool(stale_lock)

    assert metrics_without_timing(run_dir) == metrics_without_timing(tmp_path / "ref")
    for name in ("last.safetensors", "best.safetensors"):
        ref, got = load_file(tmp_path / "ref" / name), load_file(run_dir / name)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name
    assert not list(run_dir.glob(".*.tmp"))  # the temporary files of killed writes were removed on resume
    tally = collections.Counter(phases)
    print(f"{len(PLAN)} kills in {time.perf_counter() - started:.0f} s: {dict(tally)}")
    assert tally["writing a checkpoint"] >= 1 and len(phases) == len(PLAN) >= 10
