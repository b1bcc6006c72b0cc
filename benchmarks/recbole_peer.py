"""The bench's peer: RecBole 1.2.1's SASRec, installed apart and timed in the same `make bench` run.

Every speed target of `make bench` is a ratio against this peer, measured in the same run, on
the same data, threads and machine (issue 14), so that a slower or busier host moves both sides.
This module is the workbench's side of it; RecBole itself is imported only by
``benchmarks/recbole_runner.py``, which runs in an environment of its own:

1. :func:`ensure_env` creates ``.bench/recbole-venv`` (git-ignored) with ``python3 -m venv`` and
   installs :data:`PINS` there with ``pip --no-deps``: RecBole 1.2.1 and only what importing its
   config, data, trainer and SASRec modules needs, each pinned exactly. A stamp file keyed on
   the pins makes a second call install nothing. A failure raises :class:`PeerUnavailable`
   saying what failed; the bench records the reason and goes on without the peer.
2. :func:`write_atomic_inter` converts the prepared dataset (already 5-core filtered) into
   RecBole's atomic ``<name>.inter`` (``user_id:token item_id:token timestamp:float``) under
   ``.bench/recbole-data/hm4sr-<name>/`` (see :data:`ATOMIC_PREFIX`), rows in the workbench's order, so that RecBole's stable sort
   by time gives every user the same sequence, hence the same leave-one-out targets
   (checked on each run: :func:`compare_valid_targets`).
3. :func:`run_peer` starts the runner with the peer's python and reads its JSON;
   :func:`peer_figures` turns it into the ``recbole_sasrec_*`` keys of ``results.json`` and
   :func:`peer_ratios` gives the six ratios of our figures to RecBole's, from one run only.

    python -m benchmarks.recbole_peer --max-epochs 1 --threads 1   # install, convert, one epoch
    python -m benchmarks.recbole_peer --install-only               # the environment alone
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from hm4sr_core.config import SplitConfig
from hm4sr_core.data.prepare import prepared_dataset
from hm4sr_core.data.splits import build_split
from hm4sr_core.data.store import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / ".bench"
ENV_DIR = BENCH_DIR / "recbole-venv"
DATA_DIR = BENCH_DIR / "recbole-data"
WORK_DIR = BENCH_DIR / "recbole-run"
RUNNER = Path(__file__).resolve().with_name("recbole_runner.py")
TARGET_NDCG20 = 0.0864  # the bench's target (benchmarks/run.py TARGET_NDCG20)

# What importing recbole.config / recbole.data / recbole.trainer / SASRec needs (found by
# importing in an empty venv), each pinned exactly. Two are needed only because RecBole imports
# them unconditionally at module level: tensorboard (recbole.utils.utils imports
# torch.utils.tensorboard.SummaryWriter, which needs tensorboard, protobuf and absl-py) and
# scikit-learn (recbole.evaluator.metrics imports sklearn.metrics; sklearn needs scipy, joblib,
# threadpoolctl, narwhals and cloudpickle at import). Left out, as RecBole imports them only in
# features the bench does not use: ray (recbole.quick_start, not imported), thop (get_flops),
# plotly and hyperopt (hyper-parameter tuning), psutil (get_environment), tabulate, wandb.
PINS = (
    "recbole==1.2.1",
    "torch==2.13.0",  # the CPU wheel of this pin lies on this machine (pip's find-links)
    "typing_extensions==4.16.0", "sympy==1.14.0", "mpmath==1.3.0",  # imported by `import torch`
    "numpy==2.4.6", "scipy==1.17.1", "pandas==3.1.1", "python-dateutil==4.0.0", "six==1.17.0",
    "pyyaml==6.0.4", "tqdm==4.70.1", "texttable==1.7.2",
    "colorlog==4.7.2", "colorama==0.4.4",  # RecBole 1.2.1 requires exactly these
    "tensorboard==2.21.0", "protobuf==7.36.2", "absl-py==2.5.1",
    "scikit-learn==1.9.1", "joblib==1.6.0", "threadpoolctl==3.8.0", "narwhals==2.29.0", "cloudpickle==3.1.3",
)
IMPORT_CHECK = ("import recbole, recbole.config, recbole.data, recbole.trainer, "
                "recbole.model.sequential_recommender.sasrec; print(recbole.__version__)")
INDEX_ENV = "HM4SR_PEER_INDEX_URL"  # set: pip installs from this index only (a test points it nowhere)

# our figure / RecBole's figure, each measured in this run (see peer_ratios)
RATIOS = {
    "hm4sr_prefix_epoch_vs_recbole_sasrec": ("hm4sr_prefix_seconds_per_epoch", "recbole_sasrec_seconds_per_epoch"),
    "hm4sr_time_to_target_vs_recbole_sasrec": ("seconds_to_target", "recbole_sasrec_seconds_to_target"),
    "hm4sr_eval_vs_recbole_sasrec": ("eval_valid_seconds_median", "recbole_sasrec_eval_seconds"),
    "sasrec_prefix_epoch_vs_recbole_sasrec": ("sasrec_prefix_seconds_per_epoch", "recbole_sasrec_seconds_per_epoch"),
    "sasrec_time_to_target_vs_recbole_sasrec": ("sasrec_seconds_to_target", "recbole_sasrec_seconds_to_target"),
    "sasrec_eval_vs_recbole_sasrec": ("sasrec_eval_valid_seconds_median", "recbole_sasrec_eval_seconds"),
}


class PeerUnavailable(RuntimeError):
    """The peer could not be installed or run; the message says which step failed and why."""


def _log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


def _stamp_name(pins: tuple[str, ...], python: str) -> str:
    key = "\n".join((*pins, python))
    return ".installed-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def ensure_env(env_dir: Path = ENV_DIR, pins: tuple[str, ...] = PINS, *, python: str = "python3",
               index_url: str | None = None, timeout: float = 1800) -> Path:
    """The peer's python (``<env_dir>/bin/python``), installing :data:`PINS` first when the
    stamp of these pins is missing. An environment of other pins is removed and made again.

    ``index_url`` (default: the ``HM4SR_PEER_INDEX_URL`` variable) makes pip use that index only,
    ignoring this machine's pip configuration. Raises :class:`PeerUnavailable` naming the step
    that failed (venv, pip install, import check) with the tail of its output."""
    env_dir = Path(env_dir)
    index_url = index_url if index_url is not None else os.environ.get(INDEX_ENV) or None
    py = env_dir / "bin" / "python"
    stamp = env_dir / _stamp_name(pins, python)
    if stamp.exists() and py.exists():
        _log(f"environment ready ({env_dir}, {stamp.name}): nothing to install")
        return py
    if env_dir.exists() and any(env_dir.glob(".installed-*")):
        _log(f"{env_dir} holds other pins: removing it")
        shutil.rmtree(env_dir)

    def step(what: str, cmd: list[str], env: dict | None = None) -> str:
        _log(f"{what}: {' '.join(cmd)}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PeerUnavailable(f"RecBole peer: {what} failed: {e}") from e
        if proc.returncode != 0:
            tail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
            raise PeerUnavailable(f"RecBole peer: {what} failed (exit {proc.returncode}): {tail}")
        return proc.stdout

    if not py.exists():
        step("creating the venv", [python, "-m", "venv", str(env_dir)])
    env = {**os.environ, "PYTHONPATH": ""}  # the peer's python sees its own packages only
    extra: list[str] = []
    if index_url:
        env.pop("PIP_FIND_LINKS", None)
        env.pop("PIP_EXTRA_INDEX_URL", None)
        env["PIP_CONFIG_FILE"] = os.devnull  # pip reads no configuration file: this index only
        extra = ["--index-url", index_url]
    pip_out = step("pip install", [str(py), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                                   *extra, *pins], env)
    _log("pip: " + (pip_out.strip().splitlines() or ["(no output)"])[-1])
    version = step("import check", [str(py), "-c", IMPORT_CHECK], {**os.environ, "PYTHONPATH": ""}).strip()
    for old in env_dir.glob(".installed-*"):
        old.unlink()
    stamp.write_text("\n".join(pins) + "\n")
    _log(f"RecBole {version} installed in {env_dir}")
    return py


# ----------------------------------------------------------------------------- data

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
# RecBole's Config replaces the data_path of a dataset named "ml-100k" by the copy of the raw
# ml-100k shipped inside the package (recbole/dataset_example): our file gets a name of its own.
ATOMIC_PREFIX = "hm4sr-"


def write_atomic_inter(interactions, name: str, out_dir: Path = DATA_DIR) -> Path:
    """``interactions`` (a DataFrame with integer ``user``, ``item``, ``timestamp``, as a prepared
    dataset holds them) as RecBole's ``<out_dir>/<name>/<name>.inter``, written atomically.

    Tokens are the workbench's own ids; timestamps are kept. Rows are written in the given
    order, which must be sorted by user then time (the prepared order breaks same-second ties
    by item): RecBole sorts by time with a stable sort, so a same-second tie keeps this order
    and every user's sequence, hence its leave-one-out targets, are the workbench's."""
    for col in ("user", "item", "timestamp"):
        if col not in interactions.columns:
            raise ValueError(f"interactions of {name!r}: no column {col!r} (have {list(interactions.columns)})")
    users = interactions["user"].to_numpy(np.int64)
    times = interactions["timestamp"].to_numpy(np.int64)
    unsorted = np.flatnonzero((np.diff(users) < 0) | ((np.diff(users) == 0) & (np.diff(times) < 0)))
    if unsorted.size:
        r = int(unsorted[0]) + 1
        raise ValueError(f"interactions of {name!r}: row {r} (user {users[r]}, timestamp {times[r]}) comes "
                         f"after row {r - 1} (user {users[r - 1]}, timestamp {times[r - 1]}); expected rows "
                         f"sorted by user, then timestamp")
    body = interactions[["user", "item", "timestamp"]].astype("int64").to_csv(sep="\t", header=False, index=False)
    path = Path(out_dir) / name / f"{name}.inter"
    write_text_atomic(path, INTER_HEADER + "\n" + body)
    return path


def read_atomic_inter(path: Path) -> list[tuple[str, str, float]]:
    """The rows of an atomic ``.inter`` file of :data:`INTER_HEADER` as (user, item, timestamp)."""
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0] != INTER_HEADER:
        raise ValueError(f"{path}: header {lines[0] if lines else ''!r}, expected {INTER_HEADER!r}")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}, line {n}: {len(parts)} fields, expected 3 (user, item, timestamp)")
        rows.append((parts[0], parts[1], float(parts[2])))
    return rows


def leave_one_out_targets(rows: list[tuple[str, str, float]]) -> tuple[dict, dict]:
    """(validation, test) target per user token under RecBole's rule for ``order TO`` and
    ``LS valid_and_test``: a stable sort by timestamp, rows grouped by user in that order, the
    last item the test target and the one before it the validation target (users with at
    least 3 rows, as both splits require)."""
    seqs: dict[str, list[str]] = {}
    for user, item, _ in sorted(rows, key=lambda r: r[2]):  # sorted() is stable
        seqs.setdefault(user, []).append(item)
    valid = {u: s[-2] for u, s in seqs.items() if len(s) >= 3}
    test = {u: s[-1] for u, s in seqs.items() if len(s) >= 3}
    return valid, test


def our_valid_targets(ds) -> dict[str, str]:
    """The workbench's validation target per user (leave-one-out, :class:`SplitConfig`
    defaults), keyed and valued by the tokens :func:`write_atomic_inter` writes."""
    valid = build_split(ds, SplitConfig()).valid
    return {str(int(u)): str(int(t)) for u, t in zip(valid.users, valid.targets)}


def compare_valid_targets(ours: dict[str, str], theirs) -> dict:
    """How many users have the same validation target on both sides. ``theirs``: (user, item)
    token pairs, as the runner records RecBole's validation set."""
    theirs = {str(u): str(i) for u, i in theirs}
    matched = sum(1 for u, i in theirs.items() if ours.get(u) == i)
    return {"valid_users_ours": len(ours), "valid_users_peer": len(theirs), "valid_targets_matching": matched,
            "valid_targets_identical": matched == len(ours) == len(theirs)}


# ----------------------------------------------------------------------------- run and figures

# The bench's caps. The target took 8 epochs, 1,349.6 s, on 2026-12-05 here (168.6 s an epoch):
# the run stops after the epoch that passes MAX_SECONDS, so this leaves room for slower epochs.
MAX_EPOCHS = 12
MAX_SECONDS = 1800.0
PEER_GRACE_SECONDS = 900  # beyond --max-seconds: data loading, the epoch that passes it, evaluation repeats


def run_peer(py: Path, data_dir: Path, name: str, *, threads: int, max_epochs: int, max_seconds: float,
             target: float = TARGET_NDCG20, eval_repeats: int = 5, work_dir: Path = WORK_DIR) -> dict:
    """The runner's JSON after training RecBole's SASRec with the peer's python ``py``; its
    progress lines pass through to stderr. Raises :class:`PeerUnavailable` when it fails."""
    out = Path(work_dir) / f"{name}-result.json"
    out.unlink(missing_ok=True)
    cmd = [str(py), str(RUNNER), "--data-path", str(data_dir), "--dataset", name, "--out", str(out),
           "--work-dir", str(work_dir), "--threads", str(threads), "--max-epochs", str(max_epochs),
           "--max-seconds", str(max_seconds), "--target", str(target), "--eval-repeats", str(eval_repeats)]
    _log("training RecBole SASRec: " + " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ""}
    tail: collections.deque[str] = collections.deque(maxlen=40)  # for the error message
    # A hung runner must not hang `make bench`: past its time budget plus room for loading the
    # data, the last epoch and the evaluation repeats, it is killed and the peer is skipped.
    deadline = max_seconds + PEER_GRACE_SECONDS
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) as proc:
        timer = threading.Timer(deadline, proc.kill)
        timer.start()
        try:
            for line in proc.stderr:  # the runner's epoch lines as they come; RecBole's warnings kept for errors
                tail.append(line)
                if line.startswith("[recbole]"):
                    print(line, end="", file=sys.stderr, flush=True)
            code = proc.wait()
        finally:
            timer.cancel()
    if code == -signal.SIGKILL:
        raise PeerUnavailable(f"RecBole peer: the runner was still going after {deadline:.0f} s "
                              f"(--max-seconds {max_seconds:.0f} + {PEER_GRACE_SECONDS} s) and was stopped")
    if code != 0 or not out.exists():
        raise PeerUnavailable(f"RecBole peer: the runner failed (exit {code}): {''.join(tail).strip()[-2000:]}")
    return json.loads(out.read_text())


def peer_figures(record: dict, match: dict | None = None) -> dict:
    """The ``recbole_sasrec_*`` keys of ``results.json`` from the runner's ``record``."""
    epochs = record["epochs"]
    secs = [r["train_seconds"] for r in epochs]
    out = {
        "recbole_sasrec_seconds_per_epoch": float(np.median(secs)),
        "recbole_sasrec_epoch_seconds_all": secs,
        "recbole_sasrec_valid_seconds_all": [r["valid_seconds"] for r in epochs],
        "recbole_sasrec_valid_ndcg@20_by_epoch": [r["valid_ndcg@20"] for r in epochs],
        "recbole_sasrec_seconds_since_start_by_epoch": [r["seconds_since_start"] for r in epochs],
        "recbole_sasrec_reached_target": bool(record["reached_target"]),
        "recbole_sasrec_seconds_to_target": record["seconds_to_target"],
        "recbole_sasrec_epochs_to_target": record["epochs_to_target"],
        "recbole_sasrec_stopped_because": record["stopped_because"],
        "recbole_sasrec_eval_seconds": record["eval_seconds_median"],
        "recbole_sasrec_eval_seconds_all": record["eval_seconds_all"],
        "recbole_sasrec_eval_users": record["eval_users"],
        "recbole_sasrec_setup_seconds": record["setup_seconds"],
        "recbole_sasrec_threads": record["threads"],
        "recbole_version": record["recbole_version"],
        "recbole_torch_version": record["torch_version"],
        "recbole_numpy_version": record["numpy_version"],
        "recbole_sasrec_skipped": None,  # results.json merges runs: clears the reason of an older, skipped one
    }
    if match is not None:
        out.update({f"recbole_sasrec_{k}": v for k, v in match.items()})
    return out


# The figures of a measured run: a skipped run sets each to None, so that results.json (which
# merges runs) never shows an older run's figures beside this run's reason for skipping.
FIGURE_KEYS = ("recbole_sasrec_seconds_per_epoch", "recbole_sasrec_epoch_seconds_all", "recbole_sasrec_valid_seconds_all",
               "recbole_sasrec_valid_ndcg@20_by_epoch", "recbole_sasrec_seconds_since_start_by_epoch",
               "recbole_sasrec_reached_target", "recbole_sasrec_seconds_to_target", "recbole_sasrec_epochs_to_target",
               "recbole_sasrec_stopped_because", "recbole_sasrec_eval_seconds", "recbole_sasrec_eval_seconds_all",
               "recbole_sasrec_eval_users", "recbole_sasrec_setup_seconds", "recbole_sasrec_threads")


def skipped(reason: str, **extra) -> dict:
    """The peer's keys when it was not measured: the reason, and no figure of an older run."""
    return {**{k: None for k in FIGURE_KEYS}, "recbole_sasrec_skipped": reason, **extra}


def peer_ratios(measured: dict) -> dict:
    """The six ratios (ours / RecBole's) from ``measured``, which must hold this run's figures
    only (run.py's ``measured``, never results.json, which keeps figures of skipped parts from
    older runs). A ratio is None when either side is missing, None or not positive."""
    out = {}
    for name, (ours, theirs) in RATIOS.items():
        a, b = measured.get(ours), measured.get(theirs)
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (a, b))
        out[name] = a / b if ok else None
    return out


def measure(ds, name: str, *, threads: int, max_epochs: int, max_seconds: float, eval_repeats: int = 5,
            env_dir: Path = ENV_DIR, data_dir: Path = DATA_DIR, work_dir: Path = WORK_DIR) -> dict:
    """Install (once), convert ``ds``, train and time the peer: the ``recbole_sasrec_*`` figures,
    or ``{"recbole_sasrec_skipped": reason}`` when a step failed (the bench goes on)."""
    atomic = ATOMIC_PREFIX + name
    try:
        py = ensure_env(env_dir)
        path = write_atomic_inter(ds.interactions, atomic, data_dir)
        _log(f"wrote {path} ({len(ds.interactions)} interactions)")
        record = run_peer(py, data_dir, atomic, threads=threads, max_epochs=max_epochs, max_seconds=max_seconds,
                          eval_repeats=eval_repeats, work_dir=work_dir)
    except PeerUnavailable as e:
        _log(f"skipped: {e}")
        return skipped(str(e))
    return checked_figures(record, our_valid_targets(ds))


def checked_figures(record: dict, ours: dict[str, str]) -> dict:
    """:func:`peer_figures` of the runner's ``record`` when RecBole's validation targets are
    ``ours`` for every user; otherwise RecBole did not see our data, and the result holds the
    counts and ``recbole_sasrec_skipped`` but no figure a ratio could divide by."""
    match = compare_valid_targets(ours, record["valid_targets"])
    _log(f"validation targets: {match['valid_targets_matching']} of {match['valid_users_ours']} users the same")
    if not match["valid_targets_identical"]:
        return skipped(f"RecBole's validation targets are not ours ({match['valid_targets_matching']} "
                       f"of {match['valid_users_ours']} users the same): not the same data",
                       **{f"recbole_sasrec_{k}": v for k, v in match.items()})
    return peer_figures(record, match)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k", help="prepared dataset (data/processed/<name>, default ml-100k)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the peer (default 2, the bench's)")
    p.add_argument("--max-epochs", type=int, default=MAX_EPOCHS, help=f"epoch cap (default {MAX_EPOCHS}, as make bench)")
    p.add_argument("--max-seconds", type=float, default=MAX_SECONDS,
                   help="stop after the epoch that passes this wall time since the start of training "
                        f"(default {MAX_SECONDS:.0f}, as make bench)")
    p.add_argument("--eval-repeats", type=int, default=5, help="timed validation evaluations (median, default 5)")
    p.add_argument("--install-only", action="store_true", help="make the environment and stop")
    p.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = p.parse_args()
    if args.install_only:
        try:
            print(ensure_env())
        except PeerUnavailable as e:
            raise SystemExit(str(e))
        return
    ds, _ = prepared_dataset(None, args.dataset)
    t = time.perf_counter()
    figures = measure(ds, args.dataset, threads=args.threads, max_epochs=args.max_epochs,
                      max_seconds=args.max_seconds, eval_repeats=args.eval_repeats)
    figures["recbole_sasrec_wall_seconds_incl_install"] = time.perf_counter() - t
    if args.out:
        write_json_atomic(args.out, figures)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
