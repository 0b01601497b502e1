"""Two runs into one run directory: while a `cct train` runs there, a second one (fresh or --resume) is refused
by the directory's lock with one line; the lock of a run killed with SIGKILL is taken over by the next one."""

from __future__ import annotations

import json
import socket
import time

from cct.cli import main
from tests.helpers import TINY_RUN, cct_process, metrics_without_timing


def _wait_for_lock_of(process, run_dir, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while f"pid {process.pid} " not in ((run_dir / ".lock").read_text() if (run_dir / ".lock").exists() else ""):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_live_run_holds_its_directory_and_a_killed_ones_lock_is_taken_over(data_root, tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    # 64 steps an epoch: the first run is still in its first epoch (no state saved yet) when it is disturbed
    args = ["train", "keras-example", *TINY_RUN, "--set", "train_samples=2048", "--out", str(run_dir)]
    first = cct_process(*args, "--set", "epochs=1", data_root=data_root)
    _wait_for_lock_of(first, run_dir)
    holder = f"pid {first.pid} on {socket.gethostname()}"
    for extra in ([], ["--resume"]):  # a fresh run, and a resume, into the folder in use
        assert main([*args, "--set", "epochs=1", "--data-dir", str(data_root), *extra]) == 1
        assert capsys.readouterr().err == f"error: {run_dir} is in use by a running `cct train` ({holder}): wait " \
                                          "for it to end, or train into another --out folder\n"
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert [row["epoch"] for row in metrics_without_timing(run_dir)] == ["1"]
    assert (run_dir / ".lock").read_text() == ""  # released

    second = cct_process(*args, "--set", "epochs=2", "--resume", data_root=data_root)
    _wait_for_lock_of(second, run_dir)
    assert main([*args, "--set", "epochs=2", "--data-dir", str(data_root), "--resume"]) == 1  # two resumes
    assert f"is in use by a running `cct train` (pid {second.pid} " in capsys.readouterr().err
    second.kill()
    second.wait()
    assert f"pid {second.pid} " in (run_dir / ".lock").read_text()  # left behind by the killed run

    assert main([*args, "--set", "epochs=2", "--data-dir", str(data_root), "--resume"]) == 0
    assert f"the run that held it (pid {second.pid} on {socket.gethostname()}) ended without releasing it; " \
           "taking it over" in caplog.text
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2
    assert [row["epoch"] for row in metrics_without_timing(run_dir)] == ["1", "2"]
