"""Training / validation / test examples as padded tensors, and a seeded batch loader.

Two splits (evaluation.md section 3):

- **leave-one-out** (paper): per user, the last item is the test target, the one before
  it the validation target; every earlier item is a training target.
- **temporal**: two global cut-offs t_v < t_c (quantiles of all interaction times).
  Training sees only interactions before t_v; a validation example is a user's first
  interaction in [t_v, t_c) with the history before t_v; a test example is the first
  interaction at or after t_c with the history before t_c.

Training examples come in two layouts over the *same* set of (history, target) pairs:

- ``prefix``: one row per training target, history = the (up to T) items before it.
- ``dense``: one row per window of a user's training sequence; ``position_targets[j]``
  is the item after position j, so a causal model's loss at j is the prefix example of
  length j+1 (truncated to the window). Long sequences are cut into non-overlapping
  windows of T counted back from the end.

Sequences are left-aligned (oldest first) and padded with item 0 / timestamp 0 after.

:func:`build_split` only describes the parts (a few numbers per user); each is built on its
first access and kept, so dense-mode training never builds the prefix layout (2 x n x T
int64: about 6.4 GB at 10^7 interactions), and :meth:`Split.hash` digests a part that is not
built chunk by chunk, with the same digest as over the built arrays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from ..config import SplitConfig
from .schema import Dataset


@dataclass
class SequenceBatch:
    """One batch of sequences: every field a tensor (dense-mode targets optional)."""

    items: torch.Tensor  # (B, T) int64 item ids, 0 = padding, left-aligned
    timestamps: torch.Tensor  # (B, T) int64 seconds, 0 at padding
    lengths: torch.Tensor  # (B,) int64 number of real items, >= 1
    targets: torch.Tensor  # (B,) int64 the item after the last real position
    users: torch.Tensor  # (B,) int64 user ids
    position_targets: torch.Tensor | None = None  # (B, T) int64 dense mode: item after each position, 0 = none

    def to(self, device: torch.device | str) -> "SequenceBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return SequenceBatch(**{k: (v.to(device, non_blocking=True) if v is not None else None)
                                for k, v in moved.items()})

    @property
    def size(self) -> int:
        return int(self.items.shape[0])


@dataclass
class SplitPart:
    """A set of examples as numpy arrays (one row per example)."""

    items: np.ndarray  # (n, T) int64
    timestamps: np.ndarray  # (n, T) int64
    lengths: np.ndarray  # (n,) int64
    targets: np.ndarray  # (n,) int64
    users: np.ndarray  # (n,) int64
    target_timestamps: np.ndarray  # (n,) int64, kept for leakage checks, never given to models
    position_targets: np.ndarray | None = None  # (n, T) int64 in dense layout

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def digest(self, h: "hashlib._Hash") -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                h.update(f.name.encode())
                h.update(np.ascontiguousarray(v))  # the buffer itself: tobytes() would copy it


class _Rows:
    """Where the rows of one part come from, so that the part can be built, in full or in
    chunks of rows, or hashed without ever being held (the prefix layout alone is about
    6.4 GB at 10^7 interactions).

    Rows come in groups (one per user, in row order). Row r of group g is the window of up
    to T items of the flat arrays ending (exclusive) at ``first_end[g] + step * r`` and
    starting no earlier than ``start[g]``; its target is the item at that end, and a dense
    row's ``position_targets`` are the same window shifted by one. Per group it keeps four
    numbers, and views of the dataset's columns."""

    def __init__(self, items: np.ndarray, times: np.ndarray, users: np.ndarray, start: np.ndarray,
                 first_end: np.ndarray, count: np.ndarray, step: int, max_length: int, dense: bool):
        self.items, self.times, self.users = items, times, users
        self.start, self.first_end, self.step = start, first_end, step
        self.offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)  # group g: rows offsets[g]..offsets[g+1]-1
        self.max_length, self.dense = max_length, dense

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def windows(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """End (exclusive, = the target's flat position) and length of rows a..b-1."""
        i = np.arange(a, b, dtype=np.int64)
        # "right": a group of no rows shares its offset with the next group, which owns row i
        g = np.searchsorted(self.offsets, i, side="right") - 1
        ends = self.first_end[g] + self.step * (i - self.offsets[g])
        return ends, np.minimum(ends - self.start[g], self.max_length).astype(np.int64)

    def column(self, name: str, ends: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
        """One :class:`SplitPart` field (or ``first_items``: the item at position 0) of the rows
        ``ends``/``lengths`` describe."""
        T = self.max_length
        if name == "items":
            return _gather(self.items, ends, lengths, T)
        if name == "timestamps":
            return _gather(self.times, ends, lengths, T)
        if name == "lengths":
            return lengths
        if name == "targets":
            return self.items[ends].astype(np.int64)
        if name == "users":
            return self.users[ends].astype(np.int64)
        if name == "target_timestamps":
            return self.times[ends].astype(np.int64)
        if name == "position_targets":
            return _gather(self.items, ends + 1, lengths, T) if self.dense else None
        if name == "first_items":
            return self.items[ends - lengths].astype(np.int64)
        raise ValueError(f"unknown column {name!r}: expected a SplitPart field or 'first_items'")

    def rows(self, a: int, b: int) -> SplitPart:
        """Rows a..b-1 as a :class:`SplitPart` (``rows(0, len(self))`` is the whole part)."""
        ends, lengths = self.windows(a, b)
        return SplitPart(**{f.name: self.column(f.name, ends, lengths) for f in fields(SplitPart)})

    def chunks(self, names: tuple[str, ...], chunk_rows: int) -> Iterator[dict]:
        for a in range(0, len(self), chunk_rows):
            ends, lengths = self.windows(a, min(a + chunk_rows, len(self)))
            yield {name: self.column(name, ends, lengths) for name in names}

    def digest(self, h: "hashlib._Hash", chunk_rows: int) -> None:
        """What ``self.rows(0, len(self)).digest(h)`` adds, one field at a time in chunks of
        rows: a C-ordered array's bytes are its rows' bytes in order, and sha256 is a stream."""
        for f in fields(SplitPart):
            if f.name == "position_targets" and not self.dense:
                continue  # None in the built part: SplitPart.digest skips it
            h.update(f.name.encode())
            for cols in self.chunks((f.name,), chunk_rows):
                h.update(np.ascontiguousarray(cols[f.name]))


PART_NAMES = ("train_prefix", "train_dense", "valid", "test")  # hash order
HASH_CHUNK_ROWS = 65536  # rows a part not yet built is hashed (or counted) by: ~26 MB a (rows, 50) int64 array


class _Part:
    """A :class:`Split` attribute built from its :class:`_Rows` on first access, then kept."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, split: "Split | None", owner=None):
        if split is None:
            return self
        value = split._parts[self.name]
        if isinstance(value, _Rows):
            value = split._parts[self.name] = value.rows(0, len(value))
        return value

    def __set__(self, split: "Split", part: SplitPart) -> None:
        split._parts[self.name] = part


class Split:
    """All examples of one split of one dataset.

    :func:`build_split` gives each part as a recipe; a part is built on first access (then
    kept), so dense-mode training never builds the prefix layout. :meth:`hash` and
    :meth:`columns` read parts not yet built in chunks of rows, without building them.
    """

    train_prefix = _Part()
    train_dense = _Part()
    valid = _Part()
    test = _Part()

    def __init__(self, kind: str, train_prefix: "SplitPart | _Rows", train_dense: "SplitPart | _Rows",
                 valid: "SplitPart | _Rows", test: "SplitPart | _Rows", cutoffs: dict, max_length: int):
        self.kind = kind
        self._parts = {"train_prefix": train_prefix, "train_dense": train_dense, "valid": valid, "test": test}
        self.cutoffs = cutoffs  # temporal: {"valid": t_v, "test": t_c}; leave-one-out: {}
        self.max_length = max_length

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}{'' if self.is_built(k) else ' (not built)'}" for k, v in self._parts.items())
        return f"Split({self.kind!r}, {sizes}, max_length={self.max_length})"

    def _check_part(self, name: str) -> None:
        if name not in PART_NAMES:
            raise ValueError(f"unknown split part {name!r}: expected one of {', '.join(PART_NAMES)}")

    def is_built(self, name: str) -> bool:
        """Whether part ``name`` (one of ``PART_NAMES``) is held as arrays."""
        self._check_part(name)
        return isinstance(self._parts[name], SplitPart)

    def size(self, name: str) -> int:
        """Rows of part ``name``, without building it."""
        self._check_part(name)
        return len(self._parts[name])

    def head(self, name: str, n: int) -> SplitPart:
        """The first ``n`` rows of part ``name``, building only those when it is not built."""
        self._check_part(name)
        value = self._parts[name]
        n = min(n, len(value))
        if isinstance(value, _Rows):
            return value.rows(0, n)
        return SplitPart(**{f.name: (getattr(value, f.name)[:n] if getattr(value, f.name) is not None else None)
                            for f in fields(SplitPart)})

    def columns(self, name: str, names: tuple[str, ...], chunk_rows: int = HASH_CHUNK_ROWS) -> Iterator[dict]:
        """Chunks of rows of part ``name`` as {column: array}, without building the part when
        it is not built. Columns: SplitPart fields, and ``first_items`` (the item at position 0)."""
        self._check_part(name)
        value = self._parts[name]
        if isinstance(value, _Rows):
            yield from value.chunks(names, chunk_rows)
            return
        for a in range(0, len(value), chunk_rows):
            rows = slice(a, a + chunk_rows)
            yield {c: (value.items[rows, 0] if c == "first_items"
                       else None if getattr(value, c) is None else getattr(value, c)[rows]) for c in names}

    def train(self, mode: str) -> SplitPart:
        if mode not in ("prefix", "dense"):
            raise ValueError(f"training mode must be 'prefix' or 'dense', got {mode!r}")
        return self.train_prefix if mode == "prefix" else self.train_dense

    def hash(self, chunk_rows: int = HASH_CHUNK_ROWS) -> str:
        """sha256 over every array of every part: changes whenever any example changes. A part
        not built is digested in chunks of ``chunk_rows`` rows (same digest, bounded memory)."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        h = hashlib.sha256(self.kind.encode())
        for name in PART_NAMES:
            value = self._parts[name]
            if isinstance(value, _Rows):
                value.digest(h, chunk_rows)
            else:
                value.digest(h)
        return h.hexdigest()

    def train_history(self) -> list[np.ndarray]:
        """Per user, the item ids they interacted with in training inputs or targets."""
        part = self.train_dense
        n_users = int(max(part.users.max(initial=-1), self.test.users.max(initial=-1),
                          self.valid.users.max(initial=-1))) + 1
        out: list[list[np.ndarray]] = [[] for _ in range(n_users)]
        for u, row, tgt in zip(part.users, part.items, part.position_targets):
            out[u].append(row[row > 0])
            out[u].append(tgt[tgt > 0])
        return [np.unique(np.concatenate(x)) if x else np.zeros(0, np.int64) for x in out]


def _user_boundaries(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end offsets of each user's run in a user-sorted array."""
    change = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(users)]])
    return starts, ends


def _gather(values: np.ndarray, ends: np.ndarray, lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Rows of ``values`` ending (exclusive) at ``ends`` with ``lengths`` entries,
    left-aligned into an (n, T) int64 array padded with 0. Vectorised: no per-row Python loop."""
    n = len(ends)
    cols = np.arange(max_length)
    valid = cols[None, :] < lengths[:, None]
    index = np.where(valid, (ends - lengths)[:, None] + cols[None, :], 0)  # (n, T)
    return np.where(valid, values[index], 0).astype(np.int64).reshape(n, max_length)


def _examples(items, times, users, target_pos, history_start, max_length) -> _Rows:
    """Prefix examples whose targets sit at flat positions ``target_pos`` and whose history
    starts no earlier than ``history_start`` (same shape), truncated to the last T items."""
    return _Rows(items, times, users, history_start, target_pos, np.ones(len(target_pos), np.int64), 1,
                 max_length, dense=False)


def _prefix_rows(items, times, users, starts, n_train, max_length) -> _Rows:
    """One prefix example per training target: flat positions starts+1 .. starts+n_train of
    each user, history from the user's first item."""
    return _Rows(items, times, users, starts, starts + 1, n_train, 1, max_length, dense=False)


def _dense_windows(items, times, users, seq_start, seq_end, max_length) -> _Rows:
    """Dense windows over each user's training run [seq_start, seq_end) (flat offsets;
    the last item is only a target). Windows of T inputs counted back from the end:
    window k (0 = last) of a user covers inputs ending at seq_end - 1 - k*T."""
    n_inputs = seq_end - seq_start - 1  # positions that have a next item
    keep = n_inputs >= 1
    seq_start, seq_end, n_inputs = seq_start[keep], seq_end[keep], n_inputs[keep]
    n_windows = (n_inputs + max_length - 1) // max_length
    return _Rows(items, times, users, seq_start, seq_end - 1, n_windows, -max_length, max_length, dense=True)


def build_split(ds: Dataset, config: SplitConfig = SplitConfig()) -> Split:
    """Every example of ``config.kind`` for ``ds`` (vectorised over users), each part built
    on its first access (see :class:`Split`)."""
    inter = ds.interactions
    users = inter["user"].to_numpy(np.int64)
    items = inter["item"].to_numpy(np.int64)
    times = inter["timestamp"].to_numpy(np.int64)
    T = config.max_length
    starts, ends = _user_boundaries(users)

    if config.kind == "leave_one_out":
        ok = (ends - starts) >= 3  # need one training target, a validation and a test target
        starts, ends = starts[ok], ends[ok]
        test = _examples(items, times, users, ends - 1, starts, T)
        valid = _examples(items, times, users, ends - 2, starts, T)
        # training targets: positions starts+1 .. ends-3 of each user
        train_prefix = _prefix_rows(items, times, users, starts, (ends - 2) - (starts + 1), T)
        train_dense = _dense_windows(items, times, users, starts, ends - 2, T)
        cutoffs: dict = {}
    else:
        t_v = int(np.quantile(times, config.valid_quantile))
        t_c = int(np.quantile(times, config.test_quantile))
        if not t_v < t_c:
            raise ValueError(f"temporal cut-offs collapse (t_v={t_v}, t_c={t_c}); widen the quantiles")
        # per-user offsets of the first interaction at/after each cut-off (rows sorted by time)
        before_v = starts + np.array([np.searchsorted(times[s:e], t_v) for s, e in zip(starts, ends)])
        before_c = starts + np.array([np.searchsorted(times[s:e], t_c) for s, e in zip(starts, ends)])
        has_hist_v = before_v > starts
        v_ok = has_hist_v & (before_v < before_c)  # an interaction inside [t_v, t_c)
        valid = _examples(items, times, users, before_v[v_ok], starts[v_ok], T)
        t_ok = (before_c > starts) & (before_c < ends)
        test = _examples(items, times, users, before_c[t_ok], starts[t_ok], T)
        train_prefix = _prefix_rows(items, times, users, starts, np.maximum(before_v - starts - 1, 0), T)
        train_dense = _dense_windows(items, times, users, starts, before_v, T)
        cutoffs = {"valid": t_v, "test": t_c}
    return Split(config.kind, train_prefix, train_dense, valid, test, cutoffs, T)


BUCKET_POOL = 50  # batches per pool when bucketing by length


def batch_order(lengths: torch.Tensor, batch_size: int, *, shuffle: bool, bucket: bool,
                generator: torch.Generator | None) -> list[torch.Tensor]:
    """Row indices of each batch. ``bucket`` sorts each pool of ``BUCKET_POOL`` random
    batches by length before cutting it, then shuffles the batches: every example is
    still seen once per epoch, but a batch holds similar lengths, so trimming saves
    the padding work (about a fifth of prefix mode's tokens on ml-100k)."""
    n = len(lengths)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if not bucket:
        return list(order.split(batch_size))
    pool = batch_size * BUCKET_POOL
    batches = []
    for chunk in order.split(pool):
        ranked = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches.extend(ranked.split(batch_size))
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def iterate_batches(part: SplitPart, batch_size: int, *, shuffle: bool = False,
                    generator: torch.Generator | None = None, trim: bool = True,
                    bucket: bool = False) -> Iterator[SequenceBatch]:
    """Yield :class:`SequenceBatch` es over ``part``.

    ``shuffle`` draws the order from ``generator`` (seeded by the caller), so a run is
    reproducible. ``trim`` drops trailing all-padding columns of each batch, which
    changes no result (sequences are left-aligned) and saves work on short batches;
    ``bucket`` groups similar lengths (see :func:`batch_order`).
    """
    tensors = _as_tensors(part)
    for idx in batch_order(tensors["lengths"], batch_size, shuffle=shuffle, bucket=bucket, generator=generator):
        lengths = tensors["lengths"][idx]
        width = int(lengths.max()) if trim else tensors["items"].shape[1]
        yield SequenceBatch(
            items=tensors["items"][idx, :width],
            timestamps=tensors["timestamps"][idx, :width],
            lengths=lengths,
            targets=tensors["targets"][idx],
            users=tensors["users"][idx],
            position_targets=(tensors["position_targets"][idx, :width]
                              if tensors["position_targets"] is not None else None),
        )


def _as_tensors(part: SplitPart) -> dict:
    cache = getattr(part, "_tensors", None)
    if cache is None:
        cache = {f.name: (torch.from_numpy(np.ascontiguousarray(getattr(part, f.name)))
                          if getattr(part, f.name) is not None else None) for f in fields(part)}
        object.__setattr__(part, "_tensors", cache)
    return cache
