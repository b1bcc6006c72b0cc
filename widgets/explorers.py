"""Interactive explorers: ipywidgets controls wired to plotly figures.

Each explorer takes tables from :mod:`hm4sr_core.introspect` (or functions that return
them) and never trains. Figures are built by :mod:`widgets.figures`; a control change
updates the traces in place inside ``fig.batch_update()``. Every handler runs through
:meth:`Explorer._guard`: an exception is written, with its traceback, into the explorer's
visible ``errors`` Output (and kept in ``last_error``), never swallowed.

Each explorer has ``.widget`` (the top-level VBox, CSS class ``hm4sr-explorer``) and displays
itself in a notebook. Layout: no figure has a fixed width; controls sit on rows that wrap
(:func:`control_row`), side-by-side figures in a grid that stacks them below two columns of
:data:`PANEL_MIN_WIDTH` (:func:`panel_grid`), so an explorer fits the output area from a
1280-pixel screen with the file browser open to a 1920-pixel one (tests/test_browser.py).
Figures are ``plotly.graph_objects.FigureWidget`` when the ``anywidget`` package is
installed (plotly >= 6 needs it); without it they are plain ``Figure`` objects shown in an
``Output`` that is redrawn after each update, so the explorers still work, less smoothly.
"""

from __future__ import annotations

import functools
import logging
import traceback
from typing import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import ipywidgets as widgets
from IPython import get_ipython
from IPython.display import clear_output, display

from hm4sr_core import introspect
from hm4sr_core import recommend as rec
from hm4sr_core.config import SplitConfig
from hm4sr_core.data.timeunits import SECONDS_PER_DAY

from . import figures

_log = logging.getLogger(__name__)
# Side-by-side panels share a row down to this width each, then stack one below the other
# (a 1280-pixel screen with JupyterLab's file browser open leaves an output area of ~900 px).
PANEL_MIN_WIDTH = "380px"
ERROR_BORDER = "1px solid #d33"


def compact() -> widgets.Layout:
    """Checkboxes and labels as wide as their text, not the 300-pixel default of ipywidgets
    (a Layout of its own for each: a shared one would be closed with any of its widgets)."""
    return widgets.Layout(width="auto", margin="2px 12px 2px 0")


# Plotly's FigureWidget draws while its element is still detached from the page, so it takes
# plotly's default 700-pixel width and, left alone, never looks at its container again. Its
# figures are made "responsive" (plotly.js resizes them to their container on a window
# resize), and this watcher announces one whenever an explorer's box changes width: when it
# first appears, when the window or the file browser beside the notebook changes.
WIDTH_WATCHER_ESM = """
export default {
  render({ el }) {
    let last = null, frame = null;
    const observer = new ResizeObserver((entries) => {
      const width = Math.round(entries[0].contentRect.width);
      if (width === last) return;
      last = width;
      window.dispatchEvent(new Event("resize"));
    });
    const attach = () => {
      const box = el.closest(".hm4sr-explorer");
      if (box) observer.observe(box);
      else frame = requestAnimationFrame(attach);
    };
    attach();
    return () => { observer.disconnect(); if (frame !== null) cancelAnimationFrame(frame); };
  },
};
"""


try:
    import anywidget
except ImportError:  # no FigureWidget either: figures are plain, drawn by Lab's plotly renderer
    anywidget = None
else:
    class WidthWatcher(anywidget.AnyWidget):
        """Invisible; announces a window resize when the explorer around it changes width."""

        _esm = WIDTH_WATCHER_ESM


def width_watcher() -> widgets.Widget | None:
    """The widget that keeps an explorer's figures at its width. None without anywidget:
    figures are then plain ones drawn into an Output by JupyterLab's plotly renderer (a
    path the browser test does not take)."""
    if anywidget is None:
        return None
    return WidthWatcher(layout=widgets.Layout(width="0px", height="0px", overflow="hidden"))


def control_row(controls) -> widgets.HBox:
    """Controls on one row that wraps onto the next when the output area is too narrow."""
    row = widgets.HBox(list(controls), layout=widgets.Layout(flex_flow="row wrap", align_items="center",
                                                            width="100%"))
    row.add_class("hm4sr-controls")
    return row


def panel_grid(panels) -> widgets.GridBox:
    """Figures side by side in equal columns of at least :data:`PANEL_MIN_WIDTH`, wrapping
    onto rows of their own when the output area is narrower. Each figure sizes itself to
    its column (no figure here sets a width)."""
    return widgets.GridBox(list(panels), layout=widgets.Layout(
        grid_template_columns=f"repeat(auto-fit, minmax({PANEL_MIN_WIDTH}, 1fr))", grid_gap="4px 12px",
        width="100%"))


def explorer_box(children) -> widgets.VBox:
    """An explorer's top-level box: full width of the output area, never wider."""
    watcher = width_watcher()
    children = ([watcher] if watcher is not None else []) + list(children)
    box = widgets.VBox(children, layout=widgets.Layout(width="100%", max_width="100%", overflow="hidden"))
    box.add_class("hm4sr-explorer")
    return box


def figure_widgets_available() -> bool:
    """True when plotly's FigureWidget can be built (the ``anywidget`` package is installed)."""
    try:
        go.FigureWidget()
    except ImportError:
        return False
    return True


class FigureView:
    """A figure and the widget that shows it.

    ``figure`` is a FigureWidget (live in the browser) when possible, else a plain Figure
    redrawn into ``widget`` (an Output) by :meth:`refresh`. Explorers mutate ``figure``
    inside ``batch_update()`` and then call :meth:`refresh`."""

    def __init__(self, fig: go.Figure):
        try:
            self.figure = go.FigureWidget(fig)
            # plotly.js refits a responsive figure to its container on each window resize
            # (see WIDTH_WATCHER_ESM): no figure here has a fixed width.
            self.figure._config = {**self.figure._config, "responsive": True}
            self.widget = self.figure
            self.live = True
        except ImportError:
            self.figure = go.Figure(fig)
            self.widget = widgets.Output()
            self.live = False
            self.refresh()

    def refresh(self) -> None:
        """Redraw a plain Figure; a no-op for a FigureWidget, and headless (no kernel to draw into)."""
        if self.live:
            return
        shell = get_ipython()
        if shell is None or getattr(shell, "kernel", None) is None:
            return
        with self.widget:
            clear_output(wait=True)
            display(self.figure)


class Explorer:
    """Shared plumbing: the error Output, the handler guard and notebook display."""

    def __init__(self) -> None:
        # The red frame appears with the first error: an empty one under every figure read as an
        # error on a projector.
        self.errors = widgets.Output(layout=widgets.Layout(max_height="12em", overflow="auto"))
        self.last_error: BaseException | None = None
        self.widget: widgets.VBox | None = None

    def _guard(self, handler: Callable) -> Callable:
        """Wrap an observer so an exception shows up in ``self.errors`` with its traceback."""

        @functools.wraps(handler)
        def run(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except Exception as exc:  # shown to the user below, and logged: not swallowed
                self.last_error = exc
                self.errors.layout.border = ERROR_BORDER
                self.errors.append_stderr(f"{type(self).__name__}.{handler.__name__} failed:\n"
                                          f"{traceback.format_exc()}")
                _log.exception("%s handler %s failed", type(self).__name__, handler.__name__)
                return None

        return run

    def _observe(self, control: widgets.Widget, handler: Callable) -> None:
        control.observe(self._guard(handler), names="value")

    def clear_errors(self) -> None:
        self.errors.clear_output()
        self.errors.outputs = ()
        self.errors.layout.border = ""
        self.last_error = None

    def _ipython_display_(self) -> None:
        display(self.widget)


# ----------------------------------------------------------------------------- gates


class GateExplorer(Explorer):
    """Pick an example (user) and a position; see that position's Interactive-MoE gates
    (stream x expert), one stream's gates along the whole sequence, and the temporal gate.

    Args:
        gates_df: :func:`hm4sr_core.introspect.gate_table`.
        temporal_df: :func:`hm4sr_core.introspect.temporal_gate_table` over the same part,
            or None (no temporal panel).

    Controls: ``example`` (Dropdown, labelled by user token), ``position`` (IntSlider),
    ``stream`` (Dropdown for the trajectory). Figures: ``heatmap``, ``trajectory``,
    ``temporal`` (None without ``temporal_df``).
    """

    def __init__(self, gates_df: pd.DataFrame, temporal_df: pd.DataFrame | None = None):
        super().__init__()
        if gates_df.empty:
            raise ValueError("GateExplorer: gates_df is empty")
        self.gates_df = gates_df
        self.temporal_df = temporal_df
        self._by_example = dict(tuple(gates_df.groupby("example", sort=True)))
        self._temporal_by_example = dict(tuple(temporal_df.groupby("example", sort=True))) \
            if temporal_df is not None else {}
        first_rows = gates_df.drop_duplicates("example").sort_values("example")
        repeated = first_rows["user_token"].duplicated(keep=False)  # train windows: several per user
        options = [(f"{tok} (example {ex})" if dup else str(tok), int(ex))
                   for tok, ex, dup in zip(first_rows["user_token"], first_rows["example"], repeated)]
        streams = [str(s) for s in (gates_df["stream"].cat.categories if hasattr(gates_df["stream"], "cat")
                                    else pd.unique(gates_df["stream"]))]
        ex0 = options[0][1]
        self.example = widgets.Dropdown(options=options, value=ex0, description="user")
        self.position = widgets.IntSlider(value=0, min=0, max=self._last_position(ex0), description="position",
                                          continuous_update=False)
        self.stream = widgets.Dropdown(options=streams, value=streams[0], description="stream")
        self.info = widgets.HTML()

        sub = self._by_example[ex0]
        self._heatmap = FigureView(figures.gate_heatmap(sub, ex0, 0))
        self._trajectory = FigureView(figures.gate_trajectory_figure(sub, ex0, streams[0], position=0))
        self._temporal = FigureView(figures.temporal_gate_bars(self._temporal_by_example[ex0], ex0, 0)) \
            if temporal_df is not None else None
        self._update_info()

        self._observe(self.example, self._on_example)
        self._observe(self.position, self._on_position)
        self._observe(self.stream, self._on_stream)
        panels = [self._heatmap.widget] + ([self._temporal.widget] if self._temporal else [])
        self.widget = explorer_box([control_row([self.example, self.position, self.stream]), self.info,
                                    panel_grid(panels), self._trajectory.widget, self.errors])

    @property
    def heatmap(self):
        return self._heatmap.figure

    @property
    def trajectory(self):
        return self._trajectory.figure

    @property
    def temporal(self):
        return self._temporal.figure if self._temporal else None

    def _last_position(self, example: int) -> int:
        return int(self._by_example[example]["position"].max())

    def _update_info(self) -> None:
        rows = self._by_example[self.example.value]
        row = rows[rows["position"] == self.position.value].iloc[0]
        gap = "first item" if pd.isna(row["gap_days"]) else f"{row['gap_days']:.3g} days after the previous"
        self.info.value = (f"<b>{row['title']}</b> ({row['item_token']}, {row['category']}) on "
                           f"{row['date']:%Y-%m-%d %H:%M} UTC, {gap} (bucket {row['gap_bucket']})")

    def _draw_position(self) -> None:
        ex, pos = self.example.value, self.position.value
        sub = self._by_example[ex]
        z, streams, experts = figures.gate_matrix_data(sub, ex, pos)
        with self.heatmap.batch_update():
            self.heatmap.data[0].z = z
            self.heatmap.data[0].y = streams
            self.heatmap.layout.title.text = f"Interactive-MoE gates at position {pos}"
        self._heatmap.refresh()
        with self.trajectory.batch_update():
            self.trajectory.layout.shapes[0].x0 = pos
            self.trajectory.layout.shapes[0].x1 = pos
        self._trajectory.refresh()
        if self._temporal is not None:
            _, gates = figures.temporal_gate_data(self._temporal_by_example[ex], ex, pos)
            with self.temporal.batch_update():
                self.temporal.data[0].y = gates
                self.temporal.layout.title.text = f"Temporal-MoE gate at position {pos}"
            self._temporal.refresh()
        self._update_info()

    def _draw_trajectory(self) -> None:
        ex, stream = self.example.value, self.stream.value
        z, positions, experts = figures.gate_trajectory_data(self._by_example[ex], ex, stream)
        with self.trajectory.batch_update():
            self.trajectory.data[0].z = z
            self.trajectory.data[0].x = positions
            self.trajectory.layout.title.text = f"{stream} stream: gates along the sequence"
        self._trajectory.refresh()

    def _on_example(self, change) -> None:
        last = self._last_position(change["new"])
        # Shrinking max first clamps value and fires _on_position with the old example's
        # data still drawn; drawing everything once afterwards keeps the panels consistent.
        with self.position.hold_trait_notifications():
            self.position.value = min(self.position.value, last)
            self.position.max = last
        self._draw_trajectory()
        self._draw_position()

    def _on_position(self, change) -> None:
        self._draw_position()

    def _on_stream(self, change) -> None:
        self._draw_trajectory()


# ----------------------------------------------------------------------------- time


class TemporalExplorer(Explorer):
    """Slide the gap (log scale, days) and the date; see the temporal gate r and the time
    embedding tau there (cheap: one point per move), and one expert's gate over a whole
    (gap, date) grid with the current point marked (recomputed only on the Button).

    Args:
        gate_fn: (gaps_seconds (G,), date_seconds (D,)) -> DataFrame shaped like
            :func:`hm4sr_core.introspect.temporal_gate_curve`.
        embedding_fn: (gap_seconds, date_seconds) -> DataFrame shaped like
            :func:`hm4sr_core.introspect.time_embedding_at`.
        date_range: (first, last) epoch seconds the date slider spans.
        gap_days_range: (smallest, largest) gap in days for the slider and the grid.
        grid: points per axis of the grid.

    Use :meth:`from_model` to wire a trained model.
    """

    def __init__(self, gate_fn: Callable[[np.ndarray, np.ndarray], pd.DataFrame],
                 embedding_fn: Callable[[float, float], pd.DataFrame], date_range: tuple[float, float],
                 gap_days_range: tuple[float, float] = (1 / 1440, 365.0), grid: int = 40):
        super().__init__()
        lo, hi = gap_days_range
        if not 0 < lo < hi:
            raise ValueError(f"gap_days_range must satisfy 0 < low < high, got {gap_days_range}")
        if not date_range[0] <= date_range[1]:
            raise ValueError(f"date_range must be (first, last) with first <= last, got {date_range}")
        self.gate_fn, self.embedding_fn = gate_fn, embedding_fn
        self.date_origin = float(date_range[0])
        self.gap_days_range = (float(lo), float(hi))
        self.grid_size = int(grid)
        span_days = max(1, int(np.ceil((date_range[1] - date_range[0]) / SECONDS_PER_DAY)))

        self.gap = widgets.FloatLogSlider(value=1.0 if lo <= 1.0 <= hi else lo, base=10, min=np.log10(lo),
                                          max=np.log10(hi), step=0.01, description="gap (days)",
                                          continuous_update=False, readout_format=".3g")
        self.first_item = widgets.Checkbox(value=False, description="first item (no gap)", indent=False,
                                           layout=compact())
        self.day = widgets.IntSlider(value=0, min=0, max=span_days, description="day", continuous_update=False)
        self.date_label = widgets.Label(layout=compact())
        self.expert = widgets.Dropdown(options=[0], value=0, description="grid expert",
                                       layout=widgets.Layout(width="180px"))
        self.recompute = widgets.Button(description="Recompute grid", icon="refresh",
                                        tooltip="evaluate the gate on the whole (gap, date) grid")

        self._curve: pd.DataFrame | None = None
        r = self.gate_fn(np.array([self._gap_seconds()]), np.array([self._date_seconds()]))
        experts = sorted(int(k) for k in pd.unique(r["expert"]))
        self.expert.options = experts
        self._bars = FigureView(figures.temporal_gate_bars(r.assign(example=0, position=0), 0, 0)
                                .update_layout(title_text="Temporal gate r here"))
        self._embedding = FigureView(figures.time_embedding_figure(self.embedding_fn(self._gap_seconds(),
                                                                                     self._date_seconds())))
        self._grid = FigureView(self._grid_figure())

        self._observe(self.gap, self._on_point)
        self._observe(self.first_item, self._on_point)
        self._observe(self.day, self._on_point)
        self._observe(self.expert, self._on_expert)
        self.recompute.on_click(self._guard(self._on_recompute))
        self._update_label()
        self.widget = explorer_box([
            control_row([self.gap, self.first_item, self.day, self.date_label, self.expert, self.recompute]),
            panel_grid([self._bars.widget, self._embedding.widget]), self._grid.widget, self.errors])

    @classmethod
    def from_model(cls, model, dataset=None, *, gap_days_range=(1 / 1440, 365.0), grid: int = 40):
        """Wire :func:`~hm4sr_core.introspect.temporal_gate_curve` and
        :func:`~hm4sr_core.introspect.time_embedding_at` of ``model``; the date slider spans
        the dataset's interactions (without a dataset: two years from the model's time origin)."""
        if dataset is not None:
            dates = (float(dataset.stats["first_timestamp"]), float(dataset.stats["last_timestamp"]))
        else:
            origin = model.time.time_origin
            dates = (origin, origin + 730 * SECONDS_PER_DAY)
        return cls(functools.partial(introspect.temporal_gate_curve, model),
                   functools.partial(introspect.time_embedding_at, model), dates, gap_days_range, grid)

    @property
    def bars(self):
        return self._bars.figure

    @property
    def embedding(self):
        return self._embedding.figure

    @property
    def grid(self):
        return self._grid.figure

    def _gap_seconds(self) -> float:
        return float("nan") if self.first_item.value else float(self.gap.value) * SECONDS_PER_DAY

    def _date_seconds(self) -> float:
        return self.date_origin + self.day.value * SECONDS_PER_DAY

    def _update_label(self) -> None:
        self.date_label.value = f"{pd.Timestamp(self._date_seconds(), unit='s', tz='UTC'):%Y-%m-%d} (UTC)"

    def _grid_figure(self) -> go.Figure:
        lo, hi = self.gap_days_range
        gaps = np.logspace(np.log10(lo), np.log10(hi), self.grid_size) * SECONDS_PER_DAY
        dates = np.linspace(self.date_origin, self.date_origin + self.day.max * SECONDS_PER_DAY, self.grid_size)
        self._curve = self.gate_fn(gaps, dates)
        fig = figures.temporal_gate_curve_figure(self._curve, self.expert.value)
        fig.add_trace(go.Scatter(x=[self.gap.value], y=[pd.Timestamp(self._date_seconds(), unit="s", tz="UTC")],
                                 mode="markers", marker=dict(symbol="x", size=14, color="red"), name="here",
                                 showlegend=False))
        return fig

    def _on_point(self, change) -> None:
        gap, date = self._gap_seconds(), self._date_seconds()
        r = self.gate_fn(np.array([gap]), np.array([date])).sort_values("expert")
        emb = self.embedding_fn(gap, date)
        with self.bars.batch_update():
            self.bars.data[0].y = r["gate"].to_numpy()
        self._bars.refresh()
        with self.embedding.batch_update():
            for trace, (_, sub) in zip(self.embedding.data, emb.groupby("part", sort=False)):
                trace.y = sub["value"].to_numpy()
        self._embedding.refresh()
        with self.grid.batch_update():
            self.grid.data[1].x = [self.gap.value]
            self.grid.data[1].y = [pd.Timestamp(date, unit="s", tz="UTC")]
            self.grid.data[1].visible = not self.first_item.value  # a first item has no place on the gap axis
        self._grid.refresh()
        self._update_label()

    def _on_expert(self, change) -> None:
        z, gaps, dates = figures.temporal_gate_grid_data(self._curve, change["new"])
        with self.grid.batch_update():
            self.grid.data[0].z = z
            self.grid.layout.title.text = f"Temporal gate of expert {change['new']} over gap and date"
        self._grid.refresh()

    def _on_recompute(self, button=None) -> None:
        fresh = self._grid_figure()
        with self.grid.batch_update():
            self.grid.data[0].z = fresh.data[0].z
            self.grid.data[0].x = fresh.data[0].x
            self.grid.data[0].y = fresh.data[0].y
        self._grid.refresh()


# ----------------------------------------------------------------------------- losses


class LossExplorer(Explorer):
    """Tick tasks, pick a smoothing window and a weighted / unweighted view: one line per
    task, and each task's share of the weighted total.

    Args:
        steps_df: ``TrainResult.steps`` (or a run's steps.csv).

    Controls: ``tasks`` (dict task -> Checkbox), ``window`` (IntSlider, steps), ``column``
    (ToggleButtons "value" / "weighted"), ``log_y`` (Checkbox). Figures: ``lines``, ``shares``.
    """

    def __init__(self, steps_df: pd.DataFrame):
        super().__init__()
        self.table = introspect.loss_table(steps_df)
        names = figures._tasks(self.table)
        n_steps = self.table["step"].nunique()
        self.tasks = {t: widgets.Checkbox(value=True, description=t, indent=False, layout=compact()) for t in names}
        self.window = widgets.IntSlider(value=1, min=1, max=max(1, min(200, n_steps)), description="smoothing",
                                        continuous_update=False)
        self.column = widgets.ToggleButtons(options=[("unweighted", "value"), ("weighted", "weighted")],
                                            value="value")
        self.log_y = widgets.Checkbox(value=False, description="log y", indent=False, layout=compact())
        self._lines = FigureView(figures.loss_figure(self.table))
        self._shares = FigureView(figures.loss_share_figure(self.table))
        for box in self.tasks.values():
            self._observe(box, self._on_tasks)
        self._observe(self.window, self._on_values)
        self._observe(self.column, self._on_values)
        self._observe(self.log_y, self._on_log)
        self.widget = explorer_box([control_row([*self.tasks.values(), self.window, self.column, self.log_y]),
                                    self._lines.widget, self._shares.widget, self.errors])

    @property
    def lines(self):
        return self._lines.figure

    @property
    def shares(self):
        return self._shares.figure

    def _on_tasks(self, change) -> None:
        for view in (self._lines, self._shares):
            with view.figure.batch_update():
                for trace in view.figure.data:
                    trace.visible = self.tasks[trace.name].value
            view.refresh()

    def _on_values(self, change) -> None:
        table = introspect.smooth(self.table, self.window.value, columns=["value", "weighted", "share"])
        with self.lines.batch_update():
            for trace in self.lines.data:
                _, y = figures.loss_lines_data(table, trace.name, self.column.value)
                trace.y = y
            kind = "weighted" if self.column.value == "weighted" else "unweighted"
            suffix = f", mean of {self.window.value} steps" if self.window.value > 1 else ""
            self.lines.layout.title.text = f"Losses per step ({kind}{suffix})"
        self._lines.refresh()
        with self.shares.batch_update():
            for trace in self.shares.data:
                _, y = figures.loss_lines_data(table, trace.name, "share")
                trace.y = y
        self._shares.refresh()

    def _on_log(self, change) -> None:
        with self.lines.batch_update():
            self.lines.layout.yaxis.type = "log" if change["new"] else "linear"
        self._lines.refresh()


# ----------------------------------------------------------------------------- item atlas


class EmbeddingExplorer(Explorer):
    """The item atlas: a UMAP scatter coloured by category, popularity or dominant expert,
    filtered to chosen categories; hovering a point shows the item's title.

    Args:
        atlas_df: :func:`hm4sr_core.introspect.atlas_table`.

    Controls: ``color`` (Dropdown), ``categories`` (SelectMultiple, all selected at first),
    ``space`` (Dropdown over the atlas's embedding spaces). Figure: ``scatter``.
    """

    COLOR_COLUMNS = ("category", "popularity", "dominant_expert")

    def __init__(self, atlas_df: pd.DataFrame):
        super().__init__()
        if atlas_df.empty:
            raise ValueError("EmbeddingExplorer: atlas_df is empty")
        self.atlas_df = atlas_df
        colors = [c for c in self.COLOR_COLUMNS if c in atlas_df.columns]
        spaces = [str(s) for s in pd.unique(atlas_df["space"])]
        cats = sorted(str(c) for c in pd.unique(atlas_df["category"]))
        self.color = widgets.Dropdown(options=colors, value=colors[0], description="colour")
        self.space = widgets.Dropdown(options=spaces, value=spaces[0], description="space")
        self.categories = widgets.SelectMultiple(options=cats, value=tuple(cats), description="categories",
                                                 rows=min(8, len(cats)))
        self._scatter = FigureView(figures.embedding_scatter(atlas_df, colors[0], spaces[0]))
        for control in (self.color, self.space, self.categories):
            self._observe(control, self._on_change)
        self.widget = explorer_box([control_row([widgets.VBox([self.color, self.space]), self.categories]),
                                    self._scatter.widget, self.errors])

    @property
    def scatter(self):
        return self._scatter.figure

    def _on_change(self, change) -> None:
        d = figures.scatter_data(self.atlas_df, self.color.value, self.space.value, self.categories.value)
        with self.scatter.batch_update():
            trace = self.scatter.data[0]
            trace.x, trace.y, trace.customdata = d["x"], d["y"], d["customdata"]
            trace.marker.update(d["marker"])
            self.scatter.layout.title.text = f"Item atlas ({self.space.value} embedding, UMAP)"
        self._scatter.refresh()


# ----------------------------------------------------------------------------- recommendations


class RecommendationExplorer(Explorer):
    """Pick a user: the last items read, with their gaps; the top-k with each score split
    by stream; the occlusion of the history (how much each history item raises each
    score); and a slider that moves the last interaction's gap (days), redrawing the list,
    the occlusion and the temporal gate at the last position (grey: the gate as given).

    HM4SR reads only the times of the history, never the moment of the request, so "what
    if" moves the last interaction: its gap and its date.

    Args:
        explain_fn: (user token, gap_days or None) -> :class:`hm4sr_core.recommend.Explanation`
            (None: the history as it is).
        users: the user tokens offered.

    Controls: ``user`` (Dropdown), ``gap`` (FloatLogSlider, days), ``reset`` (Button: the
    real gap). Figures: ``history``, ``gate``, ``parts``, ``occlusion``. Use :meth:`from_model`.
    """

    GAP_DAYS_RANGE = (1e-3, 1e3)  # 86 seconds to about 3 years

    def __init__(self, explain_fn: Callable, users):
        super().__init__()
        users = [str(u) for u in users]
        if not users:
            raise ValueError("RecommendationExplorer: no users to offer")
        self.explain_fn = explain_fn
        lo, hi = self.GAP_DAYS_RANGE
        self.user = widgets.Dropdown(options=users, value=users[0], description="user",
                                     layout=widgets.Layout(width="220px"))
        self.gap = widgets.FloatLogSlider(value=1.0, base=10, min=np.log10(lo), max=np.log10(hi), step=0.01,
                                          description="last gap (days)", continuous_update=False,
                                          readout_format=".3g", style={"description_width": "initial"})
        self.reset = widgets.Button(description="real gap", icon="undo", tooltip="the history's own last gap")
        self.status = widgets.Label(layout=compact())
        self.note = widgets.HTML("<small>HM4SR reads the times of the history only (the gaps between "
                                 "interactions and their dates), never the moment of the request: the slider moves "
                                 "the <b>last interaction</b> (red bar) later or earlier.</small>")
        self.real = self.explain_fn(users[0], None)
        self.shown = self.real
        self._history = FigureView(figures.history_gap_figure(self.real.history))
        self._gate = FigureView(figures.last_gate_figure(self.real.gates, self.real.gates))
        self._parts = FigureView(figures.score_parts_figure(self.real.recommendations))
        self._occlusion = FigureView(figures.occlusion_figure(self.real.occlusion))
        self._quiet = False
        self._set_gap_from_history()
        self._update_status()
        self._observe(self.user, self._on_user)
        self._observe(self.gap, self._on_gap)
        self.reset.on_click(self._guard(self._on_reset))
        self.widget = explorer_box([control_row([self.user, self.gap, self.reset, self.status]), self.note,
                                    panel_grid([self._history.widget, self._gate.widget]),
                                    panel_grid([self._parts.widget, self._occlusion.widget]), self.errors])

    @classmethod
    def from_model(cls, model, dataset, users=None, *, k: int = 10, exclude_seen: bool = False,
                   at: str = "end", max_users: int = 50):
        """Wire :func:`hm4sr_core.recommend.explain` and
        :func:`~hm4sr_core.recommend.move_last_interaction` of ``model`` over the users'
        histories (``at``: "end" every interaction, "test"/"valid" evaluation's); ``users``
        default: the first ``max_users`` user tokens."""
        users = [str(u) for u in (users if users is not None else dataset.user_tokens[:max_users])]
        split = SplitConfig(max_length=model.config.max_length)
        histories: dict = {}

        def explain_fn(user: str, gap_days):
            if user not in histories:
                histories[user] = rec.user_history(dataset, user, at, split)
            h = histories[user]
            if gap_days is not None and len(h) > 1:
                h = rec.move_last_interaction(h, gap_days=gap_days)
            return rec.explain(model, dataset, h, k=k, exclude_seen=exclude_seen)

        return cls(explain_fn, users)

    @property
    def history(self):
        return self._history.figure

    @property
    def gate(self):
        return self._gate.figure

    @property
    def parts(self):
        return self._parts.figure

    @property
    def occlusion(self):
        return self._occlusion.figure

    def _real_gap(self) -> float | None:
        gap = self.real.history["gap_days"].iloc[-1]
        return None if pd.isna(gap) else float(gap)

    def _set_gap_from_history(self) -> None:
        gap = self._real_gap()
        lo, hi = self.GAP_DAYS_RANGE
        self._quiet = True
        try:
            self.gap.disabled = gap is None  # one interaction: no gap to move
            self.gap.value = min(max(gap if gap is not None else 1.0, lo), hi)
        finally:
            self._quiet = False

    def _update_status(self) -> None:
        last = self.shown.history.iloc[-1]
        moved = "" if self.shown is self.real else " (moved)"
        self.status.value = f"last interaction {last['date']:%Y-%m-%d %H:%M}{moved}, {len(self.shown.history)} items read"

    def _draw(self) -> None:
        e = self.shown
        d = figures.history_gap_data(e.history)
        with self.history.batch_update():
            bar = self.history.data[0]
            bar.x, bar.y, bar.customdata = d["labels"], np.maximum(d["gaps"], 1e-4), d["text"]
            bar.marker.color = ["#888888"] * (len(d["labels"]) - 1) + ["#d62728"]
        self._history.refresh()
        with self.gate.batch_update():
            for trace, table in zip(self.gate.data, (self.real.gates, e.gates)):
                trace.x, trace.y = figures.last_gate_data(table)
        self._gate.refresh()
        p = figures.score_parts_data(e.recommendations)
        with self.parts.batch_update():
            for trace, values in zip(self.parts.data, p["parts"].values()):
                trace.y, trace.x = p["labels"], values
            self.parts.data[-1].y, self.parts.data[-1].x = p["labels"], p["score"]
        self._parts.refresh()
        o = figures.occlusion_data(e.occlusion)
        scale = float(np.abs(o["z"]).max()) if o["z"].size else 1.0
        with self.occlusion.batch_update():
            heat = self.occlusion.data[0]
            heat.z, heat.x, heat.y, heat.zmin, heat.zmax = o["z"], o["x"], o["y"], -scale, scale
        self._occlusion.refresh()
        self._update_status()

    def _on_user(self, change) -> None:
        self.real = self.explain_fn(change["new"], None)
        self.shown = self.real
        self._set_gap_from_history()
        self._draw()

    def _on_gap(self, change) -> None:
        if self._quiet or self._real_gap() is None:
            return
        self.shown = self.explain_fn(self.user.value, float(change["new"]))
        self._draw()

    def _on_reset(self, button=None) -> None:
        self.shown = self.real
        self._set_gap_from_history()
        self._draw()
