"""Tests for hm4sr_core.train: the loss falls, runs are reproducible to the last digit,
a killed run resumes to the same result, early stopping, the learning-rate schedules
(the run folder and checkpoint checks: tests/test_runs.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BF16_EPS, FLOAT64_EPS, assert_float_close, batch_terms, clear_of_ties, float_tol

from hm4sr_core.data.splits import iterate_batches
from hm4sr_core.runs import load_checkpoint
from hm4sr_core.train import initial_model, item_popularity, train

TIMING = ("train_seconds", "seconds_since_start", "seconds")


def _untimed(frame: pd.DataFrame) -> pd.DataFrame:
    """A history table without its wall-clock columns, columns in a fixed order."""
    frame = frame.drop(columns=[c for c in TIMING if c in frame.columns])
    return frame[sorted(frame.columns)].reset_index(drop=True)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _assert_runs_agree(got, want, terms: int, split, ds) -> None:
    """Two runs of one computation whose sums go in other orders (micro-batches, recomputed
    activations): every logged step value within float_tol(its column's scale, terms), and
    the validation and test metrics equal up to the users whose ranking that rounding can
    change (conftest.clear_of_ties at the same ``terms``)."""
    a, b = _untimed(got.steps), _untimed(want.steps)
    assert list(a.columns) == list(b.columns)
    for column in b.columns:
        assert_float_close(a[column], b[column], terms, msg=column)
    popularity = item_popularity(split, ds.num_items)
    for part, which in (("valid", split.valid), ("test", split.test)):
        clear = clear_of_ties(want.model.eval(), iterate_batches(which, 1000), terms)
        unclear, n = int((~clear).sum()), len(clear)
        for k, value in want.record[part].items():
            if k.startswith("coverage"):  # each unclear user can swap one item in or out of the top 10
                bound = 2 * unclear / ds.num_items
            elif k.startswith("popularity"):  # ... or change all of its 10 slots
                bound = unclear * float(popularity.max()) / n
            else:  # a per-user metric in [0, 1], averaged
                bound = unclear / n
            assert abs(got.record[part][k] - value) <= bound, (part, k, got.record[part][k], value, unclear)


def test_loss_falls_over_a_few_epochs(tiny_ds, tiny_split, tiny_model_config, tiny_train_config):
    result = train(tiny_ds, tiny_model_config, tiny_train_config.replace(epochs=5, lr=5e-3), progress=False,
                   split=tiny_split)
    rec = result.epochs["loss_rec"].to_numpy()
    assert rec[-1] < rec[0] - 0.15, rec
    assert result.epochs["loss_id_contrastive"].iloc[-1] < result.epochs["loss_id_contrastive"].iloc[0]
    # every named loss is logged per step, with its weighted share
    for name in ("rec", "id_contrastive", "category", "placeholder_contrastive"):
        assert f"loss_{name}" in result.steps and f"weighted_{name}" in result.steps
    total = result.steps[[c for c in result.steps if c.startswith("weighted_")]].sum(axis=1)
    # the model's float32 sum of 4 weighted positive losses: 4 products and 3 additions
    np.testing.assert_allclose(total, result.steps["loss"], rtol=float_tol(1.0, 8), atol=0)
    assert {"lambda_id", "lambda_text", "lambda_image", "temporal_entropy"} <= set(result.steps)


def test_same_seed_gives_identical_runs(tiny_ds, tiny_split, tiny_model_config, tiny_train_config, tiny_run):
    first, _ = tiny_run
    again = train(tiny_ds, tiny_model_config, tiny_train_config, progress=False, split=tiny_split)
    assert again.record["test"] == first.record["test"] and again.record["valid"] == first.record["valid"]
    pd.testing.assert_frame_equal(_untimed(again.epochs), _untimed(first.epochs))
    pd.testing.assert_frame_equal(_untimed(again.steps), _untimed(first.steps))
    assert _same_state(again.model, first.model)
    other = train(tiny_ds, tiny_model_config, tiny_train_config.replace(seed=12), progress=False, split=tiny_split)
    assert other.record["test"] != first.record["test"]


class _Kill(KeyboardInterrupt):
    """What Ctrl-C (or a SIGINT from a scheduler) raises in the middle of a run."""


def _killed_in_epoch_2(ds, split, model_config, config, out) -> None:
    """Train ``config`` into ``out`` and interrupt it as epoch 2 ends (after its checkpoint)."""
    def kill_in_epoch_2(row):
        if row["epoch"] == 2:
            raise _Kill

    with pytest.raises(KeyboardInterrupt):
        train(ds, model_config, config, out_dir=out, data_hash="h", progress=False, split=split,
              on_epoch=kill_in_epoch_2)


def test_killed_run_resumes_to_the_same_result(tiny_ds, tiny_split, tiny_model_config, tiny_train_config,
                                               tmp_path):
    # three steps per epoch and a history row every second step: the killed run has done
    # 3 steps and logged 2, so the step counter must be saved, not inferred from the rows
    config = tiny_train_config.replace(epochs=4, log_every=2)
    whole = train(tiny_ds, tiny_model_config, config, out_dir=tmp_path / "whole", data_hash="h", progress=False,
                  split=tiny_split)
    assert len(whole.steps) == 6  # 12 steps, every second one logged

    _killed_in_epoch_2(tiny_ds, tiny_split, tiny_model_config, config, tmp_path / "killed")
    # on_epoch runs after the checkpoint: epoch 2 is saved (6 steps done, 3 logged)
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 2
    assert not (tmp_path / "killed" / "results.json").exists()

    resumed = train(tiny_ds, tiny_model_config, config, out_dir=tmp_path / "killed", data_hash="h",
                    progress=False, split=tiny_split, resume=True)
    assert resumed.record["test"] == whole.record["test"]
    assert resumed.record["valid"] == whole.record["valid"]
    assert (resumed.best_epoch, resumed.epochs_run) == (whole.best_epoch, whole.epochs_run) and whole.epochs_run == 4
    pd.testing.assert_frame_equal(_untimed(resumed.epochs), _untimed(whole.epochs))
    pd.testing.assert_frame_equal(_untimed(resumed.steps), _untimed(whole.steps))
    assert _same_state(resumed.model, whole.model)
    saved = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert saved["test"] == json.loads((tmp_path / "whole" / "results.json").read_text())["test"]


def test_resume_with_more_epochs_equals_the_longer_run(tiny_ds, tiny_split, tiny_model_config,
                                                      tiny_train_config, tmp_path):
    long = train(tiny_ds, tiny_model_config, tiny_train_config.replace(epochs=3, patience=10), progress=False,
                 split=tiny_split, out_dir=tmp_path / "long", data_hash="h")
    train(tiny_ds, tiny_model_config, tiny_train_config.replace(epochs=2, patience=10), progress=False,
          split=tiny_split, out_dir=tmp_path / "short", data_hash="h")
    more = train(tiny_ds, tiny_model_config, tiny_train_config.replace(epochs=3, patience=10), progress=False,
                 split=tiny_split, out_dir=tmp_path / "short", data_hash="h", resume=True)
    assert more.epochs_run == 3
    assert more.record["test"] == long.record["test"]
    pd.testing.assert_frame_equal(_untimed(more.steps), _untimed(long.steps))


def _stop_epoch(values: list[float], patience: int) -> int:
    """The epoch at which 'stop after `patience` epochs without a strict improvement' stops."""
    best = -1.0
    bad = 0
    for epoch, v in enumerate(values, start=1):
        if v > best:
            best, bad = v, 0
        else:
            bad += 1
        if bad >= patience:
            return epoch
    return len(values)


def test_early_stopping_after_patience_epochs(tiny_ds, tiny_split, tiny_model_config, tiny_train_config):
    seen = []
    # a learning rate too small to move any rank: validation never improves after epoch 1
    config = tiny_train_config.replace(epochs=12, patience=2, lr=1e-9, valid_metric="ndcg@10")
    result = train(tiny_ds, tiny_model_config, config, progress=False, split=tiny_split,
                   on_epoch=lambda row: seen.append(row["valid_ndcg@10"]))
    assert result.epochs_run < 12
    assert result.epochs_run == _stop_epoch(seen, 2) == len(seen)
    assert result.best_epoch == int(np.argmax(seen)) + 1
    assert result.record["valid"]["ndcg@10"] == pytest.approx(max(seen), rel=0,
                                                              abs=float_tol(1.0, len(tiny_split.valid), FLOAT64_EPS))


def test_prefix_mode_trains_too(tiny_ds, tiny_split, tiny_model_config, tiny_train_config):
    result = train(tiny_ds, tiny_model_config, tiny_train_config.replace(mode="prefix", epochs=1, batch_size=128,
                                                                         max_steps_per_epoch=2),
                   progress=False, split=tiny_split)
    assert len(result.steps) == 2 and np.isfinite(result.steps["loss"]).all()


def test_bf16_autocast_trains_on_the_cpu(tiny_ds, tiny_split, tiny_model_config, tiny_train_config, tiny_run):
    """amp=true runs the training steps under CPU bf16 autocast: the first step's losses are
    those of the float32 run up to bf16 rounding (not equal: autocast took effect), parameters
    stay float32, the run is repeatable, and micro-batches take the same path."""
    first, _ = tiny_run
    amp = train(tiny_ds, tiny_model_config, tiny_train_config.replace(amp=True), progress=False, split=tiny_split)
    step0, ref0 = amp.steps.iloc[0], first.steps.iloc[0]
    assert step0["loss"] != ref0["loss"]
    # bf16 keeps 8 significant bits: the ~8 matmuls on the tiny model's path (projections,
    # attention's four, feed-forward's two, the scores) each round both operands (eps / 2 each)
    assert step0["loss"] == pytest.approx(ref0["loss"], rel=float_tol(1.0, 8, BF16_EPS))
    assert np.isfinite(amp.steps["loss"]).all()
    assert all(p.dtype == torch.float32 for p in amp.model.parameters())
    again = train(tiny_ds, tiny_model_config, tiny_train_config.replace(amp=True), progress=False, split=tiny_split)
    pd.testing.assert_frame_equal(_untimed(again.steps), _untimed(amp.steps))  # exact: the same ops again
    parts = train(tiny_ds, tiny_model_config, tiny_train_config.replace(amp=True, mode="prefix", epochs=1,
                  batch_size=128, max_steps_per_epoch=2, micro_batches=2), progress=False, split=tiny_split)
    assert np.isfinite(parts.steps["loss"]).all()


def test_micro_batches_train_in_prefix_mode(tiny_ds, tiny_split, tiny_model_config, tiny_train_config):
    """TrainConfig.micro_batches runs each prefix batch in parts (gradient caching): the
    run trains, logs every loss and gate statistic, and differs from the one-part run only
    through the dropout masks drawn per part (with dropout off it is the same run)."""
    config = tiny_train_config.replace(mode="prefix", epochs=1, batch_size=128, max_steps_per_epoch=3)
    no_dropout = tiny_model_config.replace(hidden_dropout=0.0, attention_dropout=0.0)
    one = train(tiny_ds, no_dropout, config, progress=False, split=tiny_split)
    parts = train(tiny_ds, no_dropout, config.replace(micro_batches=4), progress=False, split=tiny_split)
    assert len(parts.steps) == 3 and {"loss_placeholder_contrastive", "interactive_entropy"} <= set(parts.steps)
    _assert_runs_agree(parts, one, batch_terms(128, no_dropout), tiny_split, tiny_ds)  # batches of 128 prefixes
    with_dropout = train(tiny_ds, tiny_model_config, config.replace(micro_batches=4), progress=False, split=tiny_split)
    assert np.isfinite(with_dropout.steps["loss"]).all()
    with pytest.raises(ValueError, match="micro_batches > 1 needs mode 'prefix'"):
        tiny_train_config.replace(micro_batches=2)
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        config.replace(micro_batches=0)


def test_recompute_trains_to_the_same_run(tiny_ds, tiny_split, tiny_model_config, tiny_train_config, tiny_run):
    """TrainConfig.recompute changes memory and time only: the same seed gives the same run."""
    first, _ = tiny_run
    again = train(tiny_ds, tiny_model_config, tiny_train_config.replace(recompute=True), progress=False,
                  split=tiny_split)
    assert all(layer.recompute for layer in again.model.encoders.layers)
    # the backward's graph differs (recomputed pieces), so its sums' order: 32 windows x T positions
    _assert_runs_agree(again, first, batch_terms(32 * tiny_model_config.max_length, tiny_model_config), tiny_split,
                       tiny_ds)


def test_initial_model_is_where_training_starts(tiny_ds, tiny_split, tiny_model_config, tiny_train_config,
                                                monkeypatch):
    # With the optimiser's step disabled, train() ends with the weights it started from.
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: None)
    config = tiny_train_config.replace(epochs=1, max_steps_per_epoch=2)
    frozen = train(tiny_ds, tiny_model_config, config, progress=False, split=tiny_split).model
    start = initial_model(tiny_ds, tiny_model_config, config.seed)
    assert _same_state(frozen, start)
    assert not _same_state(start, initial_model(tiny_ds, tiny_model_config, config.seed + 1))


def test_learning_rate_schedules():
    from hm4sr_core.config import TrainConfig
    from hm4sr_core.train import learning_rate

    flat = TrainConfig(lr=2e-3)
    assert [learning_rate(flat, s, 10) for s in (0, 5, 500)] == [2e-3] * 3
    warm = TrainConfig(lr=2e-3, warmup_epochs=0.5)  # 5 warm-up steps of 10 per epoch
    assert [learning_rate(warm, s, 10) for s in range(6)] == pytest.approx([4e-4, 8e-4, 1.2e-3, 1.6e-3, 2e-3, 2e-3])
    cos = TrainConfig(lr=1e-3, epochs=10, lr_schedule="cosine", warmup_epochs=1)  # 10 warm-up, 90 decay steps
    assert learning_rate(cos, 9, 10) == pytest.approx(1e-3)
    assert learning_rate(cos, 10 + 45, 10) == pytest.approx(5e-4)
    assert learning_rate(cos, 100, 10) == pytest.approx(0.0, abs=float_tol(1e-3, 8, FLOAT64_EPS))  # lr (1 + cos pi) / 2
    assert learning_rate(cos.replace(lr_decay_epochs=20), 10 + 95, 10) == pytest.approx(5e-4)
    steps = [learning_rate(cos, s, 10) for s in range(10, 100)]
    assert all(a > b for a, b in zip(steps, steps[1:]))
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="needs lr_schedule 'cosine'"):
        TrainConfig(lr_decay_epochs=5)
    with pytest.raises(ValueError, match="shorter than the run"):
        TrainConfig(lr_schedule="cosine", epochs=3, warmup_epochs=3)
    with pytest.raises(ValueError, match="shorter than the run"):
        TrainConfig(epochs=3, warmup_epochs=5)  # constant: never at lr either
    with pytest.raises(ValueError, match="shorter than the run"):
        TrainConfig(lr_schedule="cosine", epochs=3, lr_decay_epochs=10, warmup_epochs=4)
    assert learning_rate(TrainConfig(warmup_epochs=0.01), 0, 10) == pytest.approx(1e-3)  # rounds to 1 step, not 0


def test_a_schedule_sets_each_steps_learning_rate_and_resumes(tiny_ds, tiny_split, tiny_model_config,
                                                              tiny_train_config, tmp_path):
    from hm4sr_core.train import learning_rate

    config = tiny_train_config.replace(epochs=3, patience=10, lr=4e-3, lr_schedule="cosine", warmup_epochs=1)
    whole = train(tiny_ds, tiny_model_config, config, out_dir=tmp_path / "whole", data_hash="h", progress=False,
                  split=tiny_split)
    per_epoch = len(whole.steps) // 3
    assert per_epoch >= 2
    expected = [learning_rate(config, s, per_epoch) for s in whole.steps["step"]]
    np.testing.assert_allclose(whole.steps["lr"], expected)
    # the schedule counts the steps an epoch really takes (here capped to one), and training
    # ends with the cosine: 3 epochs of lr_decay_epochs=3, not the 4 of epochs
    capped = config.replace(epochs=4, max_steps_per_epoch=1, lr_decay_epochs=3, warmup_epochs=0.5)
    short = train(tiny_ds, tiny_model_config, capped, progress=False, split=tiny_split)
    assert short.epochs_run == 3 and len(short.steps) == 3
    # 1 warm-up step (0.5 rounds up to one), then the cosine over the 2 steps left: lr, lr / 2
    np.testing.assert_allclose(short.steps["lr"], [4e-3, 4e-3, 2e-3])
    assert whole.steps["lr"].iloc[0] < whole.steps["lr"].max() == pytest.approx(4e-3)
    constant = train(tiny_ds, tiny_model_config, config.replace(lr_schedule="constant", warmup_epochs=0),
                     progress=False, split=tiny_split)
    assert (constant.steps["lr"] == 4e-3).all() and constant.record["test"] != whole.record["test"]

    _killed_in_epoch_2(tiny_ds, tiny_split, tiny_model_config, config, tmp_path / "killed")
    with pytest.raises(ValueError, match="cosine schedule over its 3 epochs"):
        train(tiny_ds, tiny_model_config, config.replace(epochs=4), out_dir=tmp_path / "killed", data_hash="h",
              progress=False, split=tiny_split, resume=True)
    resumed = train(tiny_ds, tiny_model_config, config, out_dir=tmp_path / "killed", data_hash="h",
                    progress=False, split=tiny_split, resume=True)
    assert resumed.record["test"] == whole.record["test"]
    pd.testing.assert_frame_equal(_untimed(resumed.steps), _untimed(whole.steps))
