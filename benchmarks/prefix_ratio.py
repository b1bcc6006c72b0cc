"""The prefix-epoch ratio alone, paired: HM4SR's prefix epoch over RecBole SASRec's, in rounds.

`make bench` times RecBole's epoch at the start of a 27-minute run and HM4SR's prefix epoch
minutes later, once each; on a shared 2-core host the two can meet different loads, and the
ratio moved by 0.09 between two runs of the same commit (issue 29). This tool measures only
that ratio, as a median of rounds: each round trains one epoch of each side, each in a process of
its own, back to back, the order alternating from round to round (R H, H R, ...), and the
round's ratio divides the two. With ``--rev`` a third side trains HM4SR as of another git
revision in the same rounds, so a change is judged against its base and the peer under the
same conditions: that revision's hm4sr_core is extracted under .bench/revs/ and driven by this
checkout's benchmarks, so it must have the modules they import (hm4sr_core.provenance,
hm4sr_core.data.prepare.prepared_dataset: c11ac5c and later); this is checked before any
training.

    python -m benchmarks.prefix_ratio                  # 3 rounds, about 13 minutes here
    python -m benchmarks.prefix_ratio --rounds 5 --rev HEAD~3   # 5 rounds of 3 epochs

The settings are make bench's (ml-100k, batch 1024, 2 threads, one epoch, RecBole 1.2.1 in
.bench/recbole-venv). Prints each epoch as it ends and the medians; appends one JSON line per
invocation to benchmarks/prefix_ratio.jsonl (rounds, medians, CPU model, load, CPU steal,
commit), also when a later round fails (with the reason), and writes it to ``--out`` as well.

Each HM4SR side runs with the process settings of its own revision's hm4sr_core.runtime, MKL's
code path included (recorded per epoch as ``mkl_code_path``): from f3247ac on, an AMD CPU runs
MKL's AVX-512 kernels, a revision before it MKL's generic ones. RecBole runs as installed, on
MKL's generic path there; to time it on the AVX-512 path too, preload the library yourself:

    LD_PRELOAD="$(ls ~/.cache/hm4sr/libhm4sr_mkl_intel_paths-*.so)" python -m benchmarks.prefix_ratio --one recbole
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import same_results
from benchmarks.run import ROOT, _cpu_ticks, _dataset, _peak_rss_mb, steal_percent
from hm4sr_core import provenance

HISTORY = ROOT / "benchmarks" / "prefix_ratio.jsonl"
REVS = ROOT / ".bench" / "revs"
TARGET = 0.8  # make bench's hm4sr_prefix_epoch_vs_recbole_sasrec target
EPOCH_TIMEOUT = 3600  # seconds; an epoch takes 2-4 minutes here


class SideFailed(Exception):
    """One side's epoch failed or hung; the rounds before it are still recorded."""


def one_side(side: str) -> dict:
    """Train one epoch of ``side`` ('hm4sr' or 'recbole') here; its seconds and peak RSS."""
    ds, data_hash = _dataset()
    if side == "recbole":
        from benchmarks.recbole_peer import measure
        figures = measure(ds, "ml-100k", threads=2, max_epochs=1, max_seconds=float("inf"), eval_repeats=1)
        if figures.get("recbole_sasrec_skipped"):
            raise SystemExit(f"RecBole's SASRec could not run: {figures['recbole_sasrec_skipped']}")
        return {"seconds": figures["recbole_sasrec_seconds_per_epoch"]}
    from hm4sr_core.config import ModelConfig, TrainConfig
    from hm4sr_core.train import train
    cfg = TrainConfig(mode="prefix", epochs=1, threads=2, patience=100)  # part_epochs' first case
    result = train(ds, ModelConfig(), cfg, data_hash=data_hash, progress=False, test=False)
    # MKL's code path in this process (hm4sr_core.runtime.mkl_intel_paths); None for a revision
    # whose provenance does not report it (before f3247ac: MKL's generic path on an AMD CPU)
    code_path = getattr(provenance, "mkl_code_path", lambda: None)()
    return {"seconds": float(result.epochs["train_seconds"].iloc[0]), "peak_rss_mb": _peak_rss_mb(),
            "mkl_code_path": code_path}


def package_at(rev: str) -> Path:
    """A folder holding only ``hm4sr_core`` as of ``rev`` (same_results' extraction; made
    once under .bench/revs/, reused)."""
    try:
        commit = same_results.resolve(rev)
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"--rev {rev}: not a commit of this repository ({err.stderr.strip()})") from None
    folder = REVS / commit[:12]
    same_results.extract(commit, folder)
    return folder


def side_process(side: str, package: Path | None) -> tuple[list[str], Path, dict]:
    """(command, working folder, environment) of one epoch of ``side``. With ``package`` (a
    folder from :func:`package_at`) the process imports hm4sr_core from there and everything
    else (benchmarks, data paths) from this checkout: PYTHONPATH names the package folder
    first, and the process runs in it (python puts its working folder first on the path,
    unless -P / PYTHONSAFEPATH, which then leaves PYTHONPATH's order)."""
    env = dict(os.environ)
    env.setdefault("HM4SR_DATA", str(ROOT / "data"))
    first = [str(package)] if package is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*first, str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return [sys.executable, "-m", "benchmarks.prefix_ratio", "--one", side], package or ROOT, env


def check_package(package: Path) -> None:
    """Refuse, before any training, a revision whose hm4sr_core this checkout's benchmarks
    cannot drive (a module they import is missing there)."""
    _, cwd, env = side_process("hm4sr", package)
    probe = ("import hm4sr_core, benchmarks.run, hm4sr_core.train, hm4sr_core.config; "
             "print(hm4sr_core.__file__)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    if done.returncode != 0:
        raise SystemExit(f"--rev: the hm4sr_core in {package} cannot be driven by this checkout's benchmarks "
                         f"({last}); revisions from c11ac5c on can")
    if not Path(done.stdout.strip()).resolve().is_relative_to(package.resolve()):
        raise SystemExit(f"--rev: python imported hm4sr_core from {done.stdout.strip()}, not from {package}")


def _run_side(side: str, package: Path | None) -> dict:
    """One epoch of ``side`` in a fresh process (:func:`side_process`); adds when it started,
    the load after it and the CPU steal share while it ran."""
    cmd, cwd, env = side_process(side, package)
    before, t = _cpu_ticks(), time.time()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=EPOCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SideFailed(f"the {side} epoch ran past {EPOCH_TIMEOUT} s and was stopped") from None
    after = _cpu_ticks()
    if done.returncode != 0 or not done.stdout.strip():
        raise SideFailed(f"the {side} epoch failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["started"] = time.strftime("%H:%M:%S", time.gmtime(t))
    out["load_1min_after"] = os.getloadavg()[0]
    if (steal := steal_percent(before, after)) is not None:
        out["cpu_steal_percent"] = steal
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefix_ratio", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds; each trains one epoch of every side (default 3)")
    p.add_argument("--rev", help="also time HM4SR's prefix epoch as of this git revision in every round")
    p.add_argument("--out", type=Path, help="also write the record here as JSON")
    p.add_argument("--one", choices=("hm4sr", "recbole"), help=argparse.SUPPRESS)  # the child process's side
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_side(args.one)))
        return
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    sides = {"recbole": None, "hm4sr": None}
    rev_commit = None
    if args.rev:
        package = package_at(args.rev)
        check_package(package)
        rev_commit = package.name
        sides[f"hm4sr@{args.rev}"] = package
    names = list(sides)
    rounds, failure = [], None
    try:
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            row = {}
            for name in order:
                print(f"[prefix_ratio] round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                row[name] = _run_side(name.split("@")[0], sides[name])
                print(f"[prefix_ratio]   {row[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
            for name in names[1:]:
                row[f"{name}_vs_recbole"] = row[name]["seconds"] / row["recbole"]["seconds"]
            rounds.append({"order": order, **row})
            print(f"[prefix_ratio] round {r + 1}: " + ", ".join(f"{n} / recbole {row[f'{n}_vs_recbole']:.3f}"
                                                              for n in names[1:]), file=sys.stderr, flush=True)
    except (SideFailed, KeyboardInterrupt) as err:
        failure = str(err) or "interrupted"
        if not rounds:
            raise SystemExit(failure) from None
    medians = {f"{n}_vs_recbole_median": statistics.median(x[f"{n}_vs_recbole"] for x in rounds) for n in names[1:]}
    medians.update({f"{n}_seconds_median": statistics.median(x[n]["seconds"] for x in rounds) for n in names})
    git = provenance.git_state(ROOT, ("hm4sr_core",))
    record = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python -m benchmarks.prefix_ratio " + " ".join(sys.argv[1:]),
              "commit": git["commit"] and git["commit"][:7], "uncommitted_changes": git["dirty"],
              "rev": args.rev, "rev_commit": rev_commit, "cpu_model": provenance.cpu()["cpu_model"], "target": TARGET,
              "rounds_done": len(rounds), "stopped_because": failure, **medians, "rounds": rounds}
    with open(HISTORY, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    if args.out:
        from hm4sr_core.data.store import write_json_atomic
        write_json_atomic(args.out, record)
    for n in names[1:]:
        m = medians[f"{n}_vs_recbole_median"]
        print(f"{n}: prefix epoch {medians[f'{n}_seconds_median']:.1f} s, RecBole {medians['recbole_seconds_median']:.1f} s; "
              f"ratio median of {len(rounds)} rounds {m:.3f} (target <= {TARGET}: {'met' if m <= TARGET else 'not met'})")
    if failure:
        raise SystemExit(f"stopped after {len(rounds)} of {args.rounds} rounds (recorded): {failure}")


if __name__ == "__main__":
    main()
