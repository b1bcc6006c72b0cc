"""The faults a fault-injection pass found (issue 26), each reproduced and now ending in one
line that names the file, row or option, exit code 2, and nothing of the user's lost.

Kills at the worst moment come from the ``HM4SR_FAULT`` kill points of
:mod:`hm4sr_core.atomic` (the process SIGKILLs itself there), not from timing; a full disk
is a small tmpfs, mounted when the tests run as root (skipped otherwise, saying so).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from hm4sr_core import atomic
from hm4sr_core.cli import main
from hm4sr_core.data import features, timeunits
from hm4sr_core.config import PreprocessConfig
from hm4sr_core.data.prepare import _prepare_locked, locate_inputs, prepare_dataset
from hm4sr_core.data.readers import amazon
from hm4sr_core.data.schema import DataError
from hm4sr_core.data.store import load_dataset

TINY_SETS = ["--set", "hidden_size=16", "--set", "max_length=10", "--set", "num_layers=1",
             "--set", "inner_size=32", "--set", "batch_size=128", "--set", "eval_batch_size=256", "--quiet"]
SMALL_WORLD = ["--users", "30", "--items", "20", "--max-length", "10"]
REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str, *needles: str) -> None:
    """stderr is exactly one line, an hm4sr error naming every needle, no traceback."""
    assert err.count("\n") == 1 and err.startswith("hm4sr ") and ": error: " in err, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*argv, fault: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m hm4sr_core.cli ARGV`` in a child process (a kill point needs its own process)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "OMP_NUM_THREADS": "1"}
    env.pop(atomic.FAULT_VARIABLE, None)
    if fault:
        env[atomic.FAULT_VARIABLE] = fault
    return subprocess.run([sys.executable, "-m", "hm4sr_core.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_data")
    assert main(["prepare", "synthetic", "--name", "tiny", "--out-root", str(root), *SMALL_WORLD, "--seed", "4"]) == 0
    return root / "tiny"


@pytest.fixture(scope="module")
def run_folder(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults_run") / "run"
    assert main(["train", "--data", str(prepared), "--epochs", "1", "--out", str(out), *TINY_SETS]) == 0
    return out


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` at ``folder`` (a full disk on demand); skips unless root."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("full-disk case needs root to mount a small tmpfs (not root here): not tested")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"full-disk case: mounting a tmpfs failed ({done.stderr.strip()}): not tested")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# --------------------------------------------------------------------------- 1. user files and train --out


def test_train_refuses_a_folder_of_user_files_before_training(prepared, tmp_path, capsys):
    user = tmp_path / "u"
    user.mkdir()
    (user / "results.json").write_text('{"mine":1}\n')
    (user / "steps.csv").write_text("my,own\n")
    before = _snapshot(user)
    code, out, err = _run(capsys, "train", "--data", prepared, "--out", user, "--epochs", "1", *TINY_SETS)
    assert code == 2 and out == ""
    _one_error_line(err, str(user), "not empty", "results.json", "--resume")
    assert _snapshot(user) == before and sorted(p.name for p in user.iterdir()) == ["results.json", "steps.csv"]


def test_train_refuses_an_out_that_is_a_file_before_training(prepared, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    code, out, err = _run(capsys, "train", "--data", prepared, "--out", target, "--epochs", "1", *TINY_SETS)
    assert code == 2 and out == ""
    _one_error_line(err, "notes.txt", "an existing file")
    assert target.read_text() == "keep me\n"


def test_train_into_a_finished_run_needs_resume(prepared, run_folder, capsys):
    before = _snapshot(run_folder)
    code, _, err = _run(capsys, "train", "--data", prepared, "--out", run_folder, "--epochs", "1", *TINY_SETS)
    assert code == 2
    _one_error_line(err, "not empty", "--resume")
    assert _snapshot(run_folder) == before


def test_run_notebooks_refuses_a_folder_of_user_files_before_running(tmp_path, capsys):
    user = tmp_path / "mine"  # e.g. where copy-notebooks put the notebooks, one of them edited
    user.mkdir()
    (user / "00_expert_routing_tour.ipynb").write_text('{"my": "edits"}\n')
    (user / "index.html").write_text("<p>my page</p>\n")
    before = _snapshot(user)
    code, out, err = _run(capsys, "run-notebooks", "--smoke", "--notebooks", "00_expert_routing_tour", "--out", user)
    assert code == 2 and out == ""
    _one_error_line(err, str(user), "not empty", "00_expert_routing_tour.ipynb", "Nothing was run")
    assert _snapshot(user) == before
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    code, out, err = _run(capsys, "run-notebooks", "--smoke", "--out", target)
    assert code == 2 and out == ""
    _one_error_line(err, "notes.txt", "an existing file")
    assert target.read_text() == "keep me\n"


@pytest.mark.parametrize("module,extra,needle", [("papermill", "workbench", "the notebooks need"),
                                                  ("optuna", "tune", "--notebooks 00_expert_routing_tour")])
def test_run_notebooks_names_a_missing_extra_before_running(module, extra, needle, tmp_path, capsys, monkeypatch):
    """A `pip install ".[workbench]"` has no optuna: 08_tuning failed as a cell after 00-07 had run."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    out = tmp_path / "run"
    code, text, err = _run(capsys, "run-notebooks", "--smoke", "--notebooks", "00_expert_routing_tour,08_tuning",
                           "--out", out)
    assert code == 2 and text == ""
    _one_error_line(err, f"{extra} extra", f'pip install "hm4sr-workbench[{extra}]"', module, needle)
    assert not out.exists()


# --------------------------------------------------------------------------- 2. one writer per target


def test_a_second_train_into_a_locked_folder_is_refused(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    with atomic.target_lock(out, "test", wait=False):
        code, _, err = _run(capsys, "train", "--data", prepared, "--out", out, "--epochs", "1", *TINY_SETS)
    assert code == 2
    _one_error_line(err, str(out), f"pid {os.getpid()}", "another process")
    assert not out.exists()


def test_a_second_prepare_waits_for_the_lock_then_checks_again(tmp_path, capsys):
    root = tmp_path / "data"
    done: dict = {}

    def second():
        try:
            done["result"] = prepare_dataset("synthetic", name="same", out_root=root, seed=2,
                                             synthetic={"n_users": 30, "n_items": 20})
        except DataError as error:
            done["error"] = error

    with atomic.target_lock(root / "same", "test", wait=False):
        worker = threading.Thread(target=second)
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and not (root / "same").exists()  # waiting, nothing written
        # Meanwhile "the first writer" puts a dataset from seed 1 there.
        inputs = locate_inputs("synthetic", seed=1, synthetic={"n_users": 30, "n_items": 20})
        _prepare_locked("synthetic", inputs, "same", root / "same", PreprocessConfig(), overwrite=False)
        seed_1 = _snapshot(root / "same")
    worker.join(60)
    assert "waiting for another process" in capsys.readouterr().err
    # Re-checked under the lock: seed 2 would replace seed 1's dataset, so it is refused.
    assert "error" in done and "differs in seed (1 there, 2 now)" in str(done["error"])
    assert _snapshot(root / "same") == seed_1
    assert sorted(p.name for p in root.iterdir()) == ["same"]  # no lock file, no temporary folder left


def test_two_prepares_of_one_name_started_together_never_both_write(tmp_path):
    root = tmp_path / "data"
    argv = ["prepare", "synthetic", "--name", "same", "--out-root", root, *SMALL_WORLD]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    procs = {seed: subprocess.Popen([sys.executable, "-m", "hm4sr_core.cli", *map(str, argv), "--seed", str(seed)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for seed in (1, 2)}
    results = {seed: (p.wait(180), *p.communicate()) for seed, p in procs.items()}
    winners = [seed for seed, (code, out, _) in results.items() if code == 0 and "written" in out]
    assert len(winners) == 1, results
    (loser,) = {1, 2} - set(winners)
    code, _, err = results[loser]
    *waiting, error = err.splitlines()  # it waited for the lock (said in one line) unless the other had finished
    assert all("waiting for another process" in line for line in waiting) and len(waiting) <= 1, err
    assert code == 2 and "--overwrite" in error and str(root / "same") in error, err
    manifest = json.loads((root / "same" / "manifest.json").read_text())
    assert manifest["inputs"]["options"]["seed"] == winners[0]


# --------------------------------------------------------------------------- 3. millisecond timestamps


def test_unit_rule_on_values():
    year_2014_s, year_2014_ms = 1_388_534_400, 1_388_534_400_000
    assert timeunits.detect_unit(np.array([year_2014_s]), "seconds", "f").unit == "seconds"
    assert timeunits.detect_unit(np.array([year_2014_ms]), "seconds", "f").unit == "milliseconds"
    assert timeunits.detect_unit(np.array([year_2014_s]), "milliseconds", "f").unit == "seconds"
    assert timeunits.detect_unit(np.array([year_2014_ms]), "milliseconds", "f").unit == "milliseconds"
    # A relative clock keeps the format's unit.
    assert timeunits.detect_unit(np.array([0, 5, 9_000]), "seconds", "f").unit == "seconds"
    assert timeunits.detect_unit(np.array([100_000, 200_000]), "milliseconds", "f").unit == "milliseconds"
    # After 2100 as seconds and before 1990 as milliseconds: neither.
    with pytest.raises(DataError, match=r"f: row 2, column 'timestamp': 50000000000 is .* expected Unix seconds or "
                                        r"milliseconds of a date between 1990 and 2100"):
        timeunits.detect_unit(np.array([1, 50_000_000_000]), "seconds", "f")
    # A seconds value among milliseconds: one unit a file.
    with pytest.raises(DataError, match=r"line 7, column 'timestamp': 1388534400 is 2014-01-01 as seconds.*one unit"):
        timeunits.detect_unit(np.array([year_2014_ms, year_2014_s]), "seconds", "f", rows=np.array([3, 7]))
    note = timeunits.detect_unit(np.array([year_2014_ms]), "seconds", "f").note()
    assert note.startswith("milliseconds, not the format's seconds") and "2014-01-01" in note
    assert np.array_equal(timeunits.to_seconds(np.array([1_388_534_400_999, 5]), "milliseconds"),
                          [1_388_534_400, 0])
    assert np.array_equal(timeunits.to_seconds(np.array([1_388_534_400_999.9]), "milliseconds"), [1_388_534_400])


def _inter_file(folder: Path, times: list[int], users: int = 6, items: int = 6, step: int = 1) -> Path:
    """A RecBole .inter where every user meets every item (passes the 5-core), row k at
    ``times[k % len(times)] + k * step``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    k = 0
    for u in range(users):
        for i in range(items):
            rows.append(f"u{u}\ti{i}\t{times[k % len(times)] + k * step}")
            k += 1
    path = folder / "shop.inter"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_recbole_milliseconds_are_converted_and_said(tmp_path, capsys):
    inter = _inter_file(tmp_path / "in", [1_388_534_400_000], step=3_600_000)  # hourly, in milliseconds
    code, out, err = _run(capsys, "prepare", "recbole", "--path", inter, "--out-root", tmp_path / "data",
                          "--name", "ms")
    assert code == 0, err
    assert "time span    2014-01-01 .. 2014-01-02" in out
    assert "time unit    milliseconds, not the format's seconds" in out
    ds = load_dataset(tmp_path / "data" / "ms")
    assert ds.interactions["timestamp"].min() == 1_388_534_400
    assert ds.preprocessing["timestamp_unit"].startswith("milliseconds")


def test_recbole_neither_unit_is_refused_naming_the_row(tmp_path, capsys):
    inter = _inter_file(tmp_path / "in", [50_000_000_000])
    code, out, err = _run(capsys, "prepare", "recbole", "--path", inter, "--out-root", tmp_path / "data")
    assert code == 2 and out == ""
    _one_error_line(err, "shop.inter", "row 36", "column 'timestamp'", "expected Unix seconds or milliseconds")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def _reviews(path: Path, version: str, times: list[int]) -> Path:
    fields = {"2014": ("reviewerID", "asin", "unixReviewTime"), "2023": ("user_id", "parent_asin", "timestamp")}[version]
    path.write_text("".join(json.dumps(dict(zip(fields, (f"U{k}", f"I{k}", t)))) + "\n" for k, t in enumerate(times)))
    return path


def test_amazon_2014_in_milliseconds_is_converted(tmp_path):
    frame = amazon.read_reviews(_reviews(tmp_path / "r.json", "2014", [1_388_534_400_000, 1_388_620_800_500]), "2014")
    assert frame["timestamp"].tolist() == [1_388_534_400, 1_388_620_800]
    assert frame.attrs["timestamp_unit"].startswith("milliseconds, not the format's seconds")


def test_amazon_2023_in_seconds_is_read_as_seconds_and_said(tmp_path):
    frame = amazon.read_reviews(_reviews(tmp_path / "r.jsonl", "2023", [1_588_687_728, 1_588_687_800]), "2023")
    assert frame["timestamp"].tolist() == [1_588_687_728, 1_588_687_800]  # 2020, not 1970-01-19
    assert frame.attrs["timestamp_unit"].startswith("seconds, not the format's milliseconds")
    assert "1970-01-19" in frame.attrs["timestamp_unit"]


# --------------------------------------------------------------------------- 4. non-UTF-8 lines


def test_non_utf8_byte_is_reported_at_its_line(tmp_path, capsys):
    inter = _inter_file(tmp_path / "in", [1_000_000_000], users=20, items=20)
    lines = inter.read_bytes().split(b"\n")
    lines[301] = lines[301].replace(b"u", b"\xe9", 1)  # line 302 of the file
    inter.write_bytes(b"\n".join(lines))
    code, _, err = _run(capsys, "prepare", "recbole", "--path", inter, "--out-root", tmp_path / "data")
    assert code == 2
    _one_error_line(err, "shop.inter: line 302, column 1: byte 0xe9 is not UTF-8")


def test_non_utf8_byte_in_amazon_metadata_is_reported_at_its_line(tmp_path):
    meta = tmp_path / "meta.json"
    lines = [json.dumps({"asin": f"I{k}", "title": "x" * 60}) for k in range(400)]
    meta.write_bytes("\n".join(lines).encode().replace(b'"I300", "title": "x', b'"I300", "title": "\xe9'))
    with pytest.raises(DataError, match=r"meta\.json: line 301: not UTF-8 text"):
        list(amazon.iter_records(meta, python_literals=False))


# --------------------------------------------------------------------------- 5. killed writes


def test_a_prepare_killed_between_its_renames_is_restored_by_the_next(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["prepare", "synthetic", "--name", "d", "--out-root", str(root), *SMALL_WORLD, "--seed", "1"]) == 0
    before = _snapshot(root / "d")
    killed = _cli("prepare", "synthetic", "--name", "d", "--out-root", root, *SMALL_WORLD, "--seed", "2",
                  "--overwrite", fault="between-renames:d")
    assert killed.returncode == -signal.SIGKILL
    left = sorted(p.name for p in root.iterdir())
    assert "d" not in left and any(n.startswith(".d.old-") for n in left) and any(n.startswith(".d.tmp-") for n in left)
    code, _, err = _run(capsys, "train", "--data", root / "d", "--out", tmp_path / "run", *TINY_SETS)
    assert code == 2 and not (tmp_path / "run").exists()
    _one_error_line(err, f"no prepared dataset at {root / 'd'}", ".d.old-*", "again to restore it")
    code, out, _ = _run(capsys, "prepare", "synthetic", "--name", "d", "--out-root", root, *SMALL_WORLD, "--seed", "1")
    assert code == 0
    assert "recovered    restored" in out and "recovered    removed .d.tmp-" in out and "reused" in out
    assert _snapshot(root / "d") == before
    assert sorted(p.name for p in root.iterdir()) == ["d"]


def test_a_run_killed_while_renaming_its_checkpoint_resumes(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    killed = _cli("train", "--data", prepared, "--out", out, "--epochs", "2", *TINY_SETS,
                  fault="before-file-rename:last.pt")
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in out.iterdir()]
    assert "last.pt" not in left and any(n.startswith(".last.pt.tmp-") for n in left)
    code, stdout, err = _run(capsys, "train", "--data", prepared, "--out", out, "--epochs", "2", "--resume", *TINY_SETS)
    assert code == 0, err
    assert "recovered    recovered" in stdout and "(epoch 1)" in stdout
    assert json.loads((out / "results.json").read_text())["epochs_run"] == 2
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_cut_short_temporary_files_are_removed(prepared, run_folder, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_folder, out)
    (out / "results.json").unlink()  # unfinished: resume goes on from last.pt
    (out / ".last.pt.tmp-abcd1234").write_bytes(b"PK\x03\x04 cut short")
    (out / ".steps.csv.k2j4l5m6").write_bytes(b"step,lo")  # an earlier version's temporary name
    code, stdout, err = _run(capsys, "train", "--data", prepared, "--out", out, "--epochs", "1", "--resume", *TINY_SETS)
    assert code == 0, err
    assert "removed .last.pt.tmp-abcd1234" in stdout and "removed .steps.csv.k2j4l5m6" in stdout
    assert (out / "results.json").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- 6. one line, not a traceback


class Stranger:
    """A class of this module: weights_only loading refuses it (unpickling it could run code)."""


def _checkpoints(run_folder: Path, folder: Path) -> dict[str, Path]:
    folder.mkdir()
    good = (run_folder / "best.pt").read_bytes()

    torch.save({"x": Stranger()}, folder / "pickled.pt")
    torch.save([1, 2, 3], folder / "list.pt")
    torch.save({"checkpoint_version": 1}, folder / "keys.pt")
    (folder / "garbage.pt").write_bytes(b"\x93 this is not a checkpoint\n" * 100)
    (folder / "truncated.pt").write_bytes(good[: len(good) // 2])
    (folder / "empty.pt").write_bytes(b"")
    return {p.stem: p for p in folder.iterdir()}


@pytest.mark.parametrize("kind, expected", [
    ("pickled", "holds objects other than tensors and plain values"),
    ("list", "holds a list; expected a checkpoint dict"),
    ("keys", "missing model_config, train_config, data_hash"),
    ("garbage", "not a readable checkpoint"),
    ("truncated", "not a readable checkpoint"),
    ("empty", "not a readable checkpoint"),
])
def test_bad_checkpoints_end_in_one_line(run_folder, tmp_path, capsys, kind, expected):
    path = _checkpoints(run_folder, tmp_path / "ck")[kind]
    code, out, err = _run(capsys, "evaluate", "--checkpoint", path)
    assert code == 2 and out == ""
    _one_error_line(err, str(path), expected)
    assert "weights_only=False" not in err


def test_a_truncated_manifest_is_named(prepared, tmp_path, capsys):
    copy = tmp_path / "tiny"
    shutil.copytree(prepared, copy)
    text = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(text[:998])
    code, _, err = _run(capsys, "train", "--data", copy, "--out", tmp_path / "run", "--epochs", "1", *TINY_SETS)
    assert code == 2
    _one_error_line(err, str(copy / "manifest.json"), "damaged", "line ", "--overwrite")
    assert not (tmp_path / "run").exists()


def test_an_over_long_name_is_refused(prepared, tmp_path, capsys):
    code, _, err = _run(capsys, "prepare", "synthetic", "--name", "n" * 300, "--out-root", tmp_path)
    assert code == 2
    _one_error_line(err, "--name", "300 bytes", "at most 200 bytes")
    assert list(tmp_path.iterdir()) == []
    code, _, err = _run(capsys, "train", "--data", prepared, "--out", tmp_path / ("r" * 300), *TINY_SETS)
    assert code == 2
    _one_error_line(err, "--out", "300 bytes", "at most 200 bytes")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_prepare_keeps_the_old_dataset(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "200k") as disk:
        assert main(["prepare", "synthetic", "--name", "d", "--out-root", str(disk), *SMALL_WORLD]) == 0
        before = _snapshot(disk / "d")
        capsys.readouterr()
        code, out, err = _run(capsys, "prepare", "synthetic", "--name", "d", "--out-root", disk, "--users", "80",
                              "--items", "60", "--max-length", "10", "--overwrite")
        assert code == 2
        _one_error_line(err, "No space left on device")
        assert _snapshot(disk / "d") == before
        assert sorted(p.name for p in disk.iterdir()) == ["d"]


def test_a_full_disk_during_training_ends_in_one_line(prepared, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        code, _, err = _run(capsys, "train", "--data", prepared, "--out", disk / "run", "--epochs", "1", *TINY_SETS)
        assert code == 2
        _one_error_line(err, str(disk / "run" / "last.pt"), "could not be written", "bytes free")
        assert list((disk / "run").iterdir()) == []  # no half-written temporary file


# --------------------------------------------------------------------------- 7. the umask


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_files_and_folders_follow_the_umask(prepared, tmp_path, mask):
    with umask(mask):
        root = tmp_path / "data"
        assert main(["prepare", "synthetic", "--name", "d", "--out-root", str(root), *SMALL_WORLD]) == 0
        out = tmp_path / "run"
        assert main(["train", "--data", str(prepared), "--out", str(out), "--epochs", "1", *TINY_SETS]) == 0
        features._save_atomic(tmp_path / "cache" / "f.npy", np.zeros(3, np.float32), "f")  # the feature cache
    assert stat.S_IMODE((root / "d").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "cache" / "f.npy").stat().st_mode) == 0o666 & ~mask
    for folder in (root / "d", out):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert modes and set(modes.values()) == {0o666 & ~mask}, modes
    assert {"last.pt", "best.pt", "results.json", "steps.csv"} <= set(p.name for p in out.iterdir())


def test_lock_files_do_not_outlive_their_holder(tmp_path):
    target = tmp_path / f"t-{uuid.uuid4().hex[:6]}"
    with atomic.target_lock(target, "test", wait=False) as lock:
        assert lock.exists() and lock.read_text().strip() == str(os.getpid())
        with pytest.raises(atomic.Busy, match=f"pid {os.getpid()}"):
            with atomic.target_lock(target, "test", wait=False):
                pass
    assert list(tmp_path.iterdir()) == []
