"""Tests for hm4sr_core.data.splits: no leakage on the built tensors (evaluation.md 3),
prefix and dense layouts over the same examples, the split hash, seeded batches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_FORWARD_TERMS, assert_float_close

from hm4sr_core.config import PreprocessConfig, SplitConfig
from hm4sr_core.data.preprocess import preprocess
from hm4sr_core.data.schema import Dataset
from hm4sr_core.data.splits import build_split, iterate_batches
from hm4sr_core.model import build_model


def _real(part):
    """(n, T) bool: real (non-padding) positions, checked against the lengths."""
    real = np.arange(part.items.shape[1])[None, :] < part.lengths[:, None]
    assert ((part.items > 0) == real).all(), "items must be > 0 exactly at the first `length` positions"
    assert (part.timestamps[~real] == 0).all(), "padding timestamps must be 0"
    return real


def _user_events(ds) -> dict[int, set[tuple[int, int]]]:
    """Per user, the (item, timestamp) pairs they really have."""
    out: dict[int, set] = {}
    for u, i, t in ds.interactions[["user", "item", "timestamp"]].itertuples(index=False):
        out.setdefault(u, set()).add((i, t))
    return out


def _check_dense_targets(part):
    """Position target j is the input at j+1, and the last one is the row's target: so
    bounding the inputs' and the target's timestamps bounds every position target."""
    for row, n in enumerate(part.lengths):
        np.testing.assert_array_equal(part.position_targets[row, : n - 1], part.items[row, 1:n])
        assert part.position_targets[row, n - 1] == part.targets[row]
        assert (part.position_targets[row, n:] == 0).all()


def _check_training_before(part, limit_of_user, events):
    """Every input and target of ``part`` lies strictly before its user's limit in time and
    is one of the user's real interactions."""
    real = _real(part)
    limits = np.array([limit_of_user[u] for u in part.users])
    assert (np.where(real, part.timestamps, -1) < limits[:, None]).all()
    assert (part.target_timestamps < limits).all()
    for row in range(len(part)):
        u = int(part.users[row])
        pairs = set(zip(part.items[row][real[row]].tolist(), part.timestamps[row][real[row]].tolist()))
        assert pairs <= events[u]
        assert (int(part.targets[row]), int(part.target_timestamps[row])) in events[u]


def test_leave_one_out_has_no_leakage(tiny_ds, tiny_split):
    assert tiny_ds.stats["zero_gap_share"] == 0.0  # strictly increasing times: "before" is unambiguous
    events = _user_events(tiny_ds)
    sp = tiny_split
    valid_time = dict(zip(sp.valid.users.tolist(), sp.valid.target_timestamps.tolist()))
    test_time = dict(zip(sp.test.users.tolist(), sp.test.target_timestamps.tolist()))
    assert len(valid_time) == len(test_time) == tiny_ds.num_users
    for part in (sp.train_prefix, sp.train_dense):
        assert len(part) > 0
        _check_training_before(part, valid_time, events)
    _check_dense_targets(sp.train_dense)
    # validation histories stop before the validation target, test ones before the test target
    _check_training_before(sp.valid, {u: t + 1 for u, t in valid_time.items()}, events)
    for part, times in ((sp.valid, valid_time), (sp.test, test_time)):
        real = _real(part)
        assert (np.where(real, part.timestamps, -1) < part.target_timestamps[:, None]).all()
    assert all(valid_time[u] < test_time[u] for u in valid_time)
    # each interaction is the first item, a training target, the validation or the test target
    per_user = tiny_ds.interactions.groupby("user").size()
    train_targets = Counter(sp.train_prefix.users.tolist())
    assert all(train_targets[u] == per_user[u] - 3 for u in per_user.index)
    last_two = tiny_ds.interactions.groupby("user").tail(2)
    assert set(zip(last_two["user"], last_two["item"], last_two["timestamp"])) == \
        set(zip(sp.valid.users, sp.valid.targets, sp.valid.target_timestamps)) | \
        set(zip(sp.test.users, sp.test.targets, sp.test.target_timestamps))


def test_temporal_split_has_no_leakage(tiny_ds, tiny_temporal_split):
    sp = tiny_temporal_split
    t_v, t_c = sp.cutoffs["valid"], sp.cutoffs["test"]
    assert t_v < t_c
    events = _user_events(tiny_ds)
    everyone_before_tv = {u: t_v for u in events}
    for part in (sp.train_prefix, sp.train_dense):
        assert len(part) > 0
        _check_training_before(part, everyone_before_tv, events)
    _check_dense_targets(sp.train_dense)
    assert len(sp.valid) > 0 and len(sp.test) > 0
    _check_training_before(sp.valid, {u: t_c for u in events}, events)  # real events, all before t_c
    for part, cut in ((sp.valid, t_v), (sp.test, t_c)):
        real = _real(part)
        assert (np.where(real, part.timestamps, -1) < cut).all()  # histories end before the cut
    assert ((sp.valid.target_timestamps >= t_v) & (sp.valid.target_timestamps < t_c)).all()
    assert (sp.test.target_timestamps >= t_c).all()
    # a validation/test target is the user's first interaction at/after the cut
    inter = tiny_ds.interactions
    for part, cut in ((sp.valid, t_v), (sp.test, t_c)):
        first_after = inter[inter["timestamp"] >= cut].groupby("user").first()
        for u, item, t in zip(part.users, part.targets, part.target_timestamps):
            assert (first_after.loc[u, "item"], first_after.loc[u, "timestamp"]) == (item, t)
    # every training interaction before t_v is used: as a target, or as a user's first item
    before = inter[inter["timestamp"] < t_v]
    firsts = before.groupby("user").head(1)
    assert len(sp.train_prefix) == len(before) - len(firsts)


def test_temporal_cutoff_excludes_interactions_at_the_cutoff(make_raw):
    # ten users, timestamps 1..10 each: the 0.5 quantile is 5 or 6, which is a real time
    rows = [(f"u{u}", f"i{(u + k) % 7}", k) for u in range(10) for k in range(1, 11)]
    ds = preprocess(make_raw(rows), PreprocessConfig(user_core=0, item_core=0))
    sp = build_split(ds, SplitConfig(kind="temporal", valid_quantile=0.5, test_quantile=0.8, max_length=4))
    t_v = sp.cutoffs["valid"]
    assert t_v in set(range(1, 11))
    for part in (sp.train_prefix, sp.train_dense):
        assert part.timestamps.max() < t_v and part.target_timestamps.max() < t_v
    assert (sp.valid.target_timestamps == t_v).all()


def test_prefix_and_dense_hold_the_same_examples(tiny_split):
    sp = tiny_split
    prefix, dense = sp.train_prefix, sp.train_dense
    last = prefix.items[np.arange(len(prefix)), prefix.lengths - 1]
    from_prefix = Counter(zip(prefix.users.tolist(), prefix.targets.tolist(), last.tolist()))
    from_dense = Counter()
    for row in range(len(dense)):
        for j in range(dense.lengths[row]):
            from_dense[(int(dense.users[row]), int(dense.position_targets[row, j]), int(dense.items[row, j]))] += 1
    assert from_dense == from_prefix
    assert sum(from_prefix.values()) == len(prefix)
    # long sequences are cut into several windows (T = 10): this data exercises that
    assert len(dense) > len(np.unique(dense.users))


def test_dense_position_equals_the_prefix_of_that_length(tiny_ds, tiny_split):
    prefix, dense = tiny_split.train_prefix, tiny_split.train_dense
    lookup = {}
    for r in range(len(prefix)):
        n = prefix.lengths[r]
        lookup[(int(prefix.users[r]), prefix.items[r, :n].tobytes(), prefix.timestamps[r, :n].tobytes())] = \
            int(prefix.targets[r])
    first_time = tiny_ds.interactions.groupby("user")["timestamp"].min()
    checked = 0
    for r in range(len(dense)):
        u = int(dense.users[r])
        if dense.timestamps[r, 0] != first_time[u]:
            continue  # a later window: its history is cut at the window's start
        for j in range(dense.lengths[r]):
            key = (u, dense.items[r, : j + 1].tobytes(), dense.timestamps[r, : j + 1].tobytes())
            assert lookup[key] == dense.position_targets[r, j]
            checked += 1
    assert checked > len(prefix) // 2


def test_windows_are_left_aligned_and_padded(tiny_split):
    for part in (tiny_split.train_prefix, tiny_split.train_dense, tiny_split.valid, tiny_split.test):
        _real(part)
        assert part.lengths.min() >= 1 and part.lengths.max() <= tiny_split.max_length
        assert part.items.shape == part.timestamps.shape == (len(part), tiny_split.max_length)


def _perturbed(ds: Dataset, interactions: pd.DataFrame) -> Dataset:
    return Dataset(ds.name, interactions, ds.items, ds.user_tokens, ds.category_names, ds.categories,
                   ds.modalities, ds.preprocessing, ds.source, ds.stats)


def test_split_hash_is_stable_and_tracks_the_data(tiny_ds, tiny_split):
    h = tiny_split.hash()
    assert build_split(tiny_ds, SplitConfig(max_length=10)).hash() == h
    assert build_split(tiny_ds, SplitConfig(kind="temporal", max_length=10)).hash() != h
    assert build_split(tiny_ds, SplitConfig(max_length=9)).hash() != h
    shifted = tiny_ds.interactions.copy()
    shifted.loc[5, "timestamp"] += 1  # one second on one interaction
    assert build_split(_perturbed(tiny_ds, shifted), SplitConfig(max_length=10)).hash() != h
    dropped = tiny_ds.interactions.drop(index=7).reset_index(drop=True)
    assert build_split(_perturbed(tiny_ds, dropped), SplitConfig(max_length=10)).hash() != h


def test_iterate_batches_order_is_seeded(tiny_split):
    part = tiny_split.train_prefix

    def order(seed):
        gen = torch.Generator().manual_seed(seed)
        batches = list(iterate_batches(part, 50, shuffle=True, generator=gen))
        return torch.cat([b.users * 1000 + b.targets for b in batches]), [b.size for b in batches]

    a, sizes = order(5)
    b, _ = order(5)
    c, _ = order(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sizes[:-1] == [50] * (len(sizes) - 1) and sum(sizes) == len(part)
    # every example exactly once: the shuffled keys are a permutation of the unshuffled ones
    plain = torch.cat([x.users * 1000 + x.targets for x in iterate_batches(part, 50)])
    assert torch.equal(a.sort().values, plain.sort().values)


def test_trimming_keeps_what_matters_and_changes_no_output(tiny_ds, tiny_split, tiny_model_config):
    torch.manual_seed(0)
    model = build_model(tiny_model_config, tiny_ds).eval()
    part = tiny_split.train_prefix  # rows run through each user's prefixes: short batches
    trimmed = list(iterate_batches(part, 4))[:15]
    full = list(iterate_batches(part, 4, trim=False))[:15]
    assert any(b.items.shape[1] < part.items.shape[1] for b in trimmed)  # trimming happened
    for a, b in zip(trimmed, full):
        assert a.items.shape[1] == int(a.lengths.max())
        assert torch.equal(b.items[:, : a.items.shape[1]], a.items)
        assert (b.items[:, a.items.shape[1]:] == 0).all()
        with torch.no_grad():  # other widths, other kernel shapes: a forward's rounding apart
            assert_float_close(model.full_sort_predict(a), model.full_sort_predict(b), TINY_FORWARD_TERMS)


def test_dense_batches_carry_position_targets(tiny_split):
    batch = next(iterate_batches(tiny_split.train_dense, 16))
    assert batch.position_targets is not None and batch.position_targets.shape == batch.items.shape
    assert next(iterate_batches(tiny_split.train_prefix, 16)).position_targets is None


def test_train_history_covers_training_items_only(tiny_ds, tiny_split):
    history = tiny_split.train_history()
    inter = tiny_ds.interactions
    for u in (0, 7, 33):
        rows = inter[inter["user"] == u]
        expected = np.unique(rows["item"].to_numpy()[:-2])  # all but validation and test targets
        np.testing.assert_array_equal(history[u], expected)


def test_unknown_training_mode_raises(tiny_split):
    with pytest.raises(ValueError, match="'prefix' or 'dense'"):
        tiny_split.train("windows")


def test_length_buckets_cover_every_example_once_and_cut_padding():
    from hm4sr_core.data.splits import batch_order
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 51, (1000,), generator=g)
    plain = batch_order(lengths, 10, shuffle=True, bucket=False, generator=torch.Generator().manual_seed(1))
    bucketed = batch_order(lengths, 10, shuffle=True, bucket=True, generator=torch.Generator().manual_seed(1))
    again = batch_order(lengths, 10, shuffle=True, bucket=True, generator=torch.Generator().manual_seed(1))
    assert sorted(torch.cat(bucketed).tolist()) == list(range(1000))
    assert all(torch.equal(a, b) for a, b in zip(bucketed, again))

    def padded(batches):
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    assert padded(bucketed) < 0.8 * padded(plain)
