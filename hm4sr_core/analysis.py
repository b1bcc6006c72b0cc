"""Small analyses the notebooks show beside :mod:`hm4sr_core.introspect`: dataset
distributions, the dropped-modality control, and comparisons with what the planted
synthetic world put in (evaluation.md item 7: a claim that "expert k handles X" is
shown next to a control).

- Data: :func:`sequence_lengths`, :func:`time_gaps`, :func:`category_counts`.
- Controls: :func:`drop_modality` (a model whose stream for one modality sees nothing).
- Planted truth (synthetic world only): :func:`planted_summary`,
  :func:`gate_shift_after_long_gap` (does the Temporal-MoE route positions after a
  long break differently, paper Sec. 3.3), :func:`neighbour_agreement` (do item
  representations keep the category the features were built from).

Everything returns a DataFrame or a dict; nothing plots, trains or writes files.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch

from .data.schema import Dataset
from .data.synthetic import planted_truth
from .model import HM4SR

SECONDS_PER_DAY = 86_400.0


# ----------------------------------------------------------------------------- data


def sequence_lengths(dataset: Dataset) -> pd.DataFrame:
    """Interactions per user: columns user, length (one row per user, user order)."""
    counts = np.bincount(dataset.interactions["user"].to_numpy(), minlength=dataset.num_users)
    return pd.DataFrame({"user": np.arange(dataset.num_users), "length": counts})


def time_gaps(dataset: Dataset) -> pd.DataFrame:
    """Gaps between consecutive interactions of the same user.

    Returns one row per gap: user, gap_seconds (int64, >= 0), gap_days, log10_gap_days
    (NaN for a zero gap: a log axis has no place for it), zero (gap == 0: two
    interactions in the same second, e.g. ratings entered in one sitting)."""
    inter = dataset.interactions  # sorted by (user, timestamp, item)
    users = inter["user"].to_numpy()
    ts = inter["timestamp"].to_numpy(np.int64)
    same = users[1:] == users[:-1]
    gaps = (ts[1:] - ts[:-1])[same]
    days = gaps / SECONDS_PER_DAY
    log_days = np.full(len(gaps), np.nan)
    log_days[gaps > 0] = np.log10(days[gaps > 0])
    return pd.DataFrame({"user": users[1:][same], "gap_seconds": gaps, "gap_days": days,
                         "log10_gap_days": log_days, "zero": gaps == 0})


def category_counts(dataset: Dataset) -> pd.DataFrame:
    """Items and interactions per category (an item in several categories counts in each).

    Returns columns category, items, interactions; most interactions first."""
    cats = dataset.categories[1:] > 0  # (N, C)
    per_item = np.bincount(dataset.interactions["item"].to_numpy(), minlength=dataset.num_items + 1)[1:]
    frame = pd.DataFrame({"category": dataset.category_names, "items": cats.sum(0).astype(np.int64),
                          "interactions": (cats * per_item[:, None]).sum(0).astype(np.int64)})
    return frame.sort_values(["interactions", "category"], ascending=[False, True], kind="stable",
                             ignore_index=True)


# ----------------------------------------------------------------------------- controls


def drop_modality(model: HM4SR, modality: str) -> HM4SR:
    """A copy of ``model`` in which every item lacks ``modality``: that stream's item
    representation is zero (the same masking as an item without the modality), so its
    gates and outputs show what the model does without the signal. ``model`` is unchanged."""
    if modality not in model.modalities:
        raise ValueError(f"drop_modality: the model has no modality {modality!r}; "
                         f"it has {list(model.modalities)}")
    control = copy.deepcopy(model)
    index = model.modalities.index(modality)
    with torch.no_grad():
        getattr(control, f"available_{index}").zero_()
    return control


# ----------------------------------------------------------------------------- planted truth


def planted_summary(dataset: Dataset) -> dict:
    """What the synthetic world planted, in plain values (raises DataError on other data).

    Keys: long_gap_days (threshold), long_gap_share, follow_prob (share of returns that
    follow the seasonal table), return_lag (interactions between a return and its jump),
    month_category ({month name: category name}),
    stay_prob_range, text_dims, image_signal_dims, image_noise_dims."""
    truth = planted_truth(dataset)
    rule = truth.regime_rule
    months = pd.date_range("2021-01-01", periods=12, freq="MS").strftime("%B")
    return {
        "long_gap_days": rule["threshold_seconds"] / SECONDS_PER_DAY,
        "long_gap_share": rule["long_gap_share"],
        "follow_prob": rule["follow_prob"],
        "return_lag": rule.get("return_lag", 0),  # worlds made before return_lag jumped on the return itself
        "month_category": {m: truth.category_names[c] for m, c in zip(months, rule["month_category"])},
        "stay_prob_range": list(rule["stay_prob_range"]),
        "text_dims": truth.params["text_dim"],
        "image_signal_dims": len(truth.image["signal_dims"]),
        "image_noise_dims": len(truth.image["noise_dims"]),
    }


def gate_shift_after_long_gap(temporal_df: pd.DataFrame, threshold_days: float) -> pd.DataFrame:
    """Mean Temporal-MoE gate per expert after short and after long gaps.

    Args:
        temporal_df: :func:`hm4sr_core.introspect.temporal_gate_table` (first items,
            which have no gap, are left out).
        threshold_days: a gap longer than this is "long" (the planted threshold).
    Returns:
        One row per expert: expert, short_gap, long_gap (mean gates; each column sums to
        1 over experts), shift (long - short). ``attrs``: "total_variation" (half the sum
        of |shift|: 0 = the gate ignores the break, 1 = disjoint experts), "n_short",
        "n_long" (positions). NaN columns when a class has no position.
    """
    df = temporal_df[temporal_df["gap_days"].notna()]
    long_gap = df["gap_days"] > threshold_days
    short = df[~long_gap].groupby("expert")["gate"].mean()
    long = df[long_gap].groupby("expert")["gate"].mean()
    experts = np.sort(pd.unique(temporal_df["expert"]))
    out = pd.DataFrame({"expert": experts, "short_gap": short.reindex(experts).to_numpy(),
                        "long_gap": long.reindex(experts).to_numpy()})
    out["shift"] = out["long_gap"] - out["short_gap"]
    out.attrs["total_variation"] = float(0.5 * out["shift"].abs().sum(min_count=1))
    n_experts = max(len(experts), 1)
    out.attrs["n_short"] = int((~long_gap).sum()) // n_experts
    out.attrs["n_long"] = int(long_gap.sum()) // n_experts
    return out


def neighbour_agreement(embeddings: dict[str, np.ndarray], labels, k: int = 10) -> pd.DataFrame:
    """How often an item's nearest neighbours (cosine) share its label, per embedding space.

    Args:
        embeddings: space name -> (n, D) matrix, e.g. :func:`hm4sr_core.introspect.item_embeddings`.
        labels: (n,) one label per row (e.g. the planted or first category).
        k: neighbours per item (capped at n - 1).
    Returns:
        One row per space: space, agreement (mean share of the k neighbours with the same
        label), chance (the share expected when neighbours are random: same-label pairs /
        all pairs), lift (agreement / chance). Rows with a zero vector have no direction
        and are left out of that space.
    """
    labels = np.asarray(labels)
    rows = []
    for space, matrix in embeddings.items():
        x = np.asarray(matrix, dtype=np.float64)
        if x.shape[0] != len(labels):
            raise ValueError(f"neighbour_agreement: space {space!r} has {x.shape[0]} rows, labels {len(labels)}")
        norms = np.linalg.norm(x, axis=1)
        keep = norms > 0
        x, lab = x[keep] / norms[keep, None], labels[keep]
        n = len(lab)
        if n < 2:
            rows.append({"space": space, "agreement": np.nan, "chance": np.nan, "lift": np.nan})
            continue
        kk = min(k, n - 1)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        # argsort with a stable kind: ties resolve by row order, so the answer is repeatable
        nearest = np.argsort(-sim, axis=1, kind="stable")[:, :kk]
        agreement = float((lab[nearest] == lab[:, None]).mean())
        _, counts = np.unique(lab, return_counts=True)
        chance = float((counts * (counts - 1)).sum() / (n * (n - 1)))
        rows.append({"space": space, "agreement": agreement, "chance": chance,
                     "lift": agreement / chance if chance > 0 else np.nan})
    return pd.DataFrame(rows)
