"""Tests for hm4sr_core.evaluate (evaluation.md 2 and 7): the random baseline of a
constant scorer, batch-size invariance, history masking that never hides the target,
and the time controls (shuffled / zeroed timestamps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FLOAT64_EPS, TINY_FORWARD_TERMS, assert_float_close, clear_of_ties, float_tol

from hm4sr_core.config import ModelConfig
from hm4sr_core.data.splits import iterate_batches
from hm4sr_core.evaluate import evaluate, perturb_timestamps
from hm4sr_core.model import build_model
from hm4sr_core.train import item_popularity


@pytest.fixture
def constant_model(tiny_ds, tiny_model_config, monkeypatch):
    """A real model whose every item scores 0 for every user."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config, tiny_ds)
    width = model.item_matrix().shape[1]
    monkeypatch.setattr(model, "item_matrix",
                        lambda tables=None: torch.zeros(tiny_ds.num_items + 1, width))
    return model


def test_constant_scores_give_the_random_baseline(tiny_ds, tiny_split, tiny_train_config, constant_model):
    n = tiny_ds.num_items
    res = evaluate(constant_model, tiny_split.test, tiny_train_config)
    # exact: integer counts, one correctly rounded division (10 / 40 = 0.25, a mean of equal values)
    assert res.per_user["hr@10"].tolist() == [10 / n] * len(tiny_split.test)
    assert res.metrics["hr@10"] == 10 / n
    # float64 sums of 10 rank terms (log2: a few ulp), then a mean over the users
    tol = float_tol(1.0, 10 + 4 + len(tiny_split.test), FLOAT64_EPS)
    assert res.metrics["mrr@10"] == pytest.approx(sum(1 / r for r in range(1, 11)) / n, abs=tol, rel=0)
    assert res.metrics["ndcg@10"] == pytest.approx(sum(1 / np.log2(r + 1) for r in range(1, 11)) / n, abs=tol, rel=0)
    assert res.metrics["hr@50"] == 1.0  # 40 items: everything is in the top 50
    pessimistic = evaluate(constant_model, tiny_split.test, tiny_train_config.replace(tie_policy="pessimistic"))
    optimistic = evaluate(constant_model, tiny_split.test, tiny_train_config.replace(tie_policy="optimistic"))
    assert pessimistic.metrics["hr@10"] == 0.0 and optimistic.metrics["hr@10"] == 1.0
    assert (res.top_items > 0).all()  # padding is never a candidate, even at a tie


def test_batched_evaluation_equals_one_batch(tiny_split, tiny_train_config, tiny_run):
    model = tiny_run[0].model
    one = evaluate(model, tiny_split.test, tiny_train_config.replace(eval_batch_size=1000))
    sevens = evaluate(model, tiny_split.test, tiny_train_config.replace(eval_batch_size=7))
    # Other batch shapes round the scores in another order (queries 6e-8 apart, measured):
    # rows whose ranking that cannot change agree exactly, the rest within a near tie.
    clear = clear_of_ties(model.eval(), iterate_batches(tiny_split.test, 1000))
    assert clear.mean() > 0.8
    for k in one.per_user:
        np.testing.assert_array_equal(one.per_user[k][clear], sevens.per_user[k][clear])
        assert abs(one.metrics[k] - sevens.metrics[k]) <= (~clear).mean(), k  # a metric is in [0, 1]
    np.testing.assert_array_equal(one.users, sevens.users)
    np.testing.assert_array_equal(one.top_items[clear], sevens.top_items[clear])
    assert one.top_items.shape == (len(tiny_split.test), 10)


def test_history_masking_never_hides_the_target(tiny_ds, tiny_split, tiny_train_config, constant_model):
    n = tiny_ds.num_items
    part = tiny_split.test
    # each user's history holds every item they ever touched, the test target included
    inter = tiny_ds.interactions
    history = [np.unique(inter.loc[inter["user"] == u, "item"].to_numpy()) for u in range(tiny_ds.num_users)]
    assert all(t in history[u] for u, t in zip(part.users, part.targets))
    masked = evaluate(constant_model, part, tiny_train_config.replace(mask_history=True), history=history)
    # the target competes with the items outside the history: a tie among n - (|history| - 1)
    candidates = np.array([n - (len(history[u]) - 1) for u in part.users])
    np.testing.assert_allclose(masked.per_user["hr@10"], np.minimum(1.0, 10 / candidates), rtol=0,
                               atol=float_tol(1.0, 4, FLOAT64_EPS))  # a few float64 operations on counts
    assert not np.isin(masked.top_items, [0]).any()
    for row, u in enumerate(part.users):  # no masked item in anyone's top 10 (other than the target)
        assert not (set(masked.top_items[row].tolist()) & (set(history[u].tolist()) - {int(part.targets[row])}))
    # without the flag the history is ignored, as in the paper's code
    plain = evaluate(constant_model, part, tiny_train_config, history=history)
    assert plain.metrics["hr@10"] == 10 / n


def test_popularity_adds_coverage_and_mean_popularity(tiny_ds, tiny_split, tiny_train_config, tiny_run):
    popularity = item_popularity(tiny_split, tiny_ds.num_items)
    # every training interaction counted once: all but each user's validation and test targets
    # (users with more than T inputs have several dense windows: none may count twice)
    train_items = tiny_ds.interactions.groupby("user").head(-2)["item"].to_numpy()
    np.testing.assert_array_equal(popularity, np.bincount(train_items, minlength=tiny_ds.num_items + 1))
    assert len(tiny_split.train_dense) > tiny_ds.num_users
    res = evaluate(tiny_run[0].model, tiny_split.test, tiny_train_config, popularity=popularity)
    assert 0 < res.metrics["coverage@10"] <= 1
    assert res.metrics["popularity@10"] == pytest.approx(popularity[res.top_items].mean())


def test_perturb_timestamps_keeps_padding_and_the_multiset(tiny_split):
    batch = next(iterate_batches(tiny_split.valid, 30, trim=False))
    real = batch.items > 0
    shuffled = perturb_timestamps(batch, "shuffled", torch.Generator().manual_seed(0), origin=123)
    assert (shuffled.timestamps[~real] == 0).all()
    assert torch.equal(shuffled.timestamps.sort(1).values, batch.timestamps.sort(1).values)
    assert not torch.equal(shuffled.timestamps, batch.timestamps)
    zeroed = perturb_timestamps(batch, "zeroed", None, origin=123)
    assert (zeroed.timestamps[real] == 123).all() and (zeroed.timestamps[~real] == 0).all()
    assert perturb_timestamps(batch, "real", None, origin=123) is batch


def test_time_controls_change_hm4sr_but_not_sasrec(tiny_ds, tiny_split, tiny_train_config, tiny_run):
    model = tiny_run[0].model
    part = tiny_split.test
    results = {mode: evaluate(model, part, tiny_train_config.replace(eval_time=mode),
                              time_origin=int(tiny_ds.stats["first_timestamp"]))
               for mode in ("real", "shuffled", "zeroed")}
    real = results["real"].per_user["ndcg@50"]
    assert not np.array_equal(results["shuffled"].per_user["ndcg@50"], real)
    assert not np.array_equal(results["zeroed"].per_user["ndcg@50"], real)
    # the shuffle is seeded: the same control twice gives the same numbers
    again = evaluate(model, part, tiny_train_config.replace(eval_time="shuffled"),
                     time_origin=int(tiny_ds.stats["first_timestamp"]))
    assert again.metrics == results["shuffled"].metrics  # exact: same process, same ops
    # SASRec never sees time: the controls change nothing
    torch.manual_seed(0)
    sasrec = build_model(ModelConfig.sasrec(hidden_size=16, max_length=10, num_layers=1, inner_size=32), tiny_ds)
    base = evaluate(sasrec, part, tiny_train_config)
    for mode in ("shuffled", "zeroed"):
        assert evaluate(sasrec, part, tiny_train_config.replace(eval_time=mode)).metrics == base.metrics


def test_evaluation_restores_training_mode(tiny_split, tiny_train_config, tiny_run):
    model = tiny_run[0].model.train()
    evaluate(model, tiny_split.valid, tiny_train_config)
    assert model.training
    model.eval()


def test_length_sorted_query_chunks_return_rows_in_batch_order(tiny_split, tiny_run):
    from hm4sr_core.evaluate import query_by_length
    model = tiny_run[0].model.eval()
    batch = next(iterate_batches(tiny_split.test, 1000))
    assert len(set(batch.lengths.tolist())) > 2  # lengths differ, so sorting reorders rows
    with torch.no_grad():
        whole = model.query(batch)
        chunked = query_by_length(model, batch, chunk=3)
    assert_float_close(chunked, whole, TINY_FORWARD_TERMS)  # other batch shapes: other kernel orders
    assert not torch.equal(whole, whole[torch.argsort(batch.lengths, stable=True)])


def test_a_table_reuses_a_finished_run_only_for_the_same_data_and_settings(tiny_run, tiny_model_config,
                                                                          tiny_train_config):
    from hm4sr_core.experiments import _finished
    folder = tiny_run[1]
    assert _finished(folder, "tiny", tiny_model_config, tiny_train_config)
    assert _finished(folder, "tiny", tiny_model_config, tiny_train_config.replace(threads=1))  # speed only
    assert not _finished(folder, "other-data", tiny_model_config, tiny_train_config)
    assert not _finished(folder, "tiny", tiny_model_config.replace(w_category=0.0), tiny_train_config)
    assert not _finished(folder, "tiny", tiny_model_config, tiny_train_config.replace(lr=0.01))
    assert not _finished(folder / "missing", "tiny", tiny_model_config, tiny_train_config)
    assert _finished(folder, "tiny", tiny_model_config, tiny_train_config.replace(device="cuda"))  # where, not what
    assert not _finished(folder, "tiny", tiny_model_config.replace(category_columns=99), tiny_train_config)


def test_a_table_reuses_a_run_saved_before_a_setting_existed(tiny_run, tiny_model_config, tiny_train_config,
                                                             tmp_path):
    """A results.json written before ``category_columns`` existed holds that setting's
    default, so it is reused; one holding a field this version does not know is not."""
    import json
    import shutil

    from hm4sr_core.experiments import _finished
    folder = tmp_path / "old"
    shutil.copytree(tiny_run[1], folder)
    record = json.loads((folder / "results.json").read_text())
    del record["config"]["model"]["released"]["category_columns"]
    (folder / "results.json").write_text(json.dumps(record))
    assert _finished(folder, "tiny", tiny_model_config, tiny_train_config)
    record["config"]["model"]["from_the_future"] = 1
    (folder / "results.json").write_text(json.dumps(record))
    assert not _finished(folder, "tiny", tiny_model_config, tiny_train_config)


def test_evaluation_computes_the_item_tables_once_whatever_the_number_of_chunks(tiny_split, tiny_run,
                                                                                 tiny_train_config, monkeypatch):
    # The item side is a catalogue-sized projection: once per evaluation, not once per chunk
    # of users (at 10^6 items each recomputation cost gigabytes), and the queries read from the
    # shared tables are the very ones the model computes on its own.
    model = tiny_run[0].model.eval()
    batch = next(iterate_batches(tiny_split.test, 1000))
    with torch.no_grad():
        assert torch.equal(model.query(batch, tables=model.item_tables()), model.query(batch))
    expected = evaluate(model, tiny_split.test, tiny_train_config)
    calls = []
    original = model.item_tables
    monkeypatch.setattr(model, "item_tables", lambda ids=None: calls.append(ids) or original(ids))
    config = tiny_train_config.replace(eval_batch_size=5)
    chunked = evaluate(model, tiny_split.test, config)
    assert len(tiny_split.test) > 10  # several evaluation batches, each its own query
    assert calls == [None]
    clear = clear_of_ties(model, iterate_batches(tiny_split.test, 1000))  # batches of 5: as in the test above
    assert clear.mean() > 0.8
    for k in expected.per_user:
        np.testing.assert_array_equal(chunked.per_user[k][clear], expected.per_user[k][clear])
