"""Run folders and checkpoints: what :func:`hm4sr_core.train.train` writes, reads back and
resumes from.

A run folder (``hm4sr train --out``) holds ``last.pt`` (written every epoch, for
``--resume``), ``best.pt`` (the epoch that scored best on validation so far) and, once
the run ends, ``per_user_test.parquet``, ``per_user_valid.parquet``, ``steps.csv``,
``epochs.csv`` and ``results.json`` (written last: its presence means the run is
complete). Every file is written through :mod:`hm4sr_core.atomic`, so a kill never
leaves a half-written one in place; :func:`claim_run_folder` checks a folder before a
run writes into it and cleans up after a killed one.

A checkpoint is a dict of tensors and plain values (read with ``weights_only=True``):
the weights, the best weights, the optimiser and random states, both configurations,
the data hash and the run's :class:`Progress`.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import atomic, distributed, provenance
from .config import ModelConfig, TrainConfig
from .data.schema import Dataset
from .data.store import write_json_atomic
from .evaluate import EvalResult
from .model import HM4SR, build_model

CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("checkpoint_version", "model_config", "train_config", "data_hash")  # what every reader needs
RESUME_KEYS = ("model_state", "optimizer_state", "best_state", "rng_state", "steps", "epochs", "epoch", "best_metric",
               "best_epoch", "bad_epochs")  # what --resume needs besides
# Settings a resumed run may change: how long to go on and how to run, not what is learnt.
RESUME_MAY_CHANGE = ("epochs", "patience", "threads", "device", "eval_batch_size", "log_every", "recompute")
# What train writes into a run folder; only these names' temporary files are ever removed there.
RUN_FILES = ("results.json", "per_user_test.parquet", "per_user_valid.parquet", "steps.csv", "epochs.csv",
             "best.pt", "last.pt")


@dataclass
class TrainResult:
    """What :func:`hm4sr_core.train.train` returns (and writes into its run folder)."""

    model: HM4SR
    valid: EvalResult  # best checkpoint on validation
    test: EvalResult | None  # best checkpoint on test, scored once; None when trained with test=False (a search)
    steps: pd.DataFrame  # one row per logged step
    epochs: pd.DataFrame  # one row per epoch
    best_epoch: int
    epochs_run: int
    seconds_per_epoch: float  # median training seconds per epoch (evaluation excluded)
    record: dict = field(default_factory=dict)  # the results.json payload


@dataclass
class Progress:
    """Where a run stands: its history so far and the model selection's bookkeeping
    (what a checkpoint keeps besides the weights and the optimiser and random states)."""

    steps: list[dict] = field(default_factory=list)  # one row per logged step
    epochs: list[dict] = field(default_factory=list)  # one row per epoch
    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps taken
    best_metric: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None  # the best epoch's weights (None until an epoch is evaluated)
    bad_epochs: int = 0  # evaluations without improvement since the best
    resumed_world: int | None = None  # processes that wrote the resumed checkpoint, when not this run's number

    def select(self, epoch: int, metric: float, model: torch.nn.Module) -> None:
        """Keep the model of ``epoch`` when ``metric`` beats the best so far, else count a
        bad epoch."""
        if metric > self.best_metric:
            self.best_metric, self.best_epoch, self.bad_epochs = metric, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad_epochs += 1

    def stopped(self, patience: int) -> bool:
        """Whether early stopping ends the run: ``patience`` evaluations without improvement."""
        return self.bad_epochs >= patience


def save_checkpoint(payload: dict, path: Path) -> None:
    """``torch.save`` through a temporary file (:func:`hm4sr_core.atomic.write_via_temp`).

    torch reports a failed write (a full disk) as a RuntimeError from its C++ writer;
    it is raised as an OSError naming the file and the space left."""
    try:
        atomic.write_via_temp(path, lambda tmp: torch.save(payload, tmp))
    except RuntimeError as error:
        free = shutil.disk_usage(path.parent).free
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"{path}: the checkpoint could not be written ({first}); {free:,} bytes free on its "
                      f"file system; the previous {path.name} is kept") from None


def require_keys(payload: dict, keys: tuple[str, ...], path: str | Path) -> dict:
    """``payload``, or ValueError naming ``path`` and the keys it lacks."""
    missing = [key for key in keys if key not in payload]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; expected a checkpoint written by `hm4sr train`")
    return payload


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`hm4sr_core.train.train` (``weights_only=True``:
    no code runs).

    ValueError naming the file when it is not one: garbage, truncated, holding objects
    that are not tensors and plain values, not a dict, or missing a key."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: a folder; expected a checkpoint file (best.pt or last.pt of a run folder)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint file") from None
    except pickle.UnpicklingError as error:
        # torch's text suggests retrying with weights_only=False: never. Keep only its finding.
        text = str(error)
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0] if text.strip() else ""
        if "Unsupported global" in text:
            detail = detail.split(" was not an allowed global")[0]  # "Unsupported global: GLOBAL <module>.<name>"
            raise ValueError(f"{path}: holds objects other than tensors and plain values ({detail}), which are never "
                             f"loaded (loading them could run code); expected a checkpoint written by "
                             f"`hm4sr train`") from None
        raise ValueError(f"{path}: not a readable checkpoint ({detail or type(error).__name__}); expected a "
                         f"checkpoint written by `hm4sr train`") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({first}); expected a checkpoint written by "
                         f"`hm4sr train` (a truncated or damaged file: use the run's other checkpoint or "
                         f"train again)") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: holds a {type(payload).__name__}; expected a checkpoint dict written by "
                         f"`hm4sr train`")
    if payload.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint_version {payload.get('checkpoint_version')!r}, "
                         f"expected {CHECKPOINT_VERSION}")
    return require_keys(payload, CHECKPOINT_KEYS, path)


def model_from_checkpoint(payload: dict, dataset: Dataset, *, best: bool = True) -> HM4SR:
    """The model a checkpoint holds (its best weights, or with ``best=False`` its last),
    built on ``dataset``; ValueError when the weights do not fit."""
    cfg = ModelConfig.from_dict(payload["model_config"])
    model = build_model(cfg, dataset)
    key = "best_state" if best else "model_state"
    if key not in payload:
        raise ValueError(f"checkpoint of {payload.get('data_name')!r}: missing {key}; expected a checkpoint "
                         f"written by `hm4sr train`")
    try:
        model.load_state_dict(payload[key])
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"checkpoint of {payload.get('data_name')!r}: its weights do not fit the model its "
                         f"config builds on this dataset ({first})") from None
    return model


def _resumable(config: TrainConfig) -> dict:
    """The part of the training config that must match for ``resume``."""
    return {k: v for k, v in config.to_dict().items() if k not in RESUME_MAY_CHANGE}


def _rows(table: dict) -> list[dict]:
    """Columns-of-lists (what a checkpoint stores) back to rows."""
    if not table:
        return []
    n = len(next(iter(table.values())))
    return [{k: v[i] for k, v in table.items() if v[i] is not None} for i in range(n)]


def _columns(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r})
    return {k: [r.get(k) for r in rows] for k in keys}


def _restore_rng(ck: dict, seed: int, ranks: distributed.Ranks) -> None:
    """Torch's random state at the checkpoint: this rank's own when the checkpoint was
    written by as many ranks, else rank 0's (the other ranks reseed with seed + rank, so
    the run goes on, but not as it would have without the interruption)."""
    states = ck.get("rng_states")
    if ranks.active and states is not None and len(states) == ranks.world:
        torch.set_rng_state(states[ranks.rank])
    elif ranks.rank == 0:
        torch.set_rng_state(ck["rng_state"])
    else:
        torch.manual_seed(seed + ranks.rank)


@dataclass
class Run:
    """One training run's identity (data, configurations, processes) and its folder
    (``out``, or None for a run that writes nothing): its checkpoints, resume from them,
    and the record and tables it ends with."""

    out: Path | None
    dataset: Dataset
    data_hash: str
    model_config: ModelConfig
    config: TrainConfig
    ranks: distributed.Ranks

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Progress:
        """Load ``last.pt`` into ``model``, ``optimizer`` and torch's random state, and
        return the progress it holds. Refused (FileNotFoundError, ValueError naming the
        file) when there is none, or it was trained on other data or with other settings
        (besides :data:`RESUME_MAY_CHANGE`), or a cosine schedule would change length."""
        out, config = self.out, self.config
        if out is None or not (out / "last.pt").exists():
            raise FileNotFoundError(f"resume: no last.pt in {out}")
        path = out / "last.pt"
        ck = require_keys(load_checkpoint(path), RESUME_KEYS, path)
        if ck["data_hash"] != self.data_hash:
            raise ValueError(f"resume: {path} was trained on data {ck['data_hash'][:12]}, "
                             f"this dataset is {self.data_hash[:12]}")
        saved_config = TrainConfig.from_dict(ck["train_config"])
        if ModelConfig.from_dict(ck["model_config"]) != self.model_config or \
                _resumable(saved_config) != _resumable(config):
            raise ValueError(f"resume: {path} has a different configuration; "
                             f"use a new --out folder or the same settings")
        saved_epochs = saved_config.epochs
        if config.lr_schedule == "cosine" and not config.lr_decay_epochs and saved_epochs != config.epochs:
            raise ValueError(f"resume: {path} follows a cosine schedule over its {saved_epochs} epochs; "
                             f"epochs={config.epochs} would change the schedule mid-run (keep epochs={saved_epochs}, "
                             f"or start a new run with lr_decay_epochs set)")
        model.load_state_dict(ck["model_state"])
        optimizer.load_state_dict(ck["optimizer_state"])
        _restore_rng(ck, config.seed, self.ranks)
        resumed_world = None
        if ck.get("world_size", 1) != self.ranks.world:
            resumed_world = ck.get("world_size", 1)
            if self.ranks.main:
                warnings.warn(f"resume: {path} was written by {resumed_world} process(es), this run has "
                              f"{self.ranks.world}: it goes on, but not as the uninterrupted run would have "
                              f"(the dropout streams and shards differ)", stacklevel=3)
        steps_rows = _rows(ck["steps"])
        return Progress(steps_rows, _rows(ck["epochs"]), epoch=ck["epoch"],
                        # not len(steps) * log_every alone: only every log_every-th step has a row
                        step=ck.get("step", len(steps_rows) * config.log_every),
                        best_metric=ck["best_metric"], best_epoch=ck["best_epoch"], best_state=ck["best_state"],
                        bad_epochs=ck["bad_epochs"], resumed_world=resumed_world)

    def checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress) -> dict:
        """The checkpoint of the run as it stands."""
        return {
            "checkpoint_version": CHECKPOINT_VERSION,
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "best_state": progress.best_state if progress.best_state is not None else model.state_dict(),
            "model_config": self.model_config.to_dict(),
            "train_config": self.config.to_dict(),
            "data_name": self.dataset.name,
            "data_hash": self.data_hash,
            "steps": _columns(progress.steps),
            "epochs": _columns(progress.epochs),
            "rng_state": torch.get_rng_state(),
            "epoch": progress.epoch,
            "step": progress.step,  # optimizer steps taken so far
            "best_metric": progress.best_metric,
            "best_epoch": progress.best_epoch,
            "bad_epochs": progress.bad_epochs,
        }

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress) -> None:
        """Write ``last.pt``, and ``best.pt`` when this epoch is the best (nothing without a
        folder). Under DDP every rank must call it (the random states are gathered) and
        rank 0 writes."""
        if self.out is None:
            return
        payload = self.checkpoint(model, optimizer, progress)
        if self.ranks.active:  # every rank's dropout state, so resume continues each rank exactly
            payload["rng_states"] = distributed.gather_objects(torch.get_rng_state(), self.ranks)
            payload["world_size"] = self.ranks.world
        if self.ranks.main:
            save_checkpoint(payload, self.out / "last.pt")
            if progress.best_epoch == progress.epoch:
                save_checkpoint(payload, self.out / "best.pt")


    def record(self, valid: EvalResult, test: EvalResult | None, split_hash: str | None, progress: Progress,
               seconds_per_epoch: float) -> dict:
        """The results.json payload: scores, configurations, data, protocol, how the run
        went and where it ran (:func:`hm4sr_core.provenance.environment`)."""
        config = self.config
        record = {
            "valid": valid.metrics,
            "test": test.metrics if test is not None else None,
            "config": {"model": self.model_config.to_dict(), "train": config.to_dict()},
            "data_hash": self.data_hash,
            "split_hash": split_hash,  # None when the test part was never read (a search)
            "dataset": {"name": self.dataset.name, "stats": self.dataset.stats,
                        "preprocessing": self.dataset.preprocessing},
            "protocol": {"split": config.split, "ranking": "full catalogue", "tie_policy": config.tie_policy,
                         "history_masked": config.mask_history, "eval_time": config.eval_time,
                         "model_selection": f"validation {config.valid_metric}, patience {config.patience}"},
            "epochs_run": int(len(progress.epochs)),
            "best_epoch": int(progress.best_epoch),
            "seconds_per_epoch": seconds_per_epoch,
            "environment": provenance.environment(),
        }
        if self.ranks.active:
            record["distributed"] = {"world_size": self.ranks.world, "backend": distributed.backend(),
                                     "shards": "rows rank::world of each global batch",
                                     "contrastive_negatives": "within each rank's shard"}
        if progress.resumed_world is not None:
            record["resumed_from_world_size"] = progress.resumed_world
        return record

    def finish(self, model: HM4SR, valid: EvalResult, test: EvalResult | None, split_hash: str | None,
               progress: Progress) -> TrainResult:
        """The run's result; its folder's tables and results.json written (by rank 0)."""
        epochs = pd.DataFrame(progress.epochs)
        seconds = float(np.median(epochs["train_seconds"])) if len(epochs) else float("nan")
        result = TrainResult(model, valid, test, pd.DataFrame(progress.steps), epochs, progress.best_epoch,
                             len(progress.epochs), seconds, self.record(valid, test, split_hash, progress, seconds))
        if self.out is not None and self.ranks.main:
            write_run(result, self.out)
        return result


def per_user_frame(result: EvalResult) -> pd.DataFrame:
    """One row per evaluated user: every metric, then the user's top-k list as item ids
    ``top_1`` (best) .. ``top_k``, ranked as ``hm4sr recommend --at <part>`` ranks it
    (score descending, ties by the lower item id; 0 = no candidate left). Integer columns,
    not one list column, so the seed-averaging of per-user frames keeps working."""
    frame = pd.DataFrame({"user": result.users})
    for k, v in result.per_user.items():
        frame[k] = v
    for r in range(result.top_items.shape[1]):
        frame[f"top_{r + 1}"] = result.top_items[:, r].astype(np.int64)
    return frame


def write_run(result: TrainResult, out: Path) -> None:
    """Write a run folder's tables and results.json (results last: its presence means done)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in (("per_user_test.parquet", per_user_frame(result.test)),
                        ("per_user_valid.parquet", per_user_frame(result.valid))):
        atomic.write_via_temp(out / name, lambda tmp, frame=frame: frame.to_parquet(tmp, index=False))
    for name, frame in (("steps.csv", result.steps), ("epochs.csv", result.epochs)):
        atomic.write_via_temp(out / name, lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    write_json_atomic(out / "results.json", result.record)


def claim_run_folder(out: str | Path, resume: bool) -> list[str]:
    """Check ``out`` before a run writes into it (call under its lock,
    :func:`hm4sr_core.atomic.target_lock`); return what was recovered, one phrase each.

    ``out`` must be a new or empty folder, or, with ``resume``, a run folder. A file, or a
    non-empty folder without ``resume``, is refused (ValueError naming it and what is
    there): a run never replaces files it did not write. Temporary files a killed run
    left are removed first; with ``resume`` a complete temporary ``last.pt`` (killed
    between writing and renaming it) newer than ``last.pt`` takes its place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: an existing file; expected a folder for the run (new, empty, or with "
                         f"--resume the run to continue)")
    recovered = []
    if resume:
        recovered += _promote_checkpoint(out)
    removed = atomic.remove_temp_files(out, RUN_FILES)
    recovered += [f"removed {p.name} in {out}, left by an interrupted write" for p in removed]
    if not resume and out.is_dir():
        there = sorted(p.name for p in out.iterdir())
        if there:
            shown = ", ".join(there[:4]) + (f" and {len(there) - 4} more" if len(there) > 4 else "")
            raise ValueError(f"--out {out}: the folder is not empty ({shown}); expected a new or empty folder, "
                             f"or --resume to continue the run in it. Nothing was trained or written")
    return recovered


def _promote_checkpoint(out: Path) -> list[str]:
    """A complete temporary last.pt newer than last.pt (or in its absence) becomes last.pt."""
    current = out / "last.pt"
    try:
        epoch = require_keys(load_checkpoint(current), RESUME_KEYS, current)["epoch"] if current.exists() else 0
    except ValueError:
        epoch = 0
    for tmp in atomic.temp_files(out, ("last.pt",)).get("last.pt", []):
        try:
            candidate = require_keys(load_checkpoint(tmp), RESUME_KEYS, tmp)
        except (ValueError, OSError):
            continue  # cut short: removed with the other temporary files
        if candidate["epoch"] > epoch:
            os.replace(tmp, current)
            return [f"recovered {current} (epoch {candidate['epoch']}) from the complete copy an interrupted "
                    f"write left"]
        break
    return []
