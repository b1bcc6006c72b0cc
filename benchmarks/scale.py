"""Scale benchmark: training, evaluation and data preparation as the catalogue grows.

Synthetic worlds of 10^4, 10^5 and 10^6 items with about 10 interactions per item
(benchmarks/scale_world.py) are trained in dense mode (the default) with the full and the
sampled softmax (ModelConfig.rec_loss), in one process and in 2 DDP processes; an
untrained model ranks test users against the whole catalogue; and the 10M-interaction
Amazon 2023 file is prepared. Every measurement runs in a child process of its own so its
peak RSS is its own, under a time limit; a case that cannot run is recorded with its
reason, never crashes the benchmark. Figures go into benchmarks/results.json under
"scale" (merged: other parts of the file are kept).

    python -m benchmarks.scale                           # everything (about 8 minutes here)
    python -m benchmarks.scale --sizes 1e4,1e5 --only train
    python -m benchmarks.scale --skip prepare --set device=cuda
    python -m benchmarks.scale --case train:1e4:sampled:1  # one case, printed as JSON
    torchrun ... -m benchmarks.scale --case train:1e6:sampled:torchrun  # one case over several machines
    python -m benchmarks.scale --table                   # the recorded figures as Markdown

Training throughput is windows ("sequences") per second over ``--steps`` steps after
``--warmup`` steps; the exponent is the slope of log(seconds per step) against log(items)
for the sampled softmax (1 process): below 1 means a step grows sub-linearly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"
WORK = ROOT / "benchmarks" / "_work"
PARTS = ("train", "eval", "prepare")
LOSSES = ("full", "sampled")
DEFAULT_SIZES = "1e4,1e5,1e6"
EVAL_SPLIT_EXAMPLES = 64  # validation/test examples kept in a training case: train() scores them (3 times) at the end
# Full softmax keeps about three (positions x items) float32 arrays per step (scores, their
# log-softmax, the gradient); a case whose estimate exceeds --full-softmax-limit-gb is skipped.
FULL_SOFTMAX_COPIES = 3


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _size(text: str) -> int:
    value = float(text)
    if not value.is_integer() or value < 100:
        raise argparse.ArgumentTypeError(f"a size is a whole number of items >= 100 (e.g. 1e5), got {text!r}")
    return int(value)


def _sizes(text: str) -> list[int]:
    return [_size(t) for t in text.split(",") if t.strip()]


# --------------------------------------------------------------------------- data


def dense_split(ds, max_length: int, eval_examples: int | None):
    """``build_split`` (leave-one-out) as ``train()`` builds it, with only the first
    ``eval_examples`` validation and test examples (None = all): train() scores them with
    the full catalogue, which would take hours for every user. build_split builds a part
    on its first access, so dense training never builds the prefix layout (2 x n x T int64,
    about 6.4 GB at 10^7 interactions) and ``head`` builds only the rows it returns."""
    from hm4sr_core.config import SplitConfig
    from hm4sr_core.data.splits import build_split
    split = build_split(ds, SplitConfig(kind="leave_one_out", max_length=max_length))
    if eval_examples is not None:
        split.valid, split.test = split.head("valid", eval_examples), split.head("test", eval_examples)
    return split


def _world(args, size: int):
    from benchmarks.scale_world import make_scale_world
    t = time.perf_counter()
    ds = make_scale_world(size, seed=args.seed)
    return ds, time.perf_counter() - t


def _overrides(args):
    from hm4sr_core.cli import parse_overrides
    return parse_overrides(args.set)


# --------------------------------------------------------------------------- cases (child side)


def full_softmax_gb(positions: float, size: int) -> float:
    """Estimated GB of (positions x items) float32 arrays a full-softmax step keeps."""
    return FULL_SOFTMAX_COPIES * positions * (size + 1) * 4 / 1e9


def case_train(args, size: int, loss: str, nproc: int) -> dict:
    """Dense-mode training steps on the ``size``-item world: seconds per step after warm-up.
    With ``nproc`` > 1 the ranks are started by hm4sr_core.distributed.spawn (as ``hm4sr
    train --nproc``), each building the world itself (as each torchrun rank would read it)."""
    from benchmarks.scale_world import MEAN_LENGTH
    if loss == "full":
        # Before any data is built: about (mean length - 2) target positions per window.
        positions = 32 * (MEAN_LENGTH - 2)
        gb = full_softmax_gb(positions, size)
        if gb > args.full_softmax_limit_gb:
            return {"items": size, "loss": loss, "nproc": nproc, "full_softmax_logits_gb_estimate": gb,
                    "skipped": (f"full softmax needs about {gb:.1f} GB of logits per step ({FULL_SOFTMAX_COPIES} x "
                                f"~{positions:.0f} positions x {size + 1} items x 4 B), over "
                                f"--full-softmax-limit-gb {args.full_softmax_limit_gb:g}")}
    if nproc == 1:
        return train_steps(args, size, loss, 1)
    import tempfile

    from hm4sr_core import distributed
    _, train_over = _overrides(args)
    with tempfile.TemporaryDirectory(prefix="hm4sr-scale-") as tmp:
        # gloo on the CPU, nccl with device=cuda (rank r on cuda:r)
        distributed.spawn(_ddp_rank, nproc, (vars(args), size, loss, nproc, tmp),
                          device=train_over.get("device", "cpu"), timeout_s=args.case_limit)
        ranks = [json.loads((Path(tmp) / f"rank-{r}.json").read_text()) for r in range(nproc)]
    out = ranks[0]
    out["rank_peak_rss_mb"] = [r["rank_peak_rss_mb"] for r in ranks]
    out["rank_seconds_per_step"] = [r["seconds_per_step"] for r in ranks]
    out["ranks_peak_rss_sum_mb"] = sum(out["rank_peak_rss_mb"])
    return out


def case_train_torchrun(args, size: int, loss: str) -> dict | None:
    """A training case under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set;
    several machines): this process is one rank; rank 0 returns the figures, the others None.
    Each rank gets ``--threads`` // LOCAL_WORLD_SIZE torch threads."""
    from hm4sr_core import distributed
    _, train_over = _overrides(args)
    ranks = distributed.setup(train_over.get("device", "cpu"), args.case_limit)
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))
        out = train_steps(args, size, loss, ranks.world, threads=max(1, args.threads // local))
        out["rank_peak_rss_mb"] = _peak_rss_mb()
        every = distributed.gather_objects(out, ranks)
    finally:
        distributed.teardown()
    if not ranks.main:
        return None
    merged = every[0]
    merged["launcher"] = "torchrun"
    merged["rank_peak_rss_mb"] = [r["rank_peak_rss_mb"] for r in every]
    merged["rank_seconds_per_step"] = [r["seconds_per_step"] for r in every]
    merged["ranks_peak_rss_sum_mb"] = sum(merged["rank_peak_rss_mb"])
    return merged


def _ddp_rank(args: dict, size: int, loss: str, nproc: int, folder: str) -> None:
    """One DDP rank of a training case: its figures into ``folder``/rank-<r>.json."""
    from hm4sr_core import distributed
    out = train_steps(argparse.Namespace(**args), size, loss, nproc)
    out["rank_peak_rss_mb"] = _peak_rss_mb()
    (Path(folder) / f"rank-{distributed.current().rank}.json").write_text(json.dumps(out))


def train_steps(args, size: int, loss: str, nproc: int, threads: int | None = None) -> dict:
    """Build the world and its dense split, run ``train()`` for warm-up + timed steps (one
    epoch, validation on ``EVAL_SPLIT_EXAMPLES`` examples), return the step times."""
    import hm4sr_core.train as training
    from hm4sr_core.config import ModelConfig, TrainConfig
    model_over, train_over = _overrides(args)
    mc = ModelConfig(rec_loss=loss, **model_over)
    ds, world_s = _world(args, size)
    split = dense_split(ds, mc.max_length, EVAL_SPLIT_EXAMPLES)
    rss_data = _peak_rss_mb()
    steps = args.warmup + args.steps
    threads = threads or max(1, args.threads // nproc)
    cfg = TrainConfig(**{"mode": "dense", "epochs": 1, "max_steps_per_epoch": steps, "threads": threads,
                         "patience": 100, "seed": args.seed, **train_over})
    n_prefix = ds.stats["interactions"] - 3 * ds.stats["users"]
    out = {"items": size, "loss": loss, "nproc": nproc, "threads_per_process": threads,
           "interactions": ds.stats["interactions"], "users": ds.stats["users"],
           "dense_windows": len(split.train_dense), "world_seconds": world_s, "rss_after_data_mb": rss_data,
           "device": cfg.device, "num_negatives": mc.num_negatives if loss == "sampled" else None,
           "prefix_layout_gb_avoided": 2 * n_prefix * mc.max_length * 8 / 1e9}
    if loss == "full":
        positions = cfg.dense_batch_size * float(split.train_dense.lengths.mean())
        out["full_softmax_logits_gb_estimate"] = full_softmax_gb(positions, size)
    before_eval: list[float] = []
    marks: list[tuple[float, float]] = []  # the clocks as each step starts, and when the epoch's steps end
    evaluate = training.evaluate

    def timed_evaluate(*a, **k):
        # Wrapped only to read the peak RSS of the training steps alone (train() evaluates
        # after the epoch and at the end); the call is unchanged.
        if not before_eval:
            before_eval.append(_peak_rss_mb())
            marks.append((time.perf_counter(), time.process_time()))  # the end of the epoch's last step
        return evaluate(*a, **k)

    iterate = training.iterate_batches

    def marked_batches(*a, **k):
        # Wrapped only to read the clocks as each step starts (train() fetches the next batch
        # right after a step's optimizer step); the batches are unchanged. CPU time counts
        # this process's threads only: on a shared machine it is the steadier cost of a step.
        for batch in iterate(*a, **k):
            marks.append((time.perf_counter(), time.process_time()))
            yield batch

    training.evaluate, training.iterate_batches = timed_evaluate, marked_batches
    t0 = time.perf_counter()
    try:
        r = training.train(ds, mc, cfg, split=split, progress=False)
    finally:
        training.evaluate, training.iterate_batches = evaluate, iterate
    seconds = r.steps["seconds"].to_numpy()
    if len(seconds) < steps:
        raise RuntimeError(f"expected {steps} step rows, got {len(seconds)}")
    # seconds[k] is the time from the epoch's start to the end of step k; the warm-up steps
    # (first-touch allocation, thread pools) are left out.
    timed = np.diff(np.concatenate([[0.0], seconds[:steps]]))[args.warmup:]
    per_step = float(timed.mean())
    if len(marks) >= steps + 1:
        cpu = np.diff([m[1] for m in marks[:steps + 1]])[args.warmup:]
        out.update(cpu_seconds_per_step=float(cpu.mean()), cpu_seconds_per_step_median=float(np.median(cpu)))
    windows = cfg.dense_batch_size  # a global batch: DDP ranks share it (rows rank::world)
    out.update(seconds_per_step=per_step, seconds_per_step_median=float(np.median(timed)),
               seconds_per_step_all=[float(v) for v in timed], sequences_per_second=windows / per_step,
               windows_per_step=windows, first_step_seconds=float(seconds[0]),
               train_call_seconds=time.perf_counter() - t0, final_loss=float(r.steps["loss"].iloc[-1]),
               steps_timed=args.steps, warmup_steps=args.warmup,
               train_peak_rss_mb=before_eval[0] if before_eval else None,
               prefix_layout_built=split.is_built("train_prefix"))
    return out


def case_eval(args, size: int) -> dict:
    """Full-catalogue ranking of the first ``--eval-users`` test users by an untrained
    model (the cost does not depend on the weights): users per second."""
    import torch

    from hm4sr_core.config import ModelConfig, TrainConfig
    from hm4sr_core.evaluate import evaluate
    from hm4sr_core.model import build_model
    model_over, train_over = _overrides(args)
    ds, world_s = _world(args, size)
    mc = ModelConfig.hm4sr(**model_over)
    split = dense_split(ds, mc.max_length, args.eval_users + 64)
    cfg = TrainConfig(**{"threads": args.threads, **train_over})
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(args.seed)
    model = build_model(mc, ds).to(cfg.device)
    rss_model = _peak_rss_mb()
    test = split.test
    warm = _take(test, slice(args.eval_users, args.eval_users + 64))
    evaluate(model, warm, cfg, device=cfg.device)
    part = _take(test, slice(0, args.eval_users))
    t = time.perf_counter()
    r = evaluate(model, part, cfg, device=cfg.device)
    secs = time.perf_counter() - t
    return {"items": size, "eval_users": len(part), "eval_seconds": secs, "users_per_second": len(part) / secs,
            "rss_before_ranking_mb": rss_model, "world_seconds": world_s, "threads": cfg.threads,
            "device": cfg.device, "hr@10": r.metrics["hr@10"]}


def _take(part, rows: slice):
    from dataclasses import fields, replace
    return replace(part, **{f.name: getattr(part, f.name)[rows] for f in fields(part)
                            if getattr(part, f.name) is not None})


def case_prepare(args) -> dict:
    """``hm4sr prepare amazon2023`` on the synthetic 10M-interaction file, stage by stage
    (benchmarks/prepare_large.py: read, preprocess, split hashes, save; the text encoder
    is the feature step and is left out there)."""
    from benchmarks.prepare_large import measure as measure_prepare
    out = measure_prepare(str(args.amazon_path), "2023", 5, 5)
    out["prepare_seconds"] = float(out["total_seconds"])
    out["file_interactions"] = out.get("reviews")  # what was read: a reused file may hold another count
    if out["file_interactions"] != args.amazon_interactions:
        out["note"] = (f"{args.amazon_path} holds {out['file_interactions']} reviews, not --amazon-interactions "
                       f"{args.amazon_interactions}: it was reused; delete it or pass another --amazon-path")
    return out


def ensure_amazon_file(path: Path, interactions: int) -> str:
    """Write the synthetic Amazon 2023 file into ``path`` unless it is there (the generator is
    deterministic: the same arguments give the same bytes). Returns what was done."""
    from benchmarks.amazon2023_synth import CATEGORY, write_amazon2023
    if (path / f"{CATEGORY}.jsonl.gz").exists() and (path / f"meta_{CATEGORY}.jsonl.gz").exists():
        return f"reused {path}"
    t = time.perf_counter()
    write_amazon2023(path, interactions=interactions, progress=False)
    return f"generated {path} in {time.perf_counter() - t:.0f} s"


def run_case(args, spec: str) -> dict:
    """Run one case ``part[:size[:loss[:nproc]]]`` in this process (the child side)."""
    bits = spec.split(":")
    if bits[0] == "train" and len(bits) == 4 and bits[3] == "torchrun":
        return case_train_torchrun(args, _size(bits[1]), bits[2])
    if bits[0] == "train" and len(bits) == 4:
        return case_train(args, _size(bits[1]), bits[2], int(bits[3]))
    if bits[0] == "eval":
        return case_eval(args, _size(bits[1]))
    if bits[0] == "prepare":
        return case_prepare(args)
    raise SystemExit(f"unknown case {spec!r}: expected train:SIZE:full|sampled:NPROC|torchrun, eval:SIZE or prepare")


# --------------------------------------------------------------------------- parent side


def _tree_rss_mb(pid: int) -> float:
    """Resident MB of ``pid`` and its descendants now (0 where /proc cannot be read)."""
    try:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        total, todo = 0.0, [pid]
        while todo:
            p = todo.pop()
            todo.extend(children.get(p, []))
            try:
                with open(f"/proc/{p}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) / 1024.0
            except OSError:
                pass
        return total
    except OSError:
        return 0.0


def measure(spec: str, child_args: list[str], limit_s: float) -> dict:
    """Run case ``spec`` in a child process (its own session: on timeout the whole group is
    killed). Adds ``peak_rss_mb`` (the largest process of the case, from wait4),
    ``peak_tree_rss_mb`` (the sum over its processes, sampled every 0.2 s: DDP ranks
    together), ``wall_seconds`` and, when it did not finish, ``error``."""
    cmd = [sys.executable, "-m", "benchmarks.scale", "--case", spec, *child_args]
    load_before = os.getloadavg()[0]  # a shared machine's noise, made visible (2 cores: above 2 = contention)
    t0 = time.perf_counter()
    # Idle OpenMP threads sleep at once, as when the scale figures were first measured: its DDP
    # cases run several processes on 2 cores (docs/performance.md, "OpenMP wait policy").
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    peak_tree = [0.0]
    done = threading.Event()

    def sample():
        while not done.wait(0.2):
            peak_tree[0] = max(peak_tree[0], _tree_rss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    # communicate() reaped the child: its rusage is the one RUSAGE_CHILDREN gained, read per child below.
    out: dict = {}
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        out = json.loads(lines[-1])
    elif timed_out:
        out["error"] = f"over the time limit of {limit_s:.0f} s"
    else:
        tail = stderr.strip().splitlines()[-3:]
        out["error"] = f"exit {proc.returncode}: " + " | ".join(tail)
    out["wall_seconds"] = time.perf_counter() - t0
    out["load_average_1min"] = [load_before, os.getloadavg()[0]]
    out["peak_tree_rss_mb"] = peak_tree[0]
    if "child_peak_rss_mb" in out:
        out["peak_rss_mb"] = out.pop("child_peak_rss_mb")
    return out


def _fit_exponent(rows: list[dict], key: str = "cpu_seconds_per_step_median") -> dict | None:
    """Slope (and R^2) of log(``key``) against log(items) over the given rows. The default is
    the median CPU seconds of a step: on a shared machine wall time mostly measures the other
    processes, and one stalled step would move a mean."""
    pts = [(r["items"], r[key]) for r in rows if r.get(key)]
    if len(pts) < 2:
        return None
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    r2 = 1.0 - float((resid ** 2).sum()) / float(((y - y.mean()) ** 2).sum()) if len(pts) > 2 else 1.0
    return {"exponent": float(slope), "r2": r2, "points": [[int(n), float(s)] for n, s in pts]}


def plan(args) -> list[str]:
    """The cases of this run, in the order they run (small first: a time limit cuts the big ones)."""
    cases = []
    for size in args.sizes:
        if "train" in args.parts:
            for nproc in args.nprocs:
                for loss in args.losses:
                    cases.append(f"train:{size}:{loss}:{nproc}")
        if "eval" in args.parts:
            cases.append(f"eval:{size}")
    if "prepare" in args.parts:
        cases.append("prepare")
    return cases


def summarise(cases: dict) -> dict:
    """The headline figures of a run: the exponent and the targets of issue 13."""
    sampled = [v for k, v in cases.items() if k.startswith("train:") and v.get("loss") == "sampled"
               and v.get("nproc") == 1]
    ordered = sorted(sampled, key=lambda r: r["items"])
    out: dict = {"sampled_step_exponent": _fit_exponent(ordered),
                 "sampled_step_exponent_wall": _fit_exponent(ordered, "seconds_per_step_median"),
                 # between neighbouring sizes: where the O(N) part of a step starts to dominate
                 "sampled_step_exponent_local": [
                     {"items": [a["items"], b["items"]], **_fit_exponent([a, b])}
                     for a, b in zip(ordered, ordered[1:])
                     if a.get("cpu_seconds_per_step_median") and b.get("cpu_seconds_per_step_median")]}
    big = [v for v in sampled if v.get("items") == 1_000_000 and "seconds_per_step" in v]
    if big:
        steps_mb = big[0].get("train_peak_rss_mb")
        out["target_1e6_sampled_under_4gb"] = {
            "train_steps_peak_rss_mb": steps_mb, "met_by_train_steps": steps_mb is not None and steps_mb < 4096,
            "peak_rss_mb": big[0]["peak_rss_mb"], "met_with_evaluation": big[0]["peak_rss_mb"] < 4096,
            "note": "train_steps: data + model + steps, up to train()'s first evaluation; peak_rss_mb: the whole "
                    "train() call, whose 3 evaluations (64 users each) rank against the full catalogue"}
    ddp = {}
    for k, v in cases.items():
        if k.startswith("train:") and v.get("nproc", 1) > 1 and "seconds_per_step" in v:
            one = cases.get(f"train:{v['items']}:{v['loss']}:1", {})
            if "seconds_per_step" in one:
                ddp[f"{v['items']}:{v['loss']}"] = one["seconds_per_step"] / v["seconds_per_step"]
    if ddp:
        out["ddp_speedup"] = ddp  # seconds per step of 1 process / of the DDP run: > 1 pays
    exp = out["sampled_step_exponent"]
    if exp:
        out["target_sublinear"] = {"exponent": exp["exponent"], "met": exp["exponent"] < 1.0}
    prep = cases.get("prepare")
    if prep and "peak_rss_mb" in prep and "error" not in prep:
        out["target_prepare_under_8gb"] = {"peak_rss_mb": prep["peak_rss_mb"], "met": prep["peak_rss_mb"] < 8192}
    return out


def write_results(scale: dict, path: Path = RESULTS) -> dict:
    """Merge ``scale`` into ``path`` under "scale" (other keys kept), atomically. Cases of an
    earlier run that this one did not measure are kept when it ran with the same settings at
    the same commit (e.g. ``--only prepare`` after ``--skip prepare``), dropped
    otherwise, so the summary never fits an exponent across two protocols or two versions of
    the code. Each case records its own commit and time."""
    from hm4sr_core.data.store import write_json_atomic
    results = json.loads(path.read_text()) if path.exists() else {}
    old = results.get("scale", {})
    for spec in scale["cases"]:
        scale["cases"][spec]["measured_at"] = scale["measured_at"]
        scale["cases"][spec]["commit"] = scale.get("commit")
    same_code = scale.get("commit") is not None and old.get("commit") == scale.get("commit")
    if old.get("settings") == scale["settings"] and same_code:
        merged = {**{k: v for k, v in old.get("cases", {}).items() if v.get("commit") == scale.get("commit")},
                  **scale["cases"]}
    else:
        merged = dict(scale["cases"])
        if old.get("cases"):
            why = "other settings" if old.get("settings") != scale["settings"] else "another commit"
            scale["earlier_cases_dropped"] = f"{len(old['cases'])} cases of {old.get('measured_at')}: {why}"
    scale = {**scale, "cases": merged, "summary": summarise(merged)}
    results["scale"] = scale
    write_json_atomic(path, results)
    return scale


def _commit() -> dict:
    """The commit (short) and whether the measured code (hm4sr_core, benchmarks) had changes."""
    from hm4sr_core import provenance
    git = provenance.git_state(ROOT, ("hm4sr_core", "benchmarks"))
    return {"commit": git["commit"] and git["commit"][:7], "uncommitted_changes": git["dirty"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_sizes, default=_sizes(DEFAULT_SIZES),
                   help=f"catalogue sizes, comma-separated (default {DEFAULT_SIZES})")
    p.add_argument("--only", action="append", choices=PARTS, default=[], help="run only these parts (repeatable)")
    p.add_argument("--skip", action="append", choices=PARTS, default=[], help="parts to leave out (repeatable)")
    p.add_argument("--losses", type=lambda s: s.split(","), default=list(LOSSES),
                   help="rec_loss values trained (default full,sampled)")
    p.add_argument("--nprocs", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2],
                   help="process counts trained (default 1,2; 2 = DDP, threads split between them)")
    p.add_argument("--steps", type=int, default=20, help="training steps timed per case (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per case, split between DDP processes")
    p.add_argument("--eval-users", type=int, default=1000, help="test users ranked per evaluation case (default 1000)")
    p.add_argument("--full-softmax-limit-gb", type=float, default=4.0,
                   help="skip a full-softmax case whose estimated logits memory is above this (default 4)")
    p.add_argument("--case-limit", type=float, default=600.0, help="seconds a case may run before it is killed")
    p.add_argument("--total-limit", type=float, default=0.0,
                   help="seconds for the whole run (0 = none); cases that would start after it are recorded as not run")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic worlds and the model")
    p.add_argument("--amazon-path", type=Path, default=WORK / "amazon10m",
                   help="folder of the synthetic Amazon 2023 file the prepare part reads (written there when missing)")
    p.add_argument("--amazon-interactions", type=int, default=10_000_000,
                   help="review lines of that file when it is written (default 10,000,000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig/TrainConfig override for every case, e.g. device=cuda or num_negatives=512")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON file the figures are merged into")
    p.add_argument("--headline", action="store_true",
                   help="print the headline scalars as one JSON line last (what make bench records in history.jsonl)")
    p.add_argument("--table", action="store_true",
                   help="print the recorded figures (--results) as Markdown tables and measure nothing")
    p.add_argument("--case", help="run one case in this process and print its JSON (what the parent runs)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    args.parts = [x for x in (args.only or PARTS) if x not in args.skip]
    return args


def _child_args(args) -> list[str]:
    out = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--threads={args.threads}",
           f"--eval-users={args.eval_users}", f"--full-softmax-limit-gb={args.full_softmax_limit_gb}",
           f"--seed={args.seed}", f"--amazon-path={args.amazon_path}",
           f"--amazon-interactions={args.amazon_interactions}"]
    return out + [f"--set={s}" for s in args.set]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(args.results.read_text())["scale"]))
        return
    if args.case:
        out = run_case(args, args.case)
        if out is None:  # a torchrun rank other than 0
            return
        out["child_peak_rss_mb"] = _peak_rss_mb()
        if "rank_peak_rss_mb" in out:  # DDP: the launcher is small, the ranks hold the data
            out["launcher_peak_rss_mb"] = out["child_peak_rss_mb"]
            out["child_peak_rss_mb"] = max(out["rank_peak_rss_mb"] + [out["child_peak_rss_mb"]])
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            out["cuda_peak_allocated_mb"] = sys.modules["torch"].cuda.max_memory_allocated() / 2**20
        print(json.dumps(out))
        return
    import torch

    from hm4sr_core import provenance
    start = time.perf_counter()
    cases: dict = {}
    todo = plan(args)
    for i, spec in enumerate(todo, 1):
        left = args.total_limit - (time.perf_counter() - start) if args.total_limit else args.case_limit
        if left <= 5:
            cases[spec] = {"error": "not run: --total-limit reached"}
            print(f"[scale {i}/{len(todo)}] {spec}: not run (total limit)", file=sys.stderr, flush=True)
            continue
        print(f"[scale {i}/{len(todo)}] {spec} ...", file=sys.stderr, flush=True)
        if spec == "prepare":
            print(f"[scale {i}/{len(todo)}] input: {ensure_amazon_file(args.amazon_path, args.amazon_interactions)}",
                  file=sys.stderr, flush=True)
            left = args.total_limit - (time.perf_counter() - start) if args.total_limit else args.case_limit
        r = measure(spec, _child_args(args), min(args.case_limit, left))
        cases[spec] = r
        brief = r.get("error") or r.get("skipped") or \
            ", ".join(f"{k} {r[k]:.4g}" for k in ("seconds_per_step", "sequences_per_second", "users_per_second",
                                                  "prepare_seconds", "peak_rss_mb") if isinstance(r.get(k), float))
        print(f"[scale {i}/{len(todo)}] {spec}: {brief} ({r['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
    torch.set_num_threads(args.threads)
    scale = {"cases": cases, "environment": provenance.environment(), **_commit(),
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "command": "python -m benchmarks.scale " + " ".join(sys.argv[1:] if argv is None else argv),
             "settings": {"steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                          "eval_users": args.eval_users, "seed": args.seed, "set": args.set,
                          "mode": "dense", "world": "benchmarks.scale_world.make_scale_world defaults"}}
    scale = write_results(scale, args.results)
    print(json.dumps(scale["summary"], indent=2))
    if args.headline:  # this run's cases only: a history line must not repeat an earlier run's figures
        print(json.dumps(headline(summarise(cases))))


def table(scale: dict) -> str:
    """The "scale" record as Markdown tables (what docs/performance.md shows)."""
    cases = scale["cases"]
    lines = ["| items | loss | processes | sequences/s | s/step (median) | CPU s/step (median) | "
             "peak RSS, steps (MB) | peak RSS, train() (MB) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for key, c in cases.items():
        if not key.startswith("train:"):
            continue
        if "seconds_per_step" not in c:
            why = c.get("skipped") or c.get("error", "")
            lines.append(f"| {c.get('items', key.split(':')[1]):,} | {c.get('loss', '')} | {c.get('nproc', '')} | "
                         f"not run: {why} | | | | |")
            continue
        rss = c["peak_rss_mb"] if c["nproc"] == 1 else f"{c['peak_rss_mb']:,.0f} per rank"
        steps_rss = c.get("train_peak_rss_mb")
        lines.append(f"| {c['items']:,} | {c['loss']} | {c['nproc']} | {c['sequences_per_second']:.1f} | "
                     f"{c['seconds_per_step_median']:.3f} | {c.get('cpu_seconds_per_step_median', float('nan')):.3f} | "
                     f"{steps_rss:,.0f} | " + (f"{rss:,.0f} |" if isinstance(rss, float) else f"{rss} |"))
    lines += ["", "| items | users ranked | users/s | peak RSS (MB) |", "|---:|---:|---:|---:|"]
    for key, c in cases.items():
        if key.startswith("eval:") and "users_per_second" in c:
            lines.append(f"| {c['items']:,} | {c['eval_users']:,} | {c['users_per_second']:.1f} | {c['peak_rss_mb']:,.0f} |")
    prep = cases.get("prepare")
    if prep and "prepare_seconds" in prep:
        lines += ["", "| prepare | reviews | interactions after 5-core | seconds (read / preprocess / splits / save) "
                  "| peak RSS (MB) |", "|---|---:|---:|---|---:|",
                  f"| amazon2023 synthetic | {prep['reviews']:,} | {prep['interactions']:,} | {prep['prepare_seconds']:.1f} "
                  f"({' / '.join(str(v) for v in prep['stages'].values())}) | {prep['peak_rss_mb']:,.0f} |"]
    return "\n".join(lines)


def headline(summary: dict) -> dict:
    """The summary's scalars, flat: what a history line can hold."""
    out = {}
    if summary.get("sampled_step_exponent"):
        out["sampled_step_exponent"] = summary["sampled_step_exponent"]["exponent"]
    if "target_1e6_sampled_under_4gb" in summary:
        out["1e6_sampled_peak_rss_mb"] = summary["target_1e6_sampled_under_4gb"]["peak_rss_mb"]
        out["1e6_sampled_train_steps_peak_rss_mb"] = summary["target_1e6_sampled_under_4gb"]["train_steps_peak_rss_mb"]
    if "target_prepare_under_8gb" in summary:
        out["prepare_peak_rss_mb"] = summary["target_prepare_under_8gb"]["peak_rss_mb"]
    return out


if __name__ == "__main__":
    main()
