"""Training loop, checkpoints and run folders (paper section 5 protocol).

The loop runs in a fixed order each epoch: batches (forward -> backward -> clip ->
step -> log) -> validation -> early-stopping bookkeeping -> checkpoint. The test split
is scored once, by the best checkpoint, after training stops.

Reproducibility on CPU: the batch order and placeholder positions come from a
generator seeded by (seed, epoch); dropout draws from torch's global generator, whose
state is saved in every checkpoint, so ``resume`` continues a killed run exactly.

Inside a torch.distributed process group (``hm4sr train --nproc N``, torchrun) the same
loop trains data-parallel (DDP): every rank draws the same batch order and trains on its
shard of each global batch, evaluation is split over the ranks and gathered, and only
rank 0 writes files (:mod:`hm4sr_core.distributed`; docs/guide.md, "Distributed
training"). Rank r > 0 draws dropout from torch seeded with seed + r; every rank draws
placeholder positions and sampled-softmax negatives from a generator seeded by (seed, epoch, rank).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import shutil
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from . import atomic, distributed, provenance, steps
from .config import LOSS_NAMES, ModelConfig, SplitConfig, TrainConfig
from .data.schema import Dataset
from .data.splits import Split, build_split, iterate_batches
from .data.store import write_json_atomic
from .evaluate import EvalResult, evaluate
from .model import HM4SR, build_model
from .sampling import StepSampler

CHECKPOINT_VERSION = 1


@dataclass
class TrainResult:
    """What :func:`train` returns (and writes into ``out_dir`` when given)."""

    model: HM4SR
    valid: EvalResult  # best checkpoint on validation
    test: EvalResult | None  # best checkpoint on test, scored once; None when trained with test=False (a search)
    steps: pd.DataFrame  # one row per logged step
    epochs: pd.DataFrame  # one row per epoch
    best_epoch: int
    epochs_run: int
    seconds_per_epoch: float  # median training seconds per epoch (evaluation excluded)
    record: dict = field(default_factory=dict)  # the results.json payload


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def initial_model(dataset: Dataset, model_config: ModelConfig, seed: int) -> HM4SR:
    """The model :func:`train` starts from for this configuration and seed, before any step:
    the "untrained" control of a trained model (same config, same seed, no training).
    Seeds torch and numpy as :func:`train` does."""
    set_seed(seed)
    return build_model(model_config, dataset)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def gate_statistics(gates: torch.Tensor, real: torch.Tensor) -> tuple[float, np.ndarray]:
    """Mean gate entropy (nats) and mean load per expert over real positions.

    gates (..., E) with the position axes matching ``real``'s leading axes."""
    g = gates[real].float()  # (n, ..., E); bf16 under CPU autocast
    g = g.reshape(-1, g.shape[-1])
    entropy = float(-(g * torch.log(g.clamp_min(1e-12))).sum(-1).mean())
    return entropy, g.mean(0).cpu().numpy()


def _step_row(out, model: HM4SR, batch, lr: float) -> dict:
    weights = model.config.loss_weights
    row = {"lr": lr, "loss": float(out.loss.detach())}
    for name in LOSS_NAMES:
        if name in out.losses:
            value = float(out.losses[name].detach())
            row[f"loss_{name}"] = value
            row[f"weighted_{name}"] = weights[name] * value
    real = batch.items > 0
    if out.interactive_gates is not None:
        ent, load = gate_statistics(out.interactive_gates.detach(), real)
        row["interactive_entropy"] = ent
        row.update({f"interactive_load_{k}": float(v) for k, v in enumerate(load)})
        row.update({f"lambda_{s}": float(v) for s, v in zip(model.stream_names, out.lambdas)})
    if out.temporal_gates is not None:
        ent, load = gate_statistics(out.temporal_gates.detach(), real)
        row["temporal_entropy"] = ent
        row.update({f"temporal_load_{k}": float(v) for k, v in enumerate(load)})
    return row


def _atomic_torch_save(payload: dict, path: Path) -> None:
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


CHECKPOINT_KEYS = ("checkpoint_version", "model_config", "train_config", "data_hash")  # what every reader needs
RESUME_KEYS = ("model_state", "optimizer_state", "best_state", "rng_state", "steps", "epochs", "epoch", "best_metric",
               "best_epoch", "bad_epochs")  # what --resume needs besides


def require_keys(payload: dict, keys: tuple[str, ...], path: str | Path) -> dict:
    """``payload``, or ValueError naming ``path`` and the keys it lacks."""
    missing = [key for key in keys if key not in payload]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; expected a checkpoint written by `hm4sr train`")
    return payload


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`train` (``weights_only=True``: no code runs).

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


def item_popularity(split: Split, num_items: int) -> np.ndarray:
    """(N+1,) training interaction counts per item. Every training interaction but a
    user's first is the target of one prefix example, and the first is the input of the
    user's length-1 prefix. (Dense windows would count each window boundary twice: a
    later window's first input is the previous window's last target.) Read in chunks of
    rows: the prefix layout is not built for it (dense training never builds it)."""
    counts = np.zeros(num_items + 1, np.int64)
    for cols in split.columns("train_prefix", ("first_items", "lengths", "targets")):
        seen = np.concatenate([cols["first_items"][cols["lengths"] == 1], cols["targets"]])
        counts += np.bincount(seen, minlength=num_items + 1)
    return counts.astype(np.float64)


def _cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 units oneDNN uses (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train(dataset: Dataset, model_config: ModelConfig = ModelConfig(), config: TrainConfig = TrainConfig(), *,
          out_dir: str | Path | None = None, data_hash: str = "", resume: bool = False,
          progress: bool = True, split: Split | None = None,
          on_epoch: Callable[[dict], None] | None = None, test: bool = True) -> TrainResult:
    """Train ``model_config`` on ``dataset`` with early stopping on validation; test once.

    With ``out_dir`` every epoch writes ``last.pt`` (for ``resume``) and improvements
    write ``best.pt``; at the end ``results.json``, ``per_user_test.parquet``,
    ``per_user_valid.parquet``, ``steps.csv`` and ``epochs.csv`` are written.
    ``on_epoch`` receives each epoch row (for live plots in notebooks).
    ``test=False`` (a hyper-parameter search, :mod:`hm4sr_core.tune`) never touches
    ``split.test``: no test scores, no split hash, ``result.test`` is None, and no run
    folder may be written (``out_dir`` must be None).
    """
    from tqdm.auto import tqdm

    ranks = distributed.current()
    if not test and out_dir is not None:
        raise ValueError("train(test=False) writes no run folder: a run folder holds test scores")
    if ranks.active and config.micro_batches > 1:
        raise ValueError(f"micro_batches={config.micro_batches} is for one process; with {ranks.world} ranks each "
                         f"already holds 1/{ranks.world} of a batch (set micro_batches=1)")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = distributed.rank_device(config.device, ranks)
    if config.amp and device.type == "cpu" and not _cpu_has_bf16():
        warnings.warn("amp=true on a CPU without bf16 units (AVX-512 BF16 / AMX): autocast emulates bf16 "
                      "there and is likely slower than float32", stacklevel=2)
    out = Path(out_dir) if out_dir is not None else None
    progress = progress and ranks.main
    split = split or build_split(dataset, SplitConfig(kind=config.split, max_length=model_config.max_length))
    # Seeds torch and numpy; building the split draws no random numbers.
    model = initial_model(dataset, model_config, config.seed).to(device).recompute_activations(config.recompute)
    if ranks.rank > 0:
        torch.manual_seed(config.seed + ranks.rank)  # every rank starts from the same weights, but its own dropout
    net = distributed.wrap_model(model, device) if ranks.active else model
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                 weight_decay=config.weight_decay)
    train_part = split.train(config.mode)
    popularity = item_popularity(split, dataset.num_items)  # also the sampled softmax's popularity proposal
    take_step = steps.TrainingStep(model, net, optimizer, config, ranks, device, StepSampler.for_model(model, popularity))
    history = split.train_history() if config.mask_history else None
    origin = int(dataset.stats["first_timestamp"])

    steps_rows: list[dict] = []
    epoch_rows: list[dict] = []
    best_metric, best_epoch, best_state, bad_epochs, start_epoch, step = -1.0, 0, None, 0, 1, 0
    resumed_world = None  # processes that wrote the resumed checkpoint, when not this run's number
    if resume:
        if out is None or not (out / "last.pt").exists():
            raise FileNotFoundError(f"resume: no last.pt in {out}")
        ck = require_keys(load_checkpoint(out / "last.pt"), RESUME_KEYS, out / "last.pt")
        if ck["data_hash"] != data_hash:
            raise ValueError(f"resume: {out / 'last.pt'} was trained on data {ck['data_hash'][:12]}, "
                             f"this dataset is {data_hash[:12]}")
        saved_config = TrainConfig.from_dict(ck["train_config"])
        if ModelConfig.from_dict(ck["model_config"]) != model_config or _resumable(saved_config) != _resumable(config):
            raise ValueError(f"resume: {out / 'last.pt'} has a different configuration; "
                             f"use a new --out folder or the same settings")
        saved_epochs = saved_config.epochs
        if config.lr_schedule == "cosine" and not config.lr_decay_epochs and saved_epochs != config.epochs:
            raise ValueError(f"resume: {out / 'last.pt'} follows a cosine schedule over its {saved_epochs} epochs; "
                             f"epochs={config.epochs} would change the schedule mid-run (keep epochs={saved_epochs}, "
                             f"or start a new run with lr_decay_epochs set)")
        model.load_state_dict(ck["model_state"])
        optimizer.load_state_dict(ck["optimizer_state"])
        _restore_rng(ck, config.seed, ranks)
        if ck.get("world_size", 1) != ranks.world:
            resumed_world = ck.get("world_size", 1)
            if ranks.main:
                warnings.warn(f"resume: {out / 'last.pt'} was written by {resumed_world} process(es), this run has "
                              f"{ranks.world}: it goes on, but not as the uninterrupted run would have "
                              f"(the dropout streams and shards differ)", stacklevel=2)
        steps_rows, epoch_rows = _rows(ck["steps"]), _rows(ck["epochs"])
        best_metric, best_epoch, bad_epochs = ck["best_metric"], ck["best_epoch"], ck["bad_epochs"]
        best_state = ck["best_state"]
        start_epoch = ck["epoch"] + 1
        step = ck.get("step", len(steps_rows) * config.log_every)  # not len(steps) * log_every: only every log_every-th step has a row
        if bad_epochs >= config.patience:
            start_epoch = config.epochs + 1  # it had already stopped early

    batch_size = config.batch_size if config.mode == "prefix" else config.dense_batch_size
    n_batches = (len(train_part) + batch_size - 1) // batch_size
    if config.max_steps_per_epoch:
        n_batches = min(n_batches, config.max_steps_per_epoch)
    scheduled = config.lr_schedule != "constant" or config.warmup_epochs > 0
    last_epoch = config.epochs
    if config.lr_schedule == "cosine" and config.lr_decay_epochs:
        last_epoch = min(last_epoch, config.lr_decay_epochs)  # the rate is 0 after the cosine: nothing left to learn
    for epoch in range(start_epoch, last_epoch + 1):
        model.train()
        gen = _epoch_generator(config.seed, epoch)
        draws = gen if not ranks.active else \
            torch.Generator().manual_seed(distributed.draw_seed(config.seed, epoch, ranks.rank))
        t0 = time.perf_counter()
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}", disable=not progress, leave=False)
        sums: dict[str, float] = {}
        for i, batch in enumerate(iterate_batches(train_part, batch_size, shuffle=True, generator=gen,
                                                  bucket=config.bucket_by_length)):
            if i >= n_batches:
                break
            if scheduled:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config, step, n_batches)
            result, batch = take_step(batch, generator=draws)
            for k, v in result.losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if step % config.log_every == 0:
                row = _step_row(result, model, batch, optimizer.param_groups[0]["lr"])
                row.update(step=step, epoch=epoch, seconds=time.perf_counter() - t0)
                steps_rows.append(row)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(result.loss.detach()):.3f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_seconds": train_seconds}
        row.update({f"loss_{k}": v / max(n_batches, 1) for k, v in sums.items()})
        if epoch % config.eval_every == 0 or epoch == last_epoch:
            valid = evaluate(model, split.valid, config, history=history, device=device, time_origin=origin,
                             ranks=ranks)
            row.update({f"valid_{k}": v for k, v in valid.metrics.items()})
            metric = valid.metrics[config.valid_metric]
            if metric > best_metric:
                best_metric, best_epoch, bad_epochs = metric, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
        row["seconds_since_start"] = (epoch_rows[-1]["seconds_since_start"] if epoch_rows else 0.0) + \
            (time.perf_counter() - t0)
        epoch_rows.append(row)
        if progress:
            tqdm.write(f"epoch {epoch}: loss {sum(sums.values()) / max(n_batches, 1):.4f}  "
                       f"valid {config.valid_metric} {row.get('valid_' + config.valid_metric, float('nan')):.4f}  "
                       f"({train_seconds:.1f} s)")
        stop = bad_epochs >= config.patience
        if out is not None:
            payload = _checkpoint(model, optimizer, model_config, config, dataset.name, data_hash, steps_rows,
                                  epoch_rows, epoch, step, best_metric, best_epoch, bad_epochs, best_state)
            if ranks.active:  # every rank's dropout state, so resume continues each rank exactly
                payload["rng_states"] = distributed.gather_objects(torch.get_rng_state(), ranks)
                payload["world_size"] = ranks.world
            if ranks.main:
                _atomic_torch_save(payload, out / "last.pt")
                if best_epoch == epoch:
                    _atomic_torch_save(payload, out / "best.pt")
        if on_epoch is not None:  # after the checkpoint: a callback that interrupts loses nothing
            on_epoch(row)
        if stop:
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    valid = evaluate(model, split.valid, config, history=history, popularity=popularity, device=device,
                     time_origin=origin, ranks=ranks)
    scored = evaluate(model, split.test, config, history=history, popularity=popularity, device=device,
                      time_origin=origin, ranks=ranks) if test else None
    epochs_df = pd.DataFrame(epoch_rows)
    seconds = float(np.median(epochs_df["train_seconds"])) if len(epochs_df) else float("nan")
    record = {
        "valid": valid.metrics,
        "test": scored.metrics if scored is not None else None,
        "config": {"model": model_config.to_dict(), "train": config.to_dict()},
        "data_hash": data_hash,
        "split_hash": split.hash() if test else None,  # the hash digests the test part too
        "dataset": {"name": dataset.name, "stats": dataset.stats, "preprocessing": dataset.preprocessing},
        "protocol": {"split": config.split, "ranking": "full catalogue", "tie_policy": config.tie_policy,
                     "history_masked": config.mask_history, "eval_time": config.eval_time,
                     "model_selection": f"validation {config.valid_metric}, patience {config.patience}"},
        "epochs_run": int(len(epoch_rows)),
        "best_epoch": int(best_epoch),
        "seconds_per_epoch": seconds,
        "environment": provenance.environment(),
    }
    if ranks.active:
        record["distributed"] = {"world_size": ranks.world, "backend": distributed.backend(),
                                 "shards": "rows rank::world of each global batch",
                                 "contrastive_negatives": "within each rank's shard"}
    if resumed_world is not None:
        record["resumed_from_world_size"] = resumed_world
    result = TrainResult(model, valid, scored, pd.DataFrame(steps_rows), epochs_df, best_epoch,
                         len(epoch_rows), seconds, record)
    if out is not None and ranks.main:
        write_run(result, out)
    return result


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based, counted over the whole run):
    a linear warm-up over ``warmup_epochs`` (step s of W gets lr * (s + 1) / W), then
    ``lr`` (constant) or a half cosine from ``lr`` to 0 at the end of ``lr_decay_epochs``
    (0 = ``epochs``) epochs (``train`` stops there)."""
    warm = max(1, round(config.warmup_epochs * steps_per_epoch)) if config.warmup_epochs > 0 else 0
    if step < warm:
        return config.lr * (step + 1) / warm
    if config.lr_schedule == "constant":
        return config.lr
    total = (config.lr_decay_epochs or config.epochs) * steps_per_epoch
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# Settings a resumed run may change: how long to go on and how to run, not what is learnt.
RESUME_MAY_CHANGE = ("epochs", "patience", "threads", "device", "eval_batch_size", "log_every", "recompute")


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


def _checkpoint(model, optimizer, model_config, config, data_name, data_hash, steps_rows, epoch_rows, epoch,
                step, best_metric, best_epoch, bad_epochs, best_state) -> dict:
    return {
        "checkpoint_version": CHECKPOINT_VERSION,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "best_state": best_state if best_state is not None else model.state_dict(),
        "model_config": model_config.to_dict(),
        "train_config": config.to_dict(),
        "data_name": data_name,
        "data_hash": data_hash,
        "steps": _columns(steps_rows),
        "epochs": _columns(epoch_rows),
        "rng_state": torch.get_rng_state(),
        "epoch": epoch,
        "step": step,  # optimizer steps taken so far
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "bad_epochs": bad_epochs,
    }


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


# What train writes into a run folder; only these names' temporary files are ever removed there.
RUN_FILES = ("results.json", "per_user_test.parquet", "per_user_valid.parquet", "steps.csv", "epochs.csv",
             "best.pt", "last.pt")


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
