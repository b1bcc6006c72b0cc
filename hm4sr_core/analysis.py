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
- Gates against the plant and its controls (the routing tour, notebook 00):
  :func:`with_true_time` (a shuffled-time table placed at the real gaps and dates),
  :func:`gate_spread` (how much routing differs between groups), :func:`return_positions`
  (the positions after a break, with the category the month rule points to),
  :func:`gate_shift_at_jumps` (the item after a return, where the category jumps),
  :func:`planted_routing_measures` and :func:`recovery_table` (trained gates against the
  strongest control, with a verdict in words).

Everything returns a DataFrame or a dict; nothing plots, trains or writes files.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch

from .data.schema import Dataset
from .data.synthetic import planted_truth, seasonal_category
from .data.timeunits import SECONDS_PER_DAY
from .model import HM4SR


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


def gate_shift_at_jumps(temporal_df: pd.DataFrame, threshold_days: float) -> pd.DataFrame:
    """Mean Temporal-MoE gate per expert at the item right after a return (where the
    planted world's category jumps) and at every other short pause.

    A jump position has a short gap itself (<= ``threshold_days``) and follows a position
    whose gap was longer. Returns one row per expert: expert, other_short, jump, shift
    (jump - other_short); ``attrs`` "total_variation", "n_jump", "n_other" (positions).
    """
    first = temporal_df["expert"].min()
    pos = temporal_df.loc[temporal_df["expert"] == first, ["example", "position", "gap_days"]]
    prev = pos.assign(position=pos["position"] + 1).rename(columns={"gap_days": "previous_gap_days"})
    pos = pos.merge(prev, on=["example", "position"], how="left")
    short = pos["gap_days"].notna() & (pos["gap_days"] <= threshold_days)
    jump = short & (pos["previous_gap_days"] > threshold_days)
    label = pd.Series(np.where(jump, "jump", np.where(short, "other_short", "")), index=pos.index)
    keyed = temporal_df.merge(pos[["example", "position"]].assign(_kind=label.to_numpy()), on=["example", "position"])
    means = keyed[keyed["_kind"] != ""].groupby(["_kind", "expert"])["gate"].mean().unstack("_kind")
    experts = np.sort(pd.unique(temporal_df["expert"]))
    means = means.reindex(index=experts, columns=["other_short", "jump"])
    out = pd.DataFrame({"expert": experts, "other_short": means["other_short"].to_numpy(),
                        "jump": means["jump"].to_numpy()})
    out["shift"] = out["jump"] - out["other_short"]
    out.attrs["total_variation"] = float(0.5 * out["shift"].abs().sum(min_count=1))
    out.attrs["n_jump"] = int(jump.sum())
    out.attrs["n_other"] = int((short & ~jump).sum())
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


# ----------------------------------------------------------------------------- gates against the plant

# The columns of a gate table that say when a position happened (gate_table's time columns).
TIME_COLUMNS = ("timestamp", "date", "gap_seconds", "gap_days", "gap_bucket", "time_value")
# A plant counts as recovered when the trained gates show at least RECOVERY_RATIO times the
# strongest control's effect and at least RECOVERY_MIN_EFFECT in total-variation units
# (0 = the same mean gate everywhere, 1 = disjoint experts).
RECOVERY_RATIO = 2.0
RECOVERY_MIN_EFFECT = 0.05


def with_true_time(gates_df: pd.DataFrame, reference_df: pd.DataFrame) -> pd.DataFrame:
    """The gates of ``gates_df`` (e.g. computed with shuffled timestamps) with the time
    columns of ``reference_df`` (the same part with real time): each gate stays where the
    model gave it, now labelled with what really happened there, so a control groups the
    positions as the trained model's table does.

    Raises ValueError when the two tables do not hold the same rows (examples, positions,
    streams, experts, items) in the same order."""
    keys = [c for c in ("example", "position", "item", "stream", "expert") if c in gates_df.columns]
    same = len(gates_df) == len(reference_df) and all(
        c in reference_df.columns and np.array_equal(gates_df[c].to_numpy(), reference_df[c].to_numpy())
        for c in keys)
    if not same:
        raise ValueError(f"with_true_time: the tables differ in their rows ({len(gates_df)} and {len(reference_df)} "
                         f"rows, compared on {keys}); compute both over the same part and max_users")
    out = gates_df.copy()
    for column in TIME_COLUMNS:
        out[column] = reference_df[column].to_numpy()
    out["date"] = pd.to_datetime(out["timestamp"], unit="s", utc=True)
    return out


def gate_spread(gates_df: pd.DataFrame, by: str) -> pd.DataFrame:
    """How much the mean gate differs between the groups of column ``by`` (e.g. "category").

    For each group, the total variation between its mean gate and the mean gate over all
    positions (half the summed absolute difference over experts), averaged over groups
    weighted by their positions: 0 = routing ignores the grouping, 1 = every group has
    experts of its own. An untrained model reads near 0.

    Args:
        gates_df: :func:`~hm4sr_core.introspect.gate_table` or
            :func:`~hm4sr_core.introspect.temporal_gate_table` (or a subset of rows).
        by: the grouping column.
    Returns:
        One row per stream (a single row for a temporal table): [stream,] spread,
        groups (how many), positions. NaN spread when there are no rows.
    """
    if by not in gates_df.columns:
        raise ValueError(f"gate_spread: no column {by!r}; the table has {list(gates_df.columns)}")
    streams = ["stream"] if "stream" in gates_df.columns else []
    rows = []
    parts = gates_df.groupby(streams, observed=True, sort=False) if streams else [((), gates_df)]
    for key, sub in parts:
        overall = sub.groupby("expert")["gate"].mean()
        means = sub.groupby([by, "expert"], observed=True)["gate"].mean().unstack("expert")
        positions = sub.groupby(by, observed=True).size().reindex(means.index) / max(len(overall), 1)
        tv = 0.5 * (means - overall.reindex(means.columns).to_numpy()).abs().sum(axis=1)
        spread = float(np.average(tv, weights=positions)) if len(tv) else float("nan")
        row = {"spread": spread, "groups": int(len(tv)), "positions": int(positions.sum())}
        if streams:
            row = {"stream": str(key[0] if isinstance(key, tuple) else key), **row}
        rows.append(row)
    if not rows:
        rows = [{**({"stream": None} if streams else {}), "spread": float("nan"), "groups": 0, "positions": 0}]
    return pd.DataFrame(rows)


def return_positions(temporal_df: pd.DataFrame, dataset: Dataset, threshold_days: float) -> pd.DataFrame:
    """The rows of a gate table at positions right after a break (gap > ``threshold_days``),
    with ``season_category``: the category the planted month rule points to for a return
    at that date (the category of the jump that follows the return). Synthetic world only."""
    names = planted_truth(dataset).category_names
    rows = temporal_df[temporal_df["gap_days"] > threshold_days]
    season = seasonal_category(dataset, rows["timestamp"].to_numpy(np.int64))
    return rows.assign(season_category=pd.Categorical(np.asarray(names, dtype=object)[season], categories=names))


def planted_routing_measures(dataset: Dataset, threshold_days: float, *, gates: pd.DataFrame,
                             temporal: pd.DataFrame, untrained_gates: pd.DataFrame,
                             untrained_temporal: pd.DataFrame, shuffled_temporal: pd.DataFrame,
                             dropped_gates: pd.DataFrame, dropped: str) -> pd.DataFrame:
    """The planted effects a gate could show, measured on the trained model and its controls.

    Plants (synthetic world):
      - "category -> <m> gates", for each feature modality m: the features were built from a
        category prototype, so the m stream's Interactive-MoE gates may differ by the
        category of the item (:func:`gate_spread` by category). Controls: the untrained
        model, and for the ``dropped`` modality the model without it.
      - "break -> temporal gate": a break longer than the threshold changes what comes next,
        so the Temporal-MoE gate may shift after one (total variation of
        :func:`gate_shift_after_long_gap`). Controls: shuffled time (placed at the real gaps
        with :func:`with_true_time`), the untrained model.
      - "return month -> temporal gate": the month of a return sets the category of the
        jump after it, so the Temporal-MoE gate at a return may differ by that category
        (:func:`gate_spread` of :func:`return_positions` by season_category). Same controls.
      - "jump after a return -> temporal gate": the jump lands on the item after the return,
        whose own gap is short (:func:`gate_shift_at_jumps`). The gate reads only its own
        position's gap and date, so it has no way to single that item out: the plant a
        gate cannot recover, measured like the others. Same controls.

    All tables cover the same part and users; ``*_temporal`` come from
    :func:`~hm4sr_core.introspect.temporal_gate_table`, the others from
    :func:`~hm4sr_core.introspect.gate_table`; ``shuffled_temporal`` with time_mode="shuffled".

    Returns:
        Long table: plant, claim (in words), condition ("trained" or the control's name),
        value, positions (how many positions the value rests on).
    """
    rows = []

    def add(plant, claim, condition, value, positions):
        rows.append({"plant": plant, "claim": claim, "condition": condition, "value": float(value),
                     "positions": int(positions)})

    modalities = [s for s in pd.unique(gates["stream"].astype(str)) if s in dataset.modalities]
    conditions = [("trained", gates), ("untrained", untrained_gates), (f"{dropped} dropped", dropped_gates)]
    for m in modalities:
        claim = f"{m} features carry the category: the {m} stream's gates differ by item category"
        for condition, table in conditions:
            if condition.endswith("dropped") and m != dropped:
                continue  # dropping another modality is no control for this stream
            row = gate_spread(table[table["stream"].astype(str) == m], "category").iloc[0]
            add(f"category -> {m} gates", claim, condition, row["spread"], row["positions"])
    shuffled = with_true_time(shuffled_temporal, temporal)
    timed = [("trained", temporal), ("shuffled time", shuffled), ("untrained", untrained_temporal)]
    claim = f"a break over {threshold_days:g} days changes what comes next: the temporal gate shifts after one"
    for condition, table in timed:
        shift = gate_shift_after_long_gap(table, threshold_days)
        add("break -> temporal gate", claim, condition, shift.attrs["total_variation"], shift.attrs["n_long"])
    claim = "the month of a return sets the next category: the temporal gate at a return differs by it"
    for condition, table in timed:
        row = gate_spread(return_positions(table, dataset, threshold_days), "season_category").iloc[0]
        add("return month -> temporal gate", claim, condition, row["spread"], row["positions"])
    claim = "the category jumps at the item after a return: the temporal gate there differs from other short pauses"
    for condition, table in timed:
        shift = gate_shift_at_jumps(table, threshold_days)
        add("jump after a return -> temporal gate", claim, condition, shift.attrs["total_variation"],
            shift.attrs["n_jump"])
    return pd.DataFrame(rows)


def recovery_table(measures: pd.DataFrame, *, ratio: float = RECOVERY_RATIO,
                   min_effect: float = RECOVERY_MIN_EFFECT) -> pd.DataFrame:
    """Did the trained gates recover each plant? One row per plant of
    :func:`planted_routing_measures`: plant, claim, trained, control (the strongest),
    control_value, ratio (trained / control_value), recovered (trained >= ``ratio`` x the
    strongest control and >= ``min_effect``), verdict (a sentence saying so, with the numbers).
    """
    out = []
    for plant, sub in measures.groupby("plant", sort=False):
        trained = sub.loc[sub["condition"] == "trained", "value"]
        if len(trained) != 1:
            raise ValueError(f"recovery_table: plant {plant!r} needs exactly one 'trained' row, has {len(trained)}")
        value = float(trained.iloc[0])
        controls = sub[sub["condition"] != "trained"]
        if controls.empty:
            raise ValueError(f"recovery_table: plant {plant!r} has no control")
        strongest = controls.loc[controls["value"].fillna(np.inf).idxmax()]
        control_value = float(strongest["value"])
        rate = value / control_value if control_value > 0 else float("inf")
        measurable = np.isfinite(value) and np.isfinite(control_value)
        recovered = bool(measurable and value >= ratio * control_value and value >= min_effect)
        if not measurable:
            verdict = "not measurable: no positions to measure it on"
        elif recovered:
            verdict = (f"recovered: {value:.3f} against at most {control_value:.3f} ({strongest['condition']}), "
                       f"{rate:.1f} x")
        else:
            verdict = (f"NOT recovered: {value:.3f} against {control_value:.3f} ({strongest['condition']}); "
                       f"recovery needs at least {ratio:g} x the strongest control and at least {min_effect:g}")
        out.append({"plant": plant, "claim": sub["claim"].iloc[0], "trained": value,
                    "control": strongest["condition"], "control_value": control_value, "ratio": rate,
                    "recovered": recovered, "verdict": verdict})
    return pd.DataFrame(out)
