"""Tests for the ``hm4sr`` command line: prepare, train, evaluate, compare, the checks
that run before any work, and every subcommand's --help. In-process through
``hm4sr_core.cli.main`` (fast), plus one real call of the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hm4sr_core import cli
from hm4sr_core.cli import build_parser, main

# A model small enough to train in about a second on the CLI's synthetic data.
TINY_SETS = ["--set", "hidden_size=16", "--set", "max_length=10", "--set", "num_layers=1",
             "--set", "inner_size=32", "--set", "batch_size=128", "--set", "eval_batch_size=256"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``hm4sr prepare synthetic`` into a temporary root: (folder, stdout)."""
    root = tmp_path_factory.mktemp("cli_data")
    code = main(["prepare", "synthetic", "--name", "clitiny", "--out-root", str(root), "--users", "60",
                 "--items", "40", "--seed", "4", "--max-length", "10"])
    assert code == 0
    return root / "clitiny"


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run") / "run"
    code = main(["train", "--data", str(prepared), "--epochs", "2", "--seed", "5", "--out", str(out), "--quiet",
                 *TINY_SETS])
    assert code == 0
    return out


def test_prepare_writes_the_folder_and_prints_stats(tmp_path, capsys):
    code, out, err = _run(capsys, "prepare", "synthetic", "--name", "X", "--out-root", tmp_path, "--users", "30",
                          "--items", "20", "--max-length", "10")
    assert code == 0, err
    folder = tmp_path / "X"
    assert (folder / "manifest.json").is_file() and (folder / "interactions.parquet").is_file()
    assert "users        30" in out and "items        20" in out and "interactions" in out
    assert "zero gaps" in out and f"written      {folder}" in out
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["name"] == "X" and set(manifest["split_hashes"]) == {"leave_one_out", "temporal"}
    assert manifest["preprocessing"]["max_length"] == 10


def test_prepare_missing_file_exits_2_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "nothing.inter"
    code, out, err = _run(capsys, "prepare", "recbole", "--path", missing, "--name", "bad", "--out-root", tmp_path)
    assert code == 2
    assert err.startswith("hm4sr prepare: error:") and "nothing.inter" in err
    assert not (tmp_path / "bad").exists() and out == ""


def test_prepare_negative_timestamp_exits_2_naming_line_and_column(tmp_path, capsys):
    inter = tmp_path / "neg.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                     "1\ta\t10\n1\tb\t20\n2\ta\t-30\n")
    code, out, err = _run(capsys, "prepare", "recbole", "--path", inter, "--name", "neg", "--out-root",
                          tmp_path / "out", "--user-core", "0", "--item-core", "0")
    assert code == 2
    assert "neg.inter" in err and "line 4" in err and "'timestamp'" in err and ">= 0" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("setting, message", [
    ("nonsense=1", "--set nonsense: unknown key"),
    ("batch_size=abc", "TrainConfig.batch_size: cannot read 'abc' as int"),
    ("hidden_size=15", "hidden_size must be even >= 2, got 15"),
    ("use_temporal_moe=maybe", "cannot read 'maybe' as bool"),
    ("optimizer.lr=1", "prefix must be 'model.', 'train.' or 'released.'"),
    ("released.timestamps=float16", "timestamps must be 'exact', 'float32' or 'minmax', got 'float16'"),
])
def test_train_rejects_bad_settings_before_any_work(tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    # --data names nothing: the settings must be refused before the data is even looked up
    code, stdout, err = _run(capsys, "train", "--data", tmp_path / "no-such-data", "--out", out, "--set", setting)
    assert code == 2
    assert message in err and "no prepared dataset" not in err
    assert not out.exists() and stdout == ""


def test_train_rejects_bad_seed_list(prepared, tmp_path, capsys):
    code, _, err = _run(capsys, "train", "--data", prepared, "--out", tmp_path / "r", "--seeds", "1,two")
    assert code == 2 and "--seeds expects comma-separated integers" in err
    assert not (tmp_path / "r").exists()


def test_train_writes_the_run_folder(trained):
    for name in ("results.json", "per_user_test.parquet", "per_user_valid.parquet", "steps.csv", "epochs.csv",
                 "best.pt", "last.pt"):
        assert (trained / name).is_file(), name
    record = json.loads((trained / "results.json").read_text())
    assert record["epochs_run"] == 2 and record["config"]["train"]["seed"] == 5
    assert record["config"]["model"]["hidden_size"] == 16 and record["config"]["train"]["batch_size"] == 128


def test_train_records_the_manifest_data_hash(prepared, trained):
    manifest = json.loads((prepared / "manifest.json").read_text())
    record = json.loads((trained / "results.json").read_text())
    assert record["data_hash"] == manifest["data_hash"]
    assert record["split_hash"]


def test_evaluate_reproduces_the_test_metrics(prepared, trained, capsys):
    code, out, err = _run(capsys, "evaluate", "--checkpoint", trained / "best.pt", "--data", prepared, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics == json.loads((trained / "results.json").read_text())["test"]
    code, out, _ = _run(capsys, "evaluate", "--checkpoint", trained / "best.pt", "--data", prepared,
                        "--split", "valid", "--json")
    assert json.loads(out) == json.loads((trained / "results.json").read_text())["valid"]
    # the controls are reachable from the command line and change the numbers
    code, out, _ = _run(capsys, "evaluate", "--checkpoint", trained / "best.pt", "--data", prepared, "--json",
                        "--set", "eval_time=zeroed")
    assert code == 0 and json.loads(out) != metrics


def test_evaluate_rejects_training_settings(trained, capsys):
    code, _, err = _run(capsys, "evaluate", "--checkpoint", trained / "best.pt", "--set", "lr=1")
    assert code == 2 and "evaluate accepts" in err


def test_evaluate_refuses_other_data(trained, tmp_path, capsys):
    main(["prepare", "synthetic", "--name", "other", "--out-root", str(tmp_path), "--users", "30", "--items", "20",
          "--max-length", "10"])
    capsys.readouterr()
    code, _, err = _run(capsys, "evaluate", "--checkpoint", trained / "best.pt", "--data", tmp_path / "other")
    assert code == 2 and "was trained on data" in err


def test_compare_prints_means_and_p_values(prepared, tmp_path, capsys):
    for model, folder in (("hm4sr", "full"), ("sasrec", "sasrec")):
        code, out, err = _run(capsys, "train", "--data", prepared, "--model", model, "--seeds", "1,2", "--epochs",
                              "1", "--out", tmp_path / folder, "--quiet", *TINY_SETS)
        assert code == 0, err
        assert (tmp_path / folder / "seed-1" / "results.json").is_file()
        assert (tmp_path / folder / "seed-2" / "results.json").is_file()
    table_file = tmp_path / "table.md"
    code, out, err = _run(capsys, "compare", tmp_path / "full", tmp_path / "sasrec", "--metrics", "ndcg@10,hr@10",
                          "--markdown", table_file)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "| model | seeds | ndcg@10 | hr@10 |"
    full_row = next(line for line in lines if line.startswith("| full |"))
    sasrec_row = next(line for line in lines if line.startswith("| sasrec |"))
    assert "| 2 |" in full_row and "+-" in full_row and "p=" not in full_row  # the baseline row
    assert sasrec_row.count("(p=") == 2
    assert table_file.read_text() == out
    code, _, err = _run(capsys, "compare", tmp_path / "full", tmp_path / "nothing-here")
    assert code == 2 and "no results.json" in err


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_subcommand_help_lists_every_option(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for action in _subcommands()[command]._actions:
        names = action.option_strings or [action.metavar or action.dest]
        assert any(name in text for name in names), (command, names)
        if action.help and action.option_strings and action.dest != "help":
            assert action.help.split()[0] in text


def test_console_script_help():
    script = Path(sys.executable).with_name("hm4sr")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "hm4sr_core.cli"]
    done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    for command in ("prepare", "train", "evaluate", "compare", "run-notebooks", "demo"):
        assert command in done.stdout


def test_table_trains_runs_in_parallel_workers_and_reuses_them(prepared, tmp_path, capsys):
    out = tmp_path / "table"
    argv = ["table", "--data", prepared, "--out", out, "--models", "sasrec,id_only", "--seeds", "1",
            "--set", "epochs=1", "--set", "max_steps_per_epoch=1", "--quiet"]
    code, text, err = _run(capsys, *argv, "--jobs", "2")
    assert code == 0, err
    assert "2 runs to train, 2 at a time" in text
    assert "sasrec seed 1 trained" in text and "id_only seed 1 trained" in text
    stamps = {m: (out / m / "seed-1" / "results.json").stat().st_mtime_ns for m in ("sasrec", "id_only")}
    assert (out / "table.md").read_text().count("| sasrec | 1 |") == 1
    assert "Runs trained: 2 on cpu." in (out / "table.md").read_text()
    code, text, err = _run(capsys, *argv, "--set", "threads=1")  # threads: speed only, runs reused
    assert code == 0, err
    assert "runs to train" not in text and "training again" not in text
    assert {m: (out / m / "seed-1" / "results.json").stat().st_mtime_ns for m in stamps} == stamps


def test_table_names_each_failed_run_and_keeps_the_finished_ones(prepared, tmp_path, capsys):
    out = tmp_path / "t"
    common = ["table", "--data", prepared, "--out", out, "--models", "sasrec", "--set", "epochs=1", "--quiet"]
    code, _, err = _run(capsys, *common, "--seeds", "1")
    assert code == 0, err
    stamp = (out / "sasrec" / "seed-1" / "results.json").stat().st_mtime_ns
    # device is a speed-only setting: seed 1 is reused, seeds 2 and 3 fail on a GPU that is not there
    code, text, err = _run(capsys, *common, "--seeds", "1,2,3", "--jobs", "2", "--set", "device=cuda:99")
    assert code == 2
    assert "2 runs to train" in text
    assert "these runs failed" in err and "sasrec seed 2" in err and "sasrec seed 3" in err
    assert "sasrec seed 1" not in err
    assert (out / "sasrec" / "seed-1" / "results.json").stat().st_mtime_ns == stamp
    assert "| sasrec | 1 |" in (out / "table.md").read_text()  # the table of the first call, untouched


def test_table_rejects_zero_jobs(prepared, tmp_path, capsys):
    code, _, err = _run(capsys, "table", "--data", prepared, "--out", tmp_path / "t", "--jobs", "0")
    assert code == 2 and "--jobs must be >= 1" in err


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name; None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _table_workers(pid: int) -> list[int]:
    kids = []
    for proc in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(proc.name))
        if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
            try:
                if b"spawn_main" in (proc / "cmdline").read_bytes():
                    kids.append(int(proc.name))
            except OSError:
                continue
    return kids


def _start_long_table(prepared, out, **popen):
    import time
    cmd = [sys.executable, "-m", "hm4sr_core.cli", "table", "--data", str(prepared), "--out", str(out),
           "--models", "sasrec", "--seeds", "1,2,3", "--jobs", "2", "--set", "epochs=100", "--set", "patience=100",
           "--quiet"]
    table = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, **popen)
    deadline = time.time() + 180
    while time.time() < deadline and not all((out / "sasrec" / f"seed-{s}" / "last.pt").exists() for s in (1, 2)):
        time.sleep(0.2)
    workers = _table_workers(table.pid)
    assert len(workers) == 2, "two workers training"
    return table, workers


def _wait_gone(pids, seconds=30.0):
    import time
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_killing_the_table_process_ends_its_workers(prepared, tmp_path):
    import signal
    table, workers = _start_long_table(prepared, tmp_path / "t")
    try:
        table.send_signal(signal.SIGKILL)
        table.wait(timeout=30)
        assert not _wait_gone(workers), "workers outlived the killed table process"
    finally:
        if table.poll() is None:
            table.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups as a terminal makes them")
def test_ctrl_c_stops_the_table_and_its_queue(prepared, tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: the table must stop, not
    train the queued runs first."""
    import signal
    # As a terminal's foreground job: Ctrl-C handled. A job started in the background of a
    # non-interactive shell (nohup cmd &, some CI runners) inherits SIGINT ignored, and Python
    # keeps it ignored, so the table would rightly train on.
    table, workers = _start_long_table(prepared, tmp_path / "t", start_new_session=True,
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        os.killpg(table.pid, signal.SIGINT)
        code = table.wait(timeout=60)
        assert code == 130, table.stderr.read()
        assert "interrupted" in table.stderr.read()
        assert not _wait_gone(workers), "workers outlived the interrupted table"
        assert not (tmp_path / "t" / "sasrec" / "seed-3").exists()  # the queued run never started
    finally:
        if table.poll() is None:
            os.killpg(table.pid, signal.SIGKILL)


def test_table_resumes_a_run_a_killed_table_left_unfinished(prepared, tmp_path, capsys):
    import pandas as pd
    out, whole = tmp_path / "t", tmp_path / "whole"
    common = ["--data", prepared, "--models", "sasrec", "--seeds", "1", "--quiet", *TINY_SETS[8:]]
    assert _run(capsys, "table", "--out", out, *common, "--set", "epochs=1")[0] == 0
    run = out / "sasrec" / "seed-1"
    first = pd.read_csv(run / "epochs.csv")
    (run / "results.json").unlink()  # as if the table had been killed after epoch 1 of 2

    code, text, err = _run(capsys, "table", "--out", out, *common, "--set", "epochs=2")
    assert code == 0, err
    assert "resuming the unfinished run" in text
    resumed = pd.read_csv(run / "epochs.csv")
    assert len(resumed) == 2 and resumed["train_seconds"].iloc[0] == first["train_seconds"].iloc[0]
    assert _run(capsys, "table", "--out", whole, *common, "--set", "epochs=2")[0] == 0
    assert json.loads((run / "results.json").read_text())["test"] == \
        json.loads((whole / "sasrec" / "seed-1" / "results.json").read_text())["test"]

    (run / "results.json").unlink()  # unfinished again, but now asked with another learning rate
    code, text, err = _run(capsys, "table", "--out", out, *common, "--set", "epochs=2", "--set", "lr=0.01")
    assert code == 0, err
    assert "training from scratch instead" in text
    assert pd.read_csv(run / "epochs.csv")["train_seconds"].iloc[0] != first["train_seconds"].iloc[0]


def test_demo_runs_the_routing_tour_first(monkeypatch, tmp_path, capsys):
    import hm4sr_core.notebooks as runner

    calls = []
    monkeypatch.setattr(cli, "prepared_dataset", lambda source, name: (None, tmp_path))
    monkeypatch.setattr(cli, "format_stats", lambda ds: "stats")
    monkeypatch.setattr(cli, "run_notebooks", lambda **kwargs: calls.append(kwargs) or tmp_path)
    code, text, err = _run(capsys, "demo")
    assert code == 0, err
    assert calls == [{"smoke": False, "data": "ml-100k"}]  # every notebook, in NOTEBOOKS order
    assert runner.NOTEBOOKS[0] == runner.TOUR and "planted world" in text
    assert text.index(runner.TOUR) < text.index("01_prepare_data")


def test_copy_notebooks_says_where_their_kernels_keep_data(monkeypatch, tmp_path, capsys):
    """A Jupyter kernel runs in the notebook's folder, so ./data there is not the data root
    `hm4sr prepare` used here: the copy says so and how to share it."""
    from hm4sr_core.notebooks import NOTEBOOKS
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HM4SR_DATA", raising=False)
    code, text, err = _run(capsys, "copy-notebooks", "nb")
    assert code == 0, err
    assert sorted(p.stem for p in (tmp_path / "nb").glob("*.ipynb")) == sorted(NOTEBOOKS)
    assert f"keep data in {Path('nb') / 'data'}" in text and f"HM4SR_DATA={tmp_path / 'data'}" in text
    monkeypatch.setenv("HM4SR_DATA", str(tmp_path / "shared"))  # set: the kernels inherit it, nothing to say
    code, text, err = _run(capsys, "copy-notebooks", "nb2")
    assert code == 0 and "HM4SR_DATA" not in text


@pytest.mark.parametrize("argv, says", [
    (["train", "--model", "nosuch", "--data", "x", "--out", "y"], "hm4sr train: error: argument --model: invalid choice: 'nosuch'"),
    (["train", "--data", "x"], "hm4sr train: error: the following arguments are required: --out"),
    (["nosuch"], "hm4sr: error: argument COMMAND: invalid choice: 'nosuch'"),
    (["train", "--data", "x", "--out", "y", "--bogus", "1"], "hm4sr train: error: unrecognized arguments: --bogus 1"),
    (["--bogus"], "hm4sr: error: the following arguments are required: COMMAND"),
])
def test_a_usage_error_is_one_line_and_where_help_is(argv, says, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith(says), err
    assert len(lines) == 2 and "--help` explains every option" in lines[1], err
    assert "usage:" not in err
