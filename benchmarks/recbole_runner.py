"""Train RecBole 1.2.1's SASRec on one atomic dataset and write its timings as JSON.

This script runs INSIDE the peer environment (``.bench/recbole-venv``, made by
:func:`benchmarks.recbole_peer.ensure_env`), never in the workbench's: it imports RecBole, the
workbench does not. :mod:`benchmarks.recbole_peer` starts it as a subprocess and reads its
JSON. The module level uses the standard library only, so the pure functions below
(:func:`sasrec_config`, :func:`should_stop`) can be imported and tested without RecBole.

What it does, in order: builds RecBole's dataset and dataloaders (time order, leave-one-out
``valid_and_test``, full ranking), builds SASRec with the configuration of
:func:`sasrec_config`, then trains epoch by epoch with RecBole's own ``Trainer``: each epoch
is its ``_train_epoch`` (timed alone: the epoch time) followed by its ``_valid_epoch`` (timed
alone), and the wall time since the start of training is taken after the validation. It stops
after the epoch whose validation first reaches the target NDCG@20, or after ``--max-epochs``,
or after the epoch that passes ``--max-seconds``. Then it times the validation evaluation alone
(median of ``--eval-repeats``) and records RecBole's own validation targets (user and item
tokens) so the caller can check they are the workbench's.

Two things of RecBole 1.2.1 do not run as released on numpy 2 / torch 2.13; both are handled
here, in this process only, never by editing installed files:

- its ``Config`` restores numpy's old aliases (``np.float = np.float_``, ``np.long``, ...; its
  NDCG and MRR allocate with ``dtype=np.float``) from ``np.float_``, ``np.complex_`` and
  ``np.unicode_``, which numpy 2 removed: before RecBole is imported those three are set to
  what they were in numpy 1 (float64, complex128, str_), in this process only;
- ``Trainer.fit``/``evaluate(load_best_model=True)`` save and reload checkpoints with
  ``torch.load``, whose default ``weights_only=True`` (torch >= 2.6) refuses RecBole's pickled
  config: this runner never calls them. It calls ``_train_epoch`` and ``_valid_epoch`` itself
  (what ``fit`` does per epoch, without the checkpoint saving that would only add disk time)
  and ``evaluate(load_best_model=False)``.

Under pandas 3 (copy on write) RecBole's ``fillna(inplace=True)`` on a column fills nothing;
the converted file has no missing value, so nothing is lost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def sasrec_config(dataset: str, data_path: str, work_dir: str, *, threads: int, seed: int,
                  max_epochs: int) -> dict:
    """RecBole's config_dict for the peer: SASRec as the bench compares it (CE loss over the whole
    catalogue, hidden 64, 2 layers, 2 heads, dropout 0.5, batch 1024, lr 1e-3, max length 50,
    full ranking, NDCG@20 for validation) on ``<data_path>/<dataset>/<dataset>.inter``, with
    RecBole's own filtering made a no-op (the atomic file is already the workbench's 5-core data)."""
    return {
        # data: the converted file as is
        "data_path": data_path,
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "val_interval": None, "rm_dup_inter": None, "filter_inter_by_user_or_item": False,
        "MAX_ITEM_LIST_LENGTH": 50,
        # SASRec
        "model": "SASRec", "loss_type": "CE", "train_neg_sample_args": None,
        "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2,
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "initializer_range": 0.02,
        # training and evaluation
        "epochs": max_epochs, "train_batch_size": 1024, "eval_batch_size": 2048, "learning_rate": 1e-3,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["NDCG", "Hit", "MRR"], "topk": [10, 20], "valid_metric": "NDCG@20",
        "seed": seed, "reproducibility": True, "device": "cpu", "use_gpu": False, "gpu_id": "",
        "worker": 0, "nproc": 1, "show_progress": False, "saved": False, "save_dataset": False,
        "save_dataloaders": False, "log_wandb": False,
        # RecBole writes its tensorboard events and (unused) checkpoint folder here, not in the repo
        "checkpoint_dir": os.path.join(work_dir, "saved"),
        "threads": threads,  # not a RecBole key: recorded with the config, applied via torch.set_num_threads
    }


def should_stop(epoch: int, seconds_since_start: float, ndcg20: float, *, target: float,
                max_epochs: int, max_seconds: float) -> str | None:
    """Why training stops after ``epoch`` (1-based), or None to go on: ``"target"`` once the
    validation NDCG@20 reaches ``target`` (the time to target is then known), ``"max_epochs"``,
    or ``"max_seconds"`` once the wall time since the start of training passed the budget."""
    if ndcg20 >= target:
        return "target"
    if epoch >= max_epochs:
        return "max_epochs"
    if seconds_since_start >= max_seconds:
        return "max_seconds"
    return None


def _write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def recbole_data(args: argparse.Namespace, *, seed: int, max_epochs: int):
    """RecBole set up as the peer runs it: numpy-2 aliases, torch threads, the working
    folder, our SASRec configuration on ``args.dataset``, and its split. Returns (recbole,
    config, cfg, (train, valid, test) loaders). Shared by this runner and
    ``recbole_topk_runner.py``."""
    import numpy as np
    # numpy 2 removed these aliases; RecBole's Config.compatibility_settings reads them to
    # define np.float, np.long and others, which its metrics and layers use (module docstring)
    for alias, dtype in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, alias):
            setattr(np, alias, dtype)
    import torch
    torch.set_num_threads(args.threads)
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # RecBole writes log_tensorboard/ into the working directory
    cfg = sasrec_config(args.dataset, args.data_path, str(work), threads=args.threads, seed=seed,
                        max_epochs=max_epochs)
    sys.argv = sys.argv[:1]  # RecBole's Config reads "--key=value" from the command line: ours are not for it
    config = Config(model="SASRec", dataset=args.dataset, config_dict=cfg)
    expected = os.path.realpath(os.path.join(args.data_path, args.dataset))
    if os.path.realpath(config["data_path"]) != expected:  # RecBole swaps in its own copy of "ml-100k"
        raise SystemExit(f"RecBole reads {config['data_path']}, not {expected}: rename the dataset")
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    return recbole, config, cfg, data_preparation(config, dataset)


def run(args: argparse.Namespace) -> dict:
    """Build, train and time RecBole's SASRec (see the module docstring); returns the record."""
    t_setup = time.perf_counter()
    recbole, config, cfg, (train_data, valid_data, _test_data) = recbole_data(args, seed=args.seed,
                                                                              max_epochs=args.max_epochs)
    import numpy as np
    import torch
    from recbole.model.sequential_recommender.sasrec import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])  # as RecBole's run_recbole does before the model
    model = SASRec(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    setup_seconds = time.perf_counter() - t_setup

    epochs: list[dict] = []
    stop = None
    t_start = time.perf_counter()
    epoch = 0
    while stop is None:
        epoch += 1
        t0 = time.perf_counter()
        loss = trainer._train_epoch(train_data, epoch - 1, show_progress=False)
        t1 = time.perf_counter()
        _score, result = trainer._valid_epoch(valid_data, show_progress=False)
        t2 = time.perf_counter()
        ndcg20 = float(result["ndcg@20"])
        row = {"epoch": epoch, "train_seconds": t1 - t0, "valid_seconds": t2 - t1,
               "seconds_since_start": t2 - t_start, "loss": float(loss),
               **{f"valid_{k}": float(v) for k, v in result.items()}}
        epochs.append(row)
        print(f"[recbole] epoch {epoch}: train {row['train_seconds']:.1f} s, valid {row['valid_seconds']:.2f} s, "
              f"NDCG@20 {ndcg20:.4f}", file=sys.stderr, flush=True)
        stop = should_stop(epoch, row["seconds_since_start"], ndcg20, target=args.target,
                           max_epochs=args.max_epochs, max_seconds=args.max_seconds)

    eval_times = []
    for _ in range(args.eval_repeats):
        t = time.perf_counter()
        trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
        eval_times.append(time.perf_counter() - t)

    ds = valid_data._dataset
    uid, iid = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    users = ds.id2token(uid, ds.inter_feat[uid].numpy())
    items = ds.id2token(iid, ds.inter_feat[iid].numpy())
    reached = next((r for r in epochs if r["valid_ndcg@20"] >= args.target), None)
    return {
        "recbole_version": recbole.__version__, "torch_version": torch.__version__,
        "numpy_version": np.__version__, "python_version": sys.version.split()[0],
        "threads": torch.get_num_threads(), "dataset": args.dataset,
        "setup_seconds": setup_seconds, "epochs": epochs, "stopped_because": stop,
        "target_ndcg@20": args.target, "reached_target": reached is not None,
        "seconds_to_target": reached["seconds_since_start"] if reached else None,
        "epochs_to_target": reached["epoch"] if reached else None,
        "eval_users": len(ds), "eval_seconds_all": eval_times,
        "eval_seconds_median": statistics.median(eval_times) if eval_times else None,
        "valid_targets": [[str(u), str(i)] for u, i in zip(users, items)],
        "config": {k: v for k, v in cfg.items() if k not in ("data_path", "checkpoint_dir")},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="folder holding <dataset>/<dataset>.inter")
    p.add_argument("--dataset", required=True, help="the atomic dataset's name")
    p.add_argument("--out", required=True, help="JSON file to write (atomically)")
    p.add_argument("--work-dir", required=True, help="RecBole's working folder (tensorboard events)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the bench's)")
    p.add_argument("--seed", type=int, default=2025, help="RecBole's seed (default 2025)")
    p.add_argument("--max-epochs", type=int, default=3, help="epoch cap (default 3)")
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="stop after the epoch that passes this wall time since the start of training")
    p.add_argument("--target", type=float, default=0.0864, help="validation NDCG@20 that stops training")
    p.add_argument("--eval-repeats", type=int, default=5, help="timed validation evaluations after training")
    args = p.parse_args(argv)
    if args.max_epochs < 1 or args.threads < 1 or args.eval_repeats < 1:
        p.error("--max-epochs, --threads and --eval-repeats must be >= 1")
    _write_json_atomic(Path(args.out), run(args))


if __name__ == "__main__":
    main()
