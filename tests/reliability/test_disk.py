"""A run resumed onto a disk it cannot write (read-only, full, a file size limit, no permission) stops with one
line (exit 1) naming the file, and leaves the previous checkpoint as it was, loadable and resumable."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cct.train.state import load_state
from tests.helpers import TINY_RUN, run_cct

CHECKPOINT = ("last.safetensors", "last.state.pt", "best.safetensors")
RESUME = ("train", "keras-example", *TINY_RUN, "--set", "epochs=2", "--resume")


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A 32 MiB tmpfs of its own (needs root, or CAP_SYS_ADMIN), unmounted afterwards."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(where)], capture_output=True,
                           text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


def _read_only_mount(run_dir: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(run_dir.parent)], check=True)


def _fill(run_dir: Path) -> None:
    """Leave 128 KiB free: enough to start and train, not for the next checkpoint."""
    free = os.statvfs(run_dir).f_bavail * os.statvfs(run_dir).f_frsize
    with open(run_dir.parent / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free - 128 * 1024)


def _no_write_permission(run_dir: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions (the read-only mount covers this case here)")
    run_dir.chmod(0o555)


def _file_size_limit() -> None:
    """In the child: files may not grow past 1 MiB; with SIGXFSZ ignored a longer write fails with EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.parametrize("case, reason", [
    ("read-only filesystem", "Read-only file system"),
    ("full filesystem", "No space left on device"),
    ("file size limit", "File too large"),
    ("no write permission", "Permission denied"),
])
def test_unwritable_disk_stops_with_one_line_and_keeps_the_checkpoint(case, reason, one_epoch_run, data_root,
                                                                      tmp_path, request):
    on_tmpfs = case in ("read-only filesystem", "full filesystem")
    run_dir = shutil.copytree(one_epoch_run, (request.getfixturevalue("tmpfs") if on_tmpfs else tmp_path) / "run")
    before = {name: (run_dir / name).read_bytes() for name in CHECKPOINT}
    {"read-only filesystem": _read_only_mount, "full filesystem": _fill,
     "no write permission": _no_write_permission}.get(case, lambda _: None)(run_dir)
    limit = _file_size_limit if case == "file size limit" else None

    result = run_cct(*RESUME, "--out", str(run_dir), data_root=data_root, preexec_fn=limit)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: cannot write {run_dir}/") and reason in error and "kept" in error, error
    assert {name: (run_dir / name).read_bytes() for name in CHECKPOINT} == before
    assert load_state(run_dir / "last.state.pt")["step"] == 8 and load_file(run_dir / "last.safetensors")
    assert not list(run_dir.glob(".*.tmp"))
    if case == "full filesystem":  # space again: the same command resumes from the kept checkpoint
        (run_dir.parent / "filler").unlink()
        assert run_cct(*RESUME, "--out", str(run_dir), data_root=data_root).returncode == 0
        assert load_state(run_dir / "last.state.pt")["step"] == 16
