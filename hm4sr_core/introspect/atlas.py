"""Item representations as the scores use them (docs/model.md 2.6) and a seeded 2-D
atlas of them (UMAP), with each item's dominant Interactive-MoE expert."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..data.schema import Dataset
from ..model import HM4SR
from ._common import eval_mode, item_lookup
from .gates import dominant_expert

# Below this many points UMAP's neighbour graph is too small to mean anything.
UMAP_MIN_POINTS = 10


def item_embeddings(model: HM4SR) -> dict[str, np.ndarray]:
    """Item representations as the scores use them (no position, no MoE).

    Returns:
        {"id": (N, d), <modality>: (N, d) projected features (zeros where an item lacks
        the modality), ..., "fused": (N, S*d) their concatenation (the late-fusion item
        vector)}; row i-1 = item i (padding row dropped), float32.
    """
    with eval_mode(model):
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
    lookup = item_lookup(dataset).iloc[1:].reset_index(drop=True)
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
