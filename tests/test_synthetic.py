"""Tests for hm4sr_core.data.synthetic: the planted world holds what it claims."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pytest

from hm4sr_core.data.schema import DataError
from hm4sr_core.data.synthetic import (
    EPOCH_SECONDS,
    make_synthetic_world,
    planted_category_of,
    planted_truth,
    seasonal_category,
    utc_month,
)


@pytest.fixture(scope="module")
def world():
    return make_synthetic_world(2025)


def _modality(raw, name):
    return next(m for m in raw.modalities if m.name == name)


def _category_variance_share(features: np.ndarray, category: np.ndarray) -> np.ndarray:
    """Per dim, between-category sum of squares / total sum of squares (eta^2)."""
    total = ((features - features.mean(0)) ** 2).sum(0)
    between = np.zeros(features.shape[1])
    for c in np.unique(category):
        rows = features[category == c]
        between += len(rows) * (rows.mean(0) - features.mean(0)) ** 2
    return between / total


def _transitions(raw):
    """Consecutive pairs within a user: previous category, next category, the gap before
    the previous row (a return when long), the previous row's timestamp, the gap between them."""
    df = raw.interactions
    cat = planted_category_of(raw, df["item"].to_numpy())
    ts = df["timestamp"].to_numpy()
    user = df["user"].to_numpy()
    gap_in = np.concatenate([[0], ts[1:] - ts[:-1]])
    gap_in[np.concatenate([[True], user[1:] != user[:-1]])] = 0
    same = user[1:] == user[:-1]
    return cat[:-1][same], cat[1:][same], gap_in[:-1][same], ts[:-1][same], gap_in[1:][same]


def test_same_seed_gives_identical_world():
    a, b = make_synthetic_world(7), make_synthetic_world(7)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    for name in ("text", "image"):
        np.testing.assert_array_equal(_modality(a, name).features, _modality(b, name).features)
    assert json.dumps(a.source, sort_keys=True) == json.dumps(b.source, sort_keys=True)


def test_different_seed_gives_different_world():
    a, b = make_synthetic_world(7), make_synthetic_world(8)
    assert not a.interactions.equals(b.interactions)
    assert not np.array_equal(_modality(a, "text").features, _modality(b, "text").features)
    assert planted_truth(a).item_category != planted_truth(b).item_category


def test_shapes_dtypes_and_source(world):
    df = world.interactions
    assert list(df.columns) == ["user", "item", "timestamp"]
    assert df["timestamp"].dtype == np.int64
    assert set(df["user"]) == {f"u{u}" for u in range(300)}
    assert set(df["item"]) <= {f"i{j}" for j in range(200)}
    assert list(world.items.columns) == ["item", "text", "categories"]
    assert world.items["item"].tolist() == [f"i{j}" for j in range(200)]
    names = planted_truth(world).category_names
    cats = planted_category_of(world, world.items["item"])
    assert [c for (c,) in world.items["categories"]] == [names[c] for c in cats]
    assert all(text.endswith(names[c]) for text, c in zip(world.items["text"], cats))

    text, image = _modality(world, "text"), _modality(world, "image")
    assert text.features.shape == (200, 32) and text.features.dtype == np.float32
    assert image.features.shape == (200, 48) and image.features.dtype == np.float32
    assert list(text.feature_items) == world.items["item"].tolist()
    assert text.provenance["synthetic"] and image.provenance["synthetic"]

    assert world.source["reader"] == "synthetic" and world.source["seed"] == 2025
    assert world.source["params"]["long_gap_days"] == 30.0
    # Plain JSON all the way down: a round trip gives back an equal dict.
    assert json.loads(json.dumps(world.source)) == world.source


def test_timestamps_strictly_increase_within_each_user(world):
    df = world.interactions
    truth = planted_truth(world)
    assert (df["timestamp"] >= EPOCH_SECONDS).all()
    for user, ts in df.groupby("user", sort=False)["timestamp"]:
        assert (np.diff(ts.to_numpy()) > 0).all(), user
    lengths = df.groupby("user", sort=False).size()
    assert lengths.min() >= 5
    assert lengths.tolist() == [u["length"] for u in truth.users]
    assert truth.zero_gap_share == 0.0


def test_five_core_keeps_every_user_and_item(world):
    counts = world.interactions["item"].value_counts()
    assert len(counts) == 200 and counts.min() >= 5


def test_per_interaction_truth_matches_the_data(world):
    truth = planted_truth(world)
    df = world.interactions
    np.testing.assert_array_equal(truth.interaction_category, planted_category_of(world, df["item"]))
    gaps = df.groupby("user", sort=False)["timestamp"].diff().fillna(0).to_numpy()
    after_long = gaps > truth.regime_rule["threshold_seconds"]
    np.testing.assert_array_equal(truth.interaction_after_long_gap, after_long)
    followed = np.asarray(truth.interaction_followed_rule)
    jumped = np.asarray(truth.interaction_jumped)
    # A jump lands one row after a return of the same user (return_lag 1), never elsewhere.
    user = df["user"].to_numpy()
    one_after_return = np.concatenate([[False], after_long[:-1] & (user[1:] == user[:-1])])
    np.testing.assert_array_equal(jumped, one_after_return)
    assert not followed[~jumped].any() and followed.sum() > 0.8 * jumped.sum()
    # Long gaps are common enough to learn from: about long_gap_share of transitions.
    assert 0.18 < after_long.sum() / (len(df) - 300) < 0.32


def test_text_and_image_signal_dims_carry_category_noise_dims_do_not(world):
    cats = planted_category_of(world, world.items["item"])
    image = _modality(world, "image")
    noise = image.provenance["noise_dims"]
    signal = image.provenance["signal_dims"]
    assert noise == list(range(24, 48)) and signal == list(range(24))
    assert planted_truth(world).image["noise_dims"] == noise

    text_share = _category_variance_share(_modality(world, "text").features, cats)
    signal_share = _category_variance_share(image.features[:, signal], cats)
    noise_share = _category_variance_share(image.features[:, noise], cats)
    assert text_share.mean() > 0.5
    assert signal_share.mean() > 0.4
    # Under independence eta^2 averages (C-1)/(N-1) = 7/199 ~ 0.035.
    assert noise_share.mean() < 0.08 and noise_share.max() < 0.15
    # Same spread as the signal dims, so variance alone does not give the noise away.
    sd = image.features.std(0)
    assert 0.7 < sd[noise].mean() / sd[signal].mean() < 1.3


def test_a_return_keeps_the_interest_and_the_next_item_jumps_to_the_seasonal_category(world):
    prev, nxt, gap_before_prev, ts_prev, gap = _transitions(world)
    threshold = planted_truth(world).regime_rule["threshold_seconds"]
    chance = 1 / 8
    # The return itself (long gap before it) continues the interest the user left with
    # (unless a jump from an earlier return lands on it: two breaks in a row).
    back = (gap > threshold) & (gap_before_prev <= threshold)
    assert back.sum() > 1000 and np.all(nxt[back] == prev[back])
    # The item after a return follows the month of the return: follow_prob 0.9 plus
    # chance hits of the random jump, about 0.91 expected.
    after = (gap_before_prev > threshold) & (gap <= threshold)
    rule = seasonal_category(world, ts_prev)
    assert np.mean(nxt[after] == rule[after]) > 0.8 > 5 * chance
    # Within a regime, interest stays (stay prob 0.70-0.90) far more than chance...
    calm = (gap_before_prev <= threshold) & (gap <= threshold)
    assert np.mean(nxt[calm] == prev[calm]) > 0.7
    # ...and after a return staying is no longer the rule.
    assert np.mean(nxt[after] == prev[after]) < 0.3


def test_post_return_category_needs_the_inputs_time_to_be_predicted(world):
    prev, nxt, gap_before_prev, ts_prev, gap = _transitions(world)
    threshold = planted_truth(world).regime_rule["threshold_seconds"]
    after = (gap_before_prev > threshold) & (gap <= threshold)
    prev, nxt, ts_prev = prev[after], nxt[after], ts_prev[after]
    # A time-blind count model that is even told where the returns are: the most common
    # next category given the previous one, fitted on one half and scored on the other.
    # The previous category hints weakly at the season, so it beats chance a little,
    # but nowhere near the date of the last input.
    fit = np.arange(len(prev)) % 2 == 0
    table = defaultdict(Counter)
    for p, n in zip(prev[fit], nxt[fit]):
        table[p][n] += 1
    blind = np.array([table[p].most_common(1)[0][0] for p in prev[~fit]])
    blind_acc = np.mean(blind == nxt[~fit])
    month_acc = np.mean(seasonal_category(world, ts_prev[~fit]) == nxt[~fit])
    assert blind_acc < 0.4
    assert month_acc > blind_acc + 0.5


def test_return_lag_zero_jumps_on_the_return_itself():
    raw = make_synthetic_world(7, n_users=200, return_lag=0)
    prev, nxt, _, _, gap = _transitions(raw)
    df = raw.interactions
    ts, user = df["timestamp"].to_numpy(), df["user"].to_numpy()
    ts_next = ts[1:][user[1:] == user[:-1]]
    post = gap > planted_truth(raw).regime_rule["threshold_seconds"]
    assert np.mean(nxt[post] == seasonal_category(raw, ts_next)[post]) > 0.8
    assert np.mean(nxt[post] == prev[post]) < 0.3
    truth = planted_truth(raw)
    assert truth.regime_rule["return_lag"] == 0
    assert truth.interaction_jumped == truth.interaction_after_long_gap


def test_popularity_is_skewed_within_category_but_categories_are_balanced(world):
    df = world.interactions
    cats = planted_category_of(world, df["item"])
    for c in range(8):
        counts = df["item"][cats == c].value_counts()
        n_items = int(np.sum(np.asarray(planted_truth(world).item_category) == c))
        # The top item gets well over its uniform share, yet not everything.
        assert 2 / n_items < counts.iloc[0] / counts.sum() < 0.5
    category_share = np.bincount(cats, minlength=8) / len(cats)
    assert category_share.max() < 0.25 and category_share.min() > 0.05


def test_default_size_generates_in_under_a_second():
    start = time.perf_counter()
    make_synthetic_world(11)
    assert time.perf_counter() - start < 1.0


def test_other_sizes():
    raw = make_synthetic_world(3, n_users=20, n_items=40, n_categories=15, image_noise_share=0.0,
                               text_dim=4, image_dim=6)
    truth = planted_truth(raw)
    assert truth.image["noise_dims"] == [] and _modality(raw, "image").features.shape == (40, 6)
    assert len(truth.category_names) == len(set(truth.category_names)) == 15
    # With 15 categories and 12 months, each month still names a distinct category.
    assert len(set(truth.regime_rule["month_category"])) == 12


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_items=5, n_categories=8),
        dict(n_categories=1),
        dict(mean_length=4),
        dict(image_noise_share=1.0),
        dict(long_gap_days=0.0),
        dict(regime_follow_prob=1.5),
    ],
)
def test_invalid_parameters_raise(kwargs):
    with pytest.raises(ValueError, match="make_synthetic_world"):
        make_synthetic_world(1, **kwargs)


def test_planted_category_of_rejects_foreign_inputs(world):
    with pytest.raises(DataError, match="i999"):
        planted_category_of(world, ["i0", "i999"])
    with pytest.raises(DataError, match="make_synthetic_world"):
        planted_category_of({"reader": "recbole"}, ["i0"])
    # The source dict alone is enough (a preprocessed Dataset carries it).
    np.testing.assert_array_equal(
        planted_category_of(world.source, ["i3", "i0"]), planted_category_of(world, ["i3", "i0"])
    )


def test_utc_month():
    stamps = np.array([EPOCH_SECONDS, EPOCH_SECONDS + 31 * 86400, 1609459199, 1609459200])
    # 2020-01-01, 2020-02-01, 2020-12-31T23:59:59, 2021-01-01
    np.testing.assert_array_equal(utc_month(stamps), [0, 1, 11, 0])


def test_preprocessing_keeps_the_whole_world_and_its_truth(world):
    from hm4sr_core.data.preprocess import preprocess

    ds = preprocess(world)
    assert len(ds.interactions) == len(world.interactions)
    assert ds.num_items == 200 and ds.num_users == 300
    # The truth travels in Dataset.source and still names each item's category.
    planted = planted_category_of(ds, ds.items["token"])
    names = planted_truth(ds).category_names
    got = [names[c] for c in planted]
    assert got == [ds.category_names[k] for k in ds.categories[1:].argmax(1)]
