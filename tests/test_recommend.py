"""Tests for hm4sr_core.recommend and ``hm4sr recommend``: ranked lists with exact
per-stream score parts, the same top-10 as evaluation, occlusion and gates, cold-start
histories and what-if, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from hm4sr_core import recommend as rec
from hm4sr_core.cli import main
from hm4sr_core.config import ModelConfig, SplitConfig
from hm4sr_core.train import train

from conftest import TINY_T, float_tol

EPS32 = float(torch.finfo(torch.float32).eps)


def _bound(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rounding bound of float32 dot products (B, K) x (k, K): K * eps * sum |q_i v_i|
    (the textbook gamma_K bound), with sum |q_i v_i| <= |q| |v| by Cauchy-Schwarz."""
    K = q.shape[1]
    return K * EPS32 * q.double().norm(dim=1, keepdim=True) * v.double().norm(dim=1).view(1, -1)


@pytest.fixture(scope="module")
def model(tiny_run):
    return tiny_run[0].model.eval()


@torch.no_grad()
def test_lists_with_score_parts_that_sum_to_the_score(model, tiny_ds):
    frame = rec.recommend(model, tiny_ds, ["u1", "u7"], k=5)
    assert list(frame["user"]) == ["u1"] * 5 + ["u7"] * 5 and list(frame["rank"]) == [1, 2, 3, 4, 5] * 2
    assert {"item", "item_id", "title", "category", "score", "score_id", "score_text", "score_image"} <= set(frame)
    tokens = tiny_ds.items["token"].astype(str).to_numpy()
    assert (frame["item"].to_numpy() == tokens[frame["item_id"].to_numpy() - 1]).all()
    for _, rows in frame.groupby("user"):
        assert rows["item_id"].is_unique and (np.diff(rows["score"].to_numpy()) <= 0).all()
    # The parts, against a float64 reference from the raw tables: the ID part is the ID slice of the
    # query times the ID embedding, independent of item_tables().
    d = model.config.hidden_size
    for user, rows in frame.groupby("user"):
        q = model.query(rec._batch([rec.user_history(tiny_ds, user)], TINY_T))
        v = model.item_matrix()[torch.tensor(rows["item_id"].to_numpy())]
        bound = _bound(q, v)[0].numpy()
        parts = rows[["score_id", "score_text", "score_image"]].to_numpy()
        assert np.all(np.abs(parts.sum(1) - rows["score"].to_numpy()) <= bound)
        ref_id = (q[0, :d].double() @ model.item_embedding.weight[torch.tensor(rows["item_id"].to_numpy())]
                  .double().T).numpy()
        assert np.all(np.abs(parts[:, 0] - ref_id) <= bound)


def test_top_k_breaks_ties_by_the_lower_item_id_across_chunks():
    # Items 1..9 with scores that tie in pairs across chunk borders (chunks of 4 columns).
    values = torch.tensor([0, 3, 5, 3, 5, 1, 5, 0, 2, 3], dtype=torch.float32)  # row 0: padding
    item_matrix = values.view(-1, 1)
    q = torch.ones(2, 1)
    scores, items = rec.top_k_items(q, item_matrix, 5, chunk_items=4)
    assert items[0].tolist() == [2, 4, 6, 1, 3] and scores[0].tolist() == [5, 5, 5, 3, 3]
    _, items = rec.top_k_items(q, item_matrix, 5, exclude=[np.array([4]), np.array([2, 1, 9])], chunk_items=4)
    assert items[0].tolist() == [2, 6, 1, 3, 9] and items[1].tolist() == [4, 6, 3, 8, 5]
    _, items = rec.top_k_items(q, item_matrix, 9, exclude=[np.array([1, 2]), np.array([], np.int64)])
    assert items[0, -2:].tolist() == [0, 0]  # only 7 candidates left: the slots stay empty
    with pytest.raises(ValueError, match="k must be in 1..9"):
        rec.top_k_items(q, item_matrix, 10)


def test_recommend_at_test_gives_evaluations_top10(model, tiny_ds, tiny_run, tiny_train_config):
    """Same users in the same batches: evaluation's top-10 exactly, and in the run's per-user file."""
    result, out = tiny_run
    frame = rec.recommend(model, tiny_ds, at="test", k=10, batch_size=tiny_train_config.eval_batch_size,
                          split_config=SplitConfig(max_length=TINY_T))
    lists = frame["item_id"].to_numpy().reshape(-1, 10)
    users = [str(tiny_ds.user_tokens[u]) for u in result.test.users]
    assert frame["user"].to_numpy()[::10].tolist() == users
    assert np.array_equal(lists, result.test.top_items)
    per_user = pd.read_parquet(out / "per_user_test.parquet")
    assert np.array_equal(per_user[[f"top_{r}" for r in range(1, 11)]].to_numpy(), lists)


def test_sasrec_has_one_stream(tiny_ds, tiny_split, tiny_train_config):
    cfg = ModelConfig.sasrec(hidden_size=16, max_length=TINY_T, num_layers=1, num_heads=2, inner_size=32)
    sasrec = train(tiny_ds, cfg, tiny_train_config.replace(epochs=1), progress=False, split=tiny_split).model
    frame = rec.recommend(sasrec, tiny_ds, ["u3"], k=4)
    assert [c for c in frame if c.startswith("score_")] == ["score_id"]
    # one stream: its part is the score, up to the rounding of a width-16 dot product done apart
    assert np.allclose(frame["score_id"], frame["score"], rtol=0, atol=float_tol(np.abs(frame["score"]).max(), 2 * 16))
    e = rec.explain(sasrec, tiny_ds, rec.user_history(tiny_ds, "u3"), k=3)
    assert e.gates.empty and len(e.occlusion) == 3 * len(e.history)


@torch.no_grad()
def test_occlusion_is_the_score_change_of_removing_one_item(model, tiny_ds):
    history = rec.user_history(tiny_ds, "u2").last(TINY_T)  # what the model reads
    e = rec.explain(model, tiny_ds, history, k=3)
    n = len(e.history)
    assert len(e.occlusion) == 3 * n and set(e.occlusion["history_position"]) == set(range(n))
    j = 2
    reduced = rec.History(np.delete(history.items, j), np.delete(history.timestamps, j), "reduced")
    ids = e.recommendations["item_id"].to_numpy()
    v = model.item_matrix()[torch.tensor(ids)]
    q_full = model.query(rec._batch([history], TINY_T))
    q_less = model.query(rec._batch([reduced], TINY_T))
    want = ((q_full.double() - q_less.double()) @ v.double().T)[0].numpy()
    got = e.occlusion[e.occlusion["history_position"] == j].set_index("item_id").loc[ids, "score_change"].to_numpy()
    assert np.all(np.abs(got - want) <= 2 * (_bound(q_full, v) + _bound(q_less, v))[0].numpy())
    # Gates at the last position: one softmax per stream and one temporal softmax.
    sums = e.gates.groupby(["level", "stream"])["gate"].sum()
    assert set(sums.index) == {("interactive", s) for s in model.stream_names} | {("temporal", "all")}
    experts = model.config.num_experts  # a softmax's E outputs (exp, a sum of E, a division), summed again
    assert np.allclose(sums.to_numpy(), 1.0, rtol=0, atol=float_tol(1.0, 2 * experts + 3))


def test_what_if_moves_the_temporal_gate_not_the_interactive_one(model, tiny_ds):
    history = rec.user_history(tiny_ds, "u4")
    w = rec.what_if(model, tiny_ds, history, gap_days=90.0, k=5)
    assert w.after.history["gap_days"].iloc[-1] == pytest.approx(90.0)
    assert (w.after.history["timestamp"].iloc[:-1].to_numpy() == history.timestamps[:-1][-TINY_T + 1:]).all()
    inter = [g[g["level"] == "interactive"]["gate"].to_numpy() for g in (w.before.gates, w.after.gates)]
    assert np.array_equal(*inter)  # the Interactive MoE sits before the time embedding
    assert rec.temporal_shift(w.before.gates, w.after.gates) > 0
    assert set(w.changes["item"]) == set(w.before.recommendations["item"]) | set(w.after.recommendations["item"])
    with pytest.raises(ValueError, match="before the interaction before it"):
        rec.move_last_interaction(history, at_time=int(history.timestamps[-2]) - 1)


def test_a_new_user_from_pairs_or_files(model, tiny_ds, tmp_path):
    known = rec.user_history(tiny_ds, "u5")
    tokens = tiny_ds.items["token"].astype(str).to_numpy()[known.items - 1]
    pairs = list(zip(tokens, known.timestamps.tolist()))
    cold = rec.history_from_pairs(tiny_ds, pairs)
    a = rec.recommend_histories(model, tiny_ds, [cold], k=5)
    b = rec.recommend(model, tiny_ds, ["u5"], k=5)
    assert a["item_id"].tolist() == b["item_id"].tolist()
    frame = pd.DataFrame({"item": tokens, "timestamp": known.timestamps})
    frame.to_csv(tmp_path / "h.csv", index=False)
    frame.to_parquet(tmp_path / "h.parquet")
    frame.to_json(tmp_path / "h.jsonl", orient="records", lines=True)
    for name in ("h.csv", "h.parquet", "h.jsonl"):
        h = rec.read_history(tmp_path / name, tiny_ds)
        assert np.array_equal(h.items, cold.items) and np.array_equal(h.timestamps, cold.timestamps)
    with pytest.raises(ValueError, match=r"interaction 2: 'nope'"):
        rec.history_from_pairs(tiny_ds, [(tokens[0], 10), ("nope", 20)])
    with pytest.raises(ValueError, match="interaction 3: timestamp 5 is earlier than interaction 2's 20"):
        rec.history_from_pairs(tiny_ds, [(tokens[0], 10), (tokens[1], 20), (tokens[2], 5)])
    with pytest.raises(ValueError, match="interaction 2: timestamp 'yesterday' is not a whole number"):
        rec.history_from_pairs(tiny_ds, [(tokens[0], 10), (tokens[1], "yesterday")])
    # In a file, the error names the line a user sees in an editor (the .csv header is line 1).
    (tmp_path / "bad.csv").write_text(f"item,timestamp\n{tokens[0]},10\nnope,20\n")
    with pytest.raises(ValueError, match=r"bad.csv: history: unknown item token\(s\) \(line 3: 'nope'\)"):
        rec.read_history(tmp_path / "bad.csv", tiny_ds)
    (tmp_path / "bad.jsonl").write_text(f'{{"item": "{tokens[0]}", "timestamp": 30}}\n\n{{"item": "{tokens[1]}", "timestamp": 20}}\n')
    with pytest.raises(ValueError, match="bad.jsonl: history line 3: timestamp 20 is earlier than line 1's 30"):
        rec.read_history(tmp_path / "bad.jsonl", tiny_ds)


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec_data")
    assert main(["prepare", "synthetic", "--name", "rectiny", "--out-root", str(root), "--users", "40",
                 "--items", "30", "--seed", "6", "--max-length", "10"]) == 0
    out = tmp_path_factory.mktemp("rec_run") / "run"
    assert main(["train", "--data", str(root / "rectiny"), "--epochs", "1", "--out", str(out), "--quiet",
                 "--set", "hidden_size=16", "--set", "max_length=10", "--set", "num_layers=1",
                 "--set", "inner_size=32"]) == 0
    return root / "rectiny", out


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_cli_writes_every_users_lists(cli_run, tmp_path, capsys, suffix):
    data, run = cli_run
    target = tmp_path / f"recs{suffix}"
    code, out, err = _run(capsys, "recommend", run, "--data", data, "--all", "--k", 3, "--out", target, "--quiet")
    assert code == 0, err
    back = {".parquet": pd.read_parquet, ".csv": pd.read_csv,
            ".jsonl": lambda p: pd.read_json(p, lines=True)}[suffix](target)
    assert len(back) == 40 * 3 and back["user"].nunique() == 40 and f"-> {target}" in out
    # three width-16 dot products added, against one of width 48: 2 x 48 + 3 steps at the parts' scale
    parts = back[["score_id", "score_text", "score_image"]]
    tol = float_tol(parts.abs().sum(axis=1).max(), 2 * 48 + 3)
    assert np.allclose(parts.sum(axis=1), back["score"], rtol=0, atol=tol)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left


def test_cli_prints_a_table_and_explains(cli_run, capsys):
    data, run = cli_run
    code, out, err = _run(capsys, "recommend", run / "best.pt", "--data", data, "--users", "u1", "--k", 2,
                          "--explain")
    assert code == 0, err
    assert "user u1  (score = id + text + image)" in out and "occlusion" in out
    assert "interactive text" in out and "temporal    all" in out


def test_cli_what_if_on_a_history_file(cli_run, tmp_path, capsys):
    data, run = cli_run
    (tmp_path / "me.csv").write_text("item,timestamp\ni1,1600000000\ni2,1600003600\ni3,1600007200\n")
    code, out, err = _run(capsys, "recommend", run, "--data", data, "--history", tmp_path / "me.csv", "--k", 3,
                          "--last-gap-days", 45, "--out", tmp_path / "w.jsonl")
    assert code == 0, err
    assert "45.00 days after the one before it (what if)" in out and "temporal gate at the last position" in out
    rows = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["as given"] * 3 + ["what if"] * 3


@pytest.mark.parametrize("args, message", [
    (["--users", "nobody"], "unknown user token(s) ['nobody']"),
    (["--users", "u1", "--k", "0"], "--k must be >= 1, got 0"),
    (["--users", "u1", "--k", "31"], "--k 31: larger than the catalogue of 'rectiny' (30 items)"),
    (["--users", "u1", "--out", "x.txt"], "expected a file ending in .parquet, .csv, .jsonl"),
    (["--all"], "--all writes every user's list: give --out"),
    (["--users", "u1", "--last-gap-days", "-1"], "--last-gap-days must be >= 0"),
])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(cli_run, tmp_path, capsys, args, message):
    data, run = cli_run
    target = tmp_path / "out.parquet"
    argv = ["recommend", run, "--data", data, *args]
    if "--out" not in args:
        argv += ["--out", target] if "--all" not in args else []
    code, out, err = _run(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("hm4sr recommend: error:")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_folder_without_checkpoint_and_other_data(cli_run, tmp_path, capsys):
    data, run = cli_run
    code, _, err = _run(capsys, "recommend", tmp_path, "--users", "u1")
    assert code == 2 and "no best.pt" in err
    assert main(["prepare", "synthetic", "--name", "other", "--out-root", str(tmp_path), "--users", "30",
                 "--items", "20", "--seed", "9", "--max-length", "10"]) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, "recommend", run, "--data", tmp_path / "other", "--users", "u1",
                        "--out", tmp_path / "never.csv")
    assert code == 2 and "was trained on data" in err and not (tmp_path / "never.csv").exists()


# ----------------------------------------------------------------------------- the explorer


def test_recommendation_explorer_follows_user_and_gap(model, tiny_ds):
    from widgets import RecommendationExplorer, figures
    ex = RecommendationExplorer.from_model(model, tiny_ds, ["u1", "u2"], k=4)
    real = rec.explain(model, tiny_ds, rec.user_history(tiny_ds, "u1").last(TINY_T), k=4)
    np.testing.assert_allclose(np.asarray(ex.parts.data[-1].x), real.recommendations["score"])
    # the slider moves in steps of 10**0.01: within one step of the history's gap
    assert ex.gap.value == pytest.approx(real.history["gap_days"].iloc[-1], rel=10 ** 0.01 - 1)

    ex.user.value = "u2"
    other = rec.explain(model, tiny_ds, rec.user_history(tiny_ds, "u2").last(TINY_T), k=4)
    assert list(ex.parts.data[0].y) == figures.score_parts_data(other.recommendations)["labels"]
    np.testing.assert_allclose(np.asarray(ex.occlusion.data[0].z), figures.occlusion_data(other.occlusion)["z"])
    real_gate = np.asarray(ex.gate.data[1].y)

    ex.gap.value = 300.0
    assert ex.last_error is None
    # whole seconds (0.5 s off at most), as days
    assert np.asarray(ex.history.data[0].y)[-1] == pytest.approx(300.0, rel=0, abs=0.5 / 86_400 + float_tol(300.0, 2))
    np.testing.assert_allclose(np.asarray(ex.gate.data[0].y), real_gate)  # the grey bars keep the real gate
    assert not np.allclose(np.asarray(ex.gate.data[1].y), real_gate)
    assert "(moved)" in ex.status.value

    ex.reset.click()
    np.testing.assert_allclose(np.asarray(ex.gate.data[1].y), real_gate)
    assert "(moved)" not in ex.status.value
