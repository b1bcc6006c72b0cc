"""What the model does with time (paper section 3.3, docs/model.md 2.3): the interval
buckets real gaps reach, the learned interval table there, the absolute-time embedding
with and without normalised time (defect 2), the Temporal-MoE gate on a grid of (gap,
date) with no data at all, and metrics with real, shuffled and zeroed timestamps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..config import SplitConfig, TrainConfig
from ..data.schema import Dataset
from ..data.splits import Split, SplitPart, build_split
from ..evaluate import evaluate
from ..model import FIRST_BUCKET, GAP_BUCKET_OFFSET, MAX_GAP_LOG2, PADDING_BUCKET, HM4SR
from ._common import SECONDS_PER_DAY, TIME_MODES, eval_mode, model_device


# ----------------------------------------------------------------------------- gap buckets


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


def _exact_seconds(model: HM4SR, view: str) -> None:
    """These views map gaps in seconds to buckets as ``timestamps="exact"`` does; refuse a
    model that reads time otherwise (float32 or min-max: a fidelity switch), whose buckets
    they would misplace."""
    mode = getattr(model.time, "timestamps", "exact") if model.time is not None else "exact"
    if mode != "exact":
        raise ValueError(f"{view}: the model reads timestamps as {mode!r} (ModelConfig.timestamps); this view "
                         f"maps seconds to buckets exactly and would show buckets the model never uses; "
                         f"use a model with timestamps='exact'")


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
    _exact_seconds(model, "interval_table")
    s = model.time.interval_scale
    b = np.unique(np.asarray(buckets_used, dtype=np.int64))
    n_rows = model.time.num_buckets
    if len(b) and (b.min() < 0 or b.max() >= n_rows):
        raise ValueError(f"interval_table: buckets must be in [0, {n_rows - 1}], got {b.min()}..{b.max()}")
    ref = int(gap_bucket([SECONDS_PER_DAY], s)[0]) if reference_bucket is None else int(reference_bucket)
    if not 0 <= ref < n_rows:
        raise ValueError(f"interval_table: reference_bucket must be in [0, {n_rows - 1}], got {ref}")
    with eval_mode(model):
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
    t = t.to(device=model_device(model), dtype=time.absolute.weight.dtype)  # as TimeEmbedding.forward does
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
    with eval_mode(model):
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
        labels = [f"normalise_time={m.config.released.normalise_time}" for m in (model, other)]
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
    _exact_seconds(model, "temporal_gate_curve / time_embedding_at")
    time = model.time
    buckets = gap_bucket(gaps_seconds, time.interval_scale)
    interval = time.interval(torch.as_tensor(buckets, device=model_device(model))).cpu()  # (G, d)
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
    with eval_mode(model):
        tau, buckets = _tau(model, gaps, dates)
        gate = model.temporal.gate
        r = torch.softmax(gate(tau.to(model_device(model))), dim=-1).cpu().double().numpy()  # (G, D, E)
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
    with eval_mode(model):
        tau, _ = _tau(model, np.array([gap_seconds], dtype=np.float64), np.array([date_seconds], dtype=np.float64))
    v = tau[0, 0].double().numpy()
    d = len(v) // 2
    return pd.DataFrame({"part": ["interval"] * d + ["absolute"] * d, "dim": np.r_[np.arange(d), np.arange(d)],
                         "value": v})


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
                          device=model_device(model), time_origin=origin)
        rows.append({"eval_time": mode, **result.metrics})
    return pd.DataFrame(rows)
