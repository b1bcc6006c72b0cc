"""Bit-for-bit check: this checkout trains exactly as another git revision does (CPU).

A refactor that claims "behaviour unchanged" is checked here: the package at ``--rev``
(extracted with ``git archive``, imported from its own folder) and this checkout's each
run ``hm4sr train`` on the same prepared synthetic world, with the same seeds, one
thread; then every metric in results.json, every epochs.csv and steps.csv value
(timings aside) and every tensor of best.pt and last.pt (model, best and optimizer
states, the saved random state) must be equal: ``torch.equal``, not close.

    python -m benchmarks.same_results --rev 0793006
    python -m benchmarks.same_results --rev main --out /tmp/same   # keeps the runs; reruns reuse rev's

Cases: HM4SR and SASRec in dense mode (the defaults), HM4SR in prefix mode with
``micro_batches=2`` and ``recompute=true`` (gradient caching and recomputation), and
HM4SR with the sampled softmax (dense with the popularity proposal; prefix in two parts
with the uniform one). Exits 1 on the first case that differs, naming what differs.

Both sides run their matrix products on the same MKL code path: where this process loaded
the library of ``hm4sr_core.runtime.mkl_intel_paths`` (an AMD CPU), both trainings get it
through ``LD_PRELOAD``, so a revision from before that library is compared on the same
kernels (with ``HM4SR_MKL_INTEL_PATHS=0`` neither side has it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import pandas as pd
import torch

from hm4sr_core import runtime

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "hm4sr_dense": ["--model", "hm4sr", "--epochs", "2"],
    "sasrec_dense": ["--model", "sasrec", "--epochs", "2"],
    "hm4sr_prefix_parts": ["--model", "hm4sr", "--epochs", "1", "--mode", "prefix", "--set", "batch_size=256",
                           "--set", "micro_batches=2", "--set", "recompute=true"],
    # Sampled softmax: the negatives are drawn outside the model (hm4sr_core/sampling.py), so
    # a change to the draw order shows here.
    "hm4sr_dense_sampled": ["--model", "hm4sr", "--epochs", "1", "--set", "rec_loss=sampled",
                            "--set", "num_negatives=64", "--set", "negative_proposal=popularity"],
    "hm4sr_prefix_parts_sampled": ["--model", "hm4sr", "--epochs", "1", "--mode", "prefix", "--set", "batch_size=256",
                                   "--set", "micro_batches=2", "--set", "rec_loss=sampled", "--set", "num_negatives=64"],
}
TIMING_COLUMNS = {"train_seconds", "seconds_since_start", "seconds"}


def resolve(rev: str) -> str:
    """The full commit hash of ``rev``."""
    return subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()


def extract(commit: str, folder: Path) -> None:
    """hm4sr_core at ``commit`` into ``folder`` (kept: a rerun reuses it). Whole or not at
    all: it is unpacked beside and renamed into place, so an interrupted run leaves no half
    package that a rerun would take for a finished one."""
    if not (folder / "hm4sr_core").exists():
        data = subprocess.run(["git", "archive", commit, "hm4sr_core"], cwd=ROOT, check=True,
                              capture_output=True).stdout
        part = folder.with_name(folder.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        with tarfile.open(fileobj=BytesIO(data)) as tar:
            tar.extractall(part, filter="data")
        folder.mkdir(parents=True, exist_ok=True)
        (part / "hm4sr_core").rename(folder / "hm4sr_core")
        shutil.rmtree(part)


def cli(package_root: Path, args: list[str]) -> None:
    """``python -m hm4sr_core.cli ARGS`` importing the package under ``package_root``."""
    env = dict(os.environ, PYTHONPATH=str(package_root), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
               **runtime.preload_environment())
    where = subprocess.run([sys.executable, "-c", "import hm4sr_core; print(hm4sr_core.__file__)"],
                           cwd=package_root, env=env, check=True, capture_output=True, text=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(package_root.resolve()):
        raise SystemExit(f"{package_root}: python imports hm4sr_core from {where}, not from there")
    subprocess.run([sys.executable, "-m", "hm4sr_core.cli", *args], cwd=package_root, env=env, check=True)


def train(package_root: Path, data: Path, case: str, out: Path) -> None:
    if (out / "results.json").exists():
        return
    cli(package_root, ["train", "--data", str(data), *CASES[case], "--set", "threads=1", "--quiet",
                       "--out", str(out)])


def differences(a, b, where: str) -> list[str]:
    """Every place the nested checkpoint/result values ``a`` and ``b`` differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} and {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(old: Path, new: Path) -> tuple[list[str], int]:
    """What differs between two run folders, and how many tensors were compared."""
    found = []
    ra, rb = (json.loads((f / "results.json").read_text()) for f in (old, new))
    for part in ("valid", "test", "epochs_run", "best_epoch", "data_hash", "split_hash"):
        found += differences(ra[part], rb[part], f"results.{part}")
    for name in ("epochs.csv", "steps.csv"):
        fa, fb = (pd.read_csv(f / name) for f in (old, new))
        keep = [c for c in fa.columns if c not in TIMING_COLUMNS]
        if list(fa.columns) != list(fb.columns):
            found.append(f"{name}: columns differ")
        elif not fa[keep].equals(fb[keep]):
            found.append(f"{name}: values differ")
    tensors = 0
    for name in ("best.pt", "last.pt"):
        ca, cb = (torch.load(f / name, map_location="cpu", weights_only=True) for f in (old, new))
        for key in ("model_state", "best_state", "optimizer_state", "rng_state", "epoch", "step", "best_metric"):
            found += differences(ca[key], cb[key], f"{name}:{key}")
        tensors += sum(isinstance(v, torch.Tensor) for k in ("model_state", "best_state") for v in ca[k].values())
    return found, tensors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="git revision to compare against (e.g. main, 0793006)")
    p.add_argument("--out", help="folder for the data and the runs (default: a temporary one); the revision's "
                                 "runs found there are reused, this checkout's are always redone")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    args = p.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {list(CASES)}")
    with tempfile.TemporaryDirectory(prefix="hm4sr-same-") as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        commit = resolve(args.rev)
        rev_root = base / "rev-src" / commit[:12]
        extract(commit, rev_root)
        data = base / "data" / "synthetic"
        if not (data / "manifest.json").exists():
            cli(rev_root, ["prepare", "synthetic", "--out-root", str(base / "data")])
        failed = False
        for case in cases:
            old, new = base / "runs" / commit[:12] / case, base / "runs" / "here" / case
            train(rev_root, data, case, old)
            if new.exists():
                shutil.rmtree(new)
            train(ROOT, data, case, new)
            found, tensors = compare(old, new)
            r = json.loads((new / "results.json").read_text())
            summary = f"test ndcg@20 {r['test']['ndcg@20']!r}, valid ndcg@20 {r['valid']['ndcg@20']!r}"
            if found:
                failed = True
                print(f"{case}: DIFFERS from {commit[:12]}: " + "; ".join(found[:8]))
            else:
                print(f"{case}: identical to {commit[:12]} ({len(r['test'])} test and {len(r['valid'])} valid "
                      f"metrics, {tensors} state tensors, optimizer and rng state; {summary})")
        sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
