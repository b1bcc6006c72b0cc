"""A real browser on a real JupyterLab: an explorer notebook runs, its widgets and plotly
figure render, and the figure reacts to a control.

JupyterLab starts on 127.0.0.1 at a free port with token authentication on; headless
Debian Chromium (/usr/bin/chromium, never a browser downloaded by playwright) opens a
small notebook that builds a GateExplorer from an untrained HM4SR on a tiny planted
world, runs every cell, switches the stream dropdown and checks that the trajectory
plot's title in the page changes. A screenshot goes to tests/artifacts/.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium: `make test` "
                                "installs it when run as root, else apt-get install -y chromium fonts-dejavu-core")

NOTEBOOK_CELLS = [
    "from hm4sr_core.config import ModelConfig, PreprocessConfig\n"
    "from hm4sr_core.data.preprocess import preprocess\n"
    "from hm4sr_core.data.synthetic import make_synthetic_world\n"
    "from hm4sr_core.introspect import gate_table, temporal_gate_table\n"
    "from hm4sr_core.model import build_model\n"
    "from widgets import GateExplorer",
    "data = preprocess(make_synthetic_world(3, n_users=30, n_items=24, mean_length=10, text_dim=8, image_dim=8),\n"
    "                  PreprocessConfig(max_length=10))\n"
    "model = build_model(ModelConfig(hidden_size=8, num_layers=1, inner_size=16, max_length=10), data)",
    "explorer = GateExplorer(gate_table(model, data, max_users=5), temporal_gate_table(model, data, max_users=5))\n"
    "explorer",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never through a proxy


def _status(url: str) -> int:
    """HTTP status of a GET, 0 while nothing listens."""
    try:
        with _DIRECT.open(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except urllib.error.URLError:
        return 0


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab serving ``tmp_path`` (holding explorer.ipynb); yields (base url, token)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK_CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, tmp_path / "explorer.ipynb")
    port, token = _free_port(), secrets.token_hex(24)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--LabApp.expose_app_in_browser=True",
         "--ServerApp.port_retries=0"] + (["--allow-root"] if os.geteuid() == 0 else []),  # CI runs as root
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _status(f"{base}/api/status?token={token}") != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_lab_requires_the_token(lab):
    base, token = lab
    assert _status(f"{base}/api/contents") == 403
    assert _status(f"{base}/api/contents?token={'0' * len(token)}") == 403
    assert _status(f"{base}/api/contents?token={token}") == 200


def test_gate_explorer_renders_and_reacts_in_chromium(lab):
    from playwright.sync_api import sync_playwright

    base, token = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/explorer.ipynb?token={token}")
            page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')",
                                   timeout=45_000)
            # Run All before the kernel is up opens a "Select Kernel" dialog instead.
            page.wait_for_function("window.jupyterapp.shell.currentWidget?.sessionContext?.session?.kernel"
                                   "?.status === 'idle'", timeout=45_000)
            # Not awaited: the command's promise does not settle in this Lab version.
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
            try:  # kernel start, imports, a tiny world and model, three figures
                page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 3",
                                       timeout=75_000)
            finally:
                page.screenshot(path=str(ARTIFACTS / "gate_explorer_loaded.png"), full_page=True)
            stream = page.locator(".widget-dropdown", has=page.locator("label", has_text="stream")).locator("select")
            assert page.locator(".widget-dropdown select").count() == 2  # user, stream
            assert page.locator(".widget-hslider").count() == 1  # position
            titles = page.locator(".js-plotly-plot .gtitle")
            assert "id stream: gates along the sequence" in titles.all_text_contents()
            assert page.locator(".js-plotly-plot").count() == 3  # heatmap, temporal bars, trajectory
            stream.select_option("text")
            page.wait_for_function(
                "[...document.querySelectorAll('.js-plotly-plot .gtitle')]"
                ".some(t => t.textContent === 'text stream: gates along the sequence')", timeout=20_000)
            page.screenshot(path=str(ARTIFACTS / "gate_explorer.png"), full_page=True)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert errors.count() == 0, errors.all_inner_texts()
        finally:
            browser.close()
