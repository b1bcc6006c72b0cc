"""hm4sr_core.analysis: dataset distributions, the dropped-modality control and the
planted-truth comparisons the notebooks show, on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from hm4sr_core.analysis import (category_counts, drop_modality, gate_shift_after_long_gap, gate_shift_at_jumps,
                                 gate_spread,
                                 neighbour_agreement, planted_routing_measures, planted_summary, recovery_table,
                                 return_positions, sequence_lengths, time_gaps, with_true_time)
from hm4sr_core.data.synthetic import seasonal_category
from hm4sr_core.introspect import gate_table, temporal_gate_table
from hm4sr_core.train import initial_model
from hm4sr_core.config import PreprocessConfig
from hm4sr_core.data.preprocess import preprocess
from hm4sr_core.data.schema import DataError
from hm4sr_core.model import build_model

DAY = 86_400


@pytest.fixture
def hand_ds(make_raw):
    """u1: a, b at t=10 (same second), c at t=50; u2: a at 5, c at 7. Items a, b, c in
    categories ca, cb, cc."""
    raw = make_raw([("u1", "a", 10), ("u1", "b", 10), ("u1", "c", 50), ("u2", "a", 5), ("u2", "c", 7)])
    return preprocess(raw, PreprocessConfig(user_core=0, item_core=0))


def test_sequence_lengths_count_each_users_interactions(hand_ds):
    lengths = sequence_lengths(hand_ds)
    by_token = dict(zip(hand_ds.user_tokens[lengths["user"]], lengths["length"]))
    assert by_token == {"u1": 3, "u2": 2}


def test_time_gaps_stay_within_each_user(hand_ds):
    gaps = time_gaps(hand_ds)
    assert sorted(gaps["gap_seconds"].tolist()) == [0, 2, 40]  # never u1's last -> u2's first
    assert gaps["zero"].tolist().count(True) == 1
    zero = gaps[gaps["zero"]]
    assert zero["log10_gap_days"].isna().all()
    forty = gaps[gaps["gap_seconds"] == 40].iloc[0]
    assert forty["log10_gap_days"] == pytest.approx(math.log10(40 / DAY))


def test_category_counts_count_items_and_interactions(hand_ds):
    counts = category_counts(hand_ds).set_index("category")
    assert counts.loc["ca"].tolist() == [1, 2] and counts.loc["cb"].tolist() == [1, 1]
    assert counts.loc["cc"].tolist() == [1, 2]
    assert counts["interactions"].is_monotonic_decreasing


def test_drop_modality_zeroes_one_stream_and_leaves_the_model_alone(tiny_ds, tiny_model_config):
    torch.manual_seed(0)
    model = build_model(tiny_model_config, tiny_ds)
    control = drop_modality(model, "image")
    before, after = model.item_tables().detach(), control.item_tables().detach()
    image = model.stream_names.index("image")
    assert torch.count_nonzero(after[:, image]) == 0
    assert torch.count_nonzero(before[1:, image]) > 0  # the original still sees its images
    keep = [s for s in range(len(model.stream_names)) if s != image]
    assert torch.equal(before[:, keep], after[:, keep])
    with pytest.raises(ValueError, match="no modality 'audio'"):
        drop_modality(model, "audio")


def test_planted_summary_reads_the_synthetic_truth(tiny_ds, hand_ds):
    planted = planted_summary(tiny_ds)
    assert planted["long_gap_days"] == 30.0 and len(planted["month_category"]) == 12
    assert list(planted["month_category"])[0] == "January"
    assert planted["image_signal_dims"] + planted["image_noise_dims"] == 8  # conftest's image_dim
    with pytest.raises(DataError, match="make_synthetic_world"):
        planted_summary(hand_ds)


def test_gate_shift_after_long_gap_by_hand():
    # Two positions after short gaps (gates 0.8/0.2 and 0.6/0.4), one after a 40-day gap
    # (0.1/0.9), one first item (no gap: left out).
    rows = [(1.0, 0, 0.8), (1.0, 1, 0.2), (0.5, 0, 0.6), (0.5, 1, 0.4), (40.0, 0, 0.1), (40.0, 1, 0.9),
            (np.nan, 0, 0.5), (np.nan, 1, 0.5)]
    df = pd.DataFrame(rows, columns=["gap_days", "expert", "gate"])
    shift = gate_shift_after_long_gap(df, threshold_days=30.0)
    assert shift["short_gap"].tolist() == pytest.approx([0.7, 0.3])
    assert shift["long_gap"].tolist() == pytest.approx([0.1, 0.9])
    assert shift.attrs["total_variation"] == pytest.approx(0.6)
    assert (shift.attrs["n_short"], shift.attrs["n_long"]) == (2, 1)


def test_neighbour_agreement_by_hand():
    # Two tight clusters, labelled by cluster: every neighbour agrees; shuffled labels do not.
    x = np.array([[1.0, 0.0], [0.99, 0.05], [0.98, -0.05], [0.0, 1.0], [0.05, 0.99], [-0.05, 0.98]])
    labels = np.array(["a", "a", "a", "b", "b", "b"])
    table = neighbour_agreement({"clustered": x, "with_zero": np.vstack([x[:5], np.zeros(2)])}, labels, k=2)
    clustered = table.set_index("space").loc["clustered"]
    assert clustered["agreement"] == 1.0
    assert clustered["chance"] == pytest.approx(2 * 3 * 2 / (6 * 5))  # same-label pairs / pairs
    zero = table.set_index("space").loc["with_zero"]  # the zero row has no direction: left out
    assert zero["chance"] == pytest.approx((3 * 2 + 2 * 1) / (5 * 4))
    mixed = neighbour_agreement({"s": x}, np.array(["a", "b", "a", "b", "a", "b"]), k=2)
    assert mixed["agreement"].iloc[0] < 0.5
    with pytest.raises(ValueError, match="has 6 rows, labels 5"):
        neighbour_agreement({"s": x}, labels[:5])


def _gates(rows) -> pd.DataFrame:
    """A temporal-style gate table from (category, gate of expert 0) per position, 2 experts."""
    return pd.DataFrame([{"example": 0, "position": p, "category": c, "expert": k, "gate": g if k == 0 else 1 - g}
                         for p, (c, g) in enumerate(rows) for k in (0, 1)])


def test_gate_spread_by_hand():
    # A: 3 positions routed (1, 0), B: 1 position (0, 1); overall (0.75, 0.25)
    # TV(A) = 0.25, TV(B) = 0.75, weighted by positions: (3 * 0.25 + 0.75) / 4 = 0.375
    table = _gates([("A", 1.0), ("A", 1.0), ("A", 1.0), ("B", 0.0)])
    got = gate_spread(table, "category")
    assert got.to_dict("records") == [{"spread": pytest.approx(0.375), "groups": 2, "positions": 4}]
    assert gate_spread(_gates([("A", 0.5), ("B", 0.5)]), "category")["spread"].item() == 0.0  # uniform routing
    with_streams = pd.concat([table.assign(stream="text"), _gates([("A", 0.5), ("B", 0.5)]).assign(stream="id")])
    per_stream = gate_spread(with_streams, "category").set_index("stream")["spread"]
    assert per_stream.to_dict() == {"text": pytest.approx(0.375), "id": 0.0}
    with pytest.raises(ValueError, match="no column 'month'"):
        gate_spread(table, "month")


def test_recovery_table_by_hand():
    measures = pd.DataFrame([
        ("routed", "c1", "trained", 0.30), ("routed", "c1", "untrained", 0.05), ("routed", "c1", "shuffled", 0.10),
        ("tiny", "c2", "trained", 0.04), ("tiny", "c2", "untrained", 0.01),
        ("close", "c3", "trained", 0.30), ("close", "c3", "untrained", 0.20),
    ], columns=["plant", "claim", "condition", "value"])
    got = recovery_table(measures).set_index("plant")
    assert got.loc["routed", "recovered"] and got.loc["routed", "control"] == "shuffled"
    assert got.loc["routed", "ratio"] == pytest.approx(3.0) and got.loc["routed", "verdict"].startswith("recovered")
    assert not got.loc["tiny", "recovered"]  # 4 x its control, but below the smallest effect that counts
    assert not got.loc["close", "recovered"]  # above 0.05 but only 1.5 x its control
    assert got.loc["close", "verdict"].startswith("NOT recovered: 0.300 against 0.200 (untrained)")
    assert recovery_table(measures, ratio=1.2).set_index("plant").loc["close", "recovered"]
    with pytest.raises(ValueError, match="exactly one 'trained'"):
        recovery_table(measures[measures["condition"] != "trained"])


def test_routing_measures_on_the_planted_world(tiny_ds, tiny_model_config):
    model = initial_model(tiny_ds, tiny_model_config, 0)
    threshold = planted_summary(tiny_ds)["long_gap_days"]
    gates, temporal = gate_table(model, tiny_ds), temporal_gate_table(model, tiny_ds)
    shuffled = temporal_gate_table(model, tiny_ds, time_mode="shuffled")
    placed = with_true_time(shuffled, temporal)
    assert placed["gate"].equals(shuffled["gate"]) and placed["gap_days"].equals(temporal["gap_days"])
    assert not shuffled["gap_days"].equals(temporal["gap_days"])
    with pytest.raises(ValueError, match="differ in their rows"):
        with_true_time(shuffled.iloc[:-4], temporal)

    returns = return_positions(temporal, tiny_ds, threshold)
    assert len(returns) > 0 and (returns["gap_days"] > threshold).all()
    expected = seasonal_category(tiny_ds, returns["timestamp"].to_numpy())
    assert (returns["season_category"].cat.codes.to_numpy() == expected).all()

    dropped = gate_table(drop_modality(model, "text"), tiny_ds)
    measures = planted_routing_measures(tiny_ds, threshold, gates=gates, temporal=temporal, untrained_gates=gates,
                                        untrained_temporal=temporal, shuffled_temporal=shuffled,
                                        dropped_gates=dropped, dropped="text")
    conditions = measures.groupby("plant", sort=False)["condition"].apply(list).to_dict()
    assert conditions == {"category -> text gates": ["trained", "untrained", "text dropped"],
                          "category -> image gates": ["trained", "untrained"],
                          "break -> temporal gate": ["trained", "shuffled time", "untrained"],
                          "return month -> temporal gate": ["trained", "shuffled time", "untrained"],
                          "jump after a return -> temporal gate": ["trained", "shuffled time", "untrained"]}
    assert measures["value"].between(0, 1).all() and (measures["positions"] > 0).all()
    verdict = recovery_table(measures)
    assert not verdict["recovered"].any()  # the "trained" model here is its own untrained control


def test_gate_shift_at_jumps_by_hand():
    # one sequence: first item, short, LONG (a return), short (the jump), short; 2 experts
    gaps = [np.nan, 1.0, 40.0, 2.0, 3.0]
    expert0 = [0.5, 0.6, 0.5, 0.9, 0.4]
    table = pd.DataFrame([{"example": 0, "position": p, "gap_days": g, "expert": k, "gate": e if k == 0 else 1 - e}
                          for p, (g, e) in enumerate(zip(gaps, expert0)) for k in (0, 1)])
    got = gate_shift_at_jumps(table, 30.0)
    # jump: position 3 (0.9, 0.1); other short pauses: positions 1 and 4, mean (0.5, 0.5)
    np.testing.assert_allclose(got["jump"], [0.9, 0.1])
    np.testing.assert_allclose(got["other_short"], [0.5, 0.5])
    assert got.attrs == {"total_variation": pytest.approx(0.4), "n_jump": 1, "n_other": 2}
