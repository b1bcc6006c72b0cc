"""Tests for hm4sr_core.introspect: the tables say what the model computed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FLOAT64_EPS, float_tol, forward_terms

from hm4sr_core import introspect as I
from hm4sr_core.config import ModelConfig, TrainConfig
from hm4sr_core.data.preprocess import preprocess
from hm4sr_core.data.splits import build_split, iterate_batches
from hm4sr_core.data.synthetic import make_synthetic_world
from hm4sr_core.model import build_model
from hm4sr_core.train import train


@pytest.fixture(scope="module")
def world():
    ds = preprocess(make_synthetic_world(seed=3, n_users=50, n_items=40))
    result = train(ds, ModelConfig(), TrainConfig(epochs=1, dense_batch_size=32), progress=False)
    return ds, result, build_split(ds)


@pytest.fixture(scope="module")
def gates(world):
    ds, result, _ = world
    return I.gate_table(result.model, ds, "test", max_users=8)


def _softmax_sum_tol(experts: int) -> float:
    """Gates summed over the E outputs of one float32 softmax (exp, a sum of E, a division
    each, then the E again summed): within float_tol(1, 2E + 3) of 1."""
    return float_tol(1.0, 2 * experts + 3)


def _forward_tol(model) -> float:
    """Gates (in [0, 1]) of one position computed in two batches of other shapes."""
    return float_tol(1.0, forward_terms(model.config))


def _model_gates(model, part, n):
    """The model's own output (``HM4SR.encode``: gates, time inputs) for the first n examples of a part."""
    model.eval()
    with torch.no_grad():
        batch = next(iterate_batches(part, n))
        return batch, model.encode(batch)


def test_gate_table_rows_and_sums(world, gates):
    ds, result, split = world
    model = result.model
    S, E = model.S, model.config.num_experts
    sums = gates.groupby(["example", "position", "stream"], observed=True)["gate"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, rtol=0, atol=_softmax_sum_tol(E))
    # Only real positions: 8 users, each with as many positions as their test history.
    assert gates["example"].nunique() == 8
    lengths = gates.groupby("example")["position"].nunique().to_numpy()
    np.testing.assert_array_equal(lengths, split.test.lengths[:8])
    assert len(gates) == lengths.sum() * S * E
    assert (gates["item"] > 0).all()
    assert list(gates["stream"].cat.categories) == list(model.stream_names)
    first = gates[gates["position"] == 0]
    assert first["gap_seconds"].isna().all() and (first["gap_bucket"] == 1).all()
    assert gates.loc[gates["position"] > 0, "gap_seconds"].ge(0).all()
    # Titles and categories follow the item.
    row = gates.iloc[0]
    item = ds.items.iloc[row["item"] - 1]
    assert row["item_token"] == item["token"] and row["category"] == item["categories"][0]
    assert row["title"] == item["text"]
    assert model.training  # restored: train() leaves the model in training mode


def test_gate_table_matches_the_model_output(world, gates):
    _, result, split = world
    batch, out = _model_gates(result.model, split.test, 3)
    g = out.interactive_gates.numpy()  # (B, T, S, E)
    for ex, pos, s, k in [(0, 0, 0, 0), (1, 4, 2, 3), (2, 2, 1, 1)]:
        stream = result.model.stream_names[s]
        row = gates[(gates["example"] == ex) & (gates["position"] == pos) & (gates["stream"] == stream)
                    & (gates["expert"] == k)]
        assert len(row) == 1
        # gate_table ran 8 users in one batch, this 3: other shapes, other summation orders
        assert row["gate"].iloc[0] == pytest.approx(float(g[ex, pos, s, k]), rel=0, abs=_forward_tol(result.model))
        assert row["timestamp"].iloc[0] == int(batch.timestamps[ex, pos])


def test_temporal_gate_table(world):
    ds, result, split = world
    tg = I.temporal_gate_table(result.model, ds, split.test, max_users=5)
    sums = tg.groupby(["example", "position"])["gate"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, rtol=0, atol=_softmax_sum_tol(result.model.config.num_experts))
    batch, out = _model_gates(result.model, split.test, 5)
    real = (batch.items > 0).numpy()
    per_pos = tg[tg["expert"] == 0].sort_values(["example", "position"])
    np.testing.assert_array_equal(per_pos["gap_bucket"].to_numpy(), out.interval_buckets.numpy()[real])
    np.testing.assert_allclose(per_pos["gate"].to_numpy(), out.temporal_gates.numpy()[real][:, 0], rtol=0,
                               atol=_forward_tol(result.model))
    assert "stream" not in tg.columns


def test_time_modes_change_what_the_model_sees(world):
    ds, result, split = world
    real = I.temporal_gate_table(result.model, ds, split.test, max_users=4)
    zeroed = I.temporal_gate_table(result.model, ds, split.test, max_users=4, time_mode="zeroed")
    assert (zeroed["timestamp"] == ds.stats["first_timestamp"]).all()
    assert (zeroed.loc[zeroed["position"] > 0, "gap_bucket"] == 2).all()  # gap 0 -> floor(0) + 2
    assert not np.allclose(real["gate"], zeroed["gate"])
    shuffled = I.temporal_gate_table(result.model, ds, split.test, max_users=4, time_mode="shuffled")
    assert sorted(shuffled["timestamp"]) == sorted(real["timestamp"])
    assert (shuffled["timestamp"].to_numpy() != real["timestamp"].to_numpy()).any()
    with pytest.raises(ValueError, match="time_mode"):
        I.gate_table(result.model, ds, split.test, time_mode="backwards")


def test_gate_summaries(gates):
    usage = I.expert_usage(gates)
    assert len(usage) == gates["stream"].nunique() * gates["expert"].nunique()
    # means over the positions of gates that sum to 1: a sum over every row, then E means added
    experts = gates["expert"].nunique()
    np.testing.assert_allclose(usage.groupby("stream", observed=True)["gate"].sum(), 1.0, rtol=0,
                               atol=_softmax_sum_tol(experts) + float_tol(1.0, len(gates) + experts))
    by_cat = I.gate_by_category(gates)
    assert set(by_cat["category"]) == set(gates["category"].astype(str))
    dom = I.dominant_expert(gates, "item")
    item = int(gates["item"].iloc[0])
    sub = gates[(gates["item"] == item) & (gates["stream"] == "text")]
    expected = sub.groupby("expert")["gate"].mean()
    row = dom[(dom["item"] == item) & (dom["stream"] == "text")].iloc[0]
    assert row["expert"] == expected.idxmax()
    assert row["gate"] == pytest.approx(expected.max(), rel=0, abs=float_tol(1.0, len(sub)))  # a mean, other order
    assert row["margin"] >= 0
    pooled = I.dominant_expert(gates, "item", per_stream=False)
    assert "stream" not in pooled.columns and pooled["item"].is_unique


def test_gap_bucket_agrees_with_the_model(world):
    ds, result, split = world
    part = split.test
    ts, real = torch.from_numpy(part.timestamps), torch.from_numpy(part.items > 0)
    expected = result.model.time.buckets(ts, real).numpy()[part.items > 0]
    gaps = np.full(part.timestamps.shape, np.nan)
    gaps[:, 1:] = part.timestamps[:, 1:] - part.timestamps[:, :-1]
    np.testing.assert_array_equal(I.gap_bucket(gaps[part.items > 0]), expected)
    assert I.gap_bucket([86_400.0])[0] == 1641  # one day: floor(100 log2 86401) + 2
    assert I.gap_bucket([np.nan, 0.0, -5.0]).tolist() == [1, 2, 2]
    in_data = I.used_buckets(ds)
    in_test, counts = I.used_buckets(part, return_counts=True)
    assert set(in_test) <= set(in_data)
    assert in_data[0] == 1 and counts.sum() == int((part.items > 0).sum())
    assert counts[0] == len(part)  # one first item per test sequence


def test_interval_table(world):
    ds, result, _ = world
    used = I.used_buckets(ds)
    table = I.interval_table(result.model, used)
    assert table["bucket"].tolist() == sorted(used.tolist())
    assert np.isfinite(table["norm"]).all() and (table["norm"] > 0).all()
    gaps = table[table["kind"] == "gap"]
    assert gaps["gap_seconds"].is_monotonic_increasing and gaps["gap_seconds"].diff().dropna().gt(0).all()
    assert table.loc[table["kind"] == "first item", "gap_seconds"].isna().all()
    # The stated gap lands back in its bucket (just above the boundary, against rounding).
    start = I.bucket_start_seconds(gaps["bucket"].to_numpy())
    np.testing.assert_array_equal(I.gap_bucket(start * (1 + 1e-9) + 1e-9), gaps["bucket"].to_numpy())
    assert table.attrs["reference_bucket"] == 1641
    row = I.interval_table(result.model, [1641, 1700])
    d = result.model.config.hidden_size  # a float64 cosine of a row with itself: sums of d products
    assert row.loc[row["bucket"] == 1641, "cosine"].iloc[0] == pytest.approx(1.0, rel=0,
                                                                             abs=float_tol(1.0, 3 * d, FLOAT64_EPS))
    assert row["is_reference"].tolist() == [True, False]
    with pytest.raises(ValueError, match="buckets must be in"):
        I.interval_table(result.model, [10 ** 6])


def test_absolute_time_embedding(world):
    _, result, _ = world
    model = result.model
    days = np.arange(0, 10, dtype=np.float64)
    emb = I.absolute_time_embedding(model, days)
    d = model.config.hidden_size
    assert len(emb) == len(days) * d
    assert emb["value"].between(-1, 1).all()
    # the model reads whole seconds (0.5 s = 5.8e-6 days off at most), as float32 days
    np.testing.assert_allclose(emb.groupby("day")["time_input"].first().to_numpy(), days, rtol=0,
                               atol=0.5 / 86_400 + float_tol(days.max(), 1))
    both = I.compare_absolute_time(model, days)
    spread = both.groupby("variant")["cosine_to_first"].apply(lambda c: float((1 - c).abs().mean()))
    # Days vary smoothly; raw ~1.6e9-second inputs send neighbouring days far apart.
    assert spread["raw seconds"] > 10 * spread["days since start"]
    other = build_model(ModelConfig.hm4sr(normalise_time=False), world[0])
    labelled = I.compare_absolute_time(model, days[:3], other)
    assert set(labelled["variant"]) == {"normalise_time=True", "normalise_time=False"}


def test_temporal_gate_curve_reproduces_positions(world):
    ds, result, split = world
    model = result.model
    tg = I.temporal_gate_table(model, ds, split.test, max_users=2)
    rows = tg[tg["position"].isin([0, 3])]
    for (_, pos), sub in rows.groupby(["example", "position"]):
        curve = I.temporal_gate_curve(model, [sub["gap_seconds"].iloc[0]], [sub["timestamp"].iloc[0]])
        assert curve["gap_bucket"].iloc[0] == sub["gap_bucket"].iloc[0]
        np.testing.assert_allclose(curve.sort_values("expert")["gate"], sub.sort_values("expert")["gate"], rtol=0,
                                   atol=_forward_tol(model))  # one position alone against a whole batch
    grid = I.temporal_gate_curve(model, [np.nan, 60, 86_400, 40 * 86_400], np.linspace(1.58e9, 1.65e9, 3))
    assert len(grid) == 4 * 3 * model.config.num_experts
    np.testing.assert_allclose(grid.groupby(["gap_bucket", "date_seconds"])["gate"].sum(), 1.0, rtol=0,
                               atol=_softmax_sum_tol(model.config.num_experts))
    assert grid.loc[grid["gap_seconds"].isna(), "gap_bucket"].eq(1).all()
    emb = I.time_embedding_at(model, 86_400, 1.6e9)
    assert emb["part"].value_counts().to_dict() == {"interval": 64, "absolute": 64}
    row = model.time.interval.weight[1641].detach().numpy()
    np.testing.assert_array_equal(emb.loc[emb["part"] == "interval", "value"], row)  # a table row, copied


def test_loss_table_and_smooth(world):
    _, result, _ = world
    steps = result.steps
    table = I.loss_table(steps)
    assert list(table["task"].cat.categories) == ["rec", "id_contrastive", "category", "placeholder_contrastive"]
    assert len(table) == len(steps) * 4
    np.testing.assert_allclose(table.groupby("step")["share"].sum(), 1.0, rtol=0, atol=float_tol(1.0, 8, FLOAT64_EPS))
    # the logged total is the model's float32 sum of the 4 weighted (positive) losses
    np.testing.assert_allclose(table.groupby("step")["weighted"].sum().to_numpy(), steps["loss"].to_numpy(),
                               rtol=float_tol(1.0, 4 + 4), atol=0)
    rec = table[table["task"] == "rec"]
    np.testing.assert_allclose(rec["value"].to_numpy(), steps["loss_rec"].to_numpy())
    # Two hand-made steps so the rolling mean is checkable by hand.
    toy = pd.DataFrame({"step": [0, 1, 2], "epoch": 1, "loss_rec": [4.0, 2.0, 0.0], "weighted_rec": [4.0, 2.0, 0.0],
                        "loss_category": [1.0, 1.0, 2.0], "weighted_category": [0.5, 0.5, 1.0]})
    t = I.loss_table(toy)
    np.testing.assert_allclose(t.loc[t["task"] == "category", "share"], [0.5 / 4.5, 0.5 / 2.5, 1.0])
    s = I.smooth(t, 2)
    np.testing.assert_allclose(s.loc[s["task"] == "rec", "value"], [4.0, 3.0, 1.0])
    np.testing.assert_allclose(s.groupby("step")["share"].sum(), 1.0)
    pd.testing.assert_frame_equal(I.smooth(t, 1), t)
    with pytest.raises(ValueError, match="window"):
        I.smooth(t, 0)


def test_gradient_shares(world):
    _, result, split = world
    model = result.model
    batch = next(iterate_batches(split.train_dense, 16))
    before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    shares = I.gradient_shares(model, batch)
    assert set(shares["task"]) == {"rec", "id_contrastive", "category", "placeholder_contrastive"}
    assert shares["share"].sum() == pytest.approx(1.0)
    assert (shares["grad_norm"] > 0).all()
    assert shares.set_index("task").loc["rec", "cosine_to_rec"] == pytest.approx(1.0)
    shared = shares.attrs["shared_parameters"]
    assert "item_embedding.weight" in shared and "encoders.layers.0.qkv.weight" in shared
    assert not any(n.startswith(("category_head", "placeholders")) for n in shared)
    again = I.gradient_shares(model, batch)
    # exact: dropout off, the same seed, batch and ops in the same process
    np.testing.assert_array_equal(again["grad_norm"], shares["grad_norm"])
    for n, p in model.named_parameters():  # autograd.grad leaves the .grad buffers alone
        assert (p.grad is None and before[n] is None) or torch.equal(p.grad, before[n])


def test_item_embeddings_umap_and_atlas(world, gates):
    ds, result, _ = world
    emb = I.item_embeddings(result.model)
    assert set(emb) == {"id", "text", "image", "fused"}
    assert emb["id"].shape == (ds.num_items, 64) and emb["fused"].shape == (ds.num_items, 192)
    np.testing.assert_array_equal(emb["fused"][:, 64:128], emb["text"])
    np.testing.assert_array_equal(emb["id"], result.model.item_embedding.weight.detach().numpy()[1:])  # a copy
    a = I.umap_projection(emb["fused"], seed=7)
    b = I.umap_projection(emb["fused"], seed=7)
    assert a.shape == (ds.num_items, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    with pytest.warns(UserWarning, match="principal components"):
        small = I.umap_projection(emb["fused"][:5])
    assert small.shape == (5, 2)
    atlas = I.atlas_table(result.model, ds, gates_df=gates, seed=7)
    assert len(atlas) == ds.num_items and (atlas["space"] == "fused").all()
    np.testing.assert_array_equal(atlas[["x", "y"]].to_numpy(np.float32), a)
    seen = set(gates["item"])
    assert (atlas.loc[~atlas["item"].isin(seen), "dominant_expert"] == "unseen").all()
    assert atlas.loc[atlas["item"].isin(seen), "dominant_expert"].str.startswith("expert ").all()
    assert atlas["popularity"].sum() == len(ds.interactions)
    from widgets import EmbeddingExplorer  # the explorer accepts what atlas_table makes

    explorer = EmbeddingExplorer(atlas)
    explorer.color.value = "dominant_expert"
    assert explorer.errors.outputs == ()


def test_time_control_table(world):
    ds, result, split = world
    table = I.time_control_table(result.model, ds, split, TrainConfig())
    assert table["eval_time"].tolist() == ["real", "shuffled", "zeroed"]
    # The real row is the run's own test score.
    assert table.loc[0, "ndcg@10"] == pytest.approx(result.test.metrics["ndcg@10"])
    assert table[["ndcg@10", "hr@10"]].apply(lambda c: c.between(0, 1)).all().all()


def test_bad_inputs_are_named(world):
    ds, result, split = world
    sasrec = build_model(ModelConfig.sasrec(), ds)
    with pytest.raises(ValueError, match="no Interactive MoE"):
        I.gate_table(sasrec, ds, split.test)
    with pytest.raises(ValueError, match="no Temporal MoE"):
        I.temporal_gate_curve(sasrec, [1.0], [1.6e9])
    with pytest.raises(ValueError, match="part must be"):
        I.gate_table(result.model, ds, "holdout")
    with pytest.raises(ValueError, match="no loss_"):
        I.loss_table(pd.DataFrame({"step": [0]}))
    with pytest.raises(ValueError, match="max_users"):
        I.gate_table(result.model, ds, split.test, max_users=0)


def test_eval_mode_is_restored(world):
    ds, result, split = world
    model = result.model
    model.eval()
    I.item_embeddings(model)
    I.temporal_gate_table(model, ds, split.test, max_users=1)
    assert not model.training
    model.train()
    I.gradient_shares(model, next(iterate_batches(split.train_dense, 4)))
    I.interval_table(model, [1641])
    assert model.training
