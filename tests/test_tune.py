"""``hm4sr tune``: search spaces, the sealed test split, crash recovery, the final runs and
their config file, and several workers on one PostgreSQL study.

Every study here runs on the tiny planted world (60 users, T 10) with a d-16 one-layer
model and 2-epoch trials: seconds, not minutes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna", reason="Optuna is not installed (pip install \"hm4sr-workbench[tune]\")")

from benchmarks import pruner_replay  # noqa: E402
from hm4sr_core import provenance, tune  # noqa: E402
from hm4sr_core.cli import main  # noqa: E402
from hm4sr_core.data.store import save_dataset  # noqa: E402
from hm4sr_core.train import train  # noqa: E402
from hm4sr_core.tune import (SealedPart, TestSplitRead, default_space, read_config, read_space,  # noqa: E402
                             sealed_split, validate_space)

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--set", "hidden_size=16", "--set", "num_layers=1", "--set", "inner_size=32", "--set", "max_length=10",
              "--set", "dense_batch_size=32", "--set", "eval_batch_size=64"]


@pytest.fixture(scope="module")
def tiny_folder(tiny_ds, tmp_path_factory) -> Path:
    return save_dataset(tiny_ds, tmp_path_factory.mktemp("tune_data") / "tiny")


def _tune(data: Path, out: Path, *extra: str, trials: int = 4, model: str = "sasrec") -> int:
    return main(["tune", "--data", str(data), "--model", model, "--trials", str(trials), "--epochs", "2",
                 "--warmup-epochs", "1", "--startup-trials", "2", "--out", str(out), "--quiet", *TINY_MODEL, *extra])


def _trials(out: Path, study: str) -> list:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{out / 'study.db'}").get_trials()


# ----------------------------------------------------------------------------- spaces


@pytest.mark.parametrize("text, named", [
    ("lr: {low: 1.0e-3, high: 1.0e-2}\nlearning_rate: {low: 0.1, high: 0.2}\n", "learning_rate: unknown key"),
    ("hidden_dropout: {low: 0.3, high: 0.3}\n", "hidden_dropout: empty range"),
    ("lr: {low: 1.0e-2, high: 1.0e-3, log: true}\n", "lr: reversed range"),
    ("num_experts: {low: 2, hi: 8}\n", "num_experts: unknown field(s) ['hi']"),
    ("num_experts: {low: 1.5, high: 8}\n", "num_experts: low and high must be integers"),
    ("w_category: {low: 0.0, high: 1.0, log: true}\n", "w_category: a log range needs low > 0"),
    ("hidden_dropout: {low: 0.1, high: 1.0}\n", "hidden_dropout: 1.0 is refused by the configuration"),
    ("num_layers: {choices: []}\n", "num_layers: choices must be a non-empty list"),
])
def test_bad_space_file_refused_naming_the_key(tmp_path, capsys, tiny_folder, text, named):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    with pytest.raises(ValueError) as info:
        read_space(space)
    assert named in str(info.value) and str(space) in str(info.value)
    # through the command: exit 2, one line on stderr, nothing written
    code = main(["tune", "--data", str(tiny_folder), "--trials", "1", "--space", str(space),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and named in err[0]
    assert not (tmp_path / "out").exists()


def test_default_spaces_are_valid_and_ablations_leave_out_what_they_fix():
    hm4sr, sasrec = default_space("hm4sr"), default_space("sasrec")
    assert all(spec.get("reason") for spec in hm4sr.values())
    assert set(sasrec) == {"lr", "hidden_dropout", "attention_dropout"} and set(sasrec) < set(hm4sr)
    assert "w_category" not in default_space("no_category")
    assert not {"w_placeholder_contrastive", "placeholder_ratio"} & set(default_space("no_placeholder_contrastive"))
    assert validate_space({"num_layers": {"choices": [1, 2]}, "lr": {"low": 1e-4, "high": 1e-2, "log": True}}) == \
        {"num_layers": {"choices": [1, 2]}, "lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    with pytest.raises(ValueError, match="unknown; known"):
        default_space("bert4rec")


# ----------------------------------------------------------------------------- the test split


def test_sealed_split_raises_on_any_read_of_the_test_part(tiny_ds, tiny_model_config, tiny_train_config):
    split = sealed_split(tiny_ds, 10)
    assert isinstance(split.test, SealedPart) and len(split.test) == len(split.valid)
    for read in (lambda: split.test.targets, lambda: split.test.items, lambda: split.hash()):
        with pytest.raises(TestSplitRead):
            read()
    with pytest.raises(TestSplitRead):  # training that scores test at the end trips over it
        train(tiny_ds, tiny_model_config, tiny_train_config.replace(epochs=1), split=split, progress=False)
    result = train(tiny_ds, tiny_model_config, tiny_train_config.replace(epochs=1), split=split, progress=False,
                   test=False)
    assert result.test is None and result.record["test"] is None and result.valid.metrics["ndcg@20"] > 0


def test_search_is_blind_to_the_test_targets(tiny_ds, tiny_folder, tmp_path):
    """The same search on a copy whose every test target (each user's last item) is
    replaced by another item sees exactly the same trials: nothing it computes depends on
    the test split. The final runs, which do score test, then differ."""
    inter = tiny_ds.interactions.copy()
    last = inter.groupby("user").tail(1).index
    inter.loc[last, "item"] = inter.loc[last, "item"] % tiny_ds.num_items + 1  # another item, same time
    scrambled = save_dataset(dataclasses.replace(tiny_ds, interactions=inter), tmp_path / "scrambled")
    assert _tune(tiny_folder, tmp_path / "a", "--final-seeds", "7", trials=3) == 0
    assert _tune(scrambled, tmp_path / "b", "--final-seeds", "7", trials=3, ) == 0
    a, b = _trials(tmp_path / "a", "sasrec-tiny"), _trials(tmp_path / "b", "sasrec-scrambled")
    assert [(t.params, t.value, t.intermediate_values, t.state) for t in a] == \
        [(t.params, t.value, t.intermediate_values, t.state) for t in b]
    assert len(a) == 3
    test_a = json.loads((tmp_path / "a" / "sasrec_tuned" / "seed-7" / "results.json").read_text())["test"]
    test_b = json.loads((tmp_path / "b" / "sasrec_tuned" / "seed-7" / "results.json").read_text())["test"]
    assert test_a["ndcg@10"] != test_b["ndcg@10"]  # the final runs do read test: the scramble shows there


# ----------------------------------------------------------------------------- a study end to end


def test_study_then_final_seeds_then_best_config_round_trip(tiny_folder, tmp_path, capsys):
    out = tmp_path / "tune"
    assert _tune(tiny_folder, out, "--final-seeds", "3,4", trials=5, model="hm4sr") == 0
    trials = _trials(out, "hm4sr-tiny")
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 5
    table = (out / "trials.csv").read_text().splitlines()
    assert table[0].startswith("number,state,valid_ndcg@20") and len(table) == 1 + len(trials)
    summary = json.loads((out / "tune.json").read_text())
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert summary["best"]["trial"] == best.number and summary["best"]["params"] == best.params
    assert [s["seed"] for s in summary["final"]] == [3, 4]
    assert summary["environment"]["cpu_model"] == provenance.cpu()["cpu_model"]  # trials per hour: on what CPU
    # the config file: the best trial's values, and `hm4sr train --config` reproduces seed 3
    model_cfg, train_cfg = read_config(out / "best_config.yaml")
    assert train_cfg.lr == best.params["lr"]  # exact: JSON and YAML write floats by repr, which reads back the same
    assert model_cfg.num_experts == best.params["num_experts"] and train_cfg.epochs == 2
    assert main(["train", "--data", str(tiny_folder), "--config", str(out / "best_config.yaml"), "--seed", "3",
                 "--out", str(tmp_path / "again"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    first = json.loads((out / "hm4sr_tuned" / "seed-3" / "results.json").read_text())
    assert again["test"] == first["test"] and again["config"] == first["config"]
    # the run folders are what `hm4sr compare` reads
    capsys.readouterr()
    assert main(["compare", str(out / "hm4sr_tuned"), "--metrics", "ndcg@10,hr@20"]) == 0
    assert "| hm4sr_tuned | 2 |" in capsys.readouterr().out
    # a second command with another space on the same study is refused, naming what differs
    space = tmp_path / "other.yaml"
    space.write_text("lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    assert _tune(tiny_folder, out, "--space", str(space), trials=6, model="hm4sr") == 2
    assert "created with other space" in capsys.readouterr().err


# ----------------------------------------------------------------------------- kill -9


def _states(db: Path) -> dict[int, str]:
    """Trial number -> state; a RUNNING trial its worker has claimed reads 'RUNNING+'."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            states = dict(con.execute("select number, state from trials").fetchall())
            claimed = {n for (n,) in con.execute(
                "select t.number from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
                "where t.state = 'RUNNING' and a.key = 'worker'")}
    except sqlite3.Error:
        return {}
    return {n: s + ("+" if n in claimed else "") for n, s in states.items()}


def test_dead_and_unclaimed_trials_are_failed_live_ones_kept(tmp_path, monkeypatch):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    dead, live, young, remote = (study.ask() for _ in range(4))
    dead.set_user_attr("worker", f"{socket.gethostname()}:{2**22 + 12345}:")  # above Linux's largest pid
    live.set_user_attr("worker", tune.worker_id())  # this process
    remote.set_user_attr("worker", "another-host:1:")  # left to the heartbeat
    assert tune.fail_dead_trials(study) == [dead.number]  # young: no worker yet, but just created
    monkeypatch.setattr(tune, "UNCLAIMED_S", 0.0)
    assert tune.fail_dead_trials(study) == [young.number]
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {dead.number: "FAIL", live.number: "RUNNING", young.number: "FAIL", remote.number: "RUNNING"}


def test_kill_9_then_the_same_command_goes_on(tiny_folder, tmp_path):
    out = tmp_path / "tune"
    cmd = [sys.executable, "-m", "hm4sr_core.cli", "tune", "--data", str(tiny_folder), "--model", "sasrec",
           "--trials", "4", "--epochs", "4", "--warmup-epochs", "1", "--startup-trials", "2", "--out", str(out),
           "--final-seeds", "none", "--quiet", *TINY_MODEL, "--set", "threads=1"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    states: dict[int, str] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        states = _states(out / "study.db")
        done = [n for n, s in states.items() if s in ("COMPLETE", "PRUNED")]
        if done and "RUNNING+" in states.values():  # killed mid-training
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-trial: {states}, {proc.stderr.read()[-500:]!r}"
    killed = [n for n, s in _states(out / "study.db").items() if s.startswith("RUNNING")]
    before = {t.number: (t.state, t.value) for t in _trials(out, "sasrec-tiny") if t.state.is_finished()}
    assert len(killed) == 1 and before
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-1000:]
    assert f"trial(s) {killed[0]} of a killed run marked failed" in run.stdout
    after = {t.number: t for t in _trials(out, "sasrec-tiny")}
    assert {n: (after[n].state, after[n].value) for n in before} == before  # finished trials kept as they were
    lost = after[killed[0]]
    assert lost.state.name == "FAIL" and "died" in lost.user_attrs["fail_reason"]
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in after.values()) == 4
    summary = json.loads((out / "tune.json").read_text())
    assert summary["trials"]["fail"] == 1 and "final" not in summary  # --final-seeds none: search only
    assert summary["best"]["trial"] != killed[0]
    rows = {int(line.split(",")[0]): line.split(",")[1] for line in (out / "trials.csv").read_text().splitlines()[1:]}
    assert rows[killed[0]] == "FAIL"


# ----------------------------------------------------------------------------- PostgreSQL, two workers


def _postgres_bin() -> Path | None:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").exists() and (root / "pg_ctl").exists():
            return root
    return None


@pytest.fixture
def postgres(tmp_path):
    """A throw-away PostgreSQL server in tmp_path on a free 127.0.0.1 port, run as the
    'postgres' user when the tests run as root (initdb refuses root). Yields its URL."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install \"hm4sr-workbench[tune]\")")
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql, as "
                    "scripts/system-packages.sh does when run as root)")
    as_user: list[str] = []
    data = tmp_path / "pgdata"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        base = Path(f"/tmp/hm4sr-pg-{os.getpid()}-{tmp_path.name}")
        base.mkdir()
        shutil.chown(base, "postgres")
        data = base / "pgdata"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tune"],
                   check=True, capture_output=True, timeout=120)
    log = data.parent / "pg.log"
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                    "-o", f"-p {port} -k {data.parent} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, timeout=90)
    try:
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "tune", "study"],
                       check=True, capture_output=True, timeout=30)
        yield f"postgresql+psycopg2://tune@127.0.0.1:{port}/study"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(data.parent if as_user else data, ignore_errors=True)


def test_two_workers_on_one_postgresql_study(postgres, tiny_folder, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = []
    for w in range(2):
        cmd = [sys.executable, "-m", "hm4sr_core.cli", "tune", "--data", str(tiny_folder), "--model", "sasrec",
               "--trials", "6", "--epochs", "2", "--warmup-epochs", "1", "--startup-trials", "2",
               "--storage", postgres, "--study", "shared", "--seed", str(2025 + w), "--final-seeds", "none",
               "--out", str(tmp_path / f"worker{w}"), "--quiet", *TINY_MODEL, "--set", "threads=1"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-800:] for o in outs]
    study = optuna.load_study(study_name="shared", storage=postgres)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # every trial counted once
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    # each worker starts a trial only while fewer than 6 are finished: at most one more each in flight
    assert 6 <= len(finished) <= 7 and not [t for t in trials if t.state.name == "RUNNING"]
    workers = {t.user_attrs["worker"].split(":")[1] for t in trials}
    assert workers == {str(p.pid) for p in procs}  # both processes ran trials of the one study
    seen = [json.loads((tmp_path / f"worker{w}" / "tune.json").read_text()) for w in range(2)]
    best = max(t.value for t in trials if t.state.name == "COMPLETE")
    assert {s["best"]["value"] for s in seen} == {best}
    assert all(s["trials"]["complete"] + s["trials"]["pruned"] == len(finished) for s in seen)


# ----------------------------------------------------------------------------- pruners


def _replay(pruner, curves) -> list[str]:
    """Each trial's final state when ``pruner`` judges ``curves`` as hm4sr tune reports them."""
    return pruner_replay.replay(curves, pruner)["states"]


def test_halving_is_the_default_and_judges_at_the_warm_up_epoch(tmp_path):
    """The default pruner is successive halving with its first rung at --warmup-epochs: of
    three trials that reach epoch 3, one behind both others stops there; one level with the
    best goes on; the median rule would have let the laggard run (it waits for 5 trials)."""
    settings = tune.TuneSettings(data="x", model="sasrec", trials=4, out=tmp_path, space={},
                                 train=tune.TrainConfig(epochs=9))
    assert settings.pruner == "halving" and settings.warmup == tune.DEFAULT_WARMUP == 3
    pruner = tune.make_pruner(settings)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    good = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    behind = [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.9, 0.9, 0.95]  # would have been the best at the cap
    assert _replay(pruner, [good, good, behind, good]) == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    median = tune.make_pruner(dataclasses.replace(settings, pruner="median"))
    assert _replay(median, [good, good, behind, good]) == ["COMPLETE"] * 4
    assert isinstance(tune.make_pruner(dataclasses.replace(settings, pruner="none")), optuna.pruners.NopPruner)
    with pytest.raises(ValueError, match="--pruner must be one of halving, median, none, got 'asha'"):
        dataclasses.replace(settings, pruner="asha")
    with pytest.raises(ValueError, match="--warmup-epochs must be >= 1 with --pruner halving"):
        dataclasses.replace(settings, warmup=0)
    assert dataclasses.replace(settings, pruner="median", warmup=0).warmup == 0  # the median rule may judge at once
