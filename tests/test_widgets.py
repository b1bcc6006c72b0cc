"""Tests for widgets: controls change the figures' data, errors are shown, figures export.

Headless: no browser or kernel; a control's ``.value`` is set and the figure's data read back.
"""

from __future__ import annotations

import os
from pathlib import Path

import ipywidgets
import numpy as np
import pandas as pd
import plotly.io as pio
import pytest

from hm4sr_core import introspect as I
from hm4sr_core import static_export
from hm4sr_core.config import ModelConfig, TrainConfig
from hm4sr_core.data.preprocess import preprocess
from hm4sr_core.data.splits import build_split
from hm4sr_core.data.synthetic import make_synthetic_world
from hm4sr_core.train import train
from widgets import EmbeddingExplorer, GateExplorer, LossExplorer, TemporalExplorer, figures


@pytest.fixture(scope="module")
def world():
    ds = preprocess(make_synthetic_world(seed=3, n_users=50, n_items=40))
    result = train(ds, ModelConfig(), TrainConfig(epochs=1, dense_batch_size=32), progress=False)
    split = build_split(ds)
    gates = I.gate_table(result.model, ds, split.test, max_users=6)
    temporal = I.temporal_gate_table(result.model, ds, split.test, max_users=6)
    return ds, result, split, gates, temporal


def _gates_at(gates: pd.DataFrame, example: int, position: int) -> np.ndarray:
    sub = gates[(gates["example"] == example) & (gates["position"] == position)]
    return sub.pivot_table(index="stream", columns="expert", values="gate", observed=True).to_numpy()


def test_gate_explorer_follows_the_controls(world):
    ds, result, split, gates, temporal = world
    ex = GateExplorer(gates, temporal)
    first, other = ex.example.options[0][1], ex.example.options[4][1]
    np.testing.assert_allclose(np.asarray(ex.heatmap.data[0].z), _gates_at(gates, first, 0))
    assert ex.position.max == split.test.lengths[first] - 1

    ex.example.value = other
    np.testing.assert_allclose(np.asarray(ex.heatmap.data[0].z), _gates_at(gates, other, ex.position.value))
    assert ex.position.max == split.test.lengths[other] - 1
    traj = gates[(gates["example"] == other) & (gates["stream"] == "id")]
    assert np.asarray(ex.trajectory.data[0].z).shape == (4, traj["position"].nunique())

    ex.position.value = 3
    np.testing.assert_allclose(np.asarray(ex.heatmap.data[0].z), _gates_at(gates, other, 3))
    assert ex.trajectory.layout.shapes[0].x0 == 3
    r = temporal[(temporal["example"] == other) & (temporal["position"] == 3)].sort_values("expert")["gate"]
    np.testing.assert_allclose(np.asarray(ex.temporal.data[0].y), r.to_numpy())
    assert "position 3" in ex.heatmap.layout.title.text
    item = gates[(gates["example"] == other) & (gates["position"] == 3)]["title"].iloc[0]
    assert item in ex.info.value

    ex.stream.value = "image"
    img = gates[(gates["example"] == other) & (gates["stream"] == "image")]
    expected = img.pivot_table(index="expert", columns="position", values="gate", observed=True).to_numpy()
    np.testing.assert_allclose(np.asarray(ex.trajectory.data[0].z), expected)
    assert ex.errors.outputs == () and ex.last_error is None
    assert ex.widget.children[-1] is ex.errors


def test_gate_explorer_clamps_position_to_a_shorter_sequence(world):
    _, _, split, gates, temporal = world
    ex = GateExplorer(gates, None)
    lengths = {e: split.test.lengths[e] for _, e in ex.example.options}
    long_ex = max(lengths, key=lengths.get)
    short_ex = min(lengths, key=lengths.get)
    assert lengths[long_ex] > lengths[short_ex]
    ex.example.value = long_ex
    ex.position.value = lengths[long_ex] - 1
    ex.example.value = short_ex
    assert ex.position.value == lengths[short_ex] - 1
    np.testing.assert_allclose(np.asarray(ex.heatmap.data[0].z), _gates_at(gates, short_ex, ex.position.value))
    assert ex.errors.outputs == ()
    assert ex.temporal is None


def test_temporal_explorer_point_and_grid(world):
    ds, result, _, _, _ = world
    model = result.model
    ex = TemporalExplorer.from_model(model, ds, grid=12)
    ex.gap.value = 30.0
    ex.day.value = 50
    date = ds.stats["first_timestamp"] + 50 * 86_400
    expected = I.temporal_gate_curve(model, [30.0 * 86_400], [date]).sort_values("expert")["gate"].to_numpy()
    np.testing.assert_array_equal(np.asarray(ex.bars.data[0].y), expected)  # exact: the same call, the same inputs
    emb = I.time_embedding_at(model, 30.0 * 86_400, date)
    np.testing.assert_allclose(np.asarray(ex.embedding.data[1].y), emb.loc[emb["part"] == "absolute", "value"])
    assert ex.grid.data[1].x == (30.0,)

    ex.first_item.value = True  # the first item of a sequence: bucket 1, no gap
    first = I.temporal_gate_curve(model, [np.nan], [date]).sort_values("expert")["gate"].to_numpy()
    np.testing.assert_array_equal(np.asarray(ex.bars.data[0].y), first)
    assert ex.grid.data[1].visible is False

    z_expert0 = np.asarray(ex.grid.data[0].z)
    ex.expert.value = 2
    z_expert2 = np.asarray(ex.grid.data[0].z)
    assert z_expert2.shape == (12, 12) and not np.allclose(z_expert0, z_expert2)
    curve = I.temporal_gate_curve(model, np.logspace(np.log10(1 / 1440), np.log10(365), 12) * 86_400,
                                  np.linspace(ds.stats["first_timestamp"],
                                              ds.stats["first_timestamp"] + ex.day.max * 86_400, 12))
    np.testing.assert_array_equal(z_expert2, figures.temporal_gate_grid_data(curve, 2)[0])
    ex.recompute.click()
    np.testing.assert_array_equal(np.asarray(ex.grid.data[0].z), figures.temporal_gate_grid_data(curve, 2)[0])
    assert ex.errors.outputs == ()


def test_handler_errors_are_shown_not_swallowed(world):
    ds, result, _, _, _ = world
    model = result.model

    def gates_without_first_items(gaps, dates):
        if np.isnan(gaps).any():
            raise ValueError("this curve has no first-item bucket")
        return I.temporal_gate_curve(model, gaps, dates)

    ex = TemporalExplorer(gates_without_first_items, lambda g, d: I.time_embedding_at(model, g, d),
                          (ds.stats["first_timestamp"], ds.stats["last_timestamp"]), grid=6)
    before = np.asarray(ex.bars.data[0].y)
    ex.first_item.value = True  # the handler raises; the explorer must say so
    assert isinstance(ex.last_error, ValueError)
    assert ex.errors.layout.border == "1px solid #d33"  # framed in red once there is an error
    text = "".join(o["text"] for o in ex.errors.outputs)
    assert "no first-item bucket" in text and "Traceback" in text
    np.testing.assert_array_equal(np.asarray(ex.bars.data[0].y), before)
    ex.clear_errors()
    assert ex.errors.outputs == () and ex.last_error is None and not ex.errors.layout.border


def test_loss_explorer_toggles_smooths_and_weights(world):
    _, result, _, _, _ = world
    steps = result.steps
    ex = LossExplorer(steps)
    names = [t.name for t in ex.lines.data]
    assert names == ["rec", "id_contrastive", "category", "placeholder_contrastive"]
    np.testing.assert_allclose(np.asarray(ex.lines.data[0].y), steps["loss_rec"])

    ex.tasks["category"].value = False
    assert {t.name: t.visible for t in ex.lines.data}["category"] is False
    assert {t.name: t.visible for t in ex.shares.data}["category"] is False
    assert {t.name: t.visible for t in ex.lines.data}["rec"] is True
    ex.tasks["category"].value = True
    assert {t.name: t.visible for t in ex.lines.data}["category"] is True

    ex.window.value = 2
    rec = steps["loss_rec"].to_numpy()
    np.testing.assert_allclose(np.asarray(ex.lines.data[0].y), np.r_[rec[0], (rec[:-1] + rec[1:]) / 2])
    assert "mean of 2 steps" in ex.lines.layout.title.text
    shares = np.sum([np.asarray(t.y) for t in ex.shares.data], axis=0)
    np.testing.assert_allclose(shares, 1.0)

    toy = pd.DataFrame({"step": [0, 1], "epoch": 1, "loss_rec": [2.0, 1.0], "weighted_rec": [2.0, 1.0],
                        "loss_category": [1.0, 1.0], "weighted_category": [0.25, 0.25]})
    small = LossExplorer(toy)
    small.column.value = "weighted"
    np.testing.assert_allclose(np.asarray(small.lines.data[1].y), [0.25, 0.25])
    small.log_y.value = True
    assert small.lines.layout.yaxis.type == "log"
    assert ex.errors.outputs == () and small.errors.outputs == ()


def _hand_atlas(ds, result) -> pd.DataFrame:
    """An atlas table in atlas_table's columns, with PCA coordinates so no UMAP runs here
    (test_introspect feeds a real atlas_table to the explorer)."""
    fused = I.item_embeddings(result.model)["fused"]
    centred = fused - fused.mean(0)
    xy = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    items = ds.items
    return pd.DataFrame({"space": "fused", "item": items["item"], "item_token": items["token"],
                         "title": items["text"], "category": [c[0] for c in items["categories"]],
                         "popularity": np.bincount(ds.interactions["item"], minlength=len(items) + 1)[1:],
                         "dominant_expert": [f"expert {i % 4}" for i in range(len(items))],
                         "x": xy[:, 0], "y": xy[:, 1]})


def test_embedding_explorer_colour_and_filter(world):
    ds, result, _, _, _ = world
    atlas = _hand_atlas(ds, result)
    ex = EmbeddingExplorer(atlas)
    trace = ex.scatter.data[0]
    assert len(trace.x) == len(atlas)
    assert list(trace.marker.colorbar.ticktext) == sorted(atlas["category"].unique())
    assert "customdata[0]" in trace.hovertemplate and trace.customdata[0][0] == atlas["title"].iloc[0]

    ex.color.value = "popularity"
    np.testing.assert_allclose(np.asarray(ex.scatter.data[0].marker.color), np.log10(1 + atlas["popularity"]))
    assert ex.scatter.data[0].marker.colorbar.ticktext is None

    keep = ex.categories.options[:2]
    ex.categories.value = keep
    mask = atlas["category"].isin(keep).to_numpy()
    np.testing.assert_allclose(np.asarray(ex.scatter.data[0].x), atlas["x"].to_numpy()[mask])
    assert {row[1] for row in ex.scatter.data[0].customdata} == set(keep)

    ex.color.value = "dominant_expert"
    assert list(ex.scatter.data[0].marker.colorbar.ticktext) == ["expert 0", "expert 1", "expert 2", "expert 3"]
    codes = np.asarray(ex.scatter.data[0].marker.color)
    expected = atlas.loc[mask, "dominant_expert"].str[-1].astype(int).to_numpy()
    np.testing.assert_array_equal(codes, expected)
    assert ex.errors.outputs == ()


def test_figures_are_built_from_tables(world):
    ds, result, split, gates, temporal = world
    usage = figures.expert_usage_heatmap(I.expert_usage(gates))
    assert np.asarray(usage.data[0].z).shape == (3, 4)
    assert len(figures.expert_usage_heatmap(I.expert_usage(temporal)).data[0].y) == 4
    prof = figures.temporal_gate_profile(temporal, "gap_days", bins=5)
    assert len(prof.data) == 4 and prof.layout.xaxis.type == "log"
    assert len(figures.temporal_gate_profile(temporal, "position").data[0].x) == temporal["position"].nunique()
    interval = figures.interval_figure(I.interval_table(result.model, I.used_buckets(split.test)))
    assert len(interval.data) == 2
    lam = figures.lambda_figure(result.steps)
    assert [t.name for t in lam.data] == ["id", "text", "image"]
    sim = figures.absolute_time_similarity_figure(I.compare_absolute_time(result.model, np.arange(5.0)))
    assert [t.name for t in sim.data] == ["days since start", "raw seconds"]
    control = pd.DataFrame({"eval_time": ["real", "shuffled"], "ndcg@10": [0.3, 0.2], "hr@10": [0.5, 0.4]})
    assert len(figures.time_control_figure(control).data) == 2
    with pytest.raises(ValueError, match="against"):
        figures.temporal_gate_profile(temporal, "weekday")


def _has_browser() -> bool:
    try:
        static_export.find_browser()
    except static_export.BrowserMissing:
        return False
    return True


@pytest.mark.skipif(not _has_browser(), reason="no Chromium (BROWSER_PATH, chromium on PATH, /usr/bin/chromium): "
                    "`apt-get install -y chromium fonts-dejavu-core` to test PNG/SVG export through kaleido")
def test_save_figure_writes_png_and_svg(world, tmp_path):
    _, _, _, gates, _ = world
    fig = figures.gate_heatmap(gates, int(gates["example"].iloc[0]), 0)
    paths = static_export.save_figure(fig, tmp_path / "sub" / "gates", width=500, height=300)
    assert [p.name for p in paths] == ["gates.png", "gates.svg"]
    png, svg = (tmp_path / "sub" / "gates.png").read_bytes(), (tmp_path / "sub" / "gates.svg").read_text()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert svg.lstrip().startswith("<svg") and "Interactive-MoE gates" in svg
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["gates.png", "gates.svg"]  # no temp files


def test_save_figure_without_a_browser_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(static_export, "DEBIAN_CHROMIUM", str(tmp_path / "no-chromium"))
    fig = figures.lambda_figure(pd.DataFrame({"step": [0], "lambda_id": [0.0]}))
    with pytest.raises(static_export.BrowserMissing, match="apt-get install -y chromium"):
        static_export.save_figure(fig, tmp_path / "x", if_no_browser="raise")
    assert list(Path(tmp_path).iterdir()) == []  # nothing half-written
    # By default (a notebook opened in Lab on a machine without a browser) JSON, and a warning.
    with pytest.warns(UserWarning, match="Wrote plotly JSON instead of png, svg"):
        written = static_export.save_figure(fig, tmp_path / "x")
    assert written == [tmp_path / "x.json"] and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    # Plotly JSON needs no browser (the notebook runner exports PNG/SVG from it later).
    written = static_export.save_figure(figures.lambda_figure(pd.DataFrame({"step": [0, 1], "lambda_id": [0.0, 0.5]})),
                                  tmp_path / "lam", formats=("json",))
    assert written == [tmp_path / "lam.json"]
    assert pio.read_json(written[0]).data[0].name == "id"
    with pytest.raises(ValueError, match="formats"):
        static_export.save_figure(figures.lambda_figure(pd.DataFrame({"step": [0], "lambda_id": [0.0]})), tmp_path / "x",
                            formats=("gif",))


# A bare machine: no browser on PATH, none at /usr/bin/chromium, no BROWSER_PATH. Run in a
# child process so that a hang fails the test by its timeout instead of hanging the suite.
NO_BROWSER_EXPORT = """
import sys, time
import pandas as pd
from hm4sr_core import static_export
from widgets import figures
static_export.DEBIAN_CHROMIUM = sys.argv[1] + "/no-chromium"
fig = figures.lambda_figure(pd.DataFrame({"step": [0, 1], "lambda_id": [0.0, 0.5]}))
t0 = time.monotonic()
try:
    static_export.save_figure(fig, sys.argv[1] + "/lam", formats=("png", "svg"), if_no_browser="raise")
except static_export.BrowserMissing as err:
    print(f"{time.monotonic() - t0:.3f}|{err}")
"""


def _bare_environment(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "BROWSER_PATH"}
    env["PATH"] = str(tmp_path / "bin")  # no chromium, no chrome: nothing but an empty folder
    (tmp_path / "bin").mkdir(exist_ok=True)
    return env


def test_static_export_without_any_browser_returns_promptly_saying_what_is_missing(tmp_path):
    import subprocess
    import sys
    import time

    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", NO_BROWSER_EXPORT, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=_bare_environment(tmp_path))
    assert done.returncode == 0, done.stderr
    seconds, message = done.stdout.strip().split("|", 1)
    assert float(seconds) < 1.0  # found missing before anything starts
    assert "no Chromium" in message and "apt-get install -y chromium fonts-dejavu-core" in message
    assert "BROWSER_PATH" in message
    assert not list(tmp_path.glob("lam*"))
    assert time.monotonic() - t0 < 60


def test_a_browser_that_never_answers_times_out_naming_it(tmp_path):
    import sys
    import time

    fake = tmp_path / "fake-chromium"
    # Starts and reads the DevTools pipe (fd 3) like Chromium, but never answers.
    fake.write_text(f"#!{sys.executable}\nimport os, time\nend = time.monotonic() + 60\n"
                    "while time.monotonic() < end and os.read(3, 65536):\n    pass\n")
    fake.chmod(0o755)
    fig = figures.lambda_figure(pd.DataFrame({"step": [0, 1], "lambda_id": [0.0, 0.5]}))
    t0 = time.monotonic()
    with pytest.raises(static_export.StaticExportError, match=f"no answer.*starting {fake}"):
        static_export.render_static([(fig.to_dict(), {"format": "png"}, "lambda")], str(fake), start_timeout=3,
                              figure_timeout=3)
    assert time.monotonic() - t0 < 45


def test_gate_heatmaps_are_centred_on_uniform_and_say_so(world):
    ds, result, split, gates, temporal = world
    E = result.model.config.num_experts
    example = int(gates["example"].iloc[0])
    curve = I.temporal_gate_curve(result.model, [3600.0, 86_400.0], [ds.stats["first_timestamp"]] * 2)
    heatmaps = {
        "gate_heatmap": figures.gate_heatmap(gates, example, 0),
        "gate_trajectory_figure": figures.gate_trajectory_figure(gates, example, "text"),
        "expert_usage_heatmap": figures.expert_usage_heatmap(I.expert_usage(gates)),
        "gate_by_category_figure": figures.gate_by_category_figure(I.gate_by_category(gates), "text"),
        "temporal_gate_curve_figure": figures.temporal_gate_curve_figure(curve, 1),
    }
    for name, fig in heatmaps.items():
        trace = fig.data[0]
        assert trace.type == "heatmap", name
        assert trace.zmid == pytest.approx(1 / E), name
        # symmetric around 1/E, so uniform is the neutral colour of the diverging scale
        assert trace.zmax - trace.zmid == pytest.approx(trace.zmid - trace.zmin), name
        assert trace.zmin == 0.0, name
        assert "%{z:.3f}" in trace.hovertemplate, name  # the value on hover
        assert fig.layout.title.subtitle.text.startswith(f"uniform = 1/E = {1 / E:.3g}"), name
        assert fig.layout.width is None, name  # sized by its container
    assert figures.uniform_note(4).startswith("uniform = 1/E = 0.25")
    # gate bars and profiles: a dashed line at 1/E, and the subtitle says so
    for fig in (figures.temporal_gate_bars(temporal, example, 0), figures.temporal_gate_profile(temporal, "position"),
                figures.expert_usage_heatmap(I.expert_usage(temporal))):
        assert [s.y0 for s in fig.layout.shapes] == [pytest.approx(1 / E)]
        assert fig.layout.title.subtitle.text == figures.uniform_note(E, "dashed line")
        assert fig.layout.title.subtitle.text.endswith("experts; dashed line)")
    with pytest.raises(ValueError, match="n_experts"):
        figures.gate_colour(0)


def test_explorers_lay_out_for_narrow_and_wide_output_areas(world):
    ds, result, _, gates, temporal = world
    gate = GateExplorer(gates, temporal)
    assert "hm4sr-explorer" in gate.widget._dom_classes
    grid = next(c for c in gate.widget.children if isinstance(c, ipywidgets.GridBox))
    assert "auto-fit" in grid.layout.grid_template_columns  # side-by-side panels wrap below a width
    rows = [c for c in gate.widget.children if "hm4sr-controls" in getattr(c, "_dom_classes", ())]
    assert len(rows) == 1 and rows[0].layout.flex_flow == "row wrap"
    if gate._heatmap.live:
        assert gate.heatmap._config.get("responsive") is True
    loss = LossExplorer(result.steps)
    assert len([c for c in loss.widget.children if "hm4sr-controls" in getattr(c, "_dom_classes", ())]) == 1
