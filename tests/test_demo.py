"""`cct demo` and the Space app of a Hub folder, used as a person would: served on this machine, opened in headless
Chromium, an image uploaded; the page's top-1 must be `cct predict`'s. Without Gradio, `cct demo` is one line."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cct.cli import main
from cct.demo import INSTALL_HINT
from tests.helpers import cct_process, write_cifar_test_pngs

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHIPPED = ["--model", "cct_2_3x2_32", "--pretrained", "cifar10"]
MISSING = [what for what, there in [("gradio", importlib.util.find_spec("gradio")),
                                    ("playwright", importlib.util.find_spec("playwright")),
                                    ("chromium", Path(CHROMIUM).is_file())] if not there]
needs_browser = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed: run "
                                   ".ci/install-demo-deps")


def test_demo_without_gradio_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` meets where it is not installed
    assert main(["demo", *SHIPPED]) == 1
    assert capsys.readouterr().err == f"error: {INSTALL_HINT}\n"
    assert "pip install 'compact-transformers[demo]'" in INSTALL_HINT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_served(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}: {process.communicate()[1][-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"nothing served at {url} after {timeout} s")


def _top1_in_browser(url: str, image: Path, screenshot: Path) -> str:
    """Open the page, upload `image`, wait for the top-5 and both maps, save a screenshot; the top-1 label."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.locator("#image input[type=file]").set_input_files(str(image))
            top1 = page.locator("#top5 [data-testid=label-output-value]")
            top1.wait_for(timeout=60_000)
            for output in ("#pooling img", "#rollout img"):
                page.locator(output).wait_for(timeout=60_000)
            page.screenshot(path=str(screenshot), full_page=True)
            return top1.inner_text().strip()
        finally:
            browser.close()


@pytest.fixture(scope="module")
def cat_png(data_root, tmp_path_factory) -> Path:
    return write_cifar_test_pngs(data_root, tmp_path_factory.mktemp("cifar"), 1)[0]


def _predicted_top1(image: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["predict", *SHIPPED, str(image), "--json"]) == 0
    return json.loads(capsys.readouterr().out)[0]["predictions"][0]["label"]


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


def _top1_served(server, port: int, png, screenshot) -> str:
    """The top-1 label the page served by `server` on `port` shows for `png`; the server is stopped after."""
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_served(url, server)
        return _top1_in_browser(url, png, screenshot)
    finally:
        _stop(server)


@needs_browser
def test_demo_in_a_browser_shows_predicts_top1(cat_png, data_root, tmp_path, capsys):
    port = _free_port()
    server = cct_process("demo", *SHIPPED, "--host", "127.0.0.1", "--port", str(port), data_root=data_root)
    shown = _top1_served(server, port, cat_png, tmp_path / "demo.png")
    assert shown == _predicted_top1(cat_png, capsys)
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_browser
def test_hub_folder_app_serves_the_same_page_as_a_space(cat_png, tmp_path, capsys):
    folder = tmp_path / "hub"
    assert main(["export", *SHIPPED, "--format", "hub", "-o", str(folder)]) == 0
    assert (folder / "requirements.txt").read_text() == "compact-transformers[demo]\n"
    assert (folder / "README.md").read_text().startswith("---\nsdk: gradio\napp_file: app.py\n")
    port = _free_port()  # a Space passes its address to Gradio through these variables
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
    server = subprocess.Popen([sys.executable, "app.py"], cwd=folder, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    shown = _top1_served(server, port, cat_png, tmp_path / "space.png")
    assert shown == _predicted_top1(cat_png, capsys)
