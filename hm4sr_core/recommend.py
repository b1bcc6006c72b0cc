"""Recommendations a person can read: each user's top-k over the whole catalogue, the
exact per-stream parts of every score, and why (docs/model.md 2.6; ``hm4sr recommend``).

HM4SR scores an item by late fusion, score(i) = sum over streams s (ID, text, image) of
<q_s, v_s(i)> (section 2.6), so every score splits exactly into one part per stream:
:func:`recommend` returns those parts beside the score. What shaped the query vectors q_s
is read two ways (:func:`explain`):

* **occlusion**: each history item removed in turn (the later items move up one
  position, the next item's gap now runs from the item before the removed one) and the
  change of every recommended item's score: exact and model-agnostic;
* **gates** at the last history position: the Interactive-MoE gate of each stream and the
  Temporal-MoE gate (sections 3.2-3.3) that routed the last item into the query.

A user the model never saw is a :class:`History` of (item token, timestamp) pairs
(:func:`history_from_pairs`, :func:`read_history`). HM4SR reads only the times of the
history (its gaps, section 2.3 interval embedding, and its dates, the absolute-time
embedding), never the moment the list is asked for: asking today or in a year gives the
same list. "What if" therefore moves the time of the last interaction
(:func:`move_last_interaction`, :func:`what_if`), which changes the gap before it and its
date, so the Temporal MoE routes it differently.

Ranking uses the same chunked dot product and tie policy as evaluation
(:mod:`hm4sr_core.metrics`): scores in the model's dtype, ties broken by the lower item
id. Run over a split's users in its order with the evaluation batch size,
:func:`recommend` reproduces the top-10 that :func:`hm4sr_core.evaluate.evaluate` keeps.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import SplitConfig, TrainConfig
from .data.schema import DataError, Dataset
from .data.splits import SequenceBatch, Split, SplitPart, build_split, iterate_batches
from .data.store import load_dataset, read_manifest
from .data.synthetic import planted_category_of, planted_truth, seasonal_category
from .data.timeunits import SECONDS_PER_DAY
from .evaluate import perturb_timestamps, query_by_length
from .metrics import _COUNT_COLUMNS, _chunk_layout, _chunk_top_k, _merge_top_k
from .runs import load_checkpoint, model_from_checkpoint

AT_CHOICES = ("end", "test", "valid")  # whose history: everything, or what evaluation's test / valid query sees
OUTPUT_SUFFIXES = (".parquet", ".csv", ".jsonl")
CHUNK_ITEMS = 65_536  # items scored per matmul, as evaluation (one (B, chunk) score matrix at a time)
OCCLUDED_SHOWN = 3  # history items named per recommendation in the readable explanation


# ----------------------------------------------------------------------------- loading


@dataclass
class Recommender:
    """A trained model with the data it was trained on, ready to rank."""

    model: torch.nn.Module
    dataset: Dataset
    train_config: TrainConfig
    checkpoint: Path | None = None
    data_hash: str = ""

    @property
    def split_config(self) -> SplitConfig:
        return SplitConfig(kind=self.train_config.split, max_length=self.model.config.max_length)


def checkpoint_path(run_or_checkpoint: str | Path) -> Path:
    """``best.pt`` of a run folder, or the checkpoint file itself; FileNotFoundError naming
    what is missing."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        best = path / "best.pt"
        if not best.exists():
            raise FileNotFoundError(f"{path}: no best.pt in this folder (a run folder gets it after its first "
                                    f"epoch; pass a run folder of `hm4sr train` or a .pt checkpoint)")
        return best
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint")
    return path


def load_recommender(run_or_checkpoint: str | Path, data: str | Path | None = None) -> Recommender:
    """The best checkpoint of a run folder (or a checkpoint file) with its dataset.

    ``data``: dataset name or folder (default the one the checkpoint names). Raises
    ValueError when the dataset's hash is not the one the checkpoint was trained on."""
    path = checkpoint_path(run_or_checkpoint)
    try:
        payload = load_checkpoint(path)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises several kinds for a file that is no checkpoint
        raise ValueError(f"{path}: not a checkpoint written by `hm4sr train` ({type(err).__name__})") from None
    name = data if data is not None else payload["data_name"]
    manifest = read_manifest(name)
    if manifest["data_hash"] != payload["data_hash"]:
        raise ValueError(f"{path} was trained on data {payload['data_hash'][:12]}, but dataset {name} is "
                         f"{manifest['data_hash'][:12]} (another preparation or another dataset); pass the "
                         f"dataset it was trained on with --data")
    dataset = load_dataset(name)
    model = model_from_checkpoint(payload, dataset).eval()
    return Recommender(model, dataset, TrainConfig.from_dict(payload["train_config"]), path, payload["data_hash"])


# ----------------------------------------------------------------------------- histories


@dataclass
class History:
    """One user's interactions, oldest first, as the model reads them."""

    items: np.ndarray  # (n,) int64 item ids 1..N
    timestamps: np.ndarray  # (n,) int64 seconds, non-decreasing
    user: str = "(history)"  # the user token, or a label for a history given by hand

    def __len__(self) -> int:
        return len(self.items)

    def last(self, max_length: int) -> "History":
        """The last ``max_length`` interactions (what the model reads)."""
        return History(self.items[-max_length:], self.timestamps[-max_length:], self.user)


def user_ids(dataset: Dataset, tokens) -> np.ndarray:
    """(n,) user ids of user tokens; ValueError naming the unknown ones."""
    index = {str(t): i for i, t in enumerate(dataset.user_tokens)}
    tokens = [str(t).strip() for t in tokens]
    unknown = [t for t in tokens if t not in index]
    if unknown:
        example = ", ".join(repr(str(t)) for t in dataset.user_tokens[:3])
        raise ValueError(f"unknown user token(s) {unknown[:5]} in dataset {dataset.name!r} "
                         f"({dataset.num_users} users, e.g. {example})")
    return np.array([index[t] for t in tokens], dtype=np.int64)


def _user_rows(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Start and end row of each user id in the (user, time)-sorted interactions."""
    users = dataset.interactions["user"].to_numpy(np.int64)
    ids = np.arange(dataset.num_users)
    return np.searchsorted(users, ids, "left"), np.searchsorted(users, ids, "right")


def history_part(dataset: Dataset, users: np.ndarray, at: str, split_config: SplitConfig,
                 split: Split | None = None) -> SplitPart:
    """The query histories of ``users`` (ids, in that order) as a SplitPart.

    ``at="end"``: every interaction of the user (the last ``max_length``): what to
    recommend next. ``"test"`` / ``"valid"``: the rows of that part of the split (``split``,
    or built from ``split_config``), the histories evaluation ranks (their targets kept); a
    user absent from it is named."""
    if at not in AT_CHOICES:
        raise ValueError(f"at must be one of {AT_CHOICES}, got {at!r}")
    users = np.asarray(users, dtype=np.int64)
    T = split_config.max_length
    if at != "end":
        part = getattr(split if split is not None else build_split(dataset, split_config), at)
        row_of = {int(u): r for r, u in enumerate(part.users)}
        missing = [str(dataset.user_tokens[u]) for u in users if int(u) not in row_of]
        if missing:
            raise ValueError(f"user(s) {missing[:5]} have no {at} example in the {split_config.kind} split "
                             f"(too few interactions); use --at end")
        rows = np.array([row_of[int(u)] for u in users], dtype=np.int64)
        return SplitPart(part.items[rows], part.timestamps[rows], part.lengths[rows], part.targets[rows],
                         part.users[rows], part.target_timestamps[rows])
    starts, ends = _user_rows(dataset)
    items = dataset.interactions["item"].to_numpy(np.int64)
    times = dataset.interactions["timestamp"].to_numpy(np.int64)
    lengths = np.minimum(ends[users] - starts[users], T)
    if (lengths < 1).any():
        raise ValueError(f"user(s) {[str(dataset.user_tokens[u]) for u in users[lengths < 1]][:5]} have no interactions")
    cols = np.arange(T)
    valid = cols[None, :] < lengths[:, None]
    index = np.where(valid, (ends[users] - lengths)[:, None] + cols[None, :], 0)
    zeros = np.zeros(len(users), np.int64)
    return SplitPart(np.where(valid, items[index], 0), np.where(valid, times[index], 0), lengths, zeros,
                     users.copy(), zeros.copy())


def user_history(dataset: Dataset, user: str, at: str = "end", split_config: SplitConfig | None = None) -> History:
    """The history of one known user (its token), as :func:`history_part` cuts it."""
    split_config = split_config or SplitConfig()
    part = history_part(dataset, user_ids(dataset, [user]), at, split_config)
    n = int(part.lengths[0])
    return History(part.items[0, :n].copy(), part.timestamps[0, :n].copy(), str(user))


def history_from_pairs(dataset: Dataset, pairs, user: str = "(history)", *, where=None) -> History:
    """A History from (item token, timestamp) pairs, oldest first (a list of pairs, or a
    DataFrame with columns ``item`` and ``timestamp``). Timestamps are integer seconds
    (or numbers that are whole seconds); unknown item tokens are named, unsorted or
    non-numeric timestamps refused. Errors name the pair as ``where(i)`` (i counted from
    0); by default "interaction i+1" (a file reader passes its line numbers)."""
    where = where or (lambda i: f"interaction {i + 1}")
    if isinstance(pairs, pd.DataFrame):
        missing = [c for c in ("item", "timestamp") if c not in pairs.columns]
        if missing:
            raise ValueError(f"history: column(s) {missing} missing; expected columns item, timestamp "
                             f"(got {list(pairs.columns)})")
        pairs = list(zip(pairs["item"].tolist(), pairs["timestamp"].tolist()))
    pairs = list(pairs)
    if not pairs:
        raise ValueError("history: no interactions; give at least one (item token, timestamp) pair")
    tokens, times = [], []
    for row, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"history {where(row)}: expected an (item token, timestamp) pair, got {pair!r}")
        token, ts = pair
        if isinstance(ts, str) and ts.strip().lstrip("-").isdigit():  # a file read as text: "893286638"
            ts = int(ts.strip())
        if isinstance(ts, bool) or not isinstance(ts, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(ts)) or float(ts) != int(ts) or ts < 0:
            raise ValueError(f"history {where(row)}: timestamp {ts!r} is not a whole number of seconds >= 0 "
                             f"(Unix time, e.g. 893286638)")
        tokens.append(str(token).strip())
        times.append(int(ts))
    index = {str(t): i + 1 for i, t in enumerate(dataset.items["token"])}
    unknown = [(r, t) for r, t in enumerate(tokens) if t not in index]
    if unknown:
        shown = ", ".join(f"{where(r)}: {t!r}" for r, t in unknown[:5])
        raise ValueError(f"history: unknown item token(s) ({shown}{', ...' if len(unknown) > 5 else ''}); "
                         f"dataset {dataset.name!r} has {dataset.num_items} items, e.g. "
                         f"{', '.join(repr(str(t)) for t in dataset.items['token'][:3])}")
    times = np.array(times, dtype=np.int64)
    back = np.flatnonzero(np.diff(times) < 0)
    if len(back):
        r = int(back[0]) + 1
        raise ValueError(f"history {where(r)}: timestamp {times[r]} is earlier than {where(r - 1)}'s {times[r - 1]}; "
                         f"give the interactions oldest first")
    return History(np.array([index[t] for t in tokens], dtype=np.int64), times, user)


def read_history(path: str | Path, dataset: Dataset) -> History:
    """A History from a file of (item token, timestamp) rows: ``.csv`` or ``.parquet``
    with columns ``item`` and ``timestamp``, or ``.jsonl`` of {"item": ..., "timestamp": ...}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such history file")
    suffix = path.suffix.lower()
    where = lambda i: f"line {i + 2}"  # noqa: E731 - a .csv's header is line 1 (blank lines are skipped)
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype={"item": str})
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
            where = lambda i: f"row {i + 1}"  # noqa: E731
        elif suffix == ".jsonl":  # read by hand: pandas would turn a column named "timestamp" into dates
            numbered = [(n, line) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
            frame = pd.DataFrame([json.loads(line) for _, line in numbered])
            where = lambda i: f"line {numbered[i][0]}"  # noqa: E731
        else:
            raise ValueError(f"{path}: history files are .csv, .parquet or .jsonl, got {suffix or 'no suffix'!r}")
    except (ValueError, OSError) as err:  # json.JSONDecodeError is a ValueError
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: could not read it as {suffix}: {err}") from None
    try:
        return history_from_pairs(dataset, frame, user=path.stem, where=where)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def move_last_interaction(history: History, *, gap_days: float | None = None,
                          at_time: int | None = None) -> History:
    """The same history with its last interaction moved in time: ``gap_days`` after the
    one before it, or to ``at_time`` (seconds; not before the one before it). The gap
    before it and its date change; nothing else does."""
    if (gap_days is None) == (at_time is None):
        raise ValueError("give exactly one of gap_days and at_time")
    times = history.timestamps.copy()
    previous = int(times[-2]) if len(times) > 1 else None
    if gap_days is not None:
        if not (math.isfinite(gap_days) and gap_days >= 0):
            raise ValueError(f"gap_days must be a number >= 0, got {gap_days!r}")
        if previous is None:
            raise ValueError("a history of one interaction has no gap before its last interaction; "
                             "move it with at_time (its date) instead")
        times[-1] = previous + int(round(gap_days * SECONDS_PER_DAY))
    else:
        if previous is not None and int(at_time) < previous:
            raise ValueError(f"at_time {int(at_time)} is before the interaction before it ({previous})")
        times[-1] = int(at_time)
    return History(history.items.copy(), times, history.user)


def _batch(histories: list[History], max_length: int) -> SequenceBatch:
    """Histories -> one left-aligned batch (each cut to its last ``max_length`` items)."""
    cut = [h.last(max_length) for h in histories]
    width = max(len(h) for h in cut)
    items = torch.zeros(len(cut), width, dtype=torch.int64)
    times = torch.zeros(len(cut), width, dtype=torch.int64)
    for r, h in enumerate(cut):
        items[r, :len(h)] = torch.from_numpy(h.items)
        times[r, :len(h)] = torch.from_numpy(h.timestamps)
    lengths = torch.tensor([len(h) for h in cut], dtype=torch.int64)
    zeros = torch.zeros(len(cut), dtype=torch.int64)
    return SequenceBatch(items, times, lengths, zeros, zeros.clone())


# ----------------------------------------------------------------------------- ranking


@torch.no_grad()
def top_k_items(queries: torch.Tensor, item_matrix: torch.Tensor, k: int, *,
                exclude: list[np.ndarray] | None = None,
                chunk_items: int = CHUNK_ITEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best items for ``score = queries (B, K) @ item_matrix (N+1, K).T``.

    The same chunked GEMMs as :func:`hm4sr_core.metrics.count_dot_product` (one (B,
    chunk) matrix at a time, every chunk the same width) and its tie policy: score
    descending, ties by the lower item id. Padding (row 0) never ranks; ``exclude``
    (per row, item ids) removes items. Returns (scores (B, k), items (B, k)); slots
    without a candidate (too many items excluded) hold item 0 and score -inf."""
    batch, columns = queries.shape[0], item_matrix.shape[0]
    if not 1 <= k <= columns - 1:
        raise ValueError(f"k must be in 1..{columns - 1} (the catalogue), got {k}")
    width = min(chunk_items, columns)
    scores = torch.empty(batch, width, dtype=queries.dtype, device=queries.device)
    buffer = torch.empty(batch, min(width, _COUNT_COLUMNS), dtype=torch.float32, device=queries.device)
    best_scores = torch.full((batch, k), -math.inf, dtype=queries.dtype, device=queries.device)
    best_items = torch.zeros(batch, k, dtype=torch.int64, device=queries.device)
    if exclude is not None:
        rows = torch.cat([torch.full((len(e),), r, dtype=torch.int64) for r, e in enumerate(exclude)])
        cols = torch.cat([torch.as_tensor(np.asarray(e, np.int64)) for e in exclude])
        rows, cols = rows.to(queries.device), cols.to(queries.device)
    for start, owned_from in _chunk_layout(columns, width):
        torch.matmul(queries, item_matrix[start:start + width].T, out=scores)  # (B, width)
        if owned_from > start:
            scores[:, :owned_from - start] = -math.inf
        if start == 0:
            scores[:, 0] = -math.inf
        if exclude is not None:
            hit = (cols >= owned_from) & (cols < start + width)
            scores[rows[hit], cols[hit] - start] = -math.inf
        chunk_scores, chunk_items = _chunk_top_k(scores, min(k, width), buffer)
        best_scores, best_items = _merge_top_k(best_scores, best_items, chunk_scores, chunk_items + start, k)
    best_items = torch.where(best_scores == -math.inf, torch.zeros_like(best_items), best_items)
    return best_scores, best_items


def score_parts(model, queries: torch.Tensor, items: torch.Tensor,
                tables: torch.Tensor | None = None) -> torch.Tensor:
    """(B, k, S) float64 part of each stream in the scores of ``items`` (B, k): <q_s, v_s(i)>.
    They sum to the float64 score; the ranking score (the model's dtype) differs from that
    sum by its rounding only."""
    tables = model.item_tables() if tables is None else tables  # (N+1, S, d)
    S, d = tables.shape[1], tables.shape[2]
    q = queries.double().view(queries.shape[0], S, d)
    return torch.einsum("bsd,bksd->bks", q, tables[items].double())


def _seen(part: SplitPart) -> list[np.ndarray]:
    return [row[row > 0] for row in part.items]


@torch.no_grad()
def _rank_part(model, part: SplitPart, k: int, exclude_seen: bool, batch_size: int,
               progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Users, scores (n, k), items (n, k), parts (n, k, S) for every row of ``part``, in
    evaluation's batches (``iterate_batches`` over the part, ``query_by_length``)."""
    was_training = model.training
    model.eval()
    try:
        tables = model.item_tables()
        item_matrix = model.item_matrix(tables)
        out_users, out_scores, out_items, out_parts = [], [], [], []
        with tqdm(total=len(part), desc="recommend", unit="user", disable=not progress) as bar:
            for batch in iterate_batches(part, batch_size):
                device = item_matrix.device
                batch = batch.to(device)
                q = query_by_length(model, batch, tables=tables)
                exclude = [row[row > 0].cpu().numpy() for row in batch.items] if exclude_seen else None
                scores, items = top_k_items(q, item_matrix, k, exclude=exclude)
                out_users.append(batch.users.cpu().numpy())
                out_scores.append(scores.cpu().numpy())
                out_items.append(items.cpu().numpy())
                out_parts.append(score_parts(model, q, items, tables).cpu().numpy())
                bar.update(batch.size)
        return (np.concatenate(out_users), np.concatenate(out_scores), np.concatenate(out_items),
                np.concatenate(out_parts))
    finally:
        model.train(was_training)


def _frame(dataset: Dataset, stream_names, users: list[str], scores: np.ndarray, items: np.ndarray,
           parts: np.ndarray) -> pd.DataFrame:
    """The tidy recommendation table: one row per (user, rank)."""
    n, k = items.shape
    keep = (items > 0).ravel()  # slots without a candidate (everything excluded) are dropped
    lookup = dataset.items
    titles = (lookup["title"] if "title" in lookup.columns else lookup["text"]).astype(str).to_numpy()
    tokens = lookup["token"].astype(str).to_numpy()
    category = np.array(["|".join(c) if len(c) else "(none)" for c in lookup["categories"]], dtype=object)
    flat = items.ravel()
    idx = np.maximum(flat - 1, 0)
    frame = pd.DataFrame({
        "user": np.repeat(np.asarray(users, dtype=object), k),
        "rank": np.tile(np.arange(1, k + 1), n),
        "item": tokens[idx], "item_id": flat, "title": titles[idx], "category": category[idx],
        "score": scores.ravel().astype(np.float64),
    })
    for s, name in enumerate(stream_names):
        frame[f"score_{name}"] = parts[:, :, s].ravel()
    return frame[keep].reset_index(drop=True)


def recommend(model, dataset: Dataset, users=None, *, k: int = 10, exclude_seen: bool = False, at: str = "end",
              split_config: SplitConfig | None = None, batch_size: int = 2048,
              progress: bool = False) -> pd.DataFrame:
    """Each user's top-k over the whole catalogue, with every score's part per stream.

    Args:
        model: a trained :class:`~hm4sr_core.model.HM4SR` (SASRec too: one stream).
        dataset: the dataset it was trained on.
        users: user tokens (``dataset.user_tokens``); None = every user (of the ``at`` part).
        k: list length, 1..N.
        exclude_seen: drop the items of the history the model reads from the list.
        at: whose history: ``"end"`` every interaction (what comes next); ``"test"`` /
            ``"valid"`` the history evaluation ranks that part with.
        split_config: the split of ``at="test"/"valid"`` (the training run's; default
            leave-one-out at the model's max_length).
        batch_size: users per batch (evaluation's ``eval_batch_size`` reproduces its
            scores bit for bit).
        progress: a tqdm bar over the users.

    Returns:
        DataFrame, one row per (user, rank): ``user`` (token), ``rank`` (1 = best),
        ``item`` (token), ``item_id``, ``title``, ``category`` (its categories joined by
        "|"), ``score``, and ``score_<stream>`` per stream (``score_id``, ``score_text``,
        ...), float64 parts that sum to ``score`` up to its float32 rounding.
    """
    split_config = split_config or SplitConfig(max_length=model.config.max_length)
    if not 1 <= k <= dataset.num_items:
        raise ValueError(f"k must be in 1..{dataset.num_items} (the catalogue of {dataset.name!r}), got {k}")
    split = build_split(dataset, split_config) if at != "end" else None
    if users is None and split is not None:
        part = getattr(split, at)  # every user of that part, in its order
    else:
        ids = np.arange(dataset.num_users, dtype=np.int64) if users is None else user_ids(dataset, users)
        part = history_part(dataset, ids, at, split_config, split)
    got_users, scores, items, parts = _rank_part(model, part, k, exclude_seen, batch_size, progress)
    tokens = [str(dataset.user_tokens[u]) for u in got_users]
    return _frame(dataset, model.stream_names, tokens, scores, items, parts)


@torch.no_grad()
def recommend_histories(model, dataset: Dataset, histories: list[History], *, k: int = 10,
                        exclude_seen: bool = False) -> pd.DataFrame:
    """:func:`recommend` for histories given by hand (users the model never saw, or
    what-if versions of known ones), one list per history, labelled by ``History.user``."""
    if not 1 <= k <= dataset.num_items:
        raise ValueError(f"k must be in 1..{dataset.num_items} (the catalogue of {dataset.name!r}), got {k}")
    was_training = model.training
    model.eval()
    try:
        tables = model.item_tables()
        batch = _batch(histories, model.config.max_length)
        q = model.query(batch, tables=tables)
        exclude = [h.last(model.config.max_length).items for h in histories] if exclude_seen else None
        scores, items = top_k_items(q, model.item_matrix(tables), k, exclude=exclude)
        parts = score_parts(model, q, items, tables)
    finally:
        model.train(was_training)
    return _frame(dataset, model.stream_names, [h.user for h in histories], scores.numpy(), items.numpy(),
                  parts.numpy())


# ----------------------------------------------------------------------------- explanations


@dataclass
class Explanation:
    """Why one history got its list."""

    history: pd.DataFrame  # one row per history item read: position, item, title, category, timestamp, date, gap_days
    recommendations: pd.DataFrame  # as recommend_histories
    occlusion: pd.DataFrame  # (recommended item, history item): score change when that history item is removed
    gates: pd.DataFrame  # at the last history position: level, stream, expert, gate


def history_table(dataset: Dataset, history: History, max_length: int) -> pd.DataFrame:
    """The items the model reads, oldest first, with dates and the gap before each."""
    h = history.last(max_length)
    lookup = dataset.items
    titles = (lookup["title"] if "title" in lookup.columns else lookup["text"]).astype(str).to_numpy()
    gaps = np.diff(h.timestamps, prepend=h.timestamps[0]) / SECONDS_PER_DAY
    gaps = gaps.astype(np.float64)
    if len(gaps):
        gaps[0] = np.nan  # the first item has no gap before it
    return pd.DataFrame({
        "position": np.arange(len(h)), "item": lookup["token"].astype(str).to_numpy()[h.items - 1],
        "item_id": h.items, "title": titles[h.items - 1],
        "category": ["|".join(lookup["categories"].iloc[i - 1]) for i in h.items],
        "timestamp": h.timestamps, "date": pd.to_datetime(h.timestamps, unit="s", utc=True),
        "gap_days": gaps,
    })


@torch.no_grad()
def last_position_gates(model, history: History) -> pd.DataFrame:
    """The gates that routed the last history item into the query: the Interactive-MoE
    gate of each stream and the Temporal-MoE gate, with the gap bucket of that position.
    Columns level ("interactive" | "temporal"), stream ("all" for temporal), expert, gate.
    Empty for a model without either MoE (SASRec)."""
    was_training = model.training
    model.eval()
    try:
        h = history.last(model.config.max_length)
        out = model.encode(_batch([h], model.config.max_length))
    finally:
        model.train(was_training)
    last = len(h) - 1
    rows = []
    if out.interactive_gates is not None:
        g = out.interactive_gates[0, last].double().numpy()  # (S, E)
        for s, name in enumerate(model.stream_names):
            rows += [{"level": "interactive", "stream": name, "expert": e, "gate": float(g[s, e])}
                     for e in range(g.shape[1])]
    if out.temporal_gates is not None:
        r = out.temporal_gates[0, last].double().numpy()
        rows += [{"level": "temporal", "stream": "all", "expert": e, "gate": float(r[e])} for e in range(len(r))]
    frame = pd.DataFrame(rows, columns=["level", "stream", "expert", "gate"])
    if out.interval_buckets is not None:
        frame["gap_bucket"] = int(out.interval_buckets[0, last])
    return frame


@torch.no_grad()
def occlusion(model, dataset: Dataset, history: History, items: np.ndarray) -> pd.DataFrame:
    """For every history item j the model reads and every item of ``items`` (ids): the
    score change when j alone is removed from the history, full score - score without j
    (positive: j raised that item's score). The full history and its n occluded copies
    are scored in one batch, so the differences carry no batch-to-batch rounding.
    A history of one item has nothing to remove: the table is empty."""
    T = model.config.max_length
    h = history.last(T)
    n = len(h)
    columns = ["item_id", "history_position", "history_item_id", "score_change"]
    if n < 2:
        return pd.DataFrame(columns=columns)
    variants = [h] + [History(np.delete(h.items, j), np.delete(h.timestamps, j), h.user) for j in range(n)]
    was_training = model.training
    model.eval()
    try:
        tables = model.item_tables()
        q = model.query(_batch(variants, T), tables=tables).double()  # (n+1, S*d)
        v = model.item_matrix(tables)[torch.from_numpy(np.array(items, np.int64))].double()  # (k, S*d)
    finally:
        model.train(was_training)
    s = q @ v.T  # (n+1, k)
    change = (s[0:1] - s[1:]).numpy()  # (n, k)
    k = len(items)
    return pd.DataFrame({
        "item_id": np.tile(np.asarray(items, np.int64), n),
        "history_position": np.repeat(np.arange(n), k),
        "history_item_id": np.repeat(h.items, k),
        "score_change": change.ravel(),
    })


def explain(model, dataset: Dataset, history: History, *, k: int = 10, exclude_seen: bool = False) -> Explanation:
    """The top-k of ``history`` with its score parts, the occlusion of every history item
    for every recommended item, and the gates at the last history position."""
    recs = recommend_histories(model, dataset, [history], k=k, exclude_seen=exclude_seen)
    occ = occlusion(model, dataset, history, recs["item_id"].to_numpy())
    table = history_table(dataset, history, model.config.max_length)
    if len(occ):
        occ = occ.merge(recs[["item_id", "rank", "item", "title"]], on="item_id") \
                 .merge(table[["position", "item", "title", "date"]].rename(columns={
                     "position": "history_position", "item": "history_item", "title": "history_title",
                     "date": "history_date"}), on="history_position")
        occ = occ.sort_values(["rank", "score_change"], ascending=[True, False]).reset_index(drop=True)
    return Explanation(table, recs, occ, last_position_gates(model, history))


@dataclass
class WhatIf:
    """One history and the same history with its last interaction moved."""

    before: Explanation
    after: Explanation
    changes: pd.DataFrame  # per item in either list: item, title, rank_before, rank_after (NaN: not in that list)


def what_if(model, dataset: Dataset, history: History, *, gap_days: float | None = None,
            at_time: int | None = None, k: int = 10, exclude_seen: bool = False) -> WhatIf:
    """The list before and after :func:`move_last_interaction`, the gates of both, and
    which items entered, left or moved."""
    moved = move_last_interaction(history, gap_days=gap_days, at_time=at_time)
    before = explain(model, dataset, history, k=k, exclude_seen=exclude_seen)
    after = explain(model, dataset, moved, k=k, exclude_seen=exclude_seen)
    b = before.recommendations[["item", "title", "category", "rank"]].rename(columns={"rank": "rank_before"})
    a = after.recommendations[["item", "title", "category", "rank"]].rename(columns={"rank": "rank_after"})
    changes = b.merge(a, on=["item", "title", "category"], how="outer")
    changes = changes.sort_values(["rank_after", "rank_before"], na_position="last").reset_index(drop=True)
    return WhatIf(before, after, changes)


def temporal_shift(before: pd.DataFrame, after: pd.DataFrame) -> float:
    """Total variation between the Temporal-MoE gates of two :func:`last_position_gates`
    tables (0: routed alike, 1: disjoint experts); NaN without a Temporal MoE."""
    b = before[before["level"] == "temporal"]["gate"].to_numpy()
    a = after[after["level"] == "temporal"]["gate"].to_numpy()
    return float(0.5 * np.abs(a - b).sum()) if len(a) else float("nan")


# ----------------------------------------------------------------------------- the planted world


def month_rule_agreement(model, dataset: Dataset, *, k: int = 10, short_gap_days: float = 1 / 24,
                         split_config: SplitConfig | None = None, seed: int = 0) -> pd.DataFrame:
    """On a planted synthetic world: when the last history item is a return after a long
    break, how often does the top-k follow the month rule (its items in the category the
    calendar month of the return dictates)? With three histories per such test user: the
    real times; the times shuffled within the history (gaps and dates lose their order);
    the last gap set to ``short_gap_days`` (the break removed, the return's date moved back
    with it). Returns one row per condition: users, share of list items in the rule's
    category, share of lists whose first item is in it, and the chance share (items of
    that category in the catalogue)."""
    truth = planted_truth(dataset)
    threshold = float(truth.regime_rule["threshold_seconds"]) / SECONDS_PER_DAY
    split_config = split_config or SplitConfig(max_length=model.config.max_length)
    test = build_split(dataset, split_config).test
    n = test.lengths
    rows = np.arange(len(test))
    last_t = test.timestamps[rows, n - 1]
    prev_t = np.where(n > 1, test.timestamps[rows, np.maximum(n - 2, 0)], last_t)
    returns = np.flatnonzero((n > 1) & ((last_t - prev_t) / SECONDS_PER_DAY > threshold))
    item_category = np.concatenate([[-1], planted_category_of(dataset, dataset.items["token"])])
    out = []
    if len(returns) == 0:
        return pd.DataFrame(columns=["condition", "users", "rule_share", "first_item_rule_share", "chance"])
    rule = seasonal_category(dataset, last_t[returns])  # the category the real return's month dictates
    histories = {"real": [], "shuffled": [], "short gap": []}
    real = [History(test.items[r, :n[r]].copy(), test.timestamps[r, :n[r]].copy(), str(r)) for r in returns]
    histories["real"] = real
    gen = torch.Generator().manual_seed(seed)
    batch = _batch(real, model.config.max_length)
    shuffled = perturb_timestamps(batch, "shuffled", gen, 0).timestamps.numpy()
    histories["shuffled"] = [History(h.items, shuffled[i, :len(h)].copy(), h.user) for i, h in enumerate(real)]
    histories["short gap"] = [move_last_interaction(h, gap_days=short_gap_days) for h in real]
    share = np.bincount(item_category[1:], minlength=int(item_category.max()) + 1) / dataset.num_items
    for name, hs in histories.items():
        recs = recommend_histories(model, dataset, hs, k=k)
        cats = item_category[recs["item_id"].to_numpy()].reshape(len(hs), k)
        hit = cats == rule[:, None]
        out.append({"condition": name, "users": len(hs), "rule_share": float(hit.mean()),
                    "first_item_rule_share": float(hit[:, 0].mean()), "chance": float(share[rule].mean())})
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- files and text


def check_output_path(path: str | Path) -> Path:
    """An output file's path, refused before any work unless it ends in a known suffix."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {path}: expected a file ending in {', '.join(OUTPUT_SUFFIXES)}")
    if path.exists() and path.is_dir():
        raise ValueError(f"--out {path}: is a folder; give a file name")
    return path


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` as parquet, csv or jsonl (by suffix) atomically: a temporary file in
    the same folder, renamed over the target only when complete."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        elif suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", lines=True, date_format="iso")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def format_recommendations(frame: pd.DataFrame, title_width: int = 40) -> str:
    """A readable text table per user: rank, item, title, category, score and its parts."""
    parts = [c for c in frame.columns if c.startswith("score_")]
    blocks = []
    for user, rows in frame.groupby("user", sort=False):
        shown = rows[["rank", "item", "title", "category", "score", *parts]].copy()
        shown["title"] = shown["title"].map(lambda t: t if len(t) <= title_width else t[:title_width - 1] + "~")
        shown.columns = ["rank", "item", "title", "category", "score", *[p[len("score_"):] for p in parts]]
        text = shown.to_string(index=False, float_format=lambda x: f"{x:.3f}")
        blocks.append(f"user {user}  (score = {' + '.join(p[len('score_'):] for p in parts)})\n{text}")
    return "\n\n".join(blocks)


def format_explanation(explanation: Explanation, shown: int = OCCLUDED_SHOWN) -> str:
    """The history read, each recommendation's most helpful history items by occlusion,
    and the gates at the last history position, as text."""
    h = explanation.history
    lines = [f"history read by the model ({len(h)} items, oldest first; the last {min(len(h), 5)} shown):"]
    for _, r in h.tail(5).iterrows():
        gap = "" if pd.isna(r["gap_days"]) else f"  {r['gap_days']:.2f} days after the previous"
        lines.append(f"  {r['date']:%Y-%m-%d %H:%M}  {r['item']}  {r['title'][:40]}{gap}")
    occ = explanation.occlusion
    lines.append(f"why (occlusion: score change when one history item is removed; top {shown} per item):")
    for _, rec in explanation.recommendations.iterrows():
        lines.append(f"  {int(rec['rank']):>2}. {rec['item']} {rec['title'][:40]}  score {rec['score']:.3f}")
        if len(occ):
            top = occ[occ["item_id"] == rec["item_id"]].head(shown)
            lines += [f"        {r['score_change']:+.3f}  {r['history_item']} {r['history_title'][:36]} "
                      f"({r['history_date']:%Y-%m-%d})" for _, r in top.iterrows()]
    g = explanation.gates
    if len(g):
        lines.append("gates at the last history position (expert 0..E-1):")
        for (level, stream), rows in g.groupby(["level", "stream"], sort=False):
            lines.append(f"  {level:11s} {stream:6s} " + " ".join(f"{x:.3f}" for x in rows["gate"]))
    return "\n".join(lines)


def stream_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per stream, over every row of a :func:`recommend` table: the mean part, its share of
    the mean score (parts can be negative, so shares can leave [0, 1]), and how often the
    stream holds the largest part of a score."""
    parts = [c for c in frame.columns if c.startswith("score_")]
    values = frame[parts].to_numpy()
    largest = np.bincount(values.argmax(axis=1), minlength=len(parts)) / max(len(frame), 1)
    mean_score = float(frame["score"].mean())
    return pd.DataFrame({"stream": [p[len("score_"):] for p in parts], "mean_part": values.mean(axis=0),
                         "share_of_mean_score": values.mean(axis=0) / mean_score if mean_score else np.nan,
                         "largest_part_share": largest})
