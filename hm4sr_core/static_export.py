"""Static export of plotly figures: PNG, SVG, PDF, JPEG, WebP through kaleido and a local
Chromium, and plotly's own JSON (no browser).

The one part of the figure pipeline that touches files and starts a process: the figure
builders (:mod:`widgets.figures`) stay pure, the notebooks and the notebook runner
(:func:`hm4sr_core.notebooks.export_static_figures`, one browser session for a whole run)
export through here. kaleido and plotly are imported only when a figure is rendered (they
come with the workbench extra).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import warnings
from pathlib import Path

from .atomic import write_bytes_atomic

EXPORT_FORMATS = ("png", "svg", "pdf", "jpeg", "webp", "json")
# plotly JSON needs no browser: a run exports it once per figure and turns every figure
# of the run into PNG/SVG in one browser session (hm4sr_core.notebooks.export_static_figures).
BROWSER_FREE_FORMATS = ("json",)
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
DEBIAN_CHROMIUM = "/usr/bin/chromium"

# A browser that never answers must not hang a run: seconds for Chromium to start, and for
# each image once it runs (both far above what a working browser needs).
BROWSER_START_TIMEOUT = 60.0
FIGURE_TIMEOUT = 60.0
INSTALL_HINT = ("install it with `apt-get install -y chromium fonts-dejavu-core` (`make demo` and `make test` "
                "do when run as root), or point BROWSER_PATH at a Chrome/Chromium executable")


class BrowserMissing(RuntimeError):
    """No Chromium for static export (PNG/SVG); plotly JSON can still be written."""


class StaticExportError(RuntimeError):
    """The browser started but failed, or did not answer within the timeout."""


def find_browser() -> str:
    """Path of a Chromium for kaleido: $BROWSER_PATH (kaleido's own override) when it names
    an executable, else the first of ``BROWSER_NAMES`` on PATH, else /usr/bin/chromium.

    Never downloads a browser; raises :class:`BrowserMissing` saying how to install one."""
    env = os.environ.get("BROWSER_PATH")
    candidates = ([env] if env else []) + [shutil.which(n) for n in BROWSER_NAMES] + [DEBIAN_CHROMIUM]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise BrowserMissing(f"no Chromium for PNG/SVG export (checked $BROWSER_PATH, {', '.join(BROWSER_NAMES)} "
                         f"on PATH, {DEBIAN_CHROMIUM}); {INSTALL_HINT}")


def static_request(fig_dict: dict, fmt: str, label: str, *, width: int | None = None, height: int | None = None,
                   scale: float = 1.0) -> tuple[dict, dict, str]:
    """One request for :func:`render_static`: the figure at ``width`` x ``height`` pixels,
    default the figure's own size, else 900 x 500."""
    layout = fig_dict.get("layout", {})
    opts = dict(format=fmt, width=int(width or layout.get("width") or 900),
                height=int(height or layout.get("height") or 500), scale=scale)
    return fig_dict, opts, label


def render_static(requests: list[tuple[dict, dict, str]], browser: str | None = None, *,
                  start_timeout: float = BROWSER_START_TIMEOUT,
                  figure_timeout: float = FIGURE_TIMEOUT) -> list[bytes]:
    """Render many figures in one browser session (starting Chromium costs seconds).

    Args:
        requests: ``(figure dict, kaleido opts (format, width, height, scale), label)``; the
            label names the figure in errors.
        browser: a Chromium executable; default :func:`find_browser`.
    Returns:
        The image bytes, one per request, in order.
    Raises:
        BrowserMissing: no browser (before anything starts).
        StaticExportError: the browser did not start within ``start_timeout`` seconds or an
            image took longer than ``figure_timeout``, naming the browser and the figure.
    """
    import kaleido

    browser = browser or find_browser()
    stage = {"what": f"starting {browser}", "limit": start_timeout}  # where the session is, for errors

    async def within(coro, seconds: float):
        """``coro``'s result, or TimeoutError after ``seconds`` (kaleido turns a plain
        cancellation into a misleading "browser closed" error, so the timeout is ours)."""
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if not done:
            # the cancelled task's own error is expected; marking it seen keeps asyncio quiet
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            task.cancel()
            raise TimeoutError
        return task.result()

    async def run() -> list[bytes]:
        # mathjax=False: kaleido would fetch MathJax from a CDN, and these machines are offline.
        k = kaleido.Kaleido(path=browser, mathjax=False, timeout=figure_timeout)
        try:
            await within(k.open(), start_timeout)
            images = []
            for fig, opts, label in requests:
                stage.update(what=f"rendering {label} as {opts.get('format')} in {browser}", limit=figure_timeout)
                images.append(await within(k.calc_fig(fig, opts=opts), figure_timeout))
            return images
        finally:
            try:
                await within(k.close(), 5)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            process = getattr(k, "subprocess", None)
            if process is not None and process.poll() is None:  # a browser that ignored close
                process.kill()

    # A thread of our own: it has no running event loop (so this works inside Jupyter too), and
    # as a daemon it cannot keep the interpreter alive if the browser ignores the timeouts.
    result: dict = {}

    def target() -> None:
        try:
            result["images"] = asyncio.run(run())
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target, name="hm4sr-static-export", daemon=True)
    thread.start()
    thread.join(start_timeout + figure_timeout * len(requests) + 30)
    if thread.is_alive():
        raise StaticExportError(f"static export: no answer while {stage['what']}; gave up after "
                                f"{start_timeout + figure_timeout * len(requests) + 30:.0f} s")
    err = result.get("error")
    if isinstance(err, TimeoutError):
        raise StaticExportError(f"static export: no answer within {stage['limit']:.0f} s while {stage['what']}") from None
    if err is not None:
        raise StaticExportError(f"static export failed while {stage['what']}: {type(err).__name__}: {err}") from err
    images = result["images"]
    for img, (_, opts, label) in zip(images, requests):
        if not img:
            raise StaticExportError(f"static export: {browser} returned an empty {opts.get('format')} image "
                                    f"for {label}")
    return images


def save_figure(fig, path_without_ext, formats=("png", "svg"), *, width: int | None = None,
                height: int | None = None, scale: float = 1.0, if_no_browser: str = "warn") -> list[Path]:
    """Write ``fig`` as ``<path_without_ext>.<format>`` for each format, atomically.

    Args:
        fig: a Figure or FigureWidget.
        path_without_ext: e.g. "results/figures/gates"; parent folders are created.
        formats: any of ``EXPORT_FORMATS``; "json" (plotly's figure JSON) needs no browser.
        width, height: pixels; default the figure's own size, else 900 x 500.
        scale: pixel density multiplier for raster formats.
        if_no_browser: "warn" (default): when a format needs Chromium and none is installed,
            write the plotly JSON instead and warn once (a notebook opened on a machine without
            a browser keeps running); "raise": raise :class:`BrowserMissing`, writing nothing.
    Returns:
        The paths written. Each file appears whole or not at all (temporary file + rename).
    Raises:
        BrowserMissing (with ``if_no_browser="raise"``); StaticExportError when the browser
        fails or does not answer in time. Nothing is written then.
    """
    formats = tuple(formats)
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad or not formats:
        raise ValueError(f"save_figure: formats must be a non-empty subset of {EXPORT_FORMATS}, got {formats}")
    if if_no_browser not in ("warn", "raise"):
        raise ValueError(f"save_figure: if_no_browser must be 'warn' or 'raise', got {if_no_browser!r}")
    if if_no_browser == "warn" and any(f not in BROWSER_FREE_FORMATS for f in formats):
        try:
            find_browser()
        except BrowserMissing as err:
            warnings.warn(f"{err}. Wrote plotly JSON instead of {', '.join(formats)}", stacklevel=2)
            formats = ("json",)
    fig_dict = fig.to_dict()
    base = Path(path_without_ext)
    rendered = [f for f in formats if f not in BROWSER_FREE_FORMATS]
    requests = [static_request(fig_dict, f, base.name, width=width, height=height, scale=scale) for f in rendered]
    images = dict(zip(rendered, render_static(requests))) if rendered else {}
    if "json" in formats:
        import plotly.graph_objects as go  # the workbench extra; the caller made ``fig`` with it

        images["json"] = go.Figure(fig).to_json().encode()
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = base.with_name(base.name + f".{fmt}")
        write_bytes_atomic(target, images[fmt])
        written.append(target)
    return written
