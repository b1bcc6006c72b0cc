"""Tests for hm4sr_core.data.preprocess: validation, de-duplication, iterative k-core,
deterministic ordering, dense ids and feature alignment (paper section 5 protocol)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hm4sr_core.config import PreprocessConfig
from hm4sr_core.data.preprocess import deduplicate, k_core, preprocess
from hm4sr_core.data.schema import DataError, RawDataset, RawModality

NO_CORE = PreprocessConfig(user_core=0, item_core=0)


def _pairs(ds) -> set[tuple[str, str]]:
    """(user token, item token) of every interaction of a Dataset."""
    users = ds.user_tokens[ds.interactions["user"].to_numpy()]
    items = ds.items["token"].to_numpy()[ds.interactions["item"].to_numpy() - 1]
    return set(zip(users, items))


# --- k-core ---------------------------------------------------------------------


def test_k_core_is_iterative(make_raw):
    # 2-core. One pass (items, then users) drops item w, then user C (left with z only).
    # Only then does z fall to one interaction; dropping it leaves D with y alone, so D
    # goes too. A single pass would have kept D: (z, y).
    rows = [("A", "x", 1), ("A", "y", 2), ("B", "x", 1), ("B", "y", 2),
            ("C", "z", 1), ("C", "w", 2), ("D", "z", 1), ("D", "y", 2)]
    ds = preprocess(make_raw(rows), PreprocessConfig(user_core=2, item_core=2))
    assert _pairs(ds) == {("A", "x"), ("A", "y"), ("B", "x"), ("B", "y")}
    assert list(ds.user_tokens) == ["A", "B"]
    assert list(ds.items["token"]) == ["x", "y"]
    assert ds.preprocessing["rows_after_kcore"] == 4 and ds.preprocessing["rows_read"] == 8


def test_k_core_result_is_a_fixed_point(tiny_raw):
    ds = preprocess(tiny_raw, PreprocessConfig(user_core=9, item_core=9))
    assert ds.interactions.groupby("user").size().min() >= 9
    assert ds.interactions.groupby("item").size().min() >= 9
    # the filter really removed users and items (9-core: 47 users, 31 items here)
    assert ds.num_items < len(tiny_raw.items) and ds.num_users < 60


def test_k_core_that_empties_the_data_raises(make_raw):
    rows = [("A", "x", 1), ("A", "y", 2), ("B", "x", 3)]
    with pytest.raises(DataError, match="core filtering removed all 3 interactions"):
        preprocess(make_raw(rows), PreprocessConfig(user_core=5, item_core=5))


# --- de-duplication -----------------------------------------------------------------


@pytest.mark.parametrize("mode, expected", [
    ("none", [("a", 5), ("a", 1), ("a", 1), ("b", 3)]),
    ("exact", [("a", 5), ("a", 1), ("b", 3)]),
    ("first", [("a", 1), ("b", 3)]),  # the earliest (u, a), whatever the file order
])
def test_dedup_modes(make_raw, mode, expected):
    rows = [("u", "a", 5), ("u", "a", 1), ("u", "a", 1), ("u", "b", 3), ("v", "b", 2)]
    ds = preprocess(make_raw(rows), PreprocessConfig(dedup=mode, user_core=0, item_core=0))
    inter = ds.interactions[ds.interactions["user"] == 0]  # user "u"
    tokens = ds.items["token"].to_numpy()[inter["item"].to_numpy() - 1]
    got = sorted(zip(tokens, inter["timestamp"].tolist()))
    assert got == sorted(expected)
    assert ds.preprocessing["dedup"] == mode
    assert ds.preprocessing["rows_after_dedup"] == len(expected) + 1


# --- ordering and ids -----------------------------------------------------------------


def test_order_is_independent_of_input_row_order(tiny_raw):
    # Coarse (whole-day) timestamps create many same-second ties.
    inter = tiny_raw.interactions.copy()
    inter["timestamp"] = inter["timestamp"] // 86400 * 86400
    base = RawDataset(tiny_raw.name, tiny_raw.source, inter, tiny_raw.items, tiny_raw.modalities)
    reference = preprocess(base)
    ties = reference.interactions.duplicated(["user", "timestamp"], keep=False)
    assert ties.sum() > 50  # the test is about ties: make sure there are many
    for seed in (0, 1):
        shuffled = inter.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        ds = preprocess(RawDataset(tiny_raw.name, tiny_raw.source, shuffled, tiny_raw.items, tiny_raw.modalities))
        pd.testing.assert_frame_equal(ds.interactions, reference.interactions)
        pd.testing.assert_frame_equal(ds.items, reference.items)
        np.testing.assert_array_equal(ds.modalities["text"].features, reference.modalities["text"].features)
    # within (user, second) the item ids increase; across rows time never goes back
    frame = reference.interactions
    same = (frame["user"].diff() == 0) & (frame["timestamp"].diff() == 0)
    assert (frame["item"].diff()[same] > 0).all()
    assert (frame["timestamp"].diff()[frame["user"].diff() == 0] >= 0).all()


def test_same_second_items_ordered_by_item_id(make_raw):
    # numeric tokens are numbered numerically: "9" < "10" < "100"
    rows = [("u", "100", 7), ("u", "9", 7), ("u", "10", 7), ("u", "9", 3)]
    ds = preprocess(make_raw(rows), NO_CORE)
    assert list(ds.items["token"]) == ["9", "10", "100"]
    assert ds.interactions["item"].tolist() == [1, 1, 2, 3]
    assert ds.interactions["timestamp"].tolist() == [3, 7, 7, 7]


def test_ids_are_dense(tiny_ds):
    n = tiny_ds.num_items
    assert tiny_ds.items["item"].tolist() == list(range(1, n + 1))
    assert sorted(tiny_ds.interactions["item"].unique()) == list(range(1, n + 1))
    assert sorted(tiny_ds.interactions["user"].unique()) == list(range(tiny_ds.num_users))
    assert tiny_ds.categories.shape == (n + 1, len(tiny_ds.category_names))
    assert not tiny_ds.categories[0].any() and (tiny_ds.categories[1:].sum(1) == 1).all()
    for mod in tiny_ds.modalities.values():
        assert mod.features.shape[0] == n + 1 and not mod.features[0].any()
        assert not mod.available[0] and mod.available[1:].all()


def test_feature_rows_follow_item_ids(tiny_raw, tiny_ds):
    text = next(m for m in tiny_raw.modalities if m.name == "text")
    where = {str(t): r for r, t in enumerate(text.feature_items)}
    for i, token in enumerate(tiny_ds.items["token"], start=1):
        np.testing.assert_array_equal(tiny_ds.modalities["text"].features[i], text.features[where[token]])


def test_encoders_see_only_surviving_items(make_raw):
    seen = []

    def encoder(table):
        seen.extend(table["item"].tolist())
        return np.ones((len(table), 2), np.float32), np.ones(len(table), bool)

    rows = [("A", "x", 1), ("A", "y", 2), ("B", "x", 1), ("B", "y", 2), ("C", "lonely", 5), ("C", "x", 6)]
    mod = RawModality(name="text", provenance={"encoder": "counting"}, encoder=encoder)
    ds = preprocess(make_raw(rows, modalities=[mod]), PreprocessConfig(user_core=2, item_core=2))
    assert seen == ["x", "y"] and ds.modalities["text"].features.shape == (3, 2)


# --- validation errors ------------------------------------------------------------------


@pytest.mark.parametrize("bad, row, what", [
    (-5, 3, "seconds >= 0"),
    ("yesterday", 3, "finite number"),
    (float("nan"), 3, "finite number"),
    (float("inf"), 3, "finite number"),
])
def test_bad_timestamp_names_row_and_column(make_raw, bad, row, what):
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", bad), ("u", "d", 4)]
    with pytest.raises(DataError) as err:
        preprocess(make_raw(rows), NO_CORE)
    message = str(err.value)
    assert "hand.inter" in message and f"row {row}," in message and "'timestamp'" in message and what in message


def test_missing_user_names_row_and_column(make_raw):
    rows = [("u", "a", 1), (None, "b", 2)]
    with pytest.raises(DataError, match=r"row 2, column 'user'"):
        preprocess(make_raw(rows), NO_CORE)


def test_duplicate_item_ids_raise(make_raw):
    items = pd.DataFrame({"item": ["a", "b", "a"], "text": ["A", "B", "A again"], "categories": [[], [], []]})
    with pytest.raises(DataError, match="duplicate item id 'a'"):
        preprocess(make_raw([("u", "a", 1), ("u", "b", 2)], items=items), NO_CORE)


def test_duplicate_feature_rows_raise(make_raw, make_modality):
    mod = make_modality(["a", "b", "a"])
    with pytest.raises(DataError, match="item 'a' has more than one feature row"):
        preprocess(make_raw([("u", "a", 1), ("u", "b", 2)], modalities=[mod]), NO_CORE)


def test_nan_feature_raises_naming_the_item(make_raw, make_modality):
    values = np.array([[1.0, 2.0], [np.nan, 0.0]], np.float32)
    mod = make_modality(["a", "b"], values=values)
    with pytest.raises(DataError, match=r"text\.npy: features of item 'b' contain NaN"):
        preprocess(make_raw([("u", "a", 1), ("u", "b", 2)], modalities=[mod]), NO_CORE)


def test_item_without_features_rejected_unless_optional(make_raw, make_modality):
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 3)]
    strict = make_modality(["a", "c"], dim=2)  # "b" has no row
    with pytest.raises(DataError, match="item 'b' appears in the interactions but has no text features"):
        preprocess(make_raw(rows, modalities=[strict]), NO_CORE)

    optional = make_modality(["a", "c"], dim=2, optional=True)
    ds = preprocess(make_raw(rows, modalities=[optional]), NO_CORE)
    mod = ds.modalities["text"]
    assert mod.available.tolist() == [False, True, False, True]  # padding, a, b, c
    np.testing.assert_array_equal(mod.features, [[0, 0], [1, 1], [0, 0], [2, 2]])
    assert mod.provenance["available_items"] == 2

    # a row present but flagged unavailable is masked too, its values zeroed
    flagged = make_modality(["a", "b", "c"], dim=2, optional=True, available=np.array([True, False, True]))
    ds = preprocess(make_raw(rows, modalities=[flagged]), NO_CORE)
    assert ds.modalities["text"].available.tolist() == [False, True, False, True]
    assert not ds.modalities["text"].features[2].any()


def test_reserved_modality_name_raises(make_raw, make_modality):
    with pytest.raises(DataError, match="'id' used twice or reserved"):
        preprocess(make_raw([("u", "a", 1)], modalities=[make_modality(["a"], name="id")]), NO_CORE)


def test_stats_are_computed_from_the_filtered_data(tiny_ds):
    s = tiny_ds.stats
    lengths = tiny_ds.interactions.groupby("user").size()
    assert s["users"] == 60 and s["items"] == tiny_ds.num_items == 40
    assert s["interactions"] == len(tiny_ds.interactions)
    assert s["sparsity"] == pytest.approx(1 - len(tiny_ds.interactions) / (60 * 40))
    assert s["length_quantiles"]["max"] == lengths.max() and s["length_quantiles"]["min"] == lengths.min()
    assert s["zero_gap_share"] == 0.0  # synthetic timestamps strictly increase
    assert s["first_timestamp"] == tiny_ds.interactions["timestamp"].min()


# --- integer-coded filtering against the string implementation it replaced ------------------


def _string_oracle(frame: pd.DataFrame, dedup: str, user_core: int, item_core: int):
    """The DataFrame-of-strings pipeline preprocess ran before ids were coded to integers:
    (interactions with dense ids, sorted; user tokens; item tokens)."""
    frame = frame.assign(user=frame["user"].astype(str), item=frame["item"].astype(str))
    if dedup == "exact":
        frame = frame.drop_duplicates(["user", "item", "timestamp"])
    elif dedup == "first":
        frame = frame.sort_values(["user", "timestamp", "item"], kind="stable").drop_duplicates(["user", "item"])
    while True:
        n = len(frame)
        if item_core > 0:
            frame = frame[frame["item"].map(frame["item"].value_counts()) >= item_core]
        if user_core > 0:
            frame = frame[frame["user"].map(frame["user"].value_counts()) >= user_core]
        if len(frame) == n:
            break

    def order(tokens):
        unique = pd.unique(tokens)
        return sorted(unique, key=int) if all(t.isdigit() for t in unique) else sorted(unique)

    users, items = order(frame["user"]), order(frame["item"])
    ids = pd.DataFrame({
        "user": pd.Series(np.arange(len(users)), index=users).reindex(frame["user"]).to_numpy(np.int64),
        "item": pd.Series(np.arange(1, len(items) + 1), index=items).reindex(frame["item"]).to_numpy(np.int64),
        "timestamp": frame["timestamp"].to_numpy(np.int64),
    }).sort_values(["user", "timestamp", "item"], kind="stable").reset_index(drop=True)
    return ids, users, items


@pytest.mark.parametrize("seed", range(12))
def test_coded_filtering_matches_the_string_implementation(make_raw, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    numeric = seed % 3 == 0  # all-digit tokens are numbered numerically: "9" before "10"
    user_pool = [str(k) for k in rng.permutation(1000)[:40]] if numeric else [f"u{k}" for k in range(40)]
    item_pool = [str(k) for k in range(1, 31)] if numeric else [f"i{k:x}" for k in range(30)]
    # Skewed draws make k-core drop users and items in several rounds; coarse times make
    # exact duplicates and same-second ties.
    users = rng.choice(user_pool, size=n, p=np.arange(40, 0, -1) / 820)
    items = rng.choice(item_pool, size=n, p=np.arange(30, 0, -1) / 465)
    times = rng.integers(0, 12, size=n) * 100
    rows = list(zip(users.tolist(), items.tolist(), times.tolist()))
    rows += rows[: n // 10]  # exact repeats, some (user, item) pairs at other times already
    if numeric:
        rows = [(int(u) if k % 2 else u, i, t) for k, (u, i, t) in enumerate(rows)]  # 7 and "7": one user
    raw = make_raw(rows)
    for dedup in ("none", "exact", "first"):
        for core in (0, 2, 3, 5):
            config = PreprocessConfig(dedup=dedup, user_core=core, item_core=max(0, core - 1))
            expected, users_order, items_order = _string_oracle(raw.interactions, dedup, config.user_core,
                                                                config.item_core)
            if expected.empty:
                with pytest.raises(DataError, match="core filtering removed all"):
                    preprocess(raw, config)
                continue
            ds = preprocess(raw, config)
            pd.testing.assert_frame_equal(ds.interactions, expected)
            assert ds.user_tokens.tolist() == users_order and ds.items["token"].tolist() == items_order
            assert ds.preprocessing["rows_after_kcore"] == len(expected)


def test_k_core_and_deduplicate_on_codes():
    user = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    item = np.array([0, 1, 0, 1, 2, 3, 2, 1])  # test_k_core_is_iterative's rows, coded
    assert k_core(user, item, 2, 2).tolist() == [True, True, True, True, False, False, False, False]
    assert k_core(user, item, 0, 0).all() and not k_core(user, item, 9, 0).any()
    time = np.array([5, 1, 1, 1, 3, 3, 3, 3])
    repeated = (np.array([0, 0, 0, 1]), np.array([4, 4, 4, 4]), np.array([5, 1, 1, 1]))
    assert deduplicate(*repeated, "exact").tolist() == [True, True, False, True]
    assert deduplicate(*repeated, "first").tolist() == [False, True, False, True]  # the earliest, first in file
    assert deduplicate(*repeated, "none").all() and deduplicate(user, item, time, "exact").all()


def test_integer_tokens_printed_differently_have_a_fixed_order(make_raw):
    # "01" and "1" are both integer 1: ordered by their text, whatever the row order.
    rows = [("u", "1", 1), ("u", "01", 2), ("v", "2", 3), ("v", "01", 4)]
    for shuffled in (rows, rows[::-1]):
        ds = preprocess(make_raw(shuffled), NO_CORE)
        assert ds.items["token"].tolist() == ["01", "1", "2"]
