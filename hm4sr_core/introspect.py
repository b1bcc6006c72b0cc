"""Model outputs -> tidy pandas DataFrames, for the notebooks and the explorers in ``widgets``.

What lives here (hm4sr_model.md section 6, "where to look"):

- Interactive-MoE gates g_s per stream and position (paper section 3.2): :func:`gate_table`,
  summarised by :func:`expert_usage`, :func:`gate_by_category`, :func:`dominant_expert`.
- Temporal-MoE gates r per position (section 3.3): :func:`temporal_gate_table`; on a grid of
  (gap, date) with no data at all: :func:`temporal_gate_curve`, :func:`time_embedding_at`.
- The interval table at the buckets actually used (a one-day gap lands in bucket ~1641 =
  floor(100 log2 86401) + 2; the ones below are never reached with day-granular data):
  :func:`used_buckets`, :func:`interval_table`; the absolute-time embedding with and without
  normalised time (defect 2): :func:`absolute_time_embedding`, :func:`compare_absolute_time`.
- Each named loss per step and its share of the weighted total: :func:`loss_table`,
  :func:`smooth`; how hard each loss pulls on the shared weights: :func:`gradient_shares`.
- Item representations and a 2-D atlas of them: :func:`item_embeddings`,
  :func:`umap_projection`, :func:`atlas_table`.
- Whether time is used at all: :func:`time_control_table` (real / shuffled / zeroed timestamps).

Nothing here plots or trains; every function puts the model in eval mode (dropout off) for
its forward passes and restores the mode it found.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import fields
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from .config import LOSS_NAMES, SplitConfig, TrainConfig
from .data.schema import Dataset
from .data.splits import SequenceBatch, Split, SplitPart, build_split, iterate_batches
from .evaluate import evaluate, perturb_timestamps
from .model import FIRST_BUCKET, GAP_BUCKET_OFFSET, MAX_GAP_LOG2, PADDING_BUCKET, HM4SR

SECONDS_PER_DAY = 86_400.0
PART_NAMES = ("test", "valid", "train")
TIME_MODES = ("real", "shuffled", "zeroed")
# Below this many points UMAP's neighbour graph is too small to mean anything.
UMAP_MIN_POINTS = 10


# ----------------------------------------------------------------------------- helpers


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off and no autograd for the block; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _resolve_part(dataset: Dataset, part, max_length: int) -> SplitPart:
    """A SplitPart as given, or one of ``PART_NAMES`` of a leave-one-out split of ``dataset``
    ("train" = the dense training windows: whole training sequences, one or more per user)."""
    if isinstance(part, SplitPart):
        return part
    if isinstance(part, str) and part in PART_NAMES:
        split = build_split(dataset, SplitConfig(max_length=max_length))
        return split.train_dense if part == "train" else getattr(split, part)
    raise ValueError(f"part must be a SplitPart or one of {PART_NAMES}, got {part!r}")


def _item_lookup(dataset: Dataset) -> pd.DataFrame:
    """(N+1,) rows indexed by item id (row 0 = padding): token, title, first category name.

    Strings are categoricals so the long gate tables stay small."""
    items = dataset.items
    titles = items["title"] if "title" in items.columns else items["text"]
    first = [c[0] if len(c) else "(none)" for c in items["categories"]]
    frame = pd.DataFrame({
        "item_token": ["<pad>"] + items["token"].astype(str).tolist(),
        "title": ["<pad>"] + titles.astype(str).tolist(),
        "category": ["<pad>"] + first,
    })
    return frame.astype("category")


def gap_bucket(gaps_seconds, interval_scale: float = 100.0) -> np.ndarray:
    """Interval bucket of each gap, exactly as :class:`~hm4sr_core.model.TimeEmbedding` computes it.

    Args:
        gaps_seconds: (n,) gaps in seconds; NaN marks "first item of a sequence" (no gap).
        interval_scale: s in floor(s * log2(gap + 1)).
    Returns:
        (n,) int64: ``FIRST_BUCKET`` for NaN, else floor(s log2(max(gap, 0) + 1)) + 2, capped at
        the table's last row (gaps above 2**32 s share it).
    """
    g = torch.as_tensor(np.asarray(gaps_seconds, dtype=np.float64))
    first = torch.isnan(g)
    # Same dtype (float64) and the same ops as the model, so the floor lands on the same side.
    b = torch.floor(interval_scale * torch.log2(g.nan_to_num(0.0).clamp(min=0) + 1.0)).long() + GAP_BUCKET_OFFSET
    b = b.clamp(max=GAP_BUCKET_OFFSET + int(interval_scale * MAX_GAP_LOG2))
    return torch.where(first, torch.full_like(b, FIRST_BUCKET), b).numpy()


def bucket_start_seconds(buckets, interval_scale: float = 100.0) -> np.ndarray:
    """(n,) the smallest gap (seconds) that lands in each gap bucket: 2**((b - 2) / s) - 1.

    NaN for the padding (0) and first-item (1) buckets, which hold no gap."""
    b = np.asarray(buckets, dtype=np.float64)
    out = np.exp2((b - GAP_BUCKET_OFFSET) / interval_scale) - 1.0
    return np.where(b >= GAP_BUCKET_OFFSET, out, np.nan)


def _bucket_kind(buckets: np.ndarray) -> np.ndarray:
    return np.where(buckets == PADDING_BUCKET, "padding", np.where(buckets == FIRST_BUCKET, "first item", "gap"))


# ----------------------------------------------------------------------------- gates per position


def _position_frame(model: HM4SR, dataset: Dataset, part, max_users: int | None, batch_size: int,
                    time_mode: str):
    """One pass over ``part``: a frame with one row per real position, and the gates there.

    Returns (positions DataFrame (n rows), interactive gates (n, S, E) or None, temporal
    gates (n, E) or None)."""
    if time_mode not in TIME_MODES:
        raise ValueError(f"time_mode must be one of {TIME_MODES}, got {time_mode!r}")
    part = _resolve_part(dataset, part, model.config.max_length)
    examples = np.arange(len(part))
    if max_users is not None:
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1 or None, got {max_users}")
        keep_users = pd.unique(part.users)[:max_users]
        examples = examples[np.isin(part.users, keep_users)]
    sub = SplitPart(**{f.name: (getattr(part, f.name)[examples] if getattr(part, f.name) is not None else None)
                       for f in fields(SplitPart)})
    origin = int(dataset.stats["first_timestamp"])
    gen = torch.Generator().manual_seed(0)  # shuffled timestamps: the same permutation every call
    device = _device(model)
    cols: dict[str, list] = {k: [] for k in ("example", "user", "position", "item", "timestamp", "gap_seconds",
                                             "gap_bucket", "time_value")}
    interactive, temporal = [], []
    offset = 0
    with _eval_mode(model):
        for batch in iterate_batches(sub, batch_size):
            batch = perturb_timestamps(batch, time_mode, gen, origin)
            out = model(batch.to(device), introspect=True)
            real = (batch.items > 0).numpy()
            B, T = batch.items.shape
            ts = batch.timestamps.numpy()
            gaps = np.full((B, T), np.nan)
            gaps[:, 1:] = ts[:, 1:] - ts[:, :-1]
            if out.interval_buckets is not None:
                buckets = out.interval_buckets.cpu().numpy()
            else:  # a model without time still gets the bucket its gaps would fall in
                buckets = gap_bucket(gaps.ravel(), model.config.interval_scale).reshape(B, T)
            tv = (out.time_values.cpu().numpy() if out.time_values is not None
                  else (ts - origin) / SECONDS_PER_DAY)
            cols["example"].append(np.broadcast_to(examples[offset:offset + B, None], (B, T))[real])
            cols["user"].append(np.broadcast_to(batch.users.numpy()[:, None], (B, T))[real])
            cols["position"].append(np.broadcast_to(np.arange(T), (B, T))[real])
            cols["item"].append(batch.items.numpy()[real])
            cols["timestamp"].append(ts[real])
            cols["gap_seconds"].append(gaps[real])
            cols["gap_bucket"].append(buckets[real])
            cols["time_value"].append(tv[real])
            if out.interactive_gates is not None:
                interactive.append(out.interactive_gates.cpu().numpy()[real])  # (n, S, E)
            if out.temporal_gates is not None:
                temporal.append(out.temporal_gates.cpu().numpy()[real])  # (n, E)
            offset += B
    frame = pd.DataFrame({k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()})
    frame = frame.astype({"example": np.int64, "user": np.int64, "position": np.int64, "item": np.int64,
                          "timestamp": np.int64, "gap_bucket": np.int64})
    lookup = _item_lookup(dataset)
    for c in ("item_token", "title", "category"):
        frame[c] = lookup[c].take(frame["item"].to_numpy()).reset_index(drop=True)
    frame["user_token"] = pd.Categorical(np.asarray(dataset.user_tokens)[frame["user"].to_numpy()])
    frame["gap_days"] = frame["gap_seconds"] / SECONDS_PER_DAY
    frame["date"] = pd.to_datetime(frame["timestamp"], unit="s", utc=True)
    order = ["example", "user", "user_token", "position", "item", "item_token", "title", "category", "timestamp",
             "date", "gap_seconds", "gap_days", "gap_bucket", "time_value"]
    frame = frame[order]
    g_int = np.concatenate(interactive) if interactive else None
    g_tmp = np.concatenate(temporal) if temporal else None
    return frame, g_int, g_tmp


def gate_table(model: HM4SR, dataset: Dataset, part="test", *, max_users: int | None = None,
               batch_size: int = 512, time_mode: str = "real") -> pd.DataFrame:
    """Interactive-MoE gates g_s, one row per (example, position, stream, expert).

    Args:
        model: a trained :class:`HM4SR` with ``use_interactive_moe``.
        dataset: the dataset the model was built for (item titles, categories, user tokens).
        part: a :class:`SplitPart`, or "test" / "valid" (one example per user, leave-one-out)
            or "train" (the dense training windows).
        max_users: keep the first this many users of ``part`` (None = all). Rows grow as
            users x positions x S x E, so pass this on real data.
        batch_size: examples per forward pass.
        time_mode: timestamps fed to the model: "real", "shuffled" (permuted within each
            sequence, fixed seed) or "zeroed" (all at the dataset's first second); the time
            columns show what the model saw.
    Returns:
        Columns example, user, user_token, position (0 = oldest), item, item_token, title,
        category (first category name), timestamp (s), date (UTC), gap_seconds (NaN at the
        first item), gap_days, gap_bucket, time_value (absolute time as fed), stream, expert
        (int), gate. Padding positions are left out; for every (example, position, stream)
        the gates sum to 1.
    """
    if model.interactive is None:
        raise ValueError("gate_table: the model has no Interactive MoE (use_interactive_moe=False)")
    frame, g, _ = _position_frame(model, dataset, part, max_users, batch_size, time_mode)
    n, S, E = g.shape if g is not None else (0, model.S, model.config.num_experts)
    out = frame.loc[np.repeat(np.arange(n), S * E)].reset_index(drop=True)
    out["stream"] = pd.Categorical(np.tile(np.repeat(np.asarray(model.stream_names), E), n),
                                   categories=list(model.stream_names))
    out["expert"] = np.tile(np.arange(E), n * S)
    out["gate"] = g.reshape(-1).astype(np.float64) if g is not None else np.zeros(0)
    return out


def temporal_gate_table(model: HM4SR, dataset: Dataset, part="test", *, max_users: int | None = None,
                        batch_size: int = 512, time_mode: str = "real") -> pd.DataFrame:
    """Temporal-MoE gates r, one row per (example, position, expert).

    Arguments as :func:`gate_table`. Columns as :func:`gate_table` without ``stream``
    (r is shared by every stream). gap_bucket is 1 at each sequence's first item.
    """
    if model.temporal is None:
        raise ValueError("temporal_gate_table: the model has no Temporal MoE (use_temporal_moe=False)")
    frame, _, r = _position_frame(model, dataset, part, max_users, batch_size, time_mode)
    n, E = r.shape if r is not None else (0, model.config.num_experts)
    out = frame.loc[np.repeat(np.arange(n), E)].reset_index(drop=True)
    out["expert"] = np.tile(np.arange(E), n)
    out["gate"] = r.reshape(-1).astype(np.float64) if r is not None else np.zeros(0)
    return out


# ----------------------------------------------------------------------------- gate summaries


def _group_keys(gates_df: pd.DataFrame, first: list[str]) -> list[str]:
    return first + (["stream"] if "stream" in gates_df.columns else []) + ["expert"]


def expert_usage(gates_df: pd.DataFrame) -> pd.DataFrame:
    """Mean gate per stream x expert (per expert for a temporal table): columns
    [stream,] expert, gate (mean over real positions), std, n. Rows sum to 1 over experts."""
    keys = _group_keys(gates_df, [])
    grouped = gates_df.groupby(keys, observed=True)["gate"]
    return grouped.agg(gate="mean", std="std", n="size").reset_index()


def gate_by_category(gates_df: pd.DataFrame) -> pd.DataFrame:
    """Mean gate per category (of the item at the position) x [stream x] expert:
    columns category, [stream,] expert, gate, n."""
    keys = _group_keys(gates_df, ["category"])
    grouped = gates_df.groupby(keys, observed=True)["gate"]
    return grouped.agg(gate="mean", n="size").reset_index()


def dominant_expert(gates_df: pd.DataFrame, by: str | list[str] = "item", *, per_stream: bool = True) -> pd.DataFrame:
    """The expert with the highest mean gate for each group.

    Args:
        gates_df: from :func:`gate_table` or :func:`temporal_gate_table`.
        by: column(s) to group on, e.g. "item", "category", "gap_bucket", "position".
        per_stream: one answer per stream (when the table has streams); False averages
            the streams first.
    Returns:
        Columns *by, [stream,] expert (the argmax), gate (its mean gate), margin (its lead
        over the runner-up).
    """
    by = [by] if isinstance(by, str) else list(by)
    keys = by + (["stream"] if per_stream and "stream" in gates_df.columns else [])
    mean = gates_df.groupby(keys + ["expert"], observed=True)["gate"].mean().unstack("expert")
    values = mean.to_numpy()
    order = np.argsort(-values, axis=1)
    top = values[np.arange(len(values)), order[:, 0]]
    second = values[np.arange(len(values)), order[:, 1]] if values.shape[1] > 1 else np.zeros(len(values))
    out = mean.index.to_frame(index=False)
    out["expert"] = mean.columns.to_numpy()[order[:, 0]]
    out["gate"] = top
    out["margin"] = top - second
    return out


# ----------------------------------------------------------------------------- time embedding


def used_buckets(source, interval_scale: float = 100.0, *, return_counts: bool = False):
    """Interval buckets that real data actually reaches.

    Args:
        source: a :class:`Dataset` (every within-user gap, plus each user's first item),
            a :class:`Split` (all its parts) or a :class:`SplitPart` (its sequences' real positions).
        interval_scale: the model's s (``model.config.interval_scale``).
    Returns:
        (k,) int64 sorted unique bucket ids (1 = first item, >= 2 gaps); with
        ``return_counts`` also (k,) int64 how many positions fall in each.
    """
    if isinstance(source, Dataset):
        inter = source.interactions
        users = inter["user"].to_numpy()
        ts = inter["timestamp"].to_numpy(np.int64)
        gaps = np.where(np.r_[False, users[1:] == users[:-1]], np.r_[0, np.diff(ts)], -1)
        gaps = np.where(gaps >= 0, gaps.astype(np.float64), np.nan)  # -1 marks a user's first row
    else:
        parts = ([source.train_dense, source.valid, source.test] if isinstance(source, Split) else [source])
        chunks = []
        for p in parts:
            if not isinstance(p, SplitPart):
                raise ValueError(f"used_buckets: expected a Dataset, Split or SplitPart, got {type(source).__name__}")
            real = p.items > 0
            g = np.full(p.timestamps.shape, np.nan)
            g[:, 1:] = p.timestamps[:, 1:] - p.timestamps[:, :-1]
            chunks.append(g[real])
        gaps = np.concatenate(chunks) if chunks else np.zeros(0)
    buckets = gap_bucket(gaps, interval_scale)
    return np.unique(buckets, return_counts=True) if return_counts else np.unique(buckets)


def interval_table(model: HM4SR, buckets_used, *, reference_bucket: int | None = None) -> pd.DataFrame:
    """Rows of the learned interval table at the given buckets.

    Args:
        model: an :class:`HM4SR` with a time embedding.
        buckets_used: (k,) bucket ids, e.g. from :func:`used_buckets`.
        reference_bucket: the row the cosine is taken against; default the one-day gap's
            bucket (floor(s log2 86401) + 2 = 1641 at s = 100).
    Returns:
        One row per bucket (sorted): bucket, kind ("padding" / "first item" / "gap"),
        gap_seconds (smallest gap in the bucket, 2**((b-2)/s) - 1; NaN unless a gap),
        gap_days, norm (L2 of the row), cosine (to the reference row), is_reference.
        ``attrs["reference_bucket"]`` holds the reference.
    """
    if model.time is None:
        raise ValueError("interval_table: the model has no time embedding (no Temporal MoE, no placeholders)")
    s = model.time.interval_scale
    b = np.unique(np.asarray(buckets_used, dtype=np.int64))
    n_rows = model.time.num_buckets
    if len(b) and (b.min() < 0 or b.max() >= n_rows):
        raise ValueError(f"interval_table: buckets must be in [0, {n_rows - 1}], got {b.min()}..{b.max()}")
    ref = int(gap_bucket([SECONDS_PER_DAY], s)[0]) if reference_bucket is None else int(reference_bucket)
    if not 0 <= ref < n_rows:
        raise ValueError(f"interval_table: reference_bucket must be in [0, {n_rows - 1}], got {ref}")
    with _eval_mode(model):
        table = model.time.interval.weight.detach().cpu().double()
    rows = table[torch.as_tensor(b)]
    norms = rows.norm(dim=1)
    cosine = torch.nn.functional.cosine_similarity(rows, table[ref].unsqueeze(0).expand_as(rows), dim=1)
    start = bucket_start_seconds(b, s)
    out = pd.DataFrame({"bucket": b, "kind": _bucket_kind(b), "gap_seconds": start,
                        "gap_days": start / SECONDS_PER_DAY, "norm": norms.numpy(), "cosine": cosine.numpy(),
                        "is_reference": b == ref})
    out.attrs["reference_bucket"] = ref
    return out


def _absolute(model: HM4SR, t: torch.Tensor) -> torch.Tensor:
    """(n,) time values as the model would feed them -> (n, d) cos((w t + b) * f)."""
    time = model.time
    t = t.to(device=_device(model), dtype=time.absolute.weight.dtype)  # as TimeEmbedding.forward does
    return torch.cos(time.absolute(t.unsqueeze(-1)) * time.freq).cpu()


def _days_to_time_input(model: HM4SR, days: np.ndarray, time_input: str) -> torch.Tensor:
    origin = model.time.time_origin
    seconds = torch.as_tensor(origin + days * SECONDS_PER_DAY, dtype=torch.float64)
    if time_input == "model":
        return model.time.time_values(seconds.round().long())
    if time_input == "days":
        return torch.as_tensor(days, dtype=torch.float32)
    if time_input == "seconds":
        return seconds.float()  # float32, as the released code fed them: ~1e9 at 7 significant digits
    raise ValueError(f"time_input must be 'model', 'days' or 'seconds', got {time_input!r}")


def absolute_time_embedding(model: HM4SR, days, *, time_input: str = "model") -> pd.DataFrame:
    """The absolute-time half of tau, a(t) = cos((w t + b) * f), at the given dates.

    Args:
        model: an :class:`HM4SR` with a time embedding.
        days: (n,) days since the dataset's first interaction (fractions allowed).
        time_input: what is fed as t: "model" (whatever the model does: days when
            ``normalise_time``, else raw seconds), "days", or "seconds" (raw epoch seconds
            in float32, the released code's input).
    Returns:
        Long table, one row per (day, dim): day, date (UTC), time_input (the t fed),
        dim, value, cosine_to_first (cosine of that day's vector to the first day's;
        raw-second inputs make neighbouring days look unrelated).
    """
    if model.time is None:
        raise ValueError("absolute_time_embedding: the model has no time embedding")
    days = np.asarray(days, dtype=np.float64).ravel()
    if len(days) == 0:
        raise ValueError("absolute_time_embedding: days is empty")
    with _eval_mode(model):
        t = _days_to_time_input(model, days, time_input)
        emb = _absolute(model, t).double()  # (n, d)
    cos = torch.nn.functional.cosine_similarity(emb, emb[:1].expand_as(emb), dim=1).numpy()
    n, d = emb.shape
    seconds = model.time.time_origin + days * SECONDS_PER_DAY
    return pd.DataFrame({
        "day": np.repeat(days, d),
        "date": pd.to_datetime(np.repeat(np.round(seconds).astype(np.int64), d), unit="s", utc=True),
        "time_input": np.repeat(t.double().numpy(), d),
        "dim": np.tile(np.arange(d), n),
        "value": emb.numpy().ravel(),
        "cosine_to_first": np.repeat(cos, d),
    })


def compare_absolute_time(model: HM4SR, days, other: HM4SR | None = None) -> pd.DataFrame:
    """:func:`absolute_time_embedding` for two variants, stacked with a ``variant`` column.

    With ``other`` (e.g. a model trained with the opposite ``normalise_time``): each model
    as it runs, labelled "normalise_time=True/False". Without: ``model``'s weights fed
    days ("days since start") and raw float32 seconds ("raw seconds").
    """
    if other is not None:
        labels = [f"normalise_time={m.config.normalise_time}" for m in (model, other)]
        if labels[0] == labels[1]:  # same setting: tell them apart by role
            labels = [labels[0] + " (model)", labels[1] + " (other)"]
        variants = [(labels[0], model, "model"), (labels[1], other, "model")]
    else:
        variants = [("days since start", model, "days"), ("raw seconds", model, "seconds")]
    frames = []
    for label, m, how in variants:
        f = absolute_time_embedding(m, days, time_input=how)
        f.insert(0, "variant", label)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def _tau(model: HM4SR, gaps_seconds: np.ndarray, date_seconds: np.ndarray):
    """(G, D, 2d) tau on the grid of gaps x dates; and the (G,) buckets used."""
    time = model.time
    buckets = gap_bucket(gaps_seconds, time.interval_scale)
    interval = time.interval(torch.as_tensor(buckets, device=_device(model))).cpu()  # (G, d)
    t = time.time_values(torch.as_tensor(np.round(date_seconds).astype(np.int64)))
    absolute = _absolute(model, t)  # (D, d)
    G, D = len(buckets), len(date_seconds)
    tau = torch.cat([interval.unsqueeze(1).expand(G, D, -1), absolute.unsqueeze(0).expand(G, D, -1)], dim=-1)
    return tau, buckets


def temporal_gate_curve(model: HM4SR, gaps_seconds, date_seconds) -> pd.DataFrame:
    """Temporal gate r = softmax(W_r tau + b_r) on a grid of (gap, date), no data needed.

    Args:
        model: an :class:`HM4SR` with a Temporal MoE.
        gaps_seconds: (G,) gaps before the item, seconds; NaN = the first item of a
            sequence (its own bucket, 1). Negative gaps count as 0, as in the model.
        date_seconds: (D,) the item's timestamp, epoch seconds.
    Returns:
        One row per (gap, date, expert): gap_seconds, gap_days, gap_bucket, date_seconds,
        date (UTC), expert, gate. Gates sum to 1 over experts at each grid point.
    """
    if model.temporal is None:
        raise ValueError("temporal_gate_curve: the model has no Temporal MoE (use_temporal_moe=False)")
    gaps = np.asarray(gaps_seconds, dtype=np.float64).ravel()
    dates = np.asarray(date_seconds, dtype=np.float64).ravel()
    with _eval_mode(model):
        tau, buckets = _tau(model, gaps, dates)
        gate = model.temporal.gate
        r = torch.softmax(gate(tau.to(_device(model))), dim=-1).cpu().double().numpy()  # (G, D, E)
    G, D, E = r.shape
    return pd.DataFrame({
        "gap_seconds": np.repeat(gaps, D * E),
        "gap_days": np.repeat(gaps / SECONDS_PER_DAY, D * E),
        "gap_bucket": np.repeat(buckets, D * E),
        "date_seconds": np.tile(np.repeat(dates, E), G),
        "date": pd.to_datetime(np.tile(np.repeat(np.round(dates).astype(np.int64), E), G), unit="s", utc=True),
        "expert": np.tile(np.arange(E), G * D),
        "gate": r.ravel(),
    })


def time_embedding_at(model: HM4SR, gap_seconds: float, date_seconds: float) -> pd.DataFrame:
    """tau at one (gap, date): columns part ("interval" / "absolute"), dim, value (d rows each).
    ``gap_seconds`` NaN = the first item of a sequence."""
    if model.time is None:
        raise ValueError("time_embedding_at: the model has no time embedding")
    with _eval_mode(model):
        tau, _ = _tau(model, np.array([gap_seconds], dtype=np.float64), np.array([date_seconds], dtype=np.float64))
    v = tau[0, 0].double().numpy()
    d = len(v) // 2
    return pd.DataFrame({"part": ["interval"] * d + ["absolute"] * d, "dim": np.r_[np.arange(d), np.arange(d)],
                         "value": v})


# ----------------------------------------------------------------------------- losses


def loss_table(steps_df: pd.DataFrame) -> pd.DataFrame:
    """Each named loss per logged step, long format.

    Args:
        steps_df: ``TrainResult.steps`` (or a run's steps.csv): columns step, epoch,
            loss_<name>, weighted_<name>.
    Returns:
        One row per (step, task): step, epoch, task, value (unweighted), weighted,
        share (weighted / sum of the weighted losses at that step; NaN where that sum is 0).
        Tasks keep the order of ``LOSS_NAMES``.
    """
    if "step" not in steps_df.columns:
        raise ValueError(f"loss_table: steps_df needs a 'step' column; has {list(steps_df.columns)}")
    tasks = [c[len("loss_"):] for c in steps_df.columns if c.startswith("loss_")]
    if not tasks:
        raise ValueError(f"loss_table: no loss_<name> columns in {list(steps_df.columns)}")
    tasks.sort(key=lambda t: (LOSS_NAMES.index(t) if t in LOSS_NAMES else len(LOSS_NAMES), t))
    frames = []
    for t in tasks:
        value = steps_df[f"loss_{t}"].astype(float)
        weighted = steps_df[f"weighted_{t}"].astype(float) if f"weighted_{t}" in steps_df else value
        frames.append(pd.DataFrame({"step": steps_df["step"].to_numpy(),
                                    "epoch": steps_df["epoch"].to_numpy() if "epoch" in steps_df else 0,
                                    "task": t, "value": value.to_numpy(), "weighted": weighted.to_numpy()}))
    out = pd.concat(frames, ignore_index=True)
    total = out.groupby("step")["weighted"].transform("sum")
    out["share"] = out["weighted"] / total.where(total != 0)
    out["task"] = pd.Categorical(out["task"], categories=tasks)
    return out.sort_values(["step", "task"], kind="stable").reset_index(drop=True)


def smooth(df: pd.DataFrame, window: int, *, columns: list[str] | None = None, by: str | None = "task",
           order: str = "step") -> pd.DataFrame:
    """Trailing rolling mean over ``window`` rows (ordered by ``order``), per ``by`` group.

    Args:
        df: a long table (e.g. :func:`loss_table`) or a wide one (``by=None``).
        window: rows per mean, >= 1 (1 returns a copy unchanged); the first rows average
            what is there (min_periods=1).
        columns: which columns to smooth; default every float column.
    Returns:
        A copy of ``df`` (same rows, same order) with those columns smoothed.
    """
    if int(window) != window or window < 1:
        raise ValueError(f"smooth: window must be an integer >= 1, got {window!r}")
    if columns is None:
        columns = [c for c in df.columns if pd.api.types.is_float_dtype(df[c]) and c not in (order, by)]
    if window == 1 or not columns:
        return df.copy()
    out = df.reset_index(drop=True)  # positional labels, so a repeated index cannot misalign the result
    out[columns] = out[columns].astype(np.float64)
    ordered = out.sort_values(order, kind="stable") if order in out.columns else out
    if by is not None and by in out.columns:
        rolled = ordered.groupby(by, observed=True)[columns].transform(
            lambda s: s.rolling(int(window), min_periods=1).mean())
    else:
        rolled = ordered[columns].rolling(int(window), min_periods=1).mean()
    out.loc[rolled.index, columns] = rolled
    out.index = df.index
    return out


def gradient_shares(model: HM4SR, batch: SequenceBatch, *, seed: int = 0) -> pd.DataFrame:
    """How hard each named loss pulls on the parameters the losses share.

    Shared parameters are those that receive a gradient from at least two losses (the
    embeddings, projections, MoE levels and encoders; not the category head or the
    placeholder generator). Each loss is differentiated on its own (``autograd.grad``);
    dropout is off so the numbers are repeatable, and placeholder positions come from a
    generator seeded with ``seed``.

    Args:
        batch: a training batch (prefix or dense), on any device.
    Returns:
        One row per loss: task, weight, loss (unweighted value), grad_norm (L2 over the
        shared parameters, unweighted), weighted_grad_norm (x weight: what the optimiser
        sees), share (of the summed weighted norms), cosine_to_rec (direction against the
        rec gradient; negative = the losses disagree). ``attrs["shared_parameters"]``
        names the shared parameters.
    """
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(seed)
        out = model(batch.to(_device(model)), losses=True, generator=gen)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        params = list(named.values())
        grads = {}
        for task, loss in out.losses.items():
            if not loss.requires_grad:  # e.g. no placeholders in a batch of short sequences
                grads[task] = [None] * len(params)
                continue
            grads[task] = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    finally:
        model.train(was_training)
    users = [sum(g[i] is not None and bool(g[i].abs().sum() > 0) for g in grads.values()) for i in range(len(params))]
    shared = [i for i, k in enumerate(users) if k >= 2]
    names = list(named)
    weights = model.config.loss_weights

    def flat(task: str) -> torch.Tensor:
        return torch.cat([(grads[task][i] if grads[task][i] is not None else torch.zeros_like(params[i])).reshape(-1)
                          for i in shared]).double().cpu()

    vectors = {t: flat(t) for t in grads}
    rec = vectors.get("rec")
    rows = []
    for t, v in vectors.items():
        norm = float(v.norm())
        cos = math.nan
        if rec is not None and norm > 0 and float(rec.norm()) > 0:
            cos = float(torch.nn.functional.cosine_similarity(v, rec, dim=0))
        rows.append({"task": t, "weight": weights[t], "loss": float(out.losses[t].detach()), "grad_norm": norm,
                     "weighted_grad_norm": weights[t] * norm, "cosine_to_rec": cos})
    frame = pd.DataFrame(rows)
    total = frame["weighted_grad_norm"].sum()
    frame["share"] = frame["weighted_grad_norm"] / total if total > 0 else math.nan
    frame.attrs["shared_parameters"] = [names[i] for i in shared]
    return frame[["task", "weight", "loss", "grad_norm", "weighted_grad_norm", "share", "cosine_to_rec"]]


# ----------------------------------------------------------------------------- item atlas


def item_embeddings(model: HM4SR) -> dict[str, np.ndarray]:
    """Item representations as the scores use them (no position, no MoE).

    Returns:
        {"id": (N, d), <modality>: (N, d) projected features (zeros where an item lacks
        the modality), ..., "fused": (N, S*d) their concatenation (the late-fusion item
        vector)}; row i-1 = item i (padding row dropped), float32.
    """
    with _eval_mode(model):
        tables = model.item_tables().detach().cpu().float()[1:]  # (N, S, d)
    out = {name: tables[:, s].numpy().copy() for s, name in enumerate(model.stream_names)}
    out["fused"] = tables.reshape(tables.shape[0], -1).numpy().copy()
    return out


def umap_projection(matrix: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """(n, D) -> (n, 2) with UMAP (umap-learn), seeded: the same seed gives the same layout.

    With fewer than 10 rows a neighbour graph means nothing, so the first two principal
    components are returned instead, with a warning saying so. ``n_neighbors`` is capped
    at n - 1.
    """
    x = np.asarray(matrix, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"umap_projection: expected a 2-D matrix, got shape {x.shape}")
    n = x.shape[0]
    if n < UMAP_MIN_POINTS:
        warnings.warn(f"umap_projection: only {n} rows (< {UMAP_MIN_POINTS}); returning the first two "
                      f"principal components instead of UMAP", stacklevel=2)
        centred = x - x.mean(axis=0, keepdims=True)
        _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        pcs = centred @ vt[:2].T if vt.shape[0] else np.zeros((n, 0))
        return np.pad(pcs, ((0, 0), (0, 2 - pcs.shape[1]))).astype(np.float32)
    import umap  # slow to import (numba): only when asked for

    with warnings.catch_warnings():
        # random_state forces a single thread; saying n_jobs=1 ourselves still warns on some versions
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(n_neighbors, n - 1)), random_state=seed,
                            transform_seed=seed, n_jobs=1)
        return reducer.fit_transform(x).astype(np.float32)


def atlas_table(model: HM4SR, dataset: Dataset, *, spaces=("fused",), gates_df: pd.DataFrame | None = None,
                seed: int = 0, n_neighbors: int = 15) -> pd.DataFrame:
    """The item atlas for :class:`widgets.EmbeddingExplorer`: one row per (space, item).

    Args:
        spaces: keys of :func:`item_embeddings` to project ("id", a modality, "fused").
        gates_df: a :func:`gate_table`; gives each item its dominant Interactive-MoE expert
            (mean over streams and every position the item occupies); "unseen" where the
            item never appears, all "n/a" without a table.
    Returns:
        Columns space, item, item_token, title, category, popularity (interactions in
        ``dataset``), dominant_expert (str), x, y.
    """
    emb = item_embeddings(model)
    unknown = [s for s in spaces if s not in emb]
    if unknown:
        raise ValueError(f"atlas_table: unknown space(s) {unknown}; known: {list(emb)}")
    lookup = _item_lookup(dataset).iloc[1:].reset_index(drop=True)
    items = np.arange(1, dataset.num_items + 1)
    popularity = np.bincount(dataset.interactions["item"].to_numpy(), minlength=dataset.num_items + 1)[1:]
    if gates_df is not None:
        dom = dominant_expert(gates_df, "item", per_stream=False).set_index("item")["expert"]
        dominant = [f"expert {int(dom[i])}" if i in dom.index else "unseen" for i in items]
    else:
        dominant = ["n/a"] * len(items)
    frames = []
    for space in spaces:
        xy = umap_projection(emb[space], seed=seed, n_neighbors=n_neighbors)
        frames.append(pd.DataFrame({"space": space, "item": items, "item_token": lookup["item_token"].astype(str),
                                    "title": lookup["title"].astype(str), "category": lookup["category"].astype(str),
                                    "popularity": popularity, "dominant_expert": dominant,
                                    "x": xy[:, 0], "y": xy[:, 1]}))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- time controls


def time_control_table(model: HM4SR, dataset: Dataset, split: Split | None = None,
                       config: TrainConfig = TrainConfig(), *, part: str = "test") -> pd.DataFrame:
    """Test (or validation) metrics with real, shuffled and zeroed timestamps.

    A model that uses time should lose accuracy when the timestamps are permuted within
    each sequence or collapsed to one instant; one that ignores time should not move.

    Args:
        split: the split the model was trained on; default a fresh one of ``config.split``.
        config: evaluation settings (batch size, tie policy, history masking, seed);
            its ``eval_time`` is overridden per row.
        part: "test" or "valid".
    Returns:
        One row per eval_time ("real", "shuffled", "zeroed") with every metric as a column.
    """
    if part not in ("test", "valid"):
        raise ValueError(f"time_control_table: part must be 'test' or 'valid', got {part!r}")
    split = split or build_split(dataset, SplitConfig(kind=config.split, max_length=model.config.max_length))
    history = split.train_history() if config.mask_history else None
    origin = int(dataset.stats["first_timestamp"])
    rows = []
    for mode in TIME_MODES:
        result = evaluate(model, getattr(split, part), config.replace(eval_time=mode), history=history,
                          device=_device(model), time_origin=origin)
        rows.append({"eval_time": mode, **result.metrics})
    return pd.DataFrame(rows)
