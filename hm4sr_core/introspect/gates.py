"""Interactive-MoE gates g_s (paper section 3.2) and Temporal-MoE gates r (section 3.3)
at every real position of a split part, as long tables, and their summaries."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pandas as pd
import torch

from ..data.schema import Dataset
from ..data.splits import SplitPart, iterate_batches
from ..evaluate import perturb_timestamps
from ..model import HM4SR
from ._common import SECONDS_PER_DAY, TIME_MODES, eval_mode, item_lookup, model_device, resolve_part
from .temporal import gap_bucket


# ----------------------------------------------------------------------------- gates per position


def _position_frame(model: HM4SR, dataset: Dataset, part, max_users: int | None, batch_size: int,
                    time_mode: str):
    """One pass over ``part``: a frame with one row per real position, and the gates there.

    Returns (positions DataFrame (n rows), interactive gates (n, S, E) or None, temporal
    gates (n, E) or None)."""
    if time_mode not in TIME_MODES:
        raise ValueError(f"time_mode must be one of {TIME_MODES}, got {time_mode!r}")
    part = resolve_part(dataset, part, model.config.max_length)
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
    device = model_device(model)
    cols: dict[str, list] = {k: [] for k in ("example", "user", "position", "item", "timestamp", "gap_seconds",
                                             "gap_bucket", "time_value")}
    interactive, temporal = [], []
    offset = 0
    with eval_mode(model):
        for batch in iterate_batches(sub, batch_size):
            batch = perturb_timestamps(batch, time_mode, gen, origin)
            out = model.encode(batch.to(device))
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
    lookup = item_lookup(dataset)
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
