"""`make bench`: training and evaluation speed on ml-100k, written to benchmarks/results.json.

Each measurement runs in its own subprocess so its peak RSS is its own. The training and
evaluation parts use 2 threads and batch 1024 (the paper's) on the prepared ml-100k (prepared
on first use); the allocator part times one multiply on 1 thread.

    python -m benchmarks.run                 # the ratio parts against the peer, and the memory checks (make bench)
    python -m benchmarks.run --all           # and the memory-saving modes and the scale benchmark (make bench-all)
    python -m benchmarks.run --only eval_1m  # one part, printed as JSON
    python -m benchmarks.run --all --skip scale  # all but the scale benchmark (benchmarks/scale.py: 6-8 minutes here, 8 more to write its 10^7 file once)
    python -m benchmarks.run --skip peer     # without the RecBole peer (benchmarks/recbole_peer.py)

The ``peer`` part trains RecBole 1.2.1's SASRec, installed into .bench/recbole-venv on first use,
on the same data with the same threads; the ``*_vs_recbole_sasrec`` ratios divide this run's
figures of ours by this run's figures of the peer (None when one side was not measured in it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import recbole_peer
from hm4sr_core import provenance, runtime

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"
TARGET_NDCG20 = 0.0864  # the released code's validation NDCG@20 after 8 epochs (4,380 s) here
# The peer runs first: a missing or broken RecBole install shows (and is recorded as skipped)
# minutes into the run rather than after half an hour, and it runs before the scale part fills
# the page cache with gigabytes of its files.
PARTS = ("peer", "allocator", "epochs", "prefix_recompute", "prefix_parts", "to_target", "sasrec_to_target",
         "eval", "eval_1m", "recommend", "recommend_1m", "scale")
# `make bench` runs what the speed ratios and the memory targets need; `--all` (make bench-all)
# adds the memory-saving training modes (recompute: ~255 s, micro-batches: ~307 s per prefix
# epoch here) and the scale benchmark (6-8 minutes, 8 more the first time), which would push
# the run past 40 minutes once the peer trains to its target.
EXTRA_PARTS = ("prefix_recompute", "prefix_parts", "scale")
PREFIX_PARTS = 4  # TrainConfig.micro_batches of the prefix_parts part
# The peer's caps (recbole_peer.py): RecBole's SASRec took 139 s per epoch here and ~1,120 s (8 epochs with their
# validations) to the target, measured beside the released code. It stops as soon as it gets
# there; the caps only bound a run on a slower day.
PEER_MAX_EPOCHS, PEER_MAX_SECONDS = recbole_peer.MAX_EPOCHS, recbole_peer.MAX_SECONDS


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _dataset():
    """ml-100k as the MovieLens reader prepares it (prepared on first use; a folder of that
    name made by another reader is refused, not measured)."""
    from hm4sr_core.data.store import read_manifest
    from hm4sr_core.data.prepare import prepared_dataset
    ds, folder = prepared_dataset("ml-100k", "ml-100k")
    return ds, read_manifest(folder)["data_hash"]


def part_epochs(args) -> dict:
    """Seconds per training epoch: HM4SR prefix, HM4SR dense, SASRec dense, SASRec prefix (same
    run; SASRec's prefix epoch last, so the three earlier ones run as they always did)."""
    from hm4sr_core.config import ModelConfig, TrainConfig
    from hm4sr_core.train import train
    ds, h = _dataset()
    out = {}
    cases = [("hm4sr_prefix", ModelConfig(), "prefix", args.prefix_epochs),
             ("hm4sr_dense", ModelConfig(), "dense", args.dense_epochs),
             ("sasrec_dense", ModelConfig.sasrec(), "dense", args.dense_epochs),
             ("sasrec_prefix", ModelConfig.sasrec(), "prefix", args.prefix_epochs)]
    for key, mc, mode, epochs in cases:
        cfg = TrainConfig(mode=mode, epochs=epochs, threads=2, patience=100)  # paper batch 1024 / dense 32 windows
        r = train(ds, mc, cfg, data_hash=h, progress=False)
        secs = r.epochs["train_seconds"].tolist()
        out[f"{key}_seconds_per_epoch"] = float(np.median(secs))
        out[f"{key}_epoch_seconds_all"] = secs
        out[f"{key}_valid_ndcg@20_by_epoch"] = r.epochs["valid_ndcg@20"].tolist()
        print(f"[bench] {key}: {', '.join(f'{x:.1f}' for x in secs)} s per epoch", file=sys.stderr, flush=True)
    out["prefix_peak_rss_mb"] = _peak_rss_mb()  # this process's peak: the prefix epoch's
    return out


def _prefix_epochs(args, name: str, **changes) -> dict:
    """Prefix-mode epochs (TrainConfig ``changes`` on the bench's settings): keys
    ``hm4sr_prefix_<name>_seconds_per_epoch`` (median), ``..._epoch_seconds_all``,
    ``prefix_<name>_valid_ndcg@20_by_epoch`` and ``prefix_<name>_peak_rss_mb``."""
    from hm4sr_core.config import ModelConfig, TrainConfig
    from hm4sr_core.train import train
    ds, h = _dataset()
    cfg = TrainConfig(mode="prefix", epochs=args.prefix_epochs, threads=2, patience=100, **changes)
    r = train(ds, ModelConfig(), cfg, data_hash=h, progress=False)
    secs = r.epochs["train_seconds"].tolist()
    return {f"hm4sr_prefix_{name}_seconds_per_epoch": float(np.median(secs)),
            f"hm4sr_prefix_{name}_epoch_seconds_all": secs,
            f"prefix_{name}_valid_ndcg@20_by_epoch": r.epochs["valid_ndcg@20"].tolist(),
            f"prefix_{name}_peak_rss_mb": _peak_rss_mb()}


def part_prefix_recompute(args) -> dict:
    """One prefix epoch with ``recompute=True`` (TrainConfig): its seconds and peak RSS."""
    return _prefix_epochs(args, "recompute", recompute=True)


def part_prefix_parts(args) -> dict:
    """One prefix epoch with ``micro_batches=4`` (TrainConfig: the encoders run on quarter
    batches, gradient caching): its seconds, peak RSS and validation NDCG@20."""
    return {**_prefix_epochs(args, "parts", micro_batches=PREFIX_PARTS), "prefix_parts_micro_batches": PREFIX_PARTS}


def _to_target(args, model_config) -> tuple[dict, float, object]:
    """Train ``model_config`` in the default mode, seed 2025, until the validation NDCG@20
    first reaches the target: (epoch, seconds since the start of training incl. validation,
    NDCG@20) or {} when capped before, the wall time incl. setup, and the TrainConfig."""
    from hm4sr_core.config import TrainConfig
    from hm4sr_core.train import train
    ds, h = _dataset()
    cfg = TrainConfig(threads=2, seed=2025, epochs=args.max_epochs, patience=100)
    reached: dict = {}

    class Reached(Exception):
        pass

    def on_epoch(row):
        print(f"[bench] epoch {row['epoch']}: valid NDCG@20 {row.get('valid_ndcg@20', float('nan')):.4f} "
              f"(target {TARGET_NDCG20}), {row['seconds_since_start']:.1f} s", file=sys.stderr, flush=True)
        if row.get("valid_ndcg@20", 0.0) >= TARGET_NDCG20 and not reached:
            reached.update(epoch=row["epoch"], seconds=row["seconds_since_start"], ndcg20=row["valid_ndcg@20"])
            raise Reached

    t0 = time.perf_counter()
    try:
        train(ds, model_config, cfg, data_hash=h, progress=False, on_epoch=on_epoch)
    except Reached:
        pass
    return reached, time.perf_counter() - t0, cfg


def part_to_target(args) -> dict:
    """Wall time (training + validation) of HM4SR, default mode, seed 2025, to reach the target."""
    from hm4sr_core.config import ModelConfig
    reached, wall, cfg = _to_target(args, ModelConfig())
    return {"seconds_to_target": reached.get("seconds"), "epochs_to_target": reached.get("epoch"),
            "valid_ndcg@20_at_target": reached.get("ndcg20"), "target_wall_seconds_incl_setup": wall,
            "target_mode": cfg.mode, "target_dense_batch_size": cfg.dense_batch_size, "target_ndcg@20": TARGET_NDCG20,
            "to_target_peak_rss_mb": _peak_rss_mb(),
            "peak_rss_mb": _peak_rss_mb()}  # training in the default mode (what `hm4sr train` does)


def part_sasrec_to_target(args) -> dict:
    """The same for our SASRec (dense, seed 2025, same target and cap): the ratio to RecBole's."""
    from hm4sr_core.config import ModelConfig
    reached, wall, cfg = _to_target(args, ModelConfig.sasrec())
    return {"sasrec_seconds_to_target": reached.get("seconds"), "sasrec_epochs_to_target": reached.get("epoch"),
            "sasrec_valid_ndcg@20_at_target": reached.get("ndcg20"), "sasrec_target_wall_seconds_incl_setup": wall,
            "sasrec_target_mode": cfg.mode}


def part_peer(args) -> dict:
    """RecBole 1.2.1's SASRec on the same ml-100k with 2 threads (benchmarks/recbole_peer.py),
    capped by --peer-max-epochs / --peer-max-seconds; ``recbole_sasrec_skipped`` says why
    when it could not be installed or run (the bench goes on)."""
    from benchmarks.recbole_peer import measure
    ds, _ = _dataset()
    return measure(ds, "ml-100k", threads=2, max_epochs=args.peer_max_epochs, max_seconds=args.peer_max_seconds)


def _eval_seconds(model, part, cfg, repeats: int) -> list[float]:
    """Seconds of ``repeats`` full rankings of ``part`` after one warm-up ranking."""
    from hm4sr_core.evaluate import evaluate
    evaluate(model, part, cfg)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        evaluate(model, part, cfg)
        times.append(time.perf_counter() - t)
    return times


def part_eval(args) -> dict:
    """Full ranking of ml-100k's test users (median of repeated runs, model untrained:
    the cost does not depend on the weights); then of the validation users, by HM4SR and by
    our SASRec (``eval_valid_*``, ``sasrec_eval_valid_*``: what the RecBole peer's evaluation
    time is measured on)."""
    from hm4sr_core.config import ModelConfig, SplitConfig, TrainConfig
    from hm4sr_core.data.splits import build_split
    from hm4sr_core.model import build_model
    torch.set_num_threads(2)
    ds, _ = _dataset()
    split = build_split(ds, SplitConfig())
    model = build_model(ModelConfig(), ds)
    cfg = TrainConfig()
    times = _eval_seconds(model, split.test, cfg, args.repeats)
    n = len(split.test)
    out = {"eval_users": n, "eval_seconds_median": float(np.median(times)),
           "eval_users_per_second": n / float(np.median(times)), "eval_seconds_all": times}
    valid = _eval_seconds(model, split.valid, cfg, args.repeats)
    sasrec = _eval_seconds(build_model(ModelConfig.sasrec(), ds), split.valid, cfg, args.repeats)
    out.update({"eval_valid_users": len(split.valid), "eval_valid_seconds_median": float(np.median(valid)),
                "eval_valid_seconds_all": valid, "sasrec_eval_valid_seconds_median": float(np.median(sasrec)),
                "sasrec_eval_valid_seconds_all": sasrec})
    return out


def part_eval_1m(args) -> dict:
    """Full ranking of 943 users against a synthetic 1,000,000-item catalogue (HM4SR with
    text and image streams of random 64-d features): chunked, never users x items at once."""
    from hm4sr_core.config import ModelConfig, SplitConfig, TrainConfig
    from hm4sr_core.data.splits import build_split
    from hm4sr_core.evaluate import evaluate
    from hm4sr_core.model import HM4SR
    torch.set_num_threads(2)
    ds, _ = _dataset()
    n_items = 1_000_000
    g = torch.Generator().manual_seed(0)
    feats = {m: torch.randn(n_items + 1, 64, generator=g) for m in ("text", "image")}
    avail = {m: torch.ones(n_items + 1) for m in feats}
    model = HM4SR(ModelConfig(), n_items, feats, avail, torch.zeros(n_items + 1, 0),
                  float(ds.stats["first_timestamp"]))
    test = build_split(ds, SplitConfig()).test
    remap = torch.randperm(n_items, generator=g).numpy()[: ds.num_items + 1] + 1
    remap[0] = 0
    test.items = remap[test.items]
    test.targets = remap[test.targets]
    rss_before = _peak_rss_mb()
    t = time.perf_counter()
    r = evaluate(model, test, TrainConfig())
    secs = time.perf_counter() - t
    return {"eval_1m_users_per_second": len(test) / secs, "eval_1m_seconds": secs,
            "eval_1m_peak_rss_mb": _peak_rss_mb(), "eval_1m_rss_before_ranking_mb": rss_before,
            "eval_1m_hr@10": r.metrics["hr@10"]}


def part_recommend(args) -> dict:
    """`hm4sr recommend`'s top-10 for every ml-100k user (HM4SR and our SASRec) against RecBole
    1.2.1's full_sort_topk for its SASRec, same run and threads (benchmarks/recommend_bench.py)."""
    from benchmarks import recommend_bench
    ds, _ = _dataset()
    return recommend_bench.part_recommend(ds)


def part_recommend_1m(args) -> dict:
    """Peak RSS of `hm4sr recommend --all` over a 10^6-item catalogue (benchmarks/recommend_bench.py)."""
    from benchmarks import recommend_bench
    ds, _ = _dataset()
    return recommend_bench.part_recommend_1m(ds)


def part_allocator(args) -> dict:
    """A 15M-element float multiply with glibc's default allocator and with freed memory
    kept (hm4sr_core.runtime), each in a fresh process; median of 21."""
    import os
    code = ("import json, hm4sr_core.runtime as r; r.keep_freed_memory(); "
            "print(json.dumps(r._measure_multiply()))")
    out = {}
    for label, env in (("glibc_default", {"HM4SR_SYSTEM_MALLOC": "1"}), ("kept", {})):
        proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=ROOT,
                              capture_output=True, text=True, check=True)
        out[f"allocator_multiply_seconds_{label}"] = json.loads(proc.stdout)["multiply_seconds_median"]
    out["allocator_speedup"] = out["allocator_multiply_seconds_glibc_default"] / out["allocator_multiply_seconds_kept"]
    return out


def _run_scale(args) -> dict:
    """benchmarks/scale.py in its own process (its cases in processes of their own): it merges
    its figures into results.json under "scale" itself and prints its headline scalars last,
    returned here with a ``scale_`` prefix for the history line. Its progress lines pass through."""
    import shlex
    cmd = [sys.executable, "-m", "benchmarks.scale", "--sizes", args.scale_sizes, "--headline",
           *shlex.split(args.scale_args)]
    print("[bench] scale ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark part scale failed (exit {proc.returncode})")
    return {f"scale_{k}": v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def _cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share (percent, 2 decimals) of CPU time the hypervisor gave to other machines
    between two :func:`_cpu_ticks` readings; None without both readings or time between."""
    if not before or not after or after[1] <= before[1]:
        return None
    return round(100.0 * (after[0] - before[0]) / (after[1] - before[1]), 2)


def _stream(cmd: list[str]) -> tuple[int, str, str]:
    """Run ``cmd`` in the repository: its stderr (the part's epoch lines; the peer's run alone
    takes over 20 minutes) is passed on indented as it comes, its stdout goes to a file.
    Returns (exit code, stdout, the last 200 lines of stderr)."""
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with tempfile.TemporaryFile("w+") as stdout, \
            subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True) as proc:
        # the part inherits the OpenMP setting importing hm4sr_core (above) put in os.environ
        for line in proc.stderr:
            tail.append(line)
            print("  " + line, end="", file=sys.stderr, flush=True)
        code = proc.wait()
        stdout.seek(0)
        return code, stdout.read(), "".join(tail)


def _run_part(name: str, extra: list[str]) -> dict:
    """One part in its own process; adds ``<part>_cpu_steal_percent``: the share of CPU time
    the hypervisor gave to other machines while it ran (a shared host's noise, made visible)."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--only", name, *extra]
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    before = _cpu_ticks()
    code, printed, tail = _stream(cmd)
    after = _cpu_ticks()
    if code != 0:
        raise SystemExit(f"benchmark part {name} failed (exit {code}):\n{tail[-4000:]}")
    if not printed.strip():
        raise SystemExit(f"benchmark part {name} printed no result:\n{tail[-4000:]}")
    out = json.loads(printed.strip().splitlines()[-1])
    if (steal := steal_percent(before, after)) is not None:
        out[f"{name}_cpu_steal_percent"] = steal
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=PARTS, help="run one part in this process and print its JSON")
    p.add_argument("--prefix-epochs", type=int, default=1, help="prefix-mode epochs timed (default 1)")
    p.add_argument("--dense-epochs", type=int, default=5, help="dense-mode epochs timed (default 5)")
    p.add_argument("--max-epochs", type=int, default=40, help="epoch cap for the time-to-target run (default 40, over twice the target time)")
    p.add_argument("--repeats", type=int, default=7, help="evaluation repeats (median)")
    p.add_argument("--peer-max-epochs", type=int, default=PEER_MAX_EPOCHS,
                   help=f"epoch cap of the RecBole peer (default {PEER_MAX_EPOCHS})")
    p.add_argument("--peer-max-seconds", type=float, default=PEER_MAX_SECONDS,
                   help=f"the peer stops after the epoch that passes this many seconds of training and validation "
                        f"(default {PEER_MAX_SECONDS:.0f}: its target took 8 epochs, 1,350 s, on 2026-12-05)")
    p.add_argument("--skip", action="append", default=[], choices=PARTS, help="parts to leave out (repeatable)")
    p.add_argument("--all", action="store_true",
                   help=f"also run {', '.join(EXTRA_PARTS)} (left out by default to keep the run under 40 minutes)")
    p.add_argument("--scale-sizes", default="1e4,1e5,1e6", help="catalogue sizes of the scale part (default 1e4,1e5,1e6)")
    p.add_argument("--scale-args", default="", help="more options of the scale part, e.g. \"--skip prepare --steps 5\" "
                                                     "(python -m benchmarks.scale --help)")
    p.add_argument("--history", action="store_true",
                   help="print the recorded runs (benchmarks/history.jsonl) and their medians, measure nothing")
    p.add_argument("--last", type=int, default=0, help="with --history: only the last N runs (default all)")
    args = p.parse_args()
    if args.history:
        print_history(args.last)
        return
    if args.only:
        if args.only == "scale":
            raise SystemExit("the scale part runs as python -m benchmarks.scale (see its --help)")
        fn = {"allocator": part_allocator, "epochs": part_epochs, "prefix_recompute": part_prefix_recompute,
              "prefix_parts": part_prefix_parts, "to_target": part_to_target,
              "sasrec_to_target": part_sasrec_to_target, "peer": part_peer, "eval": part_eval,
              "eval_1m": part_eval_1m, "recommend": part_recommend, "recommend_1m": part_recommend_1m}
        print(json.dumps(fn[args.only](args)))
        return
    from hm4sr_core.data.store import write_json_atomic
    extra = [f"--prefix-epochs={args.prefix_epochs}", f"--dense-epochs={args.dense_epochs}",
             f"--max-epochs={args.max_epochs}", f"--repeats={args.repeats}",
             f"--peer-max-epochs={args.peer_max_epochs}", f"--peer-max-seconds={args.peer_max_seconds}"]
    measured: dict = {}  # this run's figures only: a skipped part keeps its old ones in results.json
    skipped = [p for p in PARTS if p in args.skip or (p in EXTRA_PARTS and not args.all)]
    for part in PARTS:
        if part not in skipped:
            measured.update(_run_scale(args) if part == "scale" else _run_part(part, extra))
    # Read after the parts: the scale part writes its "scale" key into the file itself.
    results = merge_results(json.loads(RESULTS.read_text()) if RESULTS.exists() else {}, measured)
    torch.set_num_threads(2)
    results["environment"] = provenance.environment()
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["command"] = "python -m benchmarks.run " + " ".join(sys.argv[1:])
    results["skipped_parts"] = skipped  # their figures in this file are an older run's
    write_json_atomic(RESULTS, results)
    _append_history({**measured, "measured_at": results["measured_at"], "skipped_parts": ",".join(skipped)})
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, (list, dict))}, indent=2))


def merge_results(results: dict, measured: dict) -> dict:
    """``results`` (results.json as it was) updated with this run's ``measured`` figures and the
    ``*_vs_recbole_sasrec`` ratios, which are added to ``measured`` too (for the history line).

    The ratios come from ``measured`` only, never from ``results``: a skipped part keeps its
    figures of an older run there, and a ratio of figures of two runs would compare two states
    of a shared machine. A ratio whose sides were not both measured in this run is None."""
    from benchmarks.recbole_peer import peer_ratios
    measured.update(peer_ratios(measured))
    return {**results, **measured}


HISTORY = ROOT / "benchmarks" / "history.jsonl"
# Memory targets are absolute; speed targets are ratios against RecBole's SASRec timed in the
# same run (issue 14): absolute seconds move with the host's load from day to day.
TARGETS = {"eval_1m_peak_rss_mb": ("<=", 4000), "recommend_1m_peak_rss_mb": ("<=", 4000),
           "hm4sr_recommend_vs_recbole_sasrec": ("<=", 1.0), "peak_rss_mb": ("<=", 2000), "prefix_parts_peak_rss_mb": ("<=", 2000),
           "hm4sr_prefix_epoch_vs_recbole_sasrec": ("<=", 0.8), "hm4sr_time_to_target_vs_recbole_sasrec": ("<=", 0.2),
           "sasrec_time_to_target_vs_recbole_sasrec": ("<=", 0.1), "hm4sr_eval_vs_recbole_sasrec": ("<=", 2.0)}


def _append_history(results: dict) -> None:
    """One line per `make bench` run in benchmarks/history.jsonl (scalars, the time, the
    commit): timings on a shared host drift, so a figure is read as the median of runs."""
    row = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    row["openmp"] = _openmp_label(runtime.openmp_settings())  # this process's setting, which the parts inherit
    row["mkl_intel_paths"] = runtime.mkl_state()["on"]  # each part loads MKL's library as this process did
    git = provenance.git_state(ROOT, ("hm4sr_core", "benchmarks/run.py"))
    row["commit"] = git["commit"] and git["commit"][:7]
    row["uncommitted_changes"] = git["dirty"]  # the measured code is not that commit's
    row["cpu_model"] = provenance.cpu()["cpu_model"]
    with open(HISTORY, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def _openmp_label(settings: dict) -> str:
    """``spin=N``, the wait policy, or ``default`` (libgomp's own: a long spin)."""
    if settings.get("GOMP_SPINCOUNT") is not None:
        return f"spin={settings['GOMP_SPINCOUNT']}"
    return settings.get("OMP_WAIT_POLICY") or "default"


COLUMNS = {"hm4sr_prefix_seconds_per_epoch": "prefix_s/ep", "seconds_to_target": "to_target_s",
           "eval_users_per_second": "eval_users/s", "eval_1m_peak_rss_mb": "eval1m_rss_MB",
           "peak_rss_mb": "train_rss_MB", "prefix_peak_rss_mb": "prefix_rss_MB",
           "hm4sr_prefix_recompute_seconds_per_epoch": "recomp_s/ep", "prefix_recompute_peak_rss_mb": "recomp_rss_MB",
           "hm4sr_prefix_parts_seconds_per_epoch": "parts_s/ep", "prefix_parts_peak_rss_mb": "parts_rss_MB",
           "to_target_cpu_steal_percent": "steal_%", "hm4sr_prefix_epoch_vs_recbole_sasrec": "prefix/peer",
           "hm4sr_time_to_target_vs_recbole_sasrec": "target/peer", "sasrec_time_to_target_vs_recbole_sasrec": "sas_tgt/peer",
           "hm4sr_eval_vs_recbole_sasrec": "eval/peer"}


def print_history(last: int = 0) -> None:
    """The target keys of the recorded runs (the ``last`` ones, 0 = all), their medians, and
    whether the medians meet the targets. Runs of different code are pooled: pick ``last``
    so that only runs of the code in question count."""
    if not HISTORY.exists():
        raise SystemExit(f"no runs recorded yet ({HISTORY}); run make bench")
    runs = [json.loads(line) for line in HISTORY.read_text().splitlines() if line.strip()]
    runs = runs[-last:] if last > 0 else runs
    # openmp: the OpenMP setting of the run (docs/performance.md, "OpenMP wait policy"); "-" for
    # runs recorded before it was: make bench ran under PASSIVE before commit 3665dd3 and with
    # spin=10000 from it (each run's results.json `environment` in git says which)
    print("finished at (UTC)".ljust(22) + "commit   " + "openmp      "
          + " ".join(c.rjust(13) for c in COLUMNS.values()))
    for r in runs:
        cells = [(f"{r[k]:13.3f}" if "/peer" in c else f"{r[k]:13.1f}") if isinstance(r.get(k), (int, float))
                 else "-".rjust(13) for k, c in COLUMNS.items()]
        commit = str(r.get("commit")) + ("+" if r.get("uncommitted_changes") else "")
        print(str(r.get("measured_at", "?")).ljust(22) + commit.ljust(9) + str(r.get("openmp", "-")).ljust(12)
              + " ".join(cells))
    for key, (op, bound) in TARGETS.items():
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if values:
            med = float(np.median(values))
            ok = med <= bound if op == "<=" else med >= bound
            label = {"peak_rss_mb": f"{key} (training, default mode)",
                     "prefix_parts_peak_rss_mb": f"{key} (training, prefix mode, micro_batches={PREFIX_PARTS})"}.get(key, key)
            print(f"{label}: median {med:.3f} over {len(values)} runs, target {op} {bound}: {'met' if ok else 'NOT met'}")
        else:
            print(f"{key}: no run has it (target {op} {bound})")
    from benchmarks.recbole_peer import RATIOS
    for key in RATIOS:  # each run's ratio is of that run's figures; the median is over runs
        if key in TARGETS:
            continue
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        print(f"{key}: " + (f"median {float(np.median(values)):.3f} over {len(values)} runs (no target)" if values
                            else "no run has it"))


if __name__ == "__main__":
    main()
