"""Fidelity screen: which single change moves the `reference` configuration's first epochs?

The authors' released code, trained on ml-100k here (prefix mode, batch 1024, seed 2025),
reached validation NDCG@20 0.0528 after its first epoch and 0.0611 after its second; our
`reference` configuration reaches about 0.040 and 0.057 (docs/results.md, "Fidelity with the released code"). This screen
trains `reference` in prefix mode with one change at a time, several seeds each, for a
few epochs, and tabulates the validation NDCG@20 after each epoch against the released
curve. Variants (each is `reference` plus the settings shown by ``--list``):

- the fixes our defaults make, one at a time, and all of them (``hm4sr``);
- each auxiliary loss off;
- the two released behaviours that keep no switch in our defaults: padding and first
  item sharing the zero-gap bucket (``gap_buckets=released``) and features fitted to
  768 columns (``feature_width=768``), plus the 192 category columns;
- those found on a later read of the source: float32 and min-max timestamps, the
  Interactive MoE's uniform gate biases, a trained padding row in the training softmax,
  and four questions about the features (image centred, centred then fitted to 768
  columns, centred and rotated onto its principal axes, image rows L2-normalised).
  ``--data-facts`` prints the data facts behind them (zero-gap shares, mean energy).

    python -m benchmarks.fidelity --device cuda --jobs 13 --threads 1   # one H100 (MPS): 134 s for the first 13 variants
    python -m benchmarks.fidelity --variants reference,gap_buckets_released --seeds 2025
    python -m benchmarks.fidelity --summary-only                  # re-tabulate finished runs

Runs go to ``--out``/<variant>/seed-<S>/ (``hm4sr train`` run folders); a finished run
whose stored settings match the variant's is kept and not trained again, and one with a
``last.pt`` of the same settings is resumed (``hm4sr train --resume``), so an interrupted
screen continues where it stopped and ``--epochs 2`` extends a one-epoch screen's runs. The table is printed and written to ``--table``
(default ``--out``/screen.md; ``--summary-only`` writes it only when ``--table`` is given). On 2 CPU threads an epoch takes
about 3 minutes, so the full screen (63 runs x 2 epochs) is a GPU job; on the CPU here
``--jobs 2 --threads 1`` trains two runs at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

from hm4sr_core.cli import MODEL_PRESETS, parse_overrides
from hm4sr_core.config import ModelConfig, TrainConfig
from hm4sr_core.data.store import load_dataset, read_manifest
from hm4sr_core.runs import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RELEASED = [0.0528, 0.0611, 0.0649, 0.0718, 0.0781, 0.0789, 0.0792, 0.0864]  # valid NDCG@20, epochs 1-8

# name -> (preset, --set overrides): `reference` (or `hm4sr`) plus these settings.
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "reference": ("reference", {}),
    "gap_buckets_released": ("reference", {"gap_buckets": "released"}),
    "feature_width_768": ("reference", {"feature_width": "768"}),
    "category_columns_192": ("reference", {"category_columns": "192"}),
    "trained_temporal_experts": ("reference", {"train_temporal_experts": "true"}),
    "normalised_time": ("reference", {"normalise_time": "true"}),
    "masked_same_target": ("reference", {"mask_same_target": "true"}),
    "one_init_pass": ("reference", {"reference_init": "false"}),
    "hm4sr_defaults": ("hm4sr", {}),
    "no_id_contrastive": ("reference", {"w_id_contrastive": "0"}),
    "no_category": ("reference", {"w_category": "0"}),
    "no_placeholder_contrastive": ("reference", {"w_placeholder_contrastive": "0"}),
    "rec_only": ("reference", {"w_id_contrastive": "0", "w_category": "0", "w_placeholder_contrastive": "0"}),
    # released behaviours found on a later read of the source (issue 15): features and init
    "image_centred": ("reference", {"feature_transform": "centre", "feature_transform_modalities": "image"}),
    "image_centred_768": ("reference", {"feature_transform": "centre", "feature_transform_modalities": "image",
                                        "feature_width": "768"}),  # centred, then the 768-column fit: a centred PCA
    # centred and rotated onto the principal axes, nothing dropped: the 768 fit without its cut
    "image_pca": ("reference", {"feature_transform": "pca", "feature_transform_modalities": "image"}),
    "image_l2": ("reference", {"feature_transform": "l2", "feature_transform_modalities": "image"}),
    "gate_bias_uniform": ("reference", {"interactive_gate_bias": "uniform"}),
    "time_float32": ("reference", {"timestamps": "float32"}),
    "padding_row_trained": ("reference", {"padding_row": "trained"}),
    "time_minmax": ("reference", {"timestamps": "minmax"}),
    # the released behaviours the first screen knew of, at once
    "released_all": ("reference", {"gap_buckets": "released", "feature_width": "768", "category_columns": "192"}),
    # not a released behaviour: how much a larger step alone moves the first epoch
    "lr_2e-3": ("reference", {"lr": "2e-3"}),
}
DEFAULT = [v for v in VARIANTS if v not in ("released_all", "lr_2e-3")]


def command(variant: str, seed: int, args, resume: bool = False) -> list[str]:
    preset, sets = VARIANTS[variant]
    cmd = [sys.executable, "-m", "hm4sr_core.cli", "train", "--data", args.data, "--model", preset,
           "--mode", "prefix", "--epochs", str(args.epochs), "--seed", str(seed),
           "--set", "bucket_by_length=false", "--set", f"device={args.device}",
           "--out", str(Path(args.out) / variant / f"seed-{seed}"), "--quiet"] + (["--resume"] if resume else [])
    if args.threads:
        cmd += ["--set", f"threads={args.threads}"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


SPEED_ONLY = ("epochs", "seed", "device", "threads", "eval_batch_size", "log_every", "recompute")


def _matches(model: dict, train: dict, variant: str) -> bool:
    """True when stored model and training configurations are ``variant``'s in every setting
    that changes results (an older definition of the variant, or other code defaults, do not)."""
    preset, sets = VARIANTS[variant]
    model_over, train_over = parse_overrides([f"{k}={v}" for k, v in sets.items()])
    want_model = MODEL_PRESETS[preset](**model_over).to_dict()
    want_train = TrainConfig(mode="prefix", bucket_by_length=False, **train_over).to_dict()
    try:
        got_model = ModelConfig.from_dict(model or {}).to_dict()
        got_train = TrainConfig.from_dict(train or {}).to_dict()
    except (TypeError, ValueError):
        return False
    return got_model == want_model and all(got_train[k] == want_train[k] for k in want_train if k not in SPEED_ONLY)


def finished(folder: Path, epochs: int, variant: str | None = None) -> bool:
    """True when ``folder`` holds a run of at least ``epochs`` epochs and, given ``variant``,
    one whose stored model and training configurations are the variant's in every setting
    that changes results (a run left by an older definition of the variant, or by other
    code defaults, is trained again)."""
    path = folder / "results.json"
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    if record.get("epochs_run", 0) < epochs:
        return False
    if variant is None:
        return True
    config = record.get("config", {})
    return _matches(config.get("model", {}), config.get("train", {}), variant)


def resumable(folder: Path, variant: str, data_hash: str | None = None) -> bool:
    """True when ``folder/last.pt`` is a checkpoint of this variant (same settings and, given
    ``data_hash``, the same data) that an ``hm4sr train --resume`` can continue: a killed run,
    or a shorter screen's run extended to more epochs (a resumed run ends as the uninterrupted
    one; tests/test_train.py)."""
    path = folder / "last.pt"
    if not path.exists():
        return False
    try:
        ck = load_checkpoint(path)
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError):
        return False  # a truncated or foreign file: this run is trained afresh
    if data_hash is not None and ck.get("data_hash") != data_hash:
        return False
    return _matches(ck.get("model_config", {}), ck.get("train_config", {}), variant)


def curve(folder: Path) -> list[float]:
    """Validation NDCG@20 after each epoch, from the run's epochs.csv."""
    return pd.read_csv(folder / "epochs.csv")["valid_ndcg@20"].tolist()


def summarise(out: Path, variants: list[str], seeds: list[int], epochs: int, released: bool = True) -> str:
    """Markdown: per variant, mean +- sd over seeds after each epoch, the per-seed values of
    epoch 1, and how far epoch 1's mean lies from `reference`'s in units of their pooled sd."""
    rows, base = [], None
    cols = " | ".join(f"epoch {e}" for e in range(1, epochs + 1))
    lines = [f"Validation NDCG@20, prefix mode, batch 1024, uniformly random batches; mean +- sd over "
             f"the seeds that finished (of {', '.join(map(str, seeds))}).", "",
             f"| variant (settings: --list) | runs | {cols} | epoch 1 per seed | epoch-1 shift vs reference |",
             "|---|---:|" + "---:|" * epochs + "---|---:|"]
    for variant in variants:
        curves = [curve(out / variant / f"seed-{s}") for s in seeds
                  if finished(out / variant / f"seed-{s}", epochs, variant)]
        if not curves:
            continue
        cells = []
        for e in range(epochs):
            vals = [c[e] for c in curves]
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            cells.append(f"{statistics.mean(vals):.4f} +- {sd:.4f}")
        first = [c[0] for c in curves]
        if variant == "reference":
            base = first
        shift = ""
        if base is not None and variant != "reference" and len(base) > 1 and len(first) > 1:
            pooled = math.sqrt((statistics.variance(base) + statistics.variance(first)) / 2)
            diff = statistics.mean(first) - statistics.mean(base)
            shift = f"{diff:+.4f} ({diff / pooled:+.1f} sd)" if pooled > 0 else f"{diff:+.4f}"
        rows.append(f"| {variant} | {len(curves)} | " + " | ".join(cells) + " | "
                    + " / ".join(f"{v:.4f}" for v in first) + f" | {shift} |")
    lines += rows
    if released:  # the released code's curve was measured on ml-100k only
        cells = " | ".join(f"{v:.4f}" for v in RELEASED[:epochs]) + " | -" * max(0, epochs - len(RELEASED))
        lines.append(f"| released code (seed 2025, CPU) | 1 | {cells} | {RELEASED[0]:.4f} | |")
    return "\n".join(lines) + "\n"


def data_facts(data) -> str:
    """The data facts behind two switches, as text: the share of zero within-user gaps with
    exact and with float32 timestamps (``timestamps=float32``), and per feature modality the
    share of the items' energy in their mean direction (what ``feature_transform=centre``
    removes): n |mean|^2 / sum |x|^2 over the items that have the modality. ``data``: a
    prepared dataset's name or folder, or a loaded Dataset."""
    ds = load_dataset(data) if isinstance(data, (str, Path)) else data
    inter = ds.interactions  # sorted by (user, timestamp, item), as every prepared dataset
    users = inter["user"].to_numpy()
    same = users[1:] == users[:-1]
    stored = inter["timestamp"].to_numpy().astype(np.float32).astype(np.float64)
    lines = [f"{ds.name}: {int(same.sum())} within-user gaps (consecutive interactions, time order)",
             f"  zero gaps, exact seconds: {ds.stats['zero_gap_share']:.2%}",  # preprocess's own statistic
             f"  zero gaps, float32 seconds: {float((np.diff(stored)[same] == 0).mean()):.2%}"]
    for name, modality in ds.modalities.items():
        have = modality.available.astype(bool).copy()
        have[0] = False
        x = modality.features[have].astype(np.float64)
        mean = x.mean(axis=0)
        share = len(x) * float(mean @ mean) / float((x * x).sum()) if len(x) else float("nan")
        lines.append(f"  {name} features ({x.shape[1]} columns, {len(x)} items): {share:.1%} of the energy "
                     f"in the mean direction")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Variants: " + ", ".join(VARIANTS),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml-100k", help="prepared dataset name or folder (default ml-100k)")
    p.add_argument("--variants", default=",".join(DEFAULT),
                   help="comma-separated variant names (default: all but released_all and lr_2e-3)")
    p.add_argument("--seeds", default="2025,2026,2027", help="comma-separated seeds (default 2025,2026,2027)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    p.add_argument("--device", default="cpu", help="torch device of every run (default cpu)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's choice)")
    p.add_argument("--out", default="runs/fidelity-screen", help="parent folder of the runs and screen.md")
    p.add_argument("--list", action="store_true", help="print each variant's preset and settings, then stop")
    p.add_argument("--summary-only", action="store_true", help="train nothing: print the table of the finished runs")
    p.add_argument("--data-facts", action="store_true",
                   help="train nothing: print the zero-gap shares (exact and float32 timestamps) and each "
                        "feature modality's energy in its mean direction, then stop")
    p.add_argument("--table", help="file the table is written to (default: --out/screen.md after training; "
                                   "with --summary-only, nothing unless given)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.epochs < 1 or args.jobs < 1:
        p.error("--epochs and --jobs must be >= 1")
    if args.data_facts:
        print(data_facts(args.data))
        return 0
    if args.list:
        for v in variants:
            preset, sets = VARIANTS[v]
            print(f"{v:28s} --model {preset} " + " ".join(f"--set {k}={x}" for k, x in sets.items()))
        return 0
    out = Path(args.out)
    todo = [(v, s) for s in seeds for v in variants if not finished(out / v / f"seed-{s}", args.epochs, v)]
    if todo and not args.summary_only:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        data_hash = read_manifest(args.data)["data_hash"]
        print(f"[fidelity] {len(todo)} runs of {args.epochs} epoch(s), {args.jobs} at a time, on {args.device}",
              flush=True)
        t0, failed = time.perf_counter(), []

        def run(v: str, s: int) -> tuple[int, str]:
            folder = out / v / f"seed-{s}"
            folder.mkdir(parents=True, exist_ok=True)
            resume = resumable(folder, v, data_hash)  # a killed run, or a shorter screen's run: continued
            with open(folder / "train.log", "a" if resume else "w") as log:
                return subprocess.run(command(v, s, args, resume), cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT).returncode, str(folder / "train.log")

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run, v, s): (v, s) for v, s in todo}
            for done, future in enumerate(as_completed(futures), 1):
                (v, s), (rc, log) = futures[future], future.result()
                status = "ok" if rc == 0 else f"FAILED (exit {rc}; see {log})"
                if rc:
                    failed.append(f"{v} seed {s}")
                print(f"[fidelity] {done}/{len(todo)} {v} seed {s}: {status} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if failed:
            print(f"[fidelity] failed: {', '.join(failed)}", file=sys.stderr)
    text = summarise(out, variants, seeds, args.epochs, released=Path(args.data).name == "ml-100k")
    table = Path(args.table) if args.table else (None if args.summary_only else out / "screen.md")
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        tmp = table.with_name(table.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(table)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
