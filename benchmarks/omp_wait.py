"""How OpenMP's wait policy changes training speed on this CPU, timed in alternation.

libgomp (torch's OpenMP on Linux) reads ``OMP_WAIT_POLICY`` once, when a process starts: with
``PASSIVE`` a thread that finishes its share of a parallel region sleeps at once, and the next
region has to wake it; unset, it spins for a while first (``GOMP_SPINCOUNT``). Dense-mode
training runs many small operations per step, so the wake-ups can cost more than the work.
Each round trains a fresh model for ``--epochs`` epochs (seed 2025, the default preset) in one
subprocess per policy, alternating so that every policy sees the same load, and prints the
median seconds per training epoch and the ratio to the first policy.

    python -m benchmarks.omp_wait                          # dense, 2 threads, PASSIVE against unset, 3 rounds
    python -m benchmarks.omp_wait --mode prefix --epochs 1 --max-steps 20
    python -m benchmarks.omp_wait --policy PASSIVE --policy unset --policy spin=10000

A policy is ``unset`` (libgomp's default), ``PASSIVE``, ``ACTIVE`` or ``spin=N`` (unset policy,
``GOMP_SPINCOUNT=N``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from hm4sr_core import runtime

ROOT = Path(__file__).resolve().parents[1]


def policy_env(policy: str) -> dict[str, str]:
    """The environment of a child for ``policy`` (the wait-policy variables of ours replaced)."""
    env = {k: v for k, v in os.environ.items() if k not in runtime.OPENMP_VARIABLES}
    env["HM4SR_BENCH_OPENMP"] = "untouched"  # "unset" stays libgomp's default in the child
    if policy in ("PASSIVE", "ACTIVE"):
        env["OMP_WAIT_POLICY"] = policy
    elif policy.startswith("spin="):
        count = policy.split("=", 1)[1]
        if not count.isdigit():
            raise ValueError(f"policy {policy!r}: spin=N needs a whole number of spins, got {count!r}")
        env["GOMP_SPINCOUNT"] = count
    elif policy != "unset":
        raise ValueError(f"policy {policy!r}: expected unset, PASSIVE, ACTIVE or spin=N")
    return env


def _child(args) -> None:
    from hm4sr_core.config import ModelConfig, TrainConfig
    from hm4sr_core.data.prepare import prepared_dataset
    from hm4sr_core.train import train
    ds, _ = prepared_dataset(args.data, args.data)
    cfg = TrainConfig(mode=args.mode, epochs=args.epochs, threads=args.threads, seed=2025, patience=100,
                      max_steps_per_epoch=args.max_steps)
    r = train(ds, ModelConfig(), cfg, progress=False)
    print(json.dumps({"train_seconds": r.epochs["train_seconds"].tolist(),
                      "valid_ndcg@20": r.epochs["valid_ndcg@20"].tolist()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", default="ml-100k", help="dataset, prepared on first use (default ml-100k)")
    p.add_argument("--mode", choices=("dense", "prefix"), default="dense", help="training layout (default dense)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as make bench)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on steps per epoch (default 0: full epochs)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every policy once (default 3)")
    p.add_argument("--policy", action="append", help="a wait policy to time (repeatable; default PASSIVE and unset)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    policies = args.policy or ["PASSIVE", "unset"]
    try:
        envs = {pol: policy_env(pol) for pol in policies}
    except ValueError as e:
        p.error(str(e))
    if args.rounds < 1 or args.epochs < 1 or args.threads < 1:
        p.error("--rounds, --epochs and --threads must be >= 1")
    cmd = [sys.executable, "-m", "benchmarks.omp_wait", "--child", "--data", args.data, "--mode", args.mode,
           "--threads", str(args.threads), "--epochs", str(args.epochs), "--max-steps", str(args.max_steps)]
    secs: dict[str, list[float]] = {pol: [] for pol in policies}
    for r in range(args.rounds):
        for pol in policies:
            proc = subprocess.run(cmd, cwd=ROOT, env=envs[pol], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"the {pol} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            secs[pol].extend(out["train_seconds"])
            print(f"round {r + 1}/{args.rounds} {pol:>12}: " + ", ".join(f"{s:.1f}" for s in out["train_seconds"])
                  + " s per epoch", file=sys.stderr, flush=True)
    base = statistics.median(secs[policies[0]])
    print(f"\n{args.mode} mode, {args.threads} threads, {args.rounds} rounds x {args.epochs} epochs")
    print(f"{'policy':>12} {'median s/epoch':>15} {'ratio':>7}")
    for pol in policies:
        med = statistics.median(secs[pol])
        print(f"{pol:>12} {med:15.2f} {med / base:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
