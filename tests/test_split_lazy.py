"""Tests for the lazily built split parts (issue 13): build_split describes the parts and
builds each on first access, Split.hash digests a part not built in chunks of rows, and
train.item_popularity counts without the prefix layout. The oracle is the eager
implementation as it was before (kept below, unchanged): every part, hash and count must
equal it bit for bit."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest

from hm4sr_core.config import SplitConfig
from hm4sr_core.data.splits import PART_NAMES, SplitPart, build_split
from hm4sr_core.train import item_popularity

# --------------------------------------------------------------------------- oracle: the eager build


def _old_gather_windows(items, times, ends, lengths, max_length):
    n = len(ends)
    cols = np.arange(max_length)
    starts = ends - lengths
    index = starts[:, None] + cols[None, :]
    valid = cols[None, :] < lengths[:, None]
    index = np.where(valid, index, 0)
    out_items = np.where(valid, items[index], 0).astype(np.int64)
    out_times = np.where(valid, times[index], 0).astype(np.int64)
    return out_items.reshape(n, max_length), out_times.reshape(n, max_length)


def _old_examples(items, times, users, target_pos, history_start, max_length):
    lengths = np.minimum(target_pos - history_start, max_length).astype(np.int64)
    seq_items, seq_times = _old_gather_windows(items, times, target_pos, lengths, max_length)
    return SplitPart(seq_items, seq_times, lengths, items[target_pos].astype(np.int64),
                     users[target_pos].astype(np.int64), times[target_pos].astype(np.int64))


def _old_dense_windows(items, times, users, seq_start, seq_end, max_length):
    n_inputs = seq_end - seq_start - 1
    keep = n_inputs >= 1
    seq_start, seq_end, n_inputs = seq_start[keep], seq_end[keep], n_inputs[keep]
    n_windows = (n_inputs + max_length - 1) // max_length
    user_of_window = np.repeat(np.arange(len(seq_start)), n_windows)
    k = np.arange(n_windows.sum()) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
    win_end = seq_end[user_of_window] - 1 - k * max_length
    win_len = np.minimum(win_end - seq_start[user_of_window], max_length)
    inp_items, inp_times = _old_gather_windows(items, times, win_end, win_len, max_length)
    tgt_items, _ = _old_gather_windows(items, times, win_end + 1, win_len, max_length)
    return SplitPart(inp_items, inp_times, win_len.astype(np.int64), items[win_end].astype(np.int64),
                     users[win_end].astype(np.int64), times[win_end].astype(np.int64), position_targets=tgt_items)


def _old_build(ds, config):
    """The four parts in hash order, as build_split built them eagerly."""
    inter = ds.interactions
    users = inter["user"].to_numpy(np.int64)
    items = inter["item"].to_numpy(np.int64)
    times = inter["timestamp"].to_numpy(np.int64)
    T = config.max_length
    change = np.flatnonzero(np.diff(users)) + 1
    starts, ends = np.concatenate([[0], change]), np.concatenate([change, [len(users)]])
    if config.kind == "leave_one_out":
        ok = (ends - starts) >= 3
        starts, ends = starts[ok], ends[ok]
        test = _old_examples(items, times, users, ends - 1, starts, T)
        valid = _old_examples(items, times, users, ends - 2, starts, T)
        n_train = (ends - 2) - (starts + 1)
        dense = _old_dense_windows(items, times, users, starts, ends - 2, T)
        before_v = None
    else:
        t_v = int(np.quantile(times, config.valid_quantile))
        t_c = int(np.quantile(times, config.test_quantile))
        before_v = starts + np.array([np.searchsorted(times[s:e], t_v) for s, e in zip(starts, ends)])
        before_c = starts + np.array([np.searchsorted(times[s:e], t_c) for s, e in zip(starts, ends)])
        v_ok = (before_v > starts) & (before_v < before_c)
        valid = _old_examples(items, times, users, before_v[v_ok], starts[v_ok], T)
        t_ok = (before_c > starts) & (before_c < ends)
        test = _old_examples(items, times, users, before_c[t_ok], starts[t_ok], T)
        n_train = np.maximum(before_v - starts - 1, 0)
        dense = _old_dense_windows(items, times, users, starts, before_v, T)
    owner = np.repeat(np.arange(len(starts)), n_train)
    offset = np.arange(n_train.sum()) - np.repeat(np.cumsum(n_train) - n_train, n_train)
    train_pos = starts[owner] + 1 + offset
    prefix = _old_examples(items, times, users, train_pos, starts[owner], T)
    return {"train_prefix": prefix, "train_dense": dense, "valid": valid, "test": test}


def _old_hash(kind, parts):
    h = hashlib.sha256(kind.encode())
    for name in PART_NAMES:
        for f in fields(parts[name]):
            v = getattr(parts[name], f.name)
            if v is not None:
                h.update(f.name.encode())
                h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def _old_popularity(prefix, num_items):
    seen = np.concatenate([prefix.items[prefix.lengths == 1, 0], prefix.targets])
    return np.bincount(seen, minlength=num_items + 1).astype(np.float64)


def _assert_same_part(got, want, where):
    for f in fields(SplitPart):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if b is None:
            assert a is None, f"{where}.{f.name}: expected None"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}.{f.name}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=f"{where}.{f.name}")


# --------------------------------------------------------------------------- data


def _random_ds(base, seed: int, n_users: int = 40, num_items: int = 30):
    """``base`` with random interactions: lengths 1..25 (users the splits drop included),
    times increasing within each user and overlapping across users."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 26, n_users)
    users = np.repeat(np.arange(n_users), lengths)
    items = rng.integers(1, num_items + 1, len(users))
    times = np.concatenate([np.sort(rng.choice(10_000, n, replace=False)) + 1 for n in lengths])
    inter = pd.DataFrame({"user": users.astype(np.int64), "item": items.astype(np.int64),
                          "timestamp": times.astype(np.int64)})
    return dataclasses.replace(base, interactions=inter)


CASES = [(kind, T) for kind in ("leave_one_out", "temporal") for T in (2, 3, 10)]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind,T", CASES)
@pytest.mark.parametrize("chunk_rows", [1, 7, 65536])
def test_hash_without_building_equals_the_eager_hash(tiny_ds, kind, T, chunk_rows):
    for ds in (tiny_ds, *(_random_ds(tiny_ds, seed) for seed in range(3))):
        want = _old_hash(kind, _old_build(ds, SplitConfig(kind=kind, max_length=T)))
        split = build_split(ds, SplitConfig(kind=kind, max_length=T))
        assert split.hash(chunk_rows=chunk_rows) == want
        assert not any(split.is_built(p) for p in PART_NAMES), "hashing must build no part"
        _ = split.train_prefix, split.valid  # half built, half not: the same digest
        assert split.hash(chunk_rows=chunk_rows) == want


def test_chunks_really_split_the_prefix_part(tiny_ds):
    """The 1-row chunks above are many chunks: the tiny prefix part has hundreds of rows."""
    assert build_split(tiny_ds, SplitConfig(max_length=10)).size("train_prefix") > 300


@pytest.mark.parametrize("kind,T", CASES)
def test_built_parts_equal_the_eager_build(tiny_ds, kind, T):
    for ds in (tiny_ds, *(_random_ds(tiny_ds, seed) for seed in range(3))):
        want = _old_build(ds, SplitConfig(kind=kind, max_length=T))
        split = build_split(ds, SplitConfig(kind=kind, max_length=T))
        for name in PART_NAMES:
            assert split.size(name) == len(want[name])
            head = split.head(name, 5)
            _assert_same_part(head, SplitPart(**{f.name: (getattr(want[name], f.name)[:5]
                                                          if getattr(want[name], f.name) is not None else None)
                                                 for f in fields(SplitPart)}), f"{kind}/T={T}/{name} head")
            assert not split.is_built(name)
            part = getattr(split, name)
            assert split.is_built(name) and getattr(split, name) is part, "built once, then kept"
            _assert_same_part(part, want[name], f"{kind}/T={T}/{name}")
        assert split.train("prefix") is split.train_prefix and split.train("dense") is split.train_dense


@pytest.mark.parametrize("kind,T", CASES)
def test_item_popularity_without_the_prefix_part(tiny_ds, kind, T):
    for ds in (tiny_ds, *(_random_ds(tiny_ds, seed) for seed in range(3))):
        want = _old_popularity(_old_build(ds, SplitConfig(kind=kind, max_length=T))["train_prefix"], ds.num_items)
        split = build_split(ds, SplitConfig(kind=kind, max_length=T))
        got = item_popularity(split, ds.num_items)
        assert not split.is_built("train_prefix")
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        _ = split.train_prefix
        np.testing.assert_array_equal(item_popularity(split, ds.num_items), want)  # from the built part too


def test_dense_training_never_builds_the_prefix_part(tiny_ds, tiny_model_config, tiny_train_config):
    from hm4sr_core.train import train
    split = build_split(tiny_ds, SplitConfig(max_length=tiny_model_config.max_length))
    cfg = dataclasses.replace(tiny_train_config, mode="dense", epochs=1)
    result = train(tiny_ds, tiny_model_config, cfg, split=split, progress=False)
    assert not split.is_built("train_prefix")
    assert split.is_built("train_dense") and split.is_built("valid") and split.is_built("test")
    assert result.record["split_hash"] == _old_hash("leave_one_out", _old_build(
        tiny_ds, SplitConfig(max_length=tiny_model_config.max_length)))


def test_bad_part_name_and_chunk_size_are_refused(tiny_split):
    with pytest.raises(ValueError, match="unknown split part 'train'.*train_prefix, train_dense, valid, test"):
        tiny_split.is_built("train")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        tiny_split.hash(chunk_rows=0)


def test_columns_of_a_built_part_give_none_for_a_field_it_lacks(tiny_ds):
    """A prefix part has no position_targets: columns() says None for it whether the part is
    built or not (it used to fail on a built part)."""
    split = build_split(tiny_ds, SplitConfig(max_length=10))
    lazy = next(split.columns("train_prefix", ("position_targets", "lengths")))
    split.train_prefix  # build it
    built = next(split.columns("train_prefix", ("position_targets", "lengths")))
    assert lazy["position_targets"] is None and built["position_targets"] is None
    assert np.array_equal(lazy["lengths"], built["lengths"])
