"""Tests for hm4sr_core.runs: a run's progress and model selection, checkpoints that round-trip
exactly, resume checks, the run folder's contents and its results record."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import FLOAT64_EPS, float_tol

from hm4sr_core import distributed
from hm4sr_core.runs import Progress, Run, _columns, _rows, load_checkpoint, save_checkpoint
from hm4sr_core.train import initial_model, train


def _stepped(ds, model_config, seed: int):
    """A model and an Adam optimiser with state: one step on a made-up loss."""
    model = initial_model(ds, model_config, seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sum(p.square().sum() for p in model.parameters() if p.requires_grad).backward()
    optimizer.step()
    return model, optimizer


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_progress_keeps_a_copy_of_the_best_weights_and_counts_bad_epochs(tiny_ds, tiny_model_config):
    model = initial_model(tiny_ds, tiny_model_config, 0)
    name, weight = next(iter(model.state_dict().items()))
    progress = Progress()
    assert not progress.stopped(1)
    progress.select(1, 0.5, model)
    assert (progress.best_epoch, progress.best_metric, progress.bad_epochs) == (1, 0.5, 0)
    with torch.no_grad():
        weight.add_(1.0)  # training goes on in place: the kept weights must not follow
    assert not torch.equal(progress.best_state[name], model.state_dict()[name])
    progress.select(2, 0.5, model)  # as good is not better
    assert (progress.best_epoch, progress.bad_epochs) == (1, 1) and not progress.stopped(2)
    progress.select(3, 0.25, model)
    assert progress.bad_epochs == 2 and progress.stopped(2)
    progress.select(4, 0.75, model)
    assert (progress.best_epoch, progress.best_metric, progress.bad_epochs) == (4, 0.75, 0)
    assert torch.equal(progress.best_state[name], model.state_dict()[name])


def test_history_rows_round_trip_through_columns():
    rows = [{"step": 0, "loss": 1.5, "interactive_entropy": 0.25}, {"step": 2, "loss": 1.25}, {"step": 4}]
    table = _columns(rows)
    assert sorted(table) == ["interactive_entropy", "loss", "step"]  # what a checkpoint stores
    assert table["interactive_entropy"] == [0.25, None, None]
    assert _rows(table) == rows and _rows({}) == []


def test_a_checkpoint_resumes_the_progress_weights_optimizer_and_random_state(tiny_ds, tiny_model_config,
                                                                              tiny_train_config, tmp_path):
    model, optimizer = _stepped(tiny_ds, tiny_model_config, 0)
    progress = Progress(steps=[{"step": 0, "loss": 1.5, "interactive_entropy": 0.25}, {"step": 2, "loss": 1.25}],
                        epochs=[{"epoch": 1, "train_seconds": 0.5, "valid_ndcg@20": 0.125}], epoch=1, step=3)
    progress.select(1, 0.125, model)
    run = Run(tmp_path, tiny_ds, "h", tiny_model_config, tiny_train_config, distributed.current())
    torch.manual_seed(5)
    run.save(model, optimizer, progress)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()  # epoch 1 is the best
    after_save = torch.rand(3)  # what the next draw was when the checkpoint was written

    other, other_optimizer = _stepped(tiny_ds, tiny_model_config, 1)
    assert not _states_equal(other.state_dict(), model.state_dict())
    got = run.resume(other, other_optimizer)
    assert torch.equal(torch.rand(3), after_save)
    assert _states_equal(other.state_dict(), model.state_dict())
    assert other_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for key, state in optimizer.state_dict()["state"].items():
        assert all(torch.equal(state[k], other_optimizer.state_dict()["state"][key][k]) for k in state)
    assert (got.steps, got.epochs) == (progress.steps, progress.epochs)
    assert (got.epoch, got.step, got.best_metric, got.best_epoch, got.bad_epochs, got.resumed_world) == \
        (1, 3, 0.125, 1, 0, None)
    assert _states_equal(got.best_state, progress.best_state)


def test_best_pt_is_written_only_by_the_best_epoch_and_nothing_without_a_folder(tiny_ds, tiny_model_config,
                                                                               tiny_train_config, tmp_path):
    model, optimizer = _stepped(tiny_ds, tiny_model_config, 0)
    progress = Progress(epoch=2, best_epoch=1)
    Run(tmp_path, tiny_ds, "h", tiny_model_config, tiny_train_config, distributed.current()).save(
        model, optimizer, progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    Run(None, tiny_ds, "h", tiny_model_config, tiny_train_config, distributed.current()).save(
        model, optimizer, progress)  # a search's run: no folder, no error


def test_resume_refuses_a_cosine_schedule_of_another_length(tiny_ds, tiny_model_config, tiny_train_config, tmp_path):
    config = tiny_train_config.replace(lr_schedule="cosine", epochs=3)
    model, optimizer = _stepped(tiny_ds, tiny_model_config, 0)
    Run(tmp_path, tiny_ds, "h", tiny_model_config, config, distributed.current()).save(
        model, optimizer, Progress(epoch=1))
    with pytest.raises(ValueError, match="cosine schedule over its 3 epochs; epochs=4 would change"):
        Run(tmp_path, tiny_ds, "h", tiny_model_config, config.replace(epochs=4), distributed.current()).resume(
            model, optimizer)
    assert Run(tmp_path, tiny_ds, "h", tiny_model_config, config.replace(patience=2),
               distributed.current()).resume(model, optimizer).epoch == 1  # patience may change


def _edited_checkpoint(ds, split, model_config, config, out, edit) -> None:
    """Train one epoch of ``config`` into ``out``, then rewrite its last.pt through ``edit(ck)``:
    a checkpoint as an older version, or another number of processes, would have written it."""
    train(ds, model_config, config.replace(epochs=1), out_dir=out, data_hash="h", progress=False, split=split)
    ck = load_checkpoint(out / "last.pt")
    edit(ck)
    save_checkpoint(ck, out / "last.pt")


def test_a_checkpoint_from_before_newer_config_fields_resumes(tiny_ds, tiny_split, tiny_model_config,
                                                              tiny_train_config, tmp_path):
    # A last.pt written before a config field existed (here the sampled-softmax fields) holds
    # the defaults implicitly: resuming it with today's default config goes on, while a
    # non-default value of the new field is a different configuration.
    def drop_new_fields(ck):
        for key in ("rec_loss", "num_negatives", "negative_proposal", "popularity_exponent"):
            del ck["model_config"][key]

    config = tiny_train_config.replace(epochs=2, patience=10)
    _edited_checkpoint(tiny_ds, tiny_split, tiny_model_config, config, tmp_path, drop_new_fields)
    resumed = train(tiny_ds, tiny_model_config, config, out_dir=tmp_path, data_hash="h", progress=False,
                    split=tiny_split, resume=True)
    assert resumed.epochs_run == 2
    with pytest.raises(ValueError, match="different configuration"):
        train(tiny_ds, tiny_model_config.replace(rec_loss="sampled"), config.replace(epochs=3), out_dir=tmp_path,
              data_hash="h", resume=True, progress=False, split=tiny_split)


def test_resume_refuses_other_data_or_model(tiny_ds, tiny_split, tiny_model_config, tiny_train_config, tiny_run,
                                            tmp_path):
    _, out = tiny_run
    with pytest.raises(ValueError, match="was trained on data tiny"):
        train(tiny_ds, tiny_model_config, tiny_train_config, out_dir=out, data_hash="other", resume=True,
              progress=False, split=tiny_split)
    with pytest.raises(ValueError, match="different configuration"):
        train(tiny_ds, tiny_model_config.replace(hidden_size=8), tiny_train_config, out_dir=out, data_hash="tiny",
              resume=True, progress=False, split=tiny_split)
    with pytest.raises(FileNotFoundError, match="no last.pt"):
        train(tiny_ds, tiny_model_config, tiny_train_config, out_dir=tmp_path, resume=True, progress=False,
              split=tiny_split)


def test_run_folder_contents(tiny_ds, tiny_split, tiny_run):
    result, out = tiny_run
    for name in ("results.json", "per_user_test.parquet", "per_user_valid.parquet", "steps.csv", "epochs.csv",
                 "best.pt", "last.pt"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    record = json.loads((out / "results.json").read_text())
    assert {"valid", "test", "config", "data_hash", "split_hash", "dataset", "protocol", "epochs_run",
            "best_epoch", "seconds_per_epoch", "environment"} <= set(record)
    for part in ("valid", "test"):
        assert {"ndcg@10", "hr@10", "mrr@10", "ndcg@20", "coverage@10", "popularity@10"} <= set(record[part])
    assert record["data_hash"] == "tiny" and record["split_hash"] == tiny_split.hash()
    assert record["epochs_run"] == 2 and record["seconds_per_epoch"] > 0
    assert record["config"]["model"]["hidden_size"] == 16 and record["config"]["train"]["seed"] == 11
    assert record["protocol"]["ranking"] == "full catalogue" and record["protocol"]["history_masked"] is False
    assert record["dataset"]["stats"]["users"] == 60
    per_user = pd.read_parquet(out / "per_user_test.parquet")
    assert len(per_user) == len(tiny_split.test) and per_user["user"].is_unique
    n = len(per_user)  # float64 means of n values in [0, 1], summed in other orders
    assert per_user["ndcg@10"].mean() == pytest.approx(record["test"]["ndcg@10"], rel=0,
                                                       abs=float_tol(1.0, n, FLOAT64_EPS))
    epochs = pd.read_csv(out / "epochs.csv")
    assert epochs["epoch"].tolist() == [1, 2] and "valid_ndcg@20" in epochs
    assert len(pd.read_csv(out / "steps.csv")) == len(result.steps)


def test_resuming_a_checkpoint_of_another_process_count_warns_and_says_so(tiny_ds, tiny_split, tiny_model_config,
                                                                         tiny_train_config, tmp_path):
    config = tiny_train_config.replace(epochs=2, patience=10)
    _edited_checkpoint(tiny_ds, tiny_split, tiny_model_config, config, tmp_path,
                       lambda ck: ck.update(world_size=2))  # as a 2-rank run writes it
    with pytest.warns(UserWarning, match="written by 2 process"):
        resumed = train(tiny_ds, tiny_model_config, config, out_dir=tmp_path, data_hash="h", progress=False,
                        split=tiny_split, resume=True)
    assert resumed.record["resumed_from_world_size"] == 2
    plain = train(tiny_ds, tiny_model_config, config, out_dir=tmp_path / "plain", data_hash="h", progress=False,
                  split=tiny_split)
    assert "resumed_from_world_size" not in plain.record


def test_a_run_that_stopped_early_trains_no_more_when_resumed(tiny_ds, tiny_split, tiny_model_config,
                                                              tiny_train_config, tmp_path):
    config = tiny_train_config.replace(epochs=20, patience=1)
    stopped = train(tiny_ds, tiny_model_config, config, out_dir=tmp_path, data_hash="h", progress=False,
                    split=tiny_split)
    assert stopped.epochs_run < 20  # one evaluation without improvement ends it
    again = train(tiny_ds, tiny_model_config, config.replace(epochs=25), out_dir=tmp_path, data_hash="h",
                  progress=False, split=tiny_split, resume=True)
    assert (again.epochs_run, again.best_epoch) == (stopped.epochs_run, stopped.best_epoch)
    assert again.record["test"] == stopped.record["test"]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == stopped.epochs_run  # no epoch was added
