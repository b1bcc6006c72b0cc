"""Raw interactions -> a filtered, re-indexed :class:`Dataset` (paper section 5 protocol).

Steps, in order, each an explicit parameter of :class:`PreprocessConfig`:
validation -> de-duplication -> iterative k-core -> deterministic ordering (same-second
ties broken by item token) -> dense id remapping -> feature alignment (encoders run
only on surviving items) -> statistics.

Ids are coded to integers first (:class:`CodedInteractions`; a categorical column, as the
Amazon reader returns, keeps its own codes), so de-duplication and k-core are array
operations and each id exists once as a string, whatever the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import PreprocessConfig
from .schema import DataError, Dataset, ModalityFeatures, RawDataset, RawModality
from .timeunits import detect_unit, to_seconds


@dataclass
class CodedInteractions:
    """Interactions as integer codes into token tables: what filtering works on, so that a
    large file's ids exist once each as strings, never once a row."""

    user: np.ndarray  # (n,) int codes into user_tokens
    item: np.ndarray  # (n,) int codes into item_tokens
    timestamp: np.ndarray  # (n,) int64 seconds
    user_tokens: np.ndarray  # (U,) distinct user tokens (str, object array)
    item_tokens: np.ndarray  # (I,) distinct item tokens (str, object array)
    time_unit: str = "seconds"  # the unit the file's timestamps were read in, and why (data.timeunits)

    def __len__(self) -> int:
        return len(self.timestamp)

    def take(self, keep: np.ndarray) -> "CodedInteractions":
        """The rows where ``keep`` (bool, (n,)) is True, in order; token tables unchanged."""
        return CodedInteractions(self.user[keep], self.item[keep], self.timestamp[keep],
                                 self.user_tokens, self.item_tokens, self.time_unit)


def _codes(column: pd.Series, name: str, file: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, distinct tokens as str) of one id column; a categorical column's own codes.

    Values that print alike (1 and "1") are one token, as when the column is cast to str.
    """
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes, tokens = column.cat.codes.to_numpy(), column.cat.categories
    else:
        codes, tokens = pd.factorize(column)
    if (codes < 0).any():
        row = int(np.flatnonzero(codes < 0)[0])
        raise DataError(f"{file}: row {row + 1}, column {name!r}: expected a token, got nothing")
    tokens = np.asarray(pd.Index(tokens).astype(str), dtype=object)
    merged, distinct = pd.factorize(tokens)
    if len(distinct) < len(tokens):
        codes = merged[codes]
        tokens = np.asarray(distinct, dtype=object)
    return codes, tokens


def encode_interactions(frame: pd.DataFrame, file: str = "<interactions>") -> CodedInteractions:
    """Check columns and timestamps; return the rows with user/item coded to integers
    (tokens as str) and timestamps floored to int64 seconds. Timestamps in milliseconds
    are recognised and converted (:func:`hm4sr_core.data.timeunits.detect_unit`); values
    that are neither seconds nor milliseconds of a date before 2100 raise DataError."""
    missing = [c for c in ("user", "item", "timestamp") if c not in frame.columns]
    if missing:
        raise DataError(f"{file}: missing column(s) {missing}; found {list(frame.columns)}")
    ts = pd.to_numeric(frame["timestamp"], errors="coerce")
    bad = ts.isna() | ~np.isfinite(ts.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{file}: row {row + 1}, column 'timestamp': expected a finite number, "
                        f"got {frame['timestamp'].iloc[row]!r}")
    if (ts < 0).any():
        row = int(np.flatnonzero((ts < 0).to_numpy())[0])
        raise DataError(f"{file}: row {row + 1}, column 'timestamp': expected seconds >= 0, "
                        f"got {ts.iloc[row]!r}")
    values = ts.to_numpy()
    unit = detect_unit(values, "seconds", file)  # seconds or milliseconds, by the rule of data.timeunits
    seconds = to_seconds(values, unit.unit)
    user, user_tokens = _codes(frame["user"], "user", file)
    item, item_tokens = _codes(frame["item"], "item", file)
    if len(frame) == 0:
        raise DataError(f"{file}: no interactions")
    return CodedInteractions(user, item, seconds, user_tokens, item_tokens, unit.note())


def deduplicate(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, mode: str) -> np.ndarray:
    """Rows to keep, (n,) bool: 'exact' drops repeated (user, item, timestamp) rows (the
    first stays); 'first' keeps each user's earliest interaction with an item; 'none' keeps
    everything. Arguments are (n,) integer arrays (user and item codes)."""
    keep = np.ones(len(timestamp), dtype=bool)
    if mode == "none" or len(timestamp) == 0:
        return keep
    order = np.lexsort((timestamp, item, user))  # stable: equal rows stay in file order
    repeat = np.ones(len(order) - 1, dtype=bool)  # row order[j + 1] repeats row order[j]
    for column in (user, item) if mode == "first" else (user, item, timestamp):
        sorted_column = column[order]
        repeat &= sorted_column[1:] == sorted_column[:-1]
    keep[order[1:][repeat]] = False
    return keep


def k_core(user: np.ndarray, item: np.ndarray, user_core: int, item_core: int) -> np.ndarray:
    """Rows to keep, (n,) bool, after iteratively dropping users with < user_core and items
    with < item_core interactions until both hold (RecBole's ``user/item_inter_num_interval:
    [k, inf)``). ``user``/``item``: (n,) non-negative integer codes."""
    rows = np.arange(len(user))
    while True:
        n = len(rows)
        for codes, core in ((item, item_core), (user, user_core)):
            if core > 0:
                current = codes[rows]
                rows = rows[np.bincount(current)[current] >= core]
        if len(rows) == n:
            keep = np.zeros(len(user), dtype=bool)
            keep[rows] = True
            return keep


def _token_order(tokens: np.ndarray) -> np.ndarray:
    """Positions that sort distinct tokens: numerically when every token is an integer,
    else lexically. Integers that print differently ("01", "1") are ordered lexically."""
    values = tokens.tolist()
    if all(t.isdigit() for t in values):
        keys = [(int(t), t) for t in values]
        return np.array(sorted(range(len(values)), key=keys.__getitem__), dtype=np.int64)
    return np.array(sorted(range(len(values)), key=values.__getitem__), dtype=np.int64)


def _dense_ids(codes: np.ndarray, tokens: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """(id per row, numbered from ``start`` in :func:`_token_order`; the tokens used, in id order)."""
    present = np.unique(codes)
    order = _token_order(tokens[present])
    ids = np.zeros(len(tokens), dtype=np.int64)
    ids[present[order]] = np.arange(start, start + len(present))
    return ids[codes], tokens[present[order]]


def _align_modality(mod: RawModality, items: pd.DataFrame) -> ModalityFeatures:
    """Features (N+1, D) row-aligned with item ids 1..N; checks coverage and values."""
    n = len(items)
    if mod.encoder is not None:
        # Encoders see original tokens under "item", as readers wrote them.
        feats, avail = mod.encoder(items.rename(columns={"item": "item_id", "token": "item"}))
        feats = np.asarray(feats, dtype=np.float32)
        avail = np.asarray(avail, dtype=bool)
        if feats.shape[0] != n or avail.shape != (n,):
            raise DataError(f"modality {mod.name!r}: encoder returned {feats.shape[0]} rows for {n} items")
        where = f"modality {mod.name!r} (encoder {mod.provenance.get('encoder', '?')})"
    else:
        where = mod.source or f"modality {mod.name!r}"
        src = np.asarray(mod.features, dtype=np.float32)
        src_avail = np.ones(len(src), bool) if mod.available is None else np.asarray(mod.available, bool)
        index = pd.Index(np.asarray(mod.feature_items).astype(str))
        if index.has_duplicates:
            dup = index[index.duplicated()][0]
            raise DataError(f"{where}: item {dup!r} has more than one feature row")
        pos = index.get_indexer(items["token"].astype(str))
        feats = np.zeros((n, src.shape[1]), np.float32)
        avail = np.zeros(n, bool)
        found = pos >= 0
        feats[found] = src[pos[found]]
        avail[found] = src_avail[pos[found]]
    bad_rows = ~np.isfinite(feats).all(axis=1) & avail  # unavailable rows are zeroed below
    if bad_rows.any():
        r = int(np.flatnonzero(bad_rows)[0])
        raise DataError(f"{where}: features of item {items['token'].iloc[r]!r} contain NaN or "
                        f"infinite values; expected finite numbers")
    if not avail.all() and not mod.optional:
        r = int(np.flatnonzero(~avail)[0])
        raise DataError(f"{where}: item {items['token'].iloc[r]!r} appears in the interactions but "
                        f"has no {mod.name} features ({int((~avail).sum())} such items); "
                        f"declare the modality optional to mask them instead")
    feats[~avail] = 0.0
    full = np.zeros((n + 1, feats.shape[1]), np.float32)
    full[1:] = feats
    full_avail = np.zeros(n + 1, bool)
    full_avail[1:] = avail
    prov = dict(mod.provenance)
    prov.setdefault("dim", int(feats.shape[1]))
    prov["available_items"] = int(avail.sum())
    return ModalityFeatures(full, full_avail, prov)


def compute_stats(interactions: pd.DataFrame, num_items: int) -> dict:
    """The statistics printed and stored with every dataset and result."""
    users = interactions["user"].nunique()
    n = len(interactions)
    lengths = interactions.groupby("user").size().to_numpy()
    ts = interactions["timestamp"].to_numpy()
    same_user = interactions["user"].to_numpy()[1:] == interactions["user"].to_numpy()[:-1]
    gaps = (ts[1:] - ts[:-1])[same_user]
    q = np.quantile(lengths, [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])
    return {
        "users": int(users),
        "items": int(num_items),
        "interactions": int(n),
        "sparsity": float(1.0 - n / (users * num_items)),
        "first_timestamp": int(ts.min()),
        "last_timestamp": int(ts.max()),
        "first_date": pd.Timestamp(int(ts.min()), unit="s", tz="UTC").strftime("%Y-%m-%d"),
        "last_date": pd.Timestamp(int(ts.max()), unit="s", tz="UTC").strftime("%Y-%m-%d"),
        "length_quantiles": {k: float(v) for k, v in zip(
            ("min", "p25", "p50", "p75", "p90", "p99", "max"), q)},
        "zero_gap_share": float((gaps == 0).mean()) if len(gaps) else 0.0,
    }


def preprocess(raw: RawDataset, config: PreprocessConfig = PreprocessConfig()) -> Dataset:
    """Filter and re-index ``raw``; run feature encoders on the surviving items only.

    Raises DataError when the input is bad or filtering leaves nothing.
    """
    file = raw.interactions_file or f"{raw.name} interactions"
    inter = encode_interactions(raw.interactions, file)
    items_table = raw.items.copy()
    if "item" not in items_table.columns:
        raise DataError(f"{raw.name} item table: missing column 'item'")
    items_table["item"] = items_table["item"].astype(str)
    if items_table["item"].duplicated().any():
        dup = items_table["item"][items_table["item"].duplicated()].iloc[0]
        raise DataError(f"{raw.name} item table: duplicate item id {dup!r}; expected unique ids")

    n_raw, time_unit = len(inter), inter.time_unit
    inter = inter.take(deduplicate(inter.user, inter.item, inter.timestamp, config.dedup))
    n_dedup = len(inter)
    inter = inter.take(k_core(inter.user, inter.item, config.user_core, config.item_core))
    if len(inter) == 0:
        raise DataError(f"{file}: {config.user_core}/{config.item_core}-core filtering removed all "
                        f"{n_dedup} interactions; lower user_core/item_core")

    item_ids, item_tokens = _dense_ids(inter.item, inter.item_tokens, start=1)
    user_ids, user_tokens = _dense_ids(inter.user, inter.user_tokens, start=0)
    frame = pd.DataFrame({"user": user_ids, "item": item_ids, "timestamp": inter.timestamp})
    del inter
    # Same-second interactions are ordered by item id: deterministic whatever the file order.
    frame = frame.sort_values(["user", "timestamp", "item"], kind="stable").reset_index(drop=True)

    meta = items_table.set_index("item").reindex(item_tokens)
    texts = meta["text"] if "text" in meta.columns else pd.Series(item_tokens, index=item_tokens)
    texts = texts.where(texts.notna(), pd.Series(item_tokens, index=item_tokens)).astype(str)
    cats = meta["categories"] if "categories" in meta.columns else pd.Series([[]] * len(meta))
    cats = [list(c) if isinstance(c, (list, tuple, np.ndarray)) else [] for c in cats]
    items = pd.DataFrame({"item": np.arange(1, len(item_tokens) + 1), "token": item_tokens.astype(str),
                          "text": texts.to_numpy(), "categories": cats})
    for extra in meta.columns:
        if extra not in ("text", "categories"):
            items[extra] = meta[extra].to_numpy()

    category_names = sorted({c for cs in cats for c in cs})
    cat_index = {c: j for j, c in enumerate(category_names)}
    categories = np.zeros((len(items) + 1, len(category_names)), np.float32)
    for i, cs in enumerate(cats, start=1):
        for c in cs:
            categories[i, cat_index[c]] = 1.0

    modalities = {}
    for mod in raw.modalities:
        if mod.name in modalities or mod.name == "id":
            raise DataError(f"{raw.name}: modality name {mod.name!r} used twice or reserved")
        modalities[mod.name] = _align_modality(mod, items)

    prep = config.to_dict()
    prep.update({"rows_read": n_raw, "rows_after_dedup": n_dedup, "rows_after_kcore": len(frame),
                 "timestamp_unit": raw.source.get("timestamp_unit", time_unit),
                 "tie_break": "same-second interactions ordered by item id (items numbered by token)"})
    return Dataset(name=raw.name, interactions=frame, items=items, user_tokens=user_tokens.astype(str),
                   category_names=category_names, categories=categories, modalities=modalities,
                   preprocessing=prep, source=dict(raw.source),
                   stats=compute_stats(frame, len(items)))
