"""hm4sr_core.analysis: dataset distributions, the dropped-modality control and the
planted-truth comparisons the notebooks show, on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from hm4sr_core.analysis import (category_counts, drop_modality, gate_shift_after_long_gap, neighbour_agreement,
                                 planted_summary, sequence_lengths, time_gaps)
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
