"""Reproducibility runs: execute ``notebooks/NN_*.ipynb`` in order with papermill into
``runs/<run-id>/`` (``hm4sr run-notebooks``, ``make demo``). The first,
``00_expert_routing_tour``, trains on its own planted synthetic world in every mode (a
run's ``--data`` goes to notebooks 01-06 only).

A run folder holds, per notebook: the executed notebook, its HTML rendering, the JSON
record its last cell wrote, and its key figures (plotly JSON written by the notebook,
exported here to PNG and SVG through kaleido in one browser session for the whole
run, instead of one browser start per notebook kernel; skipped with one line saying so
where no Chromium is installed). Beside them:
``manifest.json`` (mode, parameters, versions, data hash, git commit, timings) and
``index.html`` linking everything.

Three sizes, chosen by the runner and passed as notebook parameters:

* ``smoke``: every notebook's ``smoke`` parameter is True (tiny sizes, set in the
  notebook itself) on a run-local planted synthetic world: the test suite's run.
* ``demo``: the notebooks' own defaults, sized so ``make demo`` on ml-100k finishes in
  about 7 minutes on 2 cores: short training, stated as such in the notebooks (the
  tour trains to early stopping on its small planted world).
* ``full``: training to convergence (100 epochs, early stopping with patience 10).

A notebook that raises stops the run: :class:`NotebookError` names the notebook, the
cell and the error; the executed notebook (with the failing cell marked), its HTML and
the manifest (status "failed") are still written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import html
import json
import os
import sys
import time
from pathlib import Path

from . import paths, provenance, runtime
from .data.prepare import SOURCES
from .data.store import read_manifest, write_bytes_atomic, write_json_atomic, write_text_atomic
from .static_export import BrowserMissing, StaticExportError, find_browser, render_static, static_request

SOURCE_TREE = provenance.SOURCE_TREE  # a clone or an editable install; site-packages otherwise
# The routing tour comes first: it trains on its own planted world (whatever the run's data),
# so the first gate picture of a run comes from a converged model on data whose truth is known.
TOUR = "00_expert_routing_tour"
NOTEBOOKS = (TOUR, "01_prepare_data", "02_train", "03_expert_gating", "04_temporal_embeddings",
             "05_loss_contributions", "06_embedding_atlas", "07_recommend_and_explain", "08_tuning")


def _notebook_dir() -> Path:
    """The source tree's ``notebooks/`` (a clone, an editable install), else the copy an
    installed wheel carries as ``hm4sr_core/bundled_notebooks`` (pyproject.toml)."""
    source = SOURCE_TREE / "notebooks"
    if (source / f"{TOUR}.ipynb").is_file():
        return source
    return Path(__file__).resolve().parent / "bundled_notebooks"


NOTEBOOK_DIR = _notebook_dir()
SMOKE_DATASET = "synthetic-smoke"  # the run-local world a smoke run prepares
FULL_TRAINING = {"epochs": 100, "patience": 10, "max_steps_per_epoch": 0}  # to convergence
STATIC_FORMATS = ("png", "svg")
# Seconds one cell may run in smoke and demo runs, so a hung kernel cannot hang the run;
# --full runs have no limit (an ablation trained to convergence takes hours).
CELL_TIMEOUT = 1800
# The kernel named "python3" is launched with the runner's own interpreter
# (jupyter_client swaps a spec's "python" for sys.executable), so notebooks see
# exactly the packages of the process that runs them, whichever kernels are registered.
KERNEL_NAME = "python3"
# Inherited by every kernel: nothing tries the Hugging Face hub. Kernels also inherit the
# Kernels inherit the runner's environment: the OpenMP setting of hm4sr_core.runtime is added
# to it (unless the runner has its own wait policy, as make test's PASSIVE); each notebook's
# first cell applies the rest (runtime.configure_process).
KERNEL_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
VERSIONED_PACKAGES = ("torch", "numpy", "pandas", "scipy", "plotly", "optuna", "ipywidgets", "papermill", "nbconvert",
                      "nbformat", "ipykernel", "umap-learn", "kaleido", "sentence-transformers")


class NotebookError(ValueError):
    """A notebook failed during a run. A ValueError so ``hm4sr`` reports it as one line
    and exits 2, like every other bad-input error (most failures are bad parameters)."""

    def __init__(self, notebook: str, message: str, *, cell: int | None = None, source: str = "",
                 ename: str = "", evalue: str = ""):
        self.notebook, self.cell, self.source, self.ename, self.evalue = notebook, cell, source, ename, evalue
        super().__init__(message)


# ----------------------------------------------------------------------------- parameters


def notebook_parameters(notebook: str | Path) -> dict[str, dict]:
    """The parameters a notebook declares in its ``parameters`` cell, as papermill infers
    them: name -> {"name", "inferred_type_name", "default", "help"}."""
    import papermill
    return papermill.inspect_notebook(str(notebook))


def plan_parameters(mode: str, data: str | None, run_dir: Path, seed: int | None = None) -> dict[str, dict]:
    """Parameters for each notebook of a run (a notebook receives only those it declares).

    ``mode`` is "smoke", "demo" or "full"; ``data`` a source name (prepared on the fly)
    or the name of a dataset already under ``data/processed``."""
    if mode not in ("smoke", "demo", "full"):
        raise ValueError(f"mode must be 'smoke', 'demo' or 'full', got {mode!r}")
    common: dict = {"output_dir": str(run_dir), "smoke": mode == "smoke", "train_dir": str(run_dir / "train"),
                    "figure_formats": ["json"]}  # PNG/SVG come from export_static_figures, once per run
    if seed is not None:
        common["seed"] = seed
    if mode == "smoke" and data in (None, "synthetic"):
        name, root = SMOKE_DATASET, run_dir / "data"
        first = {"source": "synthetic", "dataset_name": name, "data_root": str(root), "reuse": False}
        dataset = str(root / name)
    else:
        name = data or "ml-100k"
        # A source name is prepared when missing; any other name must be prepared already.
        first = {"source": name if name in SOURCES else "", "dataset_name": name, "data_root": "", "reuse": True}
        dataset = name
    plan = {}
    for nb in NOTEBOOKS:
        # The tour builds its planted world from the seed in every mode: it gets no dataset.
        params = dict(common) if nb == TOUR else dict(common, dataset=dataset)
        if nb == "01_prepare_data":
            params.update(first)
        if mode == "full":
            params.update(FULL_TRAINING)
        plan[nb] = params
    return plan


# ----------------------------------------------------------------------------- run


def run_notebooks(smoke: bool = False, data: str | None = None, out: str | Path | None = None,
                  full: bool = False, *, seed: int | None = None, notebooks: tuple[str, ...] = NOTEBOOKS,
                  overrides: dict[str, dict] | None = None, notebook_dir: str | Path = NOTEBOOK_DIR,
                  cell_timeout: int | None = None, progress: bool = True) -> Path:
    """Execute ``notebooks`` in order into a run folder and return the folder.

    ``out`` defaults to ``runs/<YYYYmmdd-HHMMSS>-<mode>-<data>``. ``overrides`` maps a
    notebook name to parameters that replace the planned ones. Raises
    :class:`NotebookError` when a notebook fails (after writing what there is), or when a
    cell runs longer than ``cell_timeout`` seconds (default :data:`CELL_TIMEOUT`; none
    for ``full``)."""
    if smoke and full:
        raise ValueError("choose --smoke or --full, not both")
    mode = "smoke" if smoke else "full" if full else "demo"
    unknown = sorted(set(notebooks) - set(NOTEBOOKS))
    if unknown:
        raise ValueError(f"unknown notebook(s) {unknown}; known: {', '.join(NOTEBOOKS)}")
    notebook_dir = Path(notebook_dir)
    started = time.time()
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{mode}-{data or ('synthetic' if smoke else 'ml-100k')}"
    run_dir = Path(out) if out is not None else paths.runs_root() / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir.resolve()
    plan = plan_parameters(mode, data, run_dir, seed)
    if cell_timeout is None and mode != "full":
        cell_timeout = CELL_TIMEOUT
    for nb, extra in (overrides or {}).items():
        if nb not in plan:
            raise ValueError(f"overrides for unknown notebook {nb!r}")
        plan[nb].update(extra)
    # The kernels run in the notebook folder: they find the data and runs through absolute roots.
    kernel_env = {**KERNEL_ENVIRONMENT, **runtime.openmp_defaults(), paths.DATA_ENV: str(paths.data_root()),
                  paths.RUNS_ENV: str(paths.runs_root())}
    manifest = {
        "run_id": run_dir.name, "mode": mode, "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "kernel": {"name": KERNEL_NAME, "python": sys.executable},
        "versions": provenance.versions(VERSIONED_PACKAGES), "git": provenance.git_state(),
        "machine": provenance.machine(), "data": {}, "notebooks": [],
    }
    # HTML renderings are made in the background while the next notebook runs (its kernel
    # does the work; this process mostly waits).
    html_jobs: dict[str, concurrent.futures.Future] = {}
    with _environment_added(kernel_env), concurrent.futures.ThreadPoolExecutor(max_workers=1) as renderer:
        try:
            for i, nb in enumerate(notebooks, 1):
                if progress:
                    print(f"[{i}/{len(notebooks)}] {nb} ...", flush=True)
                entry = _execute(nb, notebook_dir, run_dir, plan[nb], manifest, cell_timeout)
                html_jobs[nb] = renderer.submit(_render_html, run_dir / entry["executed"])
                if nb == "01_prepare_data" and entry["record"]:
                    manifest["data"] = _data_entry(json.loads((run_dir / entry["record"]).read_text()))
                if progress:
                    print(f"      {nb}: {entry['seconds']:.1f} s", flush=True)
            manifest["status"] = "ok"
        except BaseException as err:
            manifest["status"] = "failed"
            manifest["error"] = f"{type(err).__name__}: {err}"
            raise
        finally:
            # What follows must not hide the run's own error or leave it without a manifest.
            try:
                static = export_static_figures(run_dir / "figures", progress=progress)
            except Exception as err:  # noqa: BLE001 - recorded; the notebooks' results stand
                static = {"status": "failed", "reason": f"PNG/SVG figures not exported: {type(err).__name__}: {err}",
                          "paths": []}
                print(f"hm4sr: {static['reason']}", file=sys.stderr, flush=True)
            figures = static.pop("paths")
            manifest["static_figures"] = dict(static, formats=list(STATIC_FORMATS))
            for entry in manifest["notebooks"]:
                if entry["name"] in html_jobs:
                    try:
                        entry["html"] = html_jobs[entry["name"]].result()
                    except Exception as err:  # noqa: BLE001 - the executed notebook is still there
                        entry["html"], entry["html_error"] = None, f"{type(err).__name__}: {err}"
                entry["figures"] = sorted(str(p.relative_to(run_dir)) for p in figures
                                          if p.parent.name == entry["name"])
            manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            manifest["seconds"] = round(time.time() - started, 2)
            write_json_atomic(run_dir / "manifest.json", manifest)
            write_text_atomic(run_dir / "index.html", index_page(manifest))
    return run_dir


@contextlib.contextmanager
def _environment_added(values: dict[str, str]):
    """``values`` in os.environ where not already set (the kernels started inside inherit
    them), and the caller's environment as it was afterwards."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _execute(nb: str, notebook_dir: Path, run_dir: Path, planned: dict, manifest: dict,
             cell_timeout: int | None) -> dict:
    """Run one notebook with papermill into ``run_dir``; append and return its manifest entry.

    Only the parameters the notebook declares are passed (papermill would inject the
    others too, as unknown names). On failure the entry is completed, the failed notebook
    rendered, and :class:`NotebookError` raised."""
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    source = notebook_dir / f"{nb}.ipynb"
    if not source.exists():
        raise FileNotFoundError(f"{source}: notebook missing")
    declared = notebook_parameters(source)
    params = {k: v for k, v in planned.items() if k in declared}
    entry = {"name": nb, "parameters": params, "status": "running", "executed": f"{nb}.ipynb"}
    manifest["notebooks"].append(entry)
    write_json_atomic(run_dir / "manifest.json", manifest)
    executed = run_dir / entry["executed"]
    entry["kernel_log"] = f"{nb}.kernel.log"
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(str(source), str(executed), parameters=params, kernel_name=KERNEL_NAME,
                                   progress_bar=False, cwd=str(notebook_dir), execution_timeout=cell_timeout,
                                   # each live plotly FigureWidget would carry its own copy of
                                   # plotly.js (~5 MB) into the saved widget state
                                   store_widget_state=False,
                                   kernel_manager_class=_logged_kernel_manager(run_dir / entry["kernel_log"]))
    except PapermillExecutionError as err:
        entry.update(status="failed", seconds=round(time.perf_counter() - t0, 2),
                     error={"cell": err.exec_count, "ename": err.ename, "evalue": err.evalue},
                     html=_render_html(executed))
        raise NotebookError(
            nb, f"notebook {nb}.ipynb failed in cell [{err.exec_count}]: {err.ename}: {err.evalue}\n"
                f"--- cell source ---\n{err.source}\n--- executed notebook: {executed}",
            cell=err.exec_count, source=err.source, ename=err.ename, evalue=err.evalue) from None
    except CellTimeoutError as err:
        entry.update(status="failed", seconds=round(time.perf_counter() - t0, 2),
                     error={"cell": None, "ename": "CellTimeoutError", "evalue": str(err)},
                     html=_render_html(executed))
        raise NotebookError(nb, f"notebook {nb}.ipynb: a cell ran longer than {cell_timeout} s and was stopped "
                                f"({err}); executed notebook: {executed}", ename="CellTimeoutError",
                            evalue=str(err)) from None
    except (DeadKernelError, RuntimeError) as err:  # the kernel died, or did not start in time
        entry.update(status="failed", seconds=round(time.perf_counter() - t0, 2),
                     error={"cell": None, "ename": type(err).__name__, "evalue": str(err)},
                     html=_render_html(executed))
        raise NotebookError(nb, f"notebook {nb}.ipynb: its kernel failed ({type(err).__name__}: {err}); "
                                f"the kernel's own output is in {run_dir / entry['kernel_log']}",
                            ename=type(err).__name__, evalue=str(err)) from None
    record = run_dir / f"{nb}.json"
    entry.update(status="ok", seconds=round(time.perf_counter() - t0, 2),
                 record=record.name if record.exists() else None)
    return entry


def _logged_kernel_manager(log: Path) -> type:
    """A kernel manager whose kernel writes its own stdout and stderr to ``log``: ipykernel's
    notes (its TCP-transport warning, the interrupt it reports at shutdown) stay out of the
    terminal, and a kernel that dies leaves its last words in the run folder."""
    from jupyter_client.manager import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            with open(log, "ab") as handle:  # the kernel process keeps its own copy of the descriptor
                kw.setdefault("stdout", handle)
                kw.setdefault("stderr", handle)
                await super().start_kernel(**kw)

    return LoggedKernelManager


def _data_entry(record: dict) -> dict:
    """The dataset part of the manifest, from 01_prepare_data's record."""
    entry = {k: record.get(k) for k in ("dataset_name", "dataset_dir", "source")}
    if record.get("dataset_dir"):
        m = read_manifest(record["dataset_dir"])
        entry.update(data_hash=m["data_hash"], split_hashes=m.get("split_hashes"),
                     preprocessing=m.get("preprocessing"))
    return entry


def _render_html(executed: Path) -> str | None:
    """Write ``<executed>.html`` (JupyterLab template, outputs as executed); return its name."""
    import nbconvert
    import nbformat
    if not executed.exists():
        return None
    exporter = nbconvert.HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    target = executed.with_suffix(".html")
    write_text_atomic(target, body)
    return target.name


def export_static_figures(folder: Path, formats: tuple[str, ...] = STATIC_FORMATS, *,
                          progress: bool = True) -> dict:
    """Export every plotly figure JSON under ``folder`` (``<notebook>/<name>.json``) to
    ``formats`` beside it, skipping those already exported, in one browser session.

    Static export is the one step that needs a system package (Chromium). Without one it is
    skipped, with one line saying what is missing and what was left out; a browser that fails
    or stops answering (every call has a timeout) is reported the same way. Neither loses the
    run: the HTML renderings and the plotly JSON figures are written regardless.

    Returns ``{"status": "ok" | "skipped" | "failed", "reason": str | None, "paths": [...]}``
    where ``paths`` are every static file present afterwards."""
    def present() -> list[Path]:
        return [p for source in sorted(folder.glob("*/*.json"))
                for p in (source.with_suffix(f".{f}") for f in formats) if p.exists()]

    if not folder.exists():
        return {"status": "ok", "reason": None, "paths": []}

    def stale(target: Path, source: Path) -> bool:  # a rerun into the same folder rewrites the JSON
        return not target.exists() or target.stat().st_mtime_ns < source.stat().st_mtime_ns

    todo = [(source, source.with_suffix(f".{fmt}")) for source in sorted(folder.glob("*/*.json"))
            for fmt in formats if stale(source.with_suffix(f".{fmt}"), source)]
    status, reason = "ok", None
    if todo:
        try:
            browser = find_browser()
            if progress:
                print(f"static figures: {len(todo)} files ({', '.join(formats)}) with {browser} ...", flush=True)
            figures = {s: json.loads(s.read_text()) for s in {s for s, _ in todo}}
            requests = [static_request(figures[source], target.suffix[1:], f"{source.parent.name}/{source.stem}")
                        for source, target in todo]
            for (_, target), image in zip(todo, render_static(requests)):
                write_bytes_atomic(target, image)
        except (BrowserMissing, StaticExportError) as err:
            status = "skipped" if isinstance(err, BrowserMissing) else "failed"
            reason = f"PNG/SVG figures not exported: {err}. The HTML and plotly JSON figures are written"
            print(f"hm4sr: {reason}", file=sys.stderr, flush=True)
    return {"status": status, "reason": reason, "paths": present()}


# ----------------------------------------------------------------------------- index


def index_page(manifest: dict) -> str:
    """A self-contained HTML page linking a run's notebooks, records and figures."""
    e = html.escape
    data = manifest.get("data") or {}
    git = manifest.get("git") or {}
    rows = []
    for nb in manifest["notebooks"]:
        links = [f'<a href="{e(nb["html"])}">HTML</a>' if nb.get("html") else "",
                 f'<a href="{e(nb["executed"])}">notebook</a>',
                 f'<a href="{e(nb["record"])}">record</a>' if nb.get("record") else ""]
        error = nb.get("error")
        where = f' in cell [{error["cell"]}]' if error and error.get("cell") is not None else ""
        status = e(nb["status"]) + (f'{where}: {e(str(error["ename"]))}: '
                                    f'{e(str(error["evalue"]))}' if error else "")
        seconds = f'{nb["seconds"]:.1f}' if nb.get("seconds") is not None else ""
        rows.append(f'<tr><td>{e(nb["name"])}</td><td class="{e(nb["status"])}">{status}</td>'
                    f'<td>{seconds}</td><td>{" ".join(x for x in links if x)}</td></tr>')
    gallery = []
    for nb in manifest["notebooks"]:
        pngs = [f for f in nb.get("figures", []) if f.endswith(".png")]
        if pngs:
            cards = "".join(
                f'<figure><a href="{e(p[:-4])}.svg"><img src="{e(p)}" alt="{e(Path(p).stem)}"></a>'
                f'<figcaption>{e(Path(p).stem)}</figcaption></figure>' for p in pngs)
            gallery.append(f'<h3>{e(nb["name"])}</h3><div class="gallery">{cards}</div>')
    static_note = (manifest.get("static_figures") or {}).get("reason")
    if static_note:
        gallery.insert(0, f'<p class="failed">{e(static_note)}.</p>')
    versions_text = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items() if v)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>HM4SR run {e(manifest["run_id"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
.ok {{ color: #176317; }} .failed {{ color: #a31515; font-weight: bold; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} img {{ width: 22em; border: 1px solid #ddd; }}
code {{ background: #f4f4f4; }}
</style></head><body>
<h1>HM4SR notebook run <code>{e(manifest["run_id"])}</code></h1>
<p>Mode <b>{e(manifest["mode"])}</b>, status <b class="{e(manifest["status"])}">{e(manifest["status"])}</b>,
started {e(manifest.get("started", ""))}, {manifest.get("seconds", 0):.0f} s.
Data <code>{e(str(data.get("dataset_name", "")))}</code> (hash <code>{e(str(data.get("data_hash", ""))[:16])}</code>).
Code at commit <code>{e(str(git.get("commit", "")))}</code>{" with uncommitted changes" if git.get("dirty") else ""}.
Everything: <a href="manifest.json">manifest.json</a>.</p>
<table><tr><th>notebook</th><th>status</th><th>seconds</th><th>files</th></tr>
{chr(10).join(rows)}
</table>
<h2>Key figures (PNG; click for SVG)</h2>
{chr(10).join(gallery) or "<p>none</p>"}
<p><small>{e(versions_text)}</small></p>
</body></html>
"""
