"""Raw interactions -> a filtered, re-indexed :class:`Dataset` (paper section 5 protocol).

Steps, in order, each an explicit parameter of :class:`PreprocessConfig`:
validation -> de-duplication -> iterative k-core -> deterministic ordering (same-second
ties broken by item token) -> dense id remapping -> feature alignment (encoders run
only on surviving items) -> statistics.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import PreprocessConfig
from .schema import DataError, Dataset, ModalityFeatures, RawDataset, RawModality


def validate_interactions(frame: pd.DataFrame, file: str = "<interactions>") -> pd.DataFrame:
    """Check columns and timestamps; return a copy with user/item as str, timestamp int64."""
    missing = [c for c in ("user", "item", "timestamp") if c not in frame.columns]
    if missing:
        raise DataError(f"{file}: missing column(s) {missing}; found {list(frame.columns)}")
    out = frame[["user", "item", "timestamp"]].copy()
    ts = pd.to_numeric(out["timestamp"], errors="coerce")
    bad = ts.isna() | ~np.isfinite(ts.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{file}: row {row + 1}, column 'timestamp': expected a finite number, "
                        f"got {frame['timestamp'].iloc[row]!r}")
    if (ts < 0).any():
        row = int(np.flatnonzero((ts < 0).to_numpy())[0])
        raise DataError(f"{file}: row {row + 1}, column 'timestamp': expected seconds >= 0, "
                        f"got {ts.iloc[row]!r}")
    out["timestamp"] = np.floor(ts.to_numpy(dtype=np.float64)).astype(np.int64)
    for col in ("user", "item"):
        if out[col].isna().any():
            row = int(np.flatnonzero(out[col].isna().to_numpy())[0])
            raise DataError(f"{file}: row {row + 1}, column {col!r}: expected a token, got nothing")
        out[col] = out[col].astype(str)
    if len(out) == 0:
        raise DataError(f"{file}: no interactions")
    return out


def deduplicate(frame: pd.DataFrame, mode: str) -> pd.DataFrame:
    """'exact' drops repeated (user, item, timestamp) rows; 'first' keeps each user's first
    interaction with an item; 'none' keeps everything."""
    if mode == "none":
        return frame
    if mode == "exact":
        return frame.drop_duplicates(["user", "item", "timestamp"])
    ordered = frame.sort_values(["user", "timestamp", "item"], kind="stable")
    return ordered.drop_duplicates(["user", "item"])


def k_core(frame: pd.DataFrame, user_core: int, item_core: int) -> pd.DataFrame:
    """Iteratively drop users with < user_core and items with < item_core interactions
    until both hold (RecBole's ``user/item_inter_num_interval: [k, inf)``)."""
    while True:
        n = len(frame)
        if item_core > 0:
            counts = frame["item"].map(frame["item"].value_counts())
            frame = frame[counts >= item_core]
        if user_core > 0:
            counts = frame["user"].map(frame["user"].value_counts())
            frame = frame[counts >= user_core]
        if len(frame) == n:
            return frame


def _token_order(tokens: pd.Series) -> np.ndarray:
    """Sorted unique tokens: numerically when every token is an integer, else lexically."""
    unique = pd.unique(tokens)
    if all(t.isdigit() for t in unique):
        return np.array(sorted(unique, key=int), dtype=object)
    return np.array(sorted(unique), dtype=object)


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
    inter = validate_interactions(raw.interactions, file)
    items_table = raw.items.copy()
    if "item" not in items_table.columns:
        raise DataError(f"{raw.name} item table: missing column 'item'")
    items_table["item"] = items_table["item"].astype(str)
    if items_table["item"].duplicated().any():
        dup = items_table["item"][items_table["item"].duplicated()].iloc[0]
        raise DataError(f"{raw.name} item table: duplicate item id {dup!r}; expected unique ids")

    n_raw = len(inter)
    inter = deduplicate(inter, config.dedup)
    n_dedup = len(inter)
    inter = k_core(inter, config.user_core, config.item_core)
    if len(inter) == 0:
        raise DataError(f"{file}: {config.user_core}/{config.item_core}-core filtering removed all "
                        f"{n_dedup} interactions; lower user_core/item_core")

    item_tokens = _token_order(inter["item"])
    user_tokens = _token_order(inter["user"])
    item_id = pd.Series(np.arange(1, len(item_tokens) + 1), index=item_tokens)
    user_id = pd.Series(np.arange(len(user_tokens)), index=user_tokens)
    frame = pd.DataFrame({
        "user": user_id.reindex(inter["user"]).to_numpy(np.int64),
        "item": item_id.reindex(inter["item"]).to_numpy(np.int64),
        "timestamp": inter["timestamp"].to_numpy(np.int64),
    })
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
                 "tie_break": "same-second interactions ordered by item id (items numbered by token)"})
    return Dataset(name=raw.name, interactions=frame, items=items, user_tokens=user_tokens.astype(str),
                   category_names=category_names, categories=categories, modalities=modalities,
                   preprocessing=prep, source=dict(raw.source),
                   stats=compute_stats(frame, len(items)))
