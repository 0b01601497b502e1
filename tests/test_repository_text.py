"""The repository speaks only of itself: no text about how it was built, no absolute paths of a build machine."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "a working session": re.compile(
        r"\b(this|that|the|a|each|every|no|first|second|previous|earlier|later|next|another|its)\s+sessions?\b",
        re.IGNORECASE),
    "the discussion the project started from": re.compile(r"\bseed discussion\b", re.IGNORECASE),
    "an issue or a ticket": re.compile(
        r"\b(speed|this|that|the|seed|previous|next)\s+issues?\b|\btickets?\b|\bwork items?\b", re.IGNORECASE),
    "an absolute path of a build machine": re.compile(r"(?<![\w.~-])/(work|root|home|tmp)/"),
}


def _tracked_text_files() -> list[Path]:
    """The files git tracks, less binary ones (a NUL byte or not UTF-8) and this test, which names the phrases."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if not name or path == Path(__file__).resolve() or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def _findings(path: Path) -> list[str]:
    """`file:line: what` for every forbidden phrase or path in one file."""
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            match = pattern.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{number}: {what}: {match.group(0)!r}")
    return found


def test_patterns_catch_what_they_are_meant_to():
    caught = ["as the speed issue asks", "the first session's run", "the seed discussion's set-up",
              "CCT_DATA=/work/shared/data", "--out /tmp/s1", "/home/me/data", "cache in /root/.cache"]
    allowed = ["@pytest.fixture(scope=\"session\")", "onnxruntime.InferenceSession(path)", "tests/helpers.py",
               "CCT_DATA=../shared/data", "~/.cache/cct", "runs/cifar10-fast/", "/usr/bin/time"]
    assert all(any(p.search(text) for p in FORBIDDEN.values()) for text in caught)
    assert not any(p.search(text) for text in allowed for p in FORBIDDEN.values())


def test_tracked_text_names_no_build_process_and_no_machine_path():
    files = _tracked_text_files()
    assert any(f.name == "README.md" for f in files)
    findings = [finding for path in files for finding in _findings(path)]
    assert not findings, "\n".join(findings)
