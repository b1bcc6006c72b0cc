"""A real browser on a real JupyterLab: every explorer renders, fits the output area at a
projector's and a desktop's size, and its figure reacts to a control.

JupyterLab starts once for the module on 127.0.0.1 at a free port with token
authentication on; headless Chromium (the one static export uses, Debian's /usr/bin/chromium
here; never a browser downloaded by playwright) opens one notebook holding the five explorers (Gate, Temporal, Loss,
Embedding, Recommendation) over a tiny planted world and a one-epoch model, in the default Lab layout with
the file browser open, at 1280 x 800 and at 1920 x 1080. For each explorer and size: every
plotly figure (its SVG, title and colour bar included) lies inside its own plot box, the
plot boxes inside the cell's output area and apart from each other, the output area has no
horizontal scroll bar, the controls take one or two rows; then one control is moved and the
figure's data in the page must change. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import json
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


def _browser() -> Path | None:
    """The Chromium static export would use (static_export.find_browser), or None."""
    from hm4sr_core.static_export import BrowserMissing, find_browser
    try:
        return Path(find_browser())
    except BrowserMissing:
        return None


CHROMIUM = _browser()
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORTS = ((1280, 800), (1920, 1080))

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium (BROWSER_PATH, chromium on PATH or "
                                "/usr/bin/chromium): `make test` installs Debian's when run as root, else "
                                "apt-get install -y chromium fonts-dejavu-core")

NOTEBOOK_CELLS = [
    "import numpy as np\n"
    "import pandas as pd\n"
    "from hm4sr_core import introspect as I\n"
    "from hm4sr_core.config import ModelConfig, PreprocessConfig, TrainConfig\n"
    "from hm4sr_core.data.preprocess import preprocess\n"
    "from hm4sr_core.data.synthetic import make_synthetic_world\n"
    "from hm4sr_core.train import train\n"
    "from widgets import EmbeddingExplorer, GateExplorer, LossExplorer, RecommendationExplorer, TemporalExplorer",
    # w_category 0.5: the weighted loss view differs from the unweighted one
    "data = preprocess(make_synthetic_world(3, n_users=30, n_items=24, mean_length=10, text_dim=8, image_dim=8),\n"
    "                  PreprocessConfig(max_length=10))\n"
    "result = train(data, ModelConfig(hidden_size=8, num_layers=1, inner_size=16, max_length=10, w_category=0.5),\n"
    "               TrainConfig(epochs=1, dense_batch_size=8, threads=1), progress=False)\n"
    "model = result.model",
    # PCA instead of UMAP (seconds of numba compilation): the atlas table's columns, other coordinates
    "fused = I.item_embeddings(model)['fused']\n"
    "xy = (fused - fused.mean(0)) @ np.linalg.svd(fused - fused.mean(0), full_matrices=False)[2][:2].T\n"
    "atlas = pd.DataFrame({'space': 'fused', 'item': data.items['item'], 'item_token': data.items['token'],\n"
    "                      'title': data.items['text'], 'category': [c[0] for c in data.items['categories']],\n"
    "                      'popularity': np.bincount(data.interactions['item'], minlength=data.num_items + 1)[1:],\n"
    "                      'dominant_expert': [f'expert {i % 4}' for i in range(data.num_items)],\n"
    "                      'x': xy[:, 0], 'y': xy[:, 1]})",
    "GateExplorer(I.gate_table(model, data, max_users=5), I.temporal_gate_table(model, data, max_users=5))",
    "TemporalExplorer.from_model(model, data, grid=12)",
    "LossExplorer(result.steps)",
    "EmbeddingExplorer(atlas)",
    "RecommendationExplorer.from_model(model, data, ['u0', 'u1', 'u2'], k=5)",
]
# In page order: name, plots, (control kind, its label, the value to pick), the plot it moves, the trace field.
EXPLORERS = [
    ("gate", 3, ("select", "stream", "text"), 2, "z"),
    ("temporal", 3, ("select", "grid expert", "2"), 2, "z"),
    ("loss", 2, ("button", "weighted", None), 0, "y"),
    ("embedding", 1, ("select", "colour", "popularity"), 0, "marker"),
    ("recommendation", 4, ("select", "user", "u1"), 2, "x"),
]

# Geometry of explorer ``i`` in the page: boxes of the output area, of every plot and of
# what plotly drew inside it (SVG layers, titles, colour bars, legends), and the rows the
# controls take (boxes whose vertical extents overlap share a row).
GEOMETRY_JS = """(i) => {
  const box = (e) => { const r = e.getBoundingClientRect();
                       return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width}; };
  const root = document.querySelectorAll('.hm4sr-explorer')[i];
  const area = root.closest('.jp-OutputArea-output');
  const plots = [...root.querySelectorAll('.js-plotly-plot')].map(p => ({
      box: box(p),
      parts: [...p.querySelectorAll('.main-svg, .gtitle, .g-gtitle, .colorbar, .legend, .xtitle, .ytitle')]
          .map(e => ({name: e.getAttribute('class'), box: box(e)})).filter(x => x.box.width > 0)}));
  const rows = [];
  for (const c of root.querySelectorAll('.hm4sr-controls > *')) {
      const b = box(c);
      if (b.width === 0) continue;
      const row = rows.find(r => b.top < r.bottom - 1 && b.bottom > r.top + 1);
      if (row) { row.top = Math.min(row.top, b.top); row.bottom = Math.max(row.bottom, b.bottom); }
      else rows.push({top: b.top, bottom: b.bottom});
  }
  return {area: box(area), scrollWidth: area.scrollWidth, clientWidth: area.clientWidth,
          rootScrollWidth: root.scrollWidth, rootClientWidth: root.clientWidth, plots, controlRows: rows.length};
}"""
TRACE_JS = """([i, j, field]) => {
  const plot = document.querySelectorAll('.hm4sr-explorer')[i].querySelectorAll('.js-plotly-plot')[j];
  return JSON.stringify((plot.data || []).map(t => t[field]));
}"""
TOLERANCE = 1.0  # px: sub-pixel rounding of bounding boxes


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


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab serving a folder holding explorers.ipynb; yields (base url, token)."""
    root = tmp_path_factory.mktemp("lab")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK_CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, root / "explorers.ipynb")
    port, token = _free_port(), secrets.token_hex(24)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
               JUPYTER_RUNTIME_DIR=str(root / "runtime"), JUPYTER_CONFIG_DIR=str(root / "config"))
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--LabApp.workspaces_dir={root / 'workspaces'}", "--LabApp.expose_app_in_browser=True",
         "--ServerApp.port_retries=0"] + (["--allow-root"] if os.geteuid() == 0 else []),  # CI runs as root
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _status(f"{base}/api/status?token={token}") != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{(root / 'lab.log').read_text()[-3000:]}")
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


def _inside(inner: dict, outer: dict) -> bool:
    return (inner["left"] >= outer["left"] - TOLERANCE and inner["right"] <= outer["right"] + TOLERANCE
            and inner["top"] >= outer["top"] - TOLERANCE and inner["bottom"] <= outer["bottom"] + TOLERANCE)


def _overlap(a: dict, b: dict) -> bool:
    return (min(a["right"], b["right"]) - max(a["left"], b["left"]) > TOLERANCE
            and min(a["bottom"], b["bottom"]) - max(a["top"], b["top"]) > TOLERANCE)


def _check_fits(geometry: dict, name: str, size: str) -> None:
    where = f"{name} explorer at {size}"
    area = geometry["area"]
    assert geometry["scrollWidth"] <= geometry["clientWidth"], f"{where}: the output area scrolls sideways"
    assert geometry["rootScrollWidth"] <= geometry["rootClientWidth"], f"{where}: the explorer overflows"
    plots = geometry["plots"]
    for k, plot in enumerate(plots):
        assert _inside(plot["box"], area), f"{where}: plot {k} {plot['box']} leaves the output area {area}"
        assert plot["parts"], f"{where}: plot {k} drew nothing"
        for part in plot["parts"]:
            assert _inside(part["box"], plot["box"]), \
                f"{where}: plot {k}'s {part['name']} {part['box']} is clipped by its box {plot['box']}"
        for other in plots[k + 1:]:
            assert not _overlap(plot["box"], other["box"]), f"{where}: plots overlap"
    assert 1 <= geometry["controlRows"] <= 2, f"{where}: controls take {geometry['controlRows']} rows"


def _open_and_run(page, base: str, token: str) -> None:
    page.goto(f"{base}/lab/tree/explorers.ipynb?token={token}")
    page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')", timeout=45_000)
    # The default layout: the file browser open beside the notebook.
    page.evaluate("() => { if (window.jupyterapp.shell.leftCollapsed)"
                  " window.jupyterapp.shell.activateById('filebrowser'); }")
    page.wait_for_function("!window.jupyterapp.shell.leftCollapsed"
                           " && document.querySelector('.jp-FileBrowser').getBoundingClientRect().width > 100")
    # Lab's "get notified about Jupyter news?" toast would cover the lower right of the notebook.
    news = page.get_by_role("button", name="No", exact=True)
    try:
        news.click(timeout=5_000)
    except Exception:  # noqa: BLE001 - no toast this time: nothing to dismiss
        pass
    # Run All before the kernel is up opens a "Select Kernel" dialog instead.
    page.wait_for_function("window.jupyterapp.shell.currentWidget?.sessionContext?.session?.kernel"
                           "?.status === 'idle'", timeout=60_000)
    # Not awaited: the command's promise does not settle in this Lab version.
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    plots = sum(n for _, n, *_ in EXPLORERS)
    # kernel start, imports, a tiny world, one epoch, four explorers; every plot drawn with its title
    page.wait_for_function(
        f"document.querySelectorAll('.hm4sr-explorer').length === {len(EXPLORERS)} && "
        f"[...document.querySelectorAll('.hm4sr-explorer .js-plotly-plot')].filter("
        f"p => p.querySelector('.main-svg') && p.querySelector('.gtitle')).length === {plots}", timeout=120_000)


def _settled(page, i: int) -> dict:
    """The explorer's geometry once two reads 0.5 s apart agree (figures resize after drawing)."""
    previous = None
    for _ in range(20):
        geometry = page.evaluate(GEOMETRY_JS, i)
        if geometry == previous:
            return geometry
        previous = geometry
        page.wait_for_timeout(500)
    return geometry


def test_every_explorer_fits_and_reacts_in_chromium(lab):
    from playwright.sync_api import sync_playwright

    base, token = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for width, height in VIEWPORTS:
                size = f"{width}x{height}"
                page = browser.new_page(viewport={"width": width, "height": height})
                try:
                    _open_and_run(page, base, token)
                finally:
                    page.screenshot(path=str(ARTIFACTS / f"explorers_{size}_loaded.png"))
                explorers = page.locator(".hm4sr-explorer")
                for i, (name, n_plots, (kind, label, value), plot, field) in enumerate(EXPLORERS):
                    explorer = explorers.nth(i)
                    explorer.scroll_into_view_if_needed()
                    assert explorer.locator(".js-plotly-plot").count() == n_plots, name
                    geometry = _settled(page, i)
                    explorer.screenshot(path=str(ARTIFACTS / f"{name}_explorer_{size}.png"))
                    _check_fits(geometry, name, size)

                    before = page.evaluate(TRACE_JS, [i, plot, field])
                    if kind == "select":
                        explorer.locator(".widget-dropdown", has=page.locator("label", has_text=label)) \
                            .locator("select").select_option(label=value)
                    else:
                        explorer.get_by_role("button", name=label, exact=True).click()
                    page.wait_for_function(f"(before) => ({TRACE_JS})([{i}, {plot}, {json.dumps(field)}]) !== before",
                                           arg=before, timeout=20_000)
                    _check_fits(_settled(page, i), name, f"{size} after moving {label}")
                errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
                assert errors.count() == 0, errors.all_inner_texts()
                page.close()
        finally:
            browser.close()
