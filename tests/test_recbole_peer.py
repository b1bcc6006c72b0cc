"""benchmarks/recbole_peer.py and recbole_runner.py without RecBole: the atomic-file converter
(format, round trip, leave-one-out targets equal to ours even with same-second ties), the
ratios of one run, the install step failing for real (an index with nothing in it), and the
runner's pure functions. The real peer runs in `make bench` (docs/performance.md)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import recbole_peer as peer
from benchmarks import recbole_runner as runner
from hm4sr_core.config import SplitConfig
from hm4sr_core.data.splits import build_split


def _with_ties(ds):
    """``ds`` with timestamps coarsened to 10,000 s buckets (many same-second ties within a
    user) and re-sorted as the prepared store sorts: user, timestamp, then item."""
    inter = ds.interactions.copy()
    inter["timestamp"] = inter["timestamp"] // 10_000 * 10_000
    inter = inter.sort_values(["user", "timestamp", "item"], kind="stable").reset_index(drop=True)
    return dataclasses.replace(ds, interactions=inter)


def test_atomic_file_round_trip(tiny_ds, tmp_path):
    """Header, one row per interaction in the dataset's order, tokens = our ids, timestamps kept;
    no temporary file left behind."""
    path = peer.write_atomic_inter(tiny_ds.interactions, "tiny", tmp_path)
    assert path == tmp_path / "tiny" / "tiny.inter"
    assert path.read_text().splitlines()[0] == "user_id:token\titem_id:token\ttimestamp:float"
    rows = peer.read_atomic_inter(path)
    inter = tiny_ds.interactions
    assert [(int(u), int(i), t) for u, i, t in rows] == list(zip(inter["user"], inter["item"],
                                                                 inter["timestamp"].astype(float)))
    assert [p.name for p in path.parent.iterdir()] == ["tiny.inter"]
    # the workbench's own RecBole reader (hm4sr prepare recbole) reads it back the same
    from hm4sr_core.data.readers.recbole import read_inter
    back = read_inter(path)
    assert back["user"].astype(int).tolist() == inter["user"].tolist()
    assert back["item"].astype(int).tolist() == inter["item"].tolist()
    assert back["timestamp"].tolist() == inter["timestamp"].tolist()


def test_leave_one_out_targets_are_ours_with_same_second_ties(tiny_ds, tmp_path):
    """RecBole's rule (stable sort by time, last two per user) on the written file gives every
    user our validation and test targets, also when ties within a second decide the order."""
    ds = _with_ties(tiny_ds)
    inter = ds.interactions
    tied = inter.duplicated(["user", "timestamp"], keep=False)
    assert tied.sum() > 50  # the case the converter must get right is really there
    valid, test = peer.leave_one_out_targets(peer.read_atomic_inter(peer.write_atomic_inter(inter, "t", tmp_path)))
    split = build_split(ds, SplitConfig())
    assert valid == peer.our_valid_targets(ds)
    assert test == {str(u): str(t) for u, t in zip(split.test.users, split.test.targets)}
    # The same file with each user's rows reversed within a tie would not: the order matters.
    shuffled = inter.sort_values(["user", "timestamp", "item"], ascending=[True, True, False], kind="stable")
    valid_rev, _ = peer.leave_one_out_targets(
        peer.read_atomic_inter(peer.write_atomic_inter(shuffled, "r", tmp_path)))
    assert valid_rev != valid


def test_converter_refuses_rows_out_of_time_order(tmp_path):
    inter = pd.DataFrame({"user": [0, 0, 1], "item": [1, 2, 3], "timestamp": [20, 10, 5]})
    with pytest.raises(ValueError, match=r"row 1 \(user 0, timestamp 10\).*sorted by user, then timestamp"):
        peer.write_atomic_inter(inter, "bad", tmp_path)
    with pytest.raises(ValueError, match="no column 'timestamp'"):
        peer.write_atomic_inter(inter.drop(columns="timestamp"), "bad", tmp_path)
    assert not (tmp_path / "bad").exists()  # checked before anything is written


def test_read_atomic_inter_names_the_bad_line(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text(peer.INTER_HEADER + "\n1\t2\t3\n1\t2\n")
    with pytest.raises(ValueError, match=r"x.inter, line 3: 2 fields"):
        peer.read_atomic_inter(path)
    path.write_text("user_id:token\titem_id:token\n")
    with pytest.raises(ValueError, match="header"):
        peer.read_atomic_inter(path)


def test_compare_valid_targets_counts_users():
    ours = {"0": "5", "1": "7", "2": "9"}
    assert peer.compare_valid_targets(ours, [["0", "5"], ["1", "7"], ["2", "9"]])["valid_targets_identical"]
    m = peer.compare_valid_targets(ours, [["0", "5"], ["1", "8"]])
    assert (m["valid_targets_matching"], m["valid_users_peer"], m["valid_targets_identical"]) == (1, 2, False)


def test_ratios_of_one_run_only():
    """ours / RecBole's; None when a side is missing, None (capped before the target) or zero."""
    measured = {"hm4sr_prefix_seconds_per_epoch": 200.0, "recbole_sasrec_seconds_per_epoch": 100.0,
                "eval_valid_seconds_median": 0.5, "recbole_sasrec_eval_seconds": 0.25,
                "seconds_to_target": 400.0, "recbole_sasrec_seconds_to_target": None,
                "sasrec_prefix_seconds_per_epoch": 0.0}
    r = peer.peer_ratios(measured)
    assert set(r) == set(peer.RATIOS)
    assert r["hm4sr_prefix_epoch_vs_recbole_sasrec"] == 2.0 and r["hm4sr_eval_vs_recbole_sasrec"] == 2.0
    assert r["hm4sr_time_to_target_vs_recbole_sasrec"] is None  # RecBole capped before the target
    assert r["sasrec_prefix_epoch_vs_recbole_sasrec"] is None  # a zero is no measurement
    assert r["sasrec_eval_vs_recbole_sasrec"] is None and r["sasrec_time_to_target_vs_recbole_sasrec"] is None


def test_bench_never_divides_figures_of_two_runs(tmp_path, monkeypatch):
    """results.json keeps the peer's figures of an older run when this run skips the peer; the
    ratios of this run are then None (in results.json and not in the history line), and they
    are computed when both sides ran now."""
    import benchmarks.run as bench
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(bench, "HISTORY", tmp_path / "history.jsonl")
    bench.RESULTS.write_text(json.dumps({"recbole_sasrec_seconds_per_epoch": 100.0,
                                         "hm4sr_prefix_epoch_vs_recbole_sasrec": 1.5}))
    parts = {"epochs": {"hm4sr_prefix_seconds_per_epoch": 180.0},
             "peer": {"recbole_sasrec_seconds_per_epoch": 120.0}}
    monkeypatch.setattr(bench, "_run_part", lambda name, extra: dict(parts[name]))

    def bench_run(*measured_parts):
        skip = [p for p in bench.PARTS if p not in measured_parts]
        monkeypatch.setattr(sys, "argv", ["run"] + [a for p in skip for a in ("--skip", p)])
        bench.main()
        return json.loads(bench.RESULTS.read_text()), json.loads(bench.HISTORY.read_text().splitlines()[-1])

    results, row = bench_run("epochs")
    assert results["recbole_sasrec_seconds_per_epoch"] == 100.0  # the old figure is kept ...
    assert results["hm4sr_prefix_epoch_vs_recbole_sasrec"] is None  # ... but never divided by
    assert "hm4sr_prefix_epoch_vs_recbole_sasrec" not in row
    results, row = bench_run("epochs", "peer")
    assert results["hm4sr_prefix_epoch_vs_recbole_sasrec"] == row["hm4sr_prefix_epoch_vs_recbole_sasrec"] == 1.5


def _record(valid_targets, train_seconds=(30.0, 10.0, 20.0)):
    """What the runner writes, for three epochs (the fields peer_figures reads)."""
    epochs = [{"epoch": e + 1, "train_seconds": s, "valid_seconds": 0.2, "seconds_since_start": 40.0 * (e + 1),
               "valid_ndcg@20": 0.03 * (e + 1)} for e, s in enumerate(train_seconds)]
    return {"epochs": epochs, "reached_target": True, "seconds_to_target": 120.0, "epochs_to_target": 3,
            "stopped_because": "target", "eval_seconds_median": 0.2, "eval_seconds_all": [0.2, 0.3, 0.1],
            "eval_users": len(valid_targets), "setup_seconds": 1.0, "threads": 2, "recbole_version": "1.2.1",
            "torch_version": "2.13.0+cpu", "numpy_version": "2.4.6", "valid_targets": valid_targets}


def test_peer_figures_only_when_recbole_saw_our_data():
    """Same validation targets: the figures (median epoch, time to target, eval); one user's
    target differs: skipped with the counts and no figure, so every ratio is None."""
    ours = {"0": "5", "1": "7"}
    fig = peer.checked_figures(_record([["1", "7"], ["0", "5"]]), ours)
    assert fig["recbole_sasrec_seconds_per_epoch"] == 20.0 and fig["recbole_sasrec_seconds_to_target"] == 120.0
    assert fig["recbole_sasrec_valid_ndcg@20_by_epoch"] == pytest.approx([0.03, 0.06, 0.09])
    assert fig["recbole_sasrec_eval_seconds"] == 0.2 and fig["recbole_sasrec_valid_targets_identical"]
    assert fig["recbole_sasrec_skipped"] is None  # an older run's reason is cleared in results.json
    bad = peer.checked_figures(_record([["0", "5"], ["1", "8"]]), ours)
    assert "1 of 2 users" in bad["recbole_sasrec_skipped"] and bad["recbole_sasrec_valid_targets_matching"] == 1
    assert bad["recbole_sasrec_seconds_per_epoch"] is None  # results.json keeps no older run's figure beside it
    assert set(peer.FIGURE_KEYS) <= set(fig) and all(bad[k] is None for k in peer.FIGURE_KEYS)
    measured = {"hm4sr_prefix_seconds_per_epoch": 200.0, "eval_valid_seconds_median": 0.5, **bad}
    assert set(peer.peer_ratios(measured).values()) == {None}


def test_install_failure_is_a_skip_that_says_why(tiny_ds, tmp_path, monkeypatch):
    """pip pointed at an index with nothing in it fails for real: the peer is skipped with the
    step and pip's error, no stamp is written, and nothing is converted or trained."""
    monkeypatch.setenv(peer.INDEX_ENV, (tmp_path / "no-such-index").as_uri())
    env_dir = tmp_path / "venv"
    out = peer.measure(tiny_ds, "tiny", threads=1, max_epochs=1, max_seconds=1.0, env_dir=env_dir,
                       data_dir=tmp_path / "data", work_dir=tmp_path / "run")
    reason = out["recbole_sasrec_skipped"]
    assert "pip install failed" in reason and "recbole==1.2.1" in reason
    assert set(out) == {"recbole_sasrec_skipped", *peer.FIGURE_KEYS}
    assert all(out[k] is None for k in peer.FIGURE_KEYS)
    assert not list(env_dir.glob(".installed-*")) and not (tmp_path / "data").exists()


def test_stamp_makes_a_second_call_install_nothing(tmp_path, capsys):
    """A stamp of these pins (and a python) is enough: no venv, no pip run; a stamp of other
    pins makes it start again (here: it fails, as python 'no-such-python' does not exist)."""
    env_dir = tmp_path / "venv"
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "python").write_text("")
    pins = ("recbole==1.2.1",)
    (env_dir / peer._stamp_name(pins, "no-such-python")).write_text("")
    assert peer.ensure_env(env_dir, pins, python="no-such-python") == env_dir / "bin" / "python"
    assert "nothing to install" in capsys.readouterr().err
    with pytest.raises(peer.PeerUnavailable, match="creating the venv failed"):
        peer.ensure_env(env_dir, ("recbole==1.2.0",), python="no-such-python")
    assert not env_dir.exists()  # the environment of other pins was removed first


def test_runner_config_is_the_compared_sasrec():
    cfg = runner.sasrec_config("ml-100k", "/data", "/work", threads=2, seed=2025, max_epochs=3)
    expected = {"loss_type": "CE", "train_neg_sample_args": None, "hidden_size": 64, "inner_size": 256,
                "n_layers": 2, "n_heads": 2, "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5,
                "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
                "train_batch_size": 1024, "eval_batch_size": 2048, "learning_rate": 1e-3,
                "MAX_ITEM_LIST_LENGTH": 50, "valid_metric": "NDCG@20", "topk": [10, 20], "seed": 2025,
                "device": "cpu", "show_progress": False, "epochs": 3}
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["eval_args"] == {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"}
    assert cfg["user_inter_num_interval"] == cfg["item_inter_num_interval"] == "[0,inf)"


@pytest.mark.parametrize("epoch, seconds, ndcg, why", [
    (1, 10.0, 0.0864, "target"),  # reached at once: stops even with epochs and time left
    (3, 10.0, 0.05, "max_epochs"),
    (2, 500.0, 0.05, "max_seconds"),
    (2, 399.0, 0.0863, None),
])
def test_runner_stops_for_the_right_reason(epoch, seconds, ndcg, why):
    assert runner.should_stop(epoch, seconds, ndcg, target=0.0864, max_epochs=3, max_seconds=400.0) == why


def test_runner_module_level_is_standard_library_only():
    """The runner's module imports nothing but the standard library (RecBole, torch and numpy
    only inside ``run``, in the peer's venv), so its functions import anywhere."""
    import subprocess
    code = "import sys, benchmarks.recbole_runner; print(sorted({'numpy', 'torch', 'recbole'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=peer.ROOT, env={"PYTHONPATH": str(peer.ROOT)})
    assert proc.stdout.strip() == "[]"


def test_a_hung_runner_is_stopped_and_the_peer_skipped(tmp_path, monkeypatch):
    """The runner gets --max-seconds plus PEER_GRACE_SECONDS; one still running then is killed
    and the peer is skipped with that reason (here a python that sleeps stands for it)."""
    monkeypatch.setattr(peer, "PEER_GRACE_SECONDS", 1)
    monkeypatch.setattr(peer, "RUNNER", tmp_path / "sleeper.py")
    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(peer.PeerUnavailable, match="still going after 2 s"):
        peer.run_peer(Path(sys.executable), tmp_path, "x", threads=1, max_epochs=1, max_seconds=1.0,
                      work_dir=tmp_path)
