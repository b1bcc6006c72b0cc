"""Plotly figures from the tidy tables of :mod:`hm4sr_core.introspect`.

Every function here is pure: DataFrame in, ``plotly.graph_objects.Figure`` out (no widgets,
no model, no training, no files, no browser). The ``*_data`` helpers return just the arrays
a figure shows, so the explorers in :mod:`widgets.explorers` can update a trace in place
instead of rebuilding the figure. Writing a figure to PNG/SVG/JSON is
:func:`hm4sr_core.static_export.save_figure`'s job.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

# Gate heatmaps diverge around uniform routing: white at 1/E, red above, blue below, on a
# range symmetric around 1/E ([0, 2/E]) so a near-uniform gate reads as one pale colour and
# a routed one stands out; gates above 2/E saturate (the hover always gives the value).
GATE_SCALE = "RdBu_r"
# A qualitative palette long enough for the categories of the data sets we use (Games has
# many more categories than this; beyond it colours repeat, the hover still names them).
PALETTE = plotly.colors.qualitative.Plotly + plotly.colors.qualitative.Set2 + plotly.colors.qualitative.Pastel1


def _expert_labels(experts) -> list[str]:
    return [f"expert {int(k)}" for k in experts]


def gate_colour(n_experts: int, title: str = "gate") -> dict:
    """Heatmap colour settings for gates over ``n_experts`` experts: zmid = 1/E (white),
    zmin 0 and zmax 2/E (symmetric around it), the colour bar ticked at 0, 1/E and 2/E."""
    if n_experts < 1:
        raise ValueError(f"gate_colour: n_experts must be >= 1, got {n_experts}")
    uniform = 1.0 / n_experts
    return dict(zmin=0.0, zmid=uniform, zmax=2.0 * uniform, colorscale=GATE_SCALE,
                colorbar=dict(title=title, tickvals=[0.0, uniform, 2.0 * uniform],
                              ticktext=["0", f"{uniform:.3g} = 1/E", f"\u2265 {2.0 * uniform:.3g}"]))


def uniform_note(n_experts: int, shown: str = "white") -> str:
    """The subtitle every gate figure carries: what a gate that routes nothing would read,
    and how the figure shows it (white in a heatmap, a dashed line in a chart)."""
    return f"uniform = 1/E = {1.0 / n_experts:.3g} (E = {n_experts} experts; {shown})"


def _gate_title(text: str, n_experts: int) -> dict:
    return dict(text=text, subtitle=dict(text=uniform_note(n_experts)))


# Margins that keep titles, subtitles and colour bars inside a figure that sizes itself to
# its container (no fixed width anywhere: the explorers lay panels out in a wrapping grid).
MARGIN = dict(t=80, b=50, l=60, r=20)


def _uniform_line(fig: go.Figure, n_experts: int) -> go.Figure:
    """A dashed line at 1/E on a figure whose y axis is a gate; the subtitle says so."""
    fig.add_hline(y=1.0 / n_experts, line=dict(dash="dash", color="#777", width=1),
                  annotation_text="uniform 1/E", annotation_position="top left")
    fig.update_layout(title_subtitle_text=uniform_note(n_experts, "dashed line"))
    return fig


def _example(df: pd.DataFrame, example: int) -> pd.DataFrame:
    sub = df[df["example"] == example]
    if sub.empty:
        raise ValueError(f"no rows for example {example!r} (examples run {df['example'].min()}.."
                         f"{df['example'].max()})")
    return sub


# ----------------------------------------------------------------------------- Interactive-MoE gates


def gate_matrix_data(gates_df: pd.DataFrame, example: int, position: int):
    """Gates g_s at one position of one example.

    Returns (z (S, E) float array, stream names (S,), expert ids (E,))."""
    sub = _example(gates_df, example)
    sub = sub[sub["position"] == position]
    if sub.empty:
        raise ValueError(f"example {example} has no position {position}")
    wide = sub.pivot_table(index="stream", columns="expert", values="gate", observed=True, sort=False)
    streams = [s for s in (gates_df["stream"].cat.categories if hasattr(gates_df["stream"], "cat")
                           else wide.index) if s in wide.index]
    wide = wide.loc[streams]
    return wide.to_numpy(), [str(s) for s in streams], wide.columns.to_numpy()


def gate_heatmap(gates_df: pd.DataFrame, example: int, position: int) -> go.Figure:
    """Heatmap stream x expert of the Interactive-MoE gates at one position, coloured
    around uniform (:func:`gate_colour`)."""
    z, streams, experts = gate_matrix_data(gates_df, example, position)
    fig = go.Figure(go.Heatmap(z=z, x=_expert_labels(experts), y=streams, **gate_colour(len(experts)),
                               hovertemplate="%{y} / %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=_gate_title(f"Interactive-MoE gates at position {position}", len(experts)),
                      xaxis_title="expert", yaxis_title="stream", height=320, margin=MARGIN)
    return fig


def gate_trajectory_data(gates_df: pd.DataFrame, example: int, stream: str):
    """One stream's gates along an example's sequence.

    Returns (z (E, P) array, positions (P,), expert ids (E,))."""
    sub = _example(gates_df, example)
    sub = sub[sub["stream"] == stream]
    if sub.empty:
        raise ValueError(f"example {example} has no stream {stream!r}")
    wide = sub.pivot_table(index="expert", columns="position", values="gate", observed=True)
    return wide.to_numpy(), wide.columns.to_numpy(), wide.index.to_numpy()


def gate_trajectory_figure(gates_df: pd.DataFrame, example: int, stream: str, position: int | None = None) -> go.Figure:
    """Heatmap expert x position of one stream's gates along the sequence; a vertical line
    marks ``position``."""
    z, positions, experts = gate_trajectory_data(gates_df, example, stream)
    fig = go.Figure(go.Heatmap(z=z, x=positions, y=_expert_labels(experts), **gate_colour(len(experts)),
                               hovertemplate="position %{x}, %{y}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=_gate_title(f"{stream} stream: gates along the sequence", len(experts)),
                      xaxis_title="position (0 = oldest)", yaxis_title="expert", height=320, margin=MARGIN)
    if position is not None:
        fig.add_vline(x=position, line=dict(color="red", width=2))
    return fig


def expert_usage_heatmap(usage_df: pd.DataFrame) -> go.Figure:
    """Heatmap stream x expert of :func:`~hm4sr_core.introspect.expert_usage` (bars per expert
    for a temporal table, which has no stream)."""
    if "stream" not in usage_df.columns:
        n = usage_df["expert"].nunique()
        fig = go.Figure(go.Bar(x=_expert_labels(usage_df["expert"]), y=usage_df["gate"],
                               error_y=dict(type="data", array=usage_df.get("std")),
                               hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
        fig.update_layout(title=_gate_title("Temporal-MoE: mean gate per expert", n), yaxis_title="mean gate",
                          yaxis_range=[0, 1], margin=MARGIN)
        return _uniform_line(fig, n)
    wide = usage_df.pivot_table(index="stream", columns="expert", values="gate", observed=True)
    fig = go.Figure(go.Heatmap(z=wide.to_numpy(), x=_expert_labels(wide.columns), y=[str(s) for s in wide.index],
                               **gate_colour(len(wide.columns), "mean gate"), text=np.round(wide.to_numpy(), 3),
                               texttemplate="%{text}", hovertemplate="%{y} / %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=_gate_title("Interactive-MoE: mean gate per stream and expert", len(wide.columns)),
                      xaxis_title="expert", yaxis_title="stream", height=340, margin=MARGIN)
    return fig


def gate_by_category_figure(by_category_df: pd.DataFrame, stream: str | None = None) -> go.Figure:
    """Heatmap category x expert of :func:`~hm4sr_core.introspect.gate_by_category` for one
    stream (the first when None; ignored for a temporal table)."""
    df = by_category_df
    if "stream" in df.columns:
        stream = stream if stream is not None else str(df["stream"].iloc[0])
        df = df[df["stream"] == stream]
    wide = df.pivot_table(index="category", columns="expert", values="gate", observed=True)
    fig = go.Figure(go.Heatmap(z=wide.to_numpy(), x=_expert_labels(wide.columns), y=[str(c) for c in wide.index],
                               **gate_colour(len(wide.columns), "mean gate"),
                               hovertemplate="%{y} / %{x}: %{z:.3f}<extra></extra>"))
    title = "Mean gate per category" + (f" ({stream} stream)" if stream is not None else "")
    fig.update_layout(title=_gate_title(title, len(wide.columns)), xaxis_title="expert", yaxis_title="category",
                      height=max(320, 22 * len(wide) + 140), margin=MARGIN)
    return fig


# ----------------------------------------------------------------------------- Temporal-MoE gates


def temporal_gate_data(temporal_df: pd.DataFrame, example: int, position: int):
    """Temporal gate r at one position: (expert ids (E,), gates (E,))."""
    sub = _example(temporal_df, example)
    sub = sub[sub["position"] == position].sort_values("expert")
    if sub.empty:
        raise ValueError(f"example {example} has no position {position}")
    return sub["expert"].to_numpy(), sub["gate"].to_numpy()


def temporal_gate_bars(temporal_df: pd.DataFrame, example: int, position: int) -> go.Figure:
    """Bar per expert of the temporal gate r at one position."""
    experts, gates = temporal_gate_data(temporal_df, example, position)
    fig = go.Figure(go.Bar(x=_expert_labels(experts), y=gates, marker_color=PALETTE[:len(experts)],
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    fig.update_layout(title=_gate_title(f"Temporal-MoE gate at position {position}", len(experts)),
                      yaxis_range=[0, 1], yaxis_title="gate", height=320, margin=MARGIN)
    return _uniform_line(fig, len(experts))


def temporal_gate_profile(temporal_df: pd.DataFrame, against: str = "gap_days", bins: int = 30) -> go.Figure:
    """Mean temporal gate per expert against the gap (log-binned days), the date or the position.

    Args:
        temporal_df: :func:`~hm4sr_core.introspect.temporal_gate_table`.
        against: "gap_days" (first items left out: they have no gap), "date" or "position".
        bins: number of bins for gap_days and date (positions are used as they are).
    """
    if against not in ("gap_days", "date", "position"):
        raise ValueError(f"against must be 'gap_days', 'date' or 'position', got {against!r}")
    df = temporal_df
    if against == "gap_days":
        df = df[df["gap_days"].notna()]
        x = np.log10(df["gap_days"].clip(lower=1e-6))
        edges = np.linspace(x.min(), x.max() + 1e-9, bins + 1)
        key = pd.Series(10 ** ((edges[:-1] + edges[1:]) / 2)[np.clip(np.digitize(x, edges) - 1, 0, bins - 1)],
                        index=df.index)
    elif against == "date":
        secs = df["timestamp"].astype(np.float64)
        edges = np.linspace(secs.min(), secs.max() + 1, bins + 1)
        mids = (edges[:-1] + edges[1:]) / 2
        key = pd.Series(pd.to_datetime(mids[np.clip(np.digitize(secs, edges) - 1, 0, bins - 1)].astype(np.int64),
                                       unit="s", utc=True), index=df.index)
    else:
        key = df["position"]
    mean = df.assign(_x=key).groupby(["_x", "expert"])["gate"].mean().unstack("expert")
    fig = go.Figure()
    for i, k in enumerate(mean.columns):
        fig.add_trace(go.Scatter(x=mean.index, y=mean[k], mode="lines+markers", name=f"expert {k}",
                                 line_color=PALETTE[i % len(PALETTE)]))
    labels = {"gap_days": "gap before the item (days, log)", "date": "date", "position": "position (0 = oldest)"}
    fig.update_layout(title=_gate_title("Temporal-MoE gate r by " + labels[against].split(" (")[0], len(mean.columns)),
                      xaxis_title=labels[against], yaxis_title="mean gate", yaxis_range=[0, 1], margin=MARGIN)
    if against == "gap_days":
        fig.update_xaxes(type="log")
    return _uniform_line(fig, len(mean.columns))


def temporal_gate_grid_data(curve_df: pd.DataFrame, expert: int):
    """One expert's gate on the (gap, date) grid of
    :func:`~hm4sr_core.introspect.temporal_gate_curve`: (z (D, G), gap_days (G,), dates (D,)).
    First-item rows (gap NaN) are left out: they have no place on a gap axis."""
    sub = curve_df[(curve_df["expert"] == expert) & curve_df["gap_days"].notna()]
    wide = sub.pivot_table(index="date", columns="gap_days", values="gate")
    return wide.to_numpy(), wide.columns.to_numpy(), wide.index


def temporal_gate_curve_figure(curve_df: pd.DataFrame, expert: int = 0) -> go.Figure:
    """Heatmap of one expert's temporal gate over log gap (x) and date (y)."""
    z, gaps, dates = temporal_gate_grid_data(curve_df, expert)
    n = int(curve_df["expert"].nunique())
    fig = go.Figure(go.Heatmap(z=z, x=gaps, y=dates, **gate_colour(n),
                               hovertemplate="gap %{x:.3g} d, %{y}: %{z:.3f}<extra></extra>"))
    fig.update_xaxes(type="log", title="gap before the item (days)")
    fig.update_layout(title=_gate_title(f"Temporal gate of expert {expert} over gap and date", n),
                      yaxis_title="date", height=420, margin=MARGIN)
    return fig


def time_embedding_figure(embedding_df: pd.DataFrame) -> go.Figure:
    """tau at one (gap, date) (:func:`~hm4sr_core.introspect.time_embedding_at`): the interval
    and absolute halves, value per dimension."""
    fig = go.Figure()
    for i, (part, sub) in enumerate(embedding_df.groupby("part", sort=False)):
        fig.add_trace(go.Scatter(x=sub["dim"], y=sub["value"], mode="lines+markers", name=str(part),
                                 line_color=PALETTE[i]))
    fig.update_layout(title="Time embedding tau", xaxis_title="dimension", yaxis_title="value", height=300)
    return fig


# ----------------------------------------------------------------------------- time embedding tables


def interval_figure(interval_df: pd.DataFrame) -> go.Figure:
    """Interval-table rows at the used buckets: norm and cosine to the reference bucket
    against the gap (days, log axis). The first-item bucket has no gap and is left out."""
    df = interval_df[interval_df["kind"] == "gap"]
    ref = interval_df.attrs.get("reference_bucket")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("row norm", f"cosine to bucket {ref}"))
    hover = "bucket %{customdata}<br>gap %{x:.3g} d<br>%{y:.3f}<extra></extra>"
    fig.add_trace(go.Scatter(x=df["gap_days"], y=df["norm"], mode="markers", customdata=df["bucket"],
                             hovertemplate=hover, name="norm", marker_size=5), row=1, col=1)
    fig.add_trace(go.Scatter(x=df["gap_days"], y=df["cosine"], mode="markers", customdata=df["bucket"],
                             hovertemplate=hover, name="cosine", marker_size=5), row=1, col=2)
    fig.update_xaxes(type="log", title="gap (days)")
    fig.update_layout(title="Interval embedding at the buckets the data uses", showlegend=False, height=350)
    return fig


def absolute_time_figure(absolute_df: pd.DataFrame) -> go.Figure:
    """Heatmap dimension x day of :func:`~hm4sr_core.introspect.absolute_time_embedding`
    (the first variant of a :func:`~hm4sr_core.introspect.compare_absolute_time` table)."""
    df = absolute_df
    title = "Absolute-time embedding"
    if "variant" in df.columns:
        first = df["variant"].iloc[0]
        df = df[df["variant"] == first]
        title += f" ({first})"
    wide = df.pivot_table(index="dim", columns="day", values="value")
    fig = go.Figure(go.Heatmap(z=wide.to_numpy(), x=wide.columns, y=wide.index, zmin=-1, zmax=1, colorscale="RdBu",
                               colorbar=dict(title="cos")))
    fig.update_layout(title=title, xaxis_title="days since the first interaction", yaxis_title="dimension",
                      height=400)
    return fig


def absolute_time_similarity_figure(absolute_df: pd.DataFrame) -> go.Figure:
    """Cosine of each day's absolute-time vector to the first day's, one line per variant:
    smooth with normalised time, noise with raw seconds."""
    df = absolute_df if "variant" in absolute_df.columns else absolute_df.assign(variant="model")
    per_day = df.groupby(["variant", "day"], sort=False)["cosine_to_first"].first().reset_index()
    fig = go.Figure()
    for i, (variant, sub) in enumerate(per_day.groupby("variant", sort=False)):
        fig.add_trace(go.Scatter(x=sub["day"], y=sub["cosine_to_first"], mode="lines", name=str(variant),
                                 line_color=PALETTE[i]))
    fig.update_layout(title="Absolute-time embedding: similarity to the first day", yaxis_range=[-1.05, 1.05],
                      xaxis_title="days since the first interaction", yaxis_title="cosine to day 0")
    return fig


# ----------------------------------------------------------------------------- training curves


def loss_lines_data(loss_df: pd.DataFrame, task: str, column: str = "value"):
    """(steps (n,), values (n,)) of one task from a :func:`~hm4sr_core.introspect.loss_table`."""
    sub = loss_df[loss_df["task"] == task].sort_values("step")
    return sub["step"].to_numpy(), sub[column].to_numpy()


def _tasks(loss_df: pd.DataFrame) -> list[str]:
    t = loss_df["task"]
    return [str(x) for x in (t.cat.categories if hasattr(t, "cat") else pd.unique(t))]


def loss_figure(loss_df: pd.DataFrame, column: str = "value", tasks=None) -> go.Figure:
    """One line per task: its unweighted ("value") or weighted loss per step. Tasks not in
    ``tasks`` (default all) are present but hidden, so a legend click brings them back."""
    fig = go.Figure()
    show = set(_tasks(loss_df) if tasks is None else tasks)
    for i, task in enumerate(_tasks(loss_df)):
        x, y = loss_lines_data(loss_df, task, column)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=task, line_color=PALETTE[i % len(PALETTE)],
                                 visible=True if task in show else "legendonly"))
    fig.update_layout(title=f"Losses per step ({'weighted' if column == 'weighted' else 'unweighted'})",
                      xaxis_title="step", yaxis_title="loss", height=350)
    return fig


def loss_share_figure(loss_df: pd.DataFrame, tasks=None) -> go.Figure:
    """Stacked areas: each task's share of the weighted total per step (sums to 1)."""
    fig = go.Figure()
    show = set(_tasks(loss_df) if tasks is None else tasks)
    for i, task in enumerate(_tasks(loss_df)):
        x, y = loss_lines_data(loss_df, task, "share")
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", stackgroup="share", name=task,
                                 line_color=PALETTE[i % len(PALETTE)], visible=True if task in show else "legendonly"))
    fig.update_layout(title="Share of the weighted total loss", xaxis_title="step", yaxis_title="share",
                      yaxis_range=[0, 1], height=350)
    return fig


def lambda_figure(steps_df: pd.DataFrame) -> go.Figure:
    """lambda_s (Interactive-MoE output scale per stream) over training steps."""
    cols = [c for c in steps_df.columns if c.startswith("lambda_")]
    if not cols:
        raise ValueError("lambda_figure: no lambda_<stream> columns (was the Interactive MoE on?)")
    fig = go.Figure()
    for i, c in enumerate(cols):
        fig.add_trace(go.Scatter(x=steps_df["step"], y=steps_df[c], mode="lines", name=c[len("lambda_"):],
                                 line_color=PALETTE[i % len(PALETTE)]))
    fig.update_layout(title="Interactive-MoE scale lambda per stream", xaxis_title="step", yaxis_title="lambda")
    return fig


def gradient_share_figure(gradient_df: pd.DataFrame) -> go.Figure:
    """Bars: each loss's share of the weighted gradient norm on the shared parameters;
    the hover gives the cosine to the rec gradient."""
    fig = go.Figure(go.Bar(x=gradient_df["task"], y=gradient_df["share"], customdata=gradient_df["cosine_to_rec"],
                           hovertemplate="%{x}: share %{y:.3f}, cosine to rec %{customdata:.3f}<extra></extra>"))
    fig.update_layout(title="Gradient on the shared parameters, by loss", yaxis_title="share of weighted norm",
                      yaxis_range=[0, 1])
    return fig


def time_control_figure(control_df: pd.DataFrame, metrics=("ndcg@10", "hr@10")) -> go.Figure:
    """Grouped bars of :func:`~hm4sr_core.introspect.time_control_table`: each metric with
    real, shuffled and zeroed timestamps."""
    missing = [m for m in metrics if m not in control_df.columns]
    if missing:
        raise ValueError(f"time_control_figure: metric(s) {missing} not in the table")
    fig = go.Figure()
    for i, (_, row) in enumerate(control_df.iterrows()):
        fig.add_trace(go.Bar(x=list(metrics), y=[row[m] for m in metrics], name=str(row["eval_time"]),
                             marker_color=PALETTE[i % len(PALETTE)]))
    fig.update_layout(barmode="group", title="Timestamps at evaluation: real, shuffled, zeroed", yaxis_title="value")
    return fig


# ----------------------------------------------------------------------------- item atlas


def discrete_colorscale(n: int) -> list:
    """A stepped colour scale giving the integer codes 0..n-1 one palette colour each
    (use with cmin=-0.5, cmax=n-0.5)."""
    n = max(n, 1)
    scale = []
    for i in range(n):
        c = PALETTE[i % len(PALETTE)]
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def scatter_data(atlas_df: pd.DataFrame, color: str, space: str | None = None, categories=None) -> dict:
    """What the atlas scatter shows for a colour column, space and category filter.

    Returns a dict of trace properties: x, y, customdata (title, category, popularity,
    dominant expert, token per point) and marker settings (categorical columns coded
    0..K-1 on a stepped scale with their names on the colour bar; popularity on log10(1+n))."""
    df = atlas_df
    if space is not None:
        df = df[df["space"] == space]
    if color not in atlas_df.columns:
        raise ValueError(f"colour column {color!r} not in the atlas; has {list(atlas_df.columns)}")
    levels = None
    if not pd.api.types.is_numeric_dtype(atlas_df[color]):
        levels = sorted(pd.unique(atlas_df[color].astype(str)))  # over the whole atlas: stable colours
    if categories is not None:
        df = df[df["category"].isin(list(categories))]
    custom = np.stack([df["title"].astype(str), df["category"].astype(str), df["popularity"].astype(str),
                       df["dominant_expert"].astype(str), df["item_token"].astype(str)], axis=1) \
        if len(df) else np.zeros((0, 5), dtype=object)
    if levels is None:
        values = np.log10(1.0 + df[color].to_numpy(np.float64))
        marker = dict(color=values, colorscale="Viridis", cmin=float(np.log10(1 + atlas_df[color].min())),
                      cmax=float(np.log10(1 + atlas_df[color].max())),
                      colorbar=dict(title=f"log10(1+{color})", tickvals=None, ticktext=None))
    else:
        code = {v: i for i, v in enumerate(levels)}
        values = np.array([code[v] for v in df[color].astype(str)], dtype=np.float64)
        marker = dict(color=values, colorscale=discrete_colorscale(len(levels)), cmin=-0.5, cmax=len(levels) - 0.5,
                      colorbar=dict(title=color, tickvals=list(range(len(levels))), ticktext=levels))
    return dict(x=df["x"].to_numpy(), y=df["y"].to_numpy(), customdata=custom, marker=marker)


def embedding_scatter(atlas_df: pd.DataFrame, color: str = "category", space: str | None = None,
                      categories=None) -> go.Figure:
    """UMAP scatter of :func:`~hm4sr_core.introspect.atlas_table`, coloured by a column
    ("category", "popularity", "dominant_expert"); hover shows the title."""
    space = space if space is not None else str(atlas_df["space"].iloc[0])
    d = scatter_data(atlas_df, color, space, categories)
    fig = go.Figure(go.Scatter(
        x=d["x"], y=d["y"], mode="markers", customdata=d["customdata"],
        marker=dict(size=6, showscale=True, **d["marker"]),
        hovertemplate="<b>%{customdata[0]}</b><br>%{customdata[4]} | %{customdata[1]}<br>"
                      "interactions %{customdata[2]}<br>%{customdata[3]}<extra></extra>"))
    fig.update_layout(title=f"Item atlas ({space} embedding, UMAP)", xaxis_title="UMAP 1", yaxis_title="UMAP 2",
                      height=550)
    return fig


# ----------------------------------------------------------------------------- recommendations


STREAM_COLOURS = {"id": "#636EFA", "text": "#EF553B", "image": "#00CC96"}


def _rank_labels(recs_df: pd.DataFrame, width: int = 28) -> list[str]:
    return [f"{int(r)}. {str(t)[:width]}" for r, t in zip(recs_df["rank"], recs_df["title"])]


def score_parts_data(recs_df: pd.DataFrame) -> dict:
    """Rank labels (k,), and per stream the (k,) score parts of one user's list
    (:func:`hm4sr_core.recommend.recommend` rows of one user)."""
    streams = [c[len("score_"):] for c in recs_df.columns if c.startswith("score_")]
    return {"labels": _rank_labels(recs_df), "score": recs_df["score"].to_numpy(),
            "parts": {s: recs_df[f"score_{s}"].to_numpy() for s in streams}}


def score_parts_figure(recs_df: pd.DataFrame) -> go.Figure:
    """Stacked horizontal bars: each recommended item's score split into its part per stream
    (negative parts to the left of 0), best first, with the score itself marked."""
    d = score_parts_data(recs_df)
    fig = go.Figure()
    for i, (stream, values) in enumerate(d["parts"].items()):
        fig.add_trace(go.Bar(y=d["labels"], x=values, orientation="h", name=stream,
                             marker_color=STREAM_COLOURS.get(stream, PALETTE[i % len(PALETTE)]),
                             hovertemplate=f"{stream}: %{{x:.3f}}<extra>%{{y}}</extra>"))
    fig.add_trace(go.Scatter(y=d["labels"], x=d["score"], mode="markers", name="score",
                             marker=dict(symbol="line-ns-open", size=16, color="black"),
                             hovertemplate="score %{x:.3f}<extra>%{y}</extra>"))
    fig.update_layout(barmode="relative", title="Top-k scores by stream",
                      yaxis=dict(autorange="reversed"), height=max(320, 90 + 26 * len(d["labels"])),
                      margin=dict(MARGIN, b=70), legend=dict(orientation="h", y=-0.12, yanchor="top"))
    return fig


def history_gap_data(history_df: pd.DataFrame, last: int = 10) -> dict:
    """The last ``last`` history items of :func:`hm4sr_core.recommend.history_table`: labels
    (item and date), gap before each in days (first item: 0), hover text."""
    h = history_df.tail(last)
    labels = [f"{pos}: {item}" for pos, item in zip(h["position"], h["item"])]
    dates = [f"{d:%Y-%m-%d %H:%M}" for d in h["date"]]
    return {"labels": labels, "gaps": h["gap_days"].fillna(0.0).to_numpy(),
            "text": [f"{t[:40]}<br>{d}" for t, d in zip(h["title"].astype(str), dates)]}


def history_gap_figure(history_df: pd.DataFrame, last: int = 10) -> go.Figure:
    """Bars: the gap (days, log axis) before each of the last history items, the last one
    (the one a what-if moves) in red; hover gives title and date."""
    d = history_gap_data(history_df, last)
    colours = ["#888888"] * (len(d["labels"]) - 1) + ["#d62728"]
    fig = go.Figure(go.Bar(x=d["labels"], y=np.maximum(d["gaps"], 1e-4), marker_color=colours,
                           customdata=d["text"], hovertemplate="%{x}<br>%{customdata}<br>gap %{y:.3g} days<extra></extra>"))
    fig.update_layout(title="Gap before each last item", yaxis_type="log",
                      yaxis_title="gap before (days)", height=320, margin=MARGIN)
    return fig


def occlusion_data(occlusion_df: pd.DataFrame) -> dict:
    """(k, n) score changes of :func:`hm4sr_core.recommend.explain`'s occlusion table:
    rows the recommended items by rank, columns the history positions."""
    if occlusion_df.empty:
        return {"z": np.zeros((0, 0)), "x": [], "y": []}
    table = occlusion_df.pivot_table(index=["rank", "title"], columns=["history_position", "history_item"],
                                     values="score_change", observed=True).sort_index()
    return {"z": table.to_numpy(), "x": [f"{p}: {i}" for p, i in table.columns],
            "y": [f"{int(r)}. {str(t)[:28]}" for r, t in table.index]}


def occlusion_figure(occlusion_df: pd.DataFrame) -> go.Figure:
    """Heatmap: how much each history item (column) raises (red) or lowers (blue) the
    score of each recommended item (row), by removing it from the history."""
    d = occlusion_data(occlusion_df)
    scale = float(np.abs(d["z"]).max()) if d["z"].size else 1.0
    fig = go.Figure(go.Heatmap(z=d["z"], x=d["x"], y=d["y"], colorscale="RdBu_r", zmid=0.0,
                               zmin=-scale, zmax=scale, colorbar=dict(title="change"),
                               hovertemplate="%{y}<br>without %{x}: score %{z:+.3f} lower<extra></extra>"))
    fig.update_layout(title="Occlusion: score change",
                      xaxis_title="history item (position: item)", yaxis=dict(autorange="reversed"),
                      height=max(320, 80 + 24 * len(d["y"])), margin=MARGIN)
    return fig


def last_gate_data(gates_df: pd.DataFrame, level: str = "temporal", stream: str = "all"):
    """(expert labels, gates) of one gate at the last history position
    (:func:`hm4sr_core.recommend.last_position_gates`)."""
    sub = gates_df[(gates_df["level"] == level) & (gates_df["stream"] == stream)].sort_values("expert")
    return _expert_labels(sub["expert"].to_numpy()), sub["gate"].to_numpy()


def last_gate_figure(gates_df: pd.DataFrame, real_df: pd.DataFrame | None = None) -> go.Figure:
    """Bars of the Temporal-MoE gate at the last history position, beside the gate of the
    history as it was (``real_df``) when the last interaction was moved."""
    fig = go.Figure()
    if real_df is not None:
        x, y = last_gate_data(real_df)
        fig.add_trace(go.Bar(x=x, y=y, name="as given", marker_color="#bbbbbb"))
    x, y = last_gate_data(gates_df)
    fig.add_trace(go.Bar(x=x, y=y, name="shown", marker_color="#d62728"))
    fig.update_layout(title=_gate_title("Temporal gate, last item", max(len(x), 1)),
                      yaxis_range=[0, 1], yaxis_title="gate", barmode="group", height=320, margin=MARGIN,
                      legend=dict(orientation="h", y=-0.2))
    return _uniform_line(fig, max(len(x), 1))


def month_rule_figure(agreement_df: pd.DataFrame) -> go.Figure:
    """Bars: share of list items in the category the month rule dictates, per condition
    (real times, shuffled times, short gap), with the chance share as a dashed line."""
    fig = go.Figure(go.Bar(x=agreement_df["condition"], y=agreement_df["rule_share"],
                           marker_color=["#d62728", "#888888", "#bbbbbb"][:len(agreement_df)],
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    if len(agreement_df):
        fig.add_hline(y=float(agreement_df["chance"].iloc[0]), line_dash="dash", annotation_text="chance")
    fig.update_layout(title="Lists in the month rule's category", yaxis_range=[0, 1],
                      yaxis_title="share of the top-k", height=340, margin=MARGIN)
    return fig
