"""The training loop (paper section 5 protocol).

Each step runs in a fixed order: learning rate -> step (forward, backward, clip,
optimiser step: :class:`hm4sr_core.steps.TrainingStep`, in the form the config asks
for) -> log. Each epoch then: evaluate on validation -> select (early-stopping
bookkeeping) -> checkpoint (:class:`hm4sr_core.runs.Run`) -> stop. The test split is
scored once, by the best checkpoint, after training stops.

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

import itertools
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed, steps
from .config import LOSS_NAMES, ModelConfig, SplitConfig, TrainConfig
from .data.schema import Dataset
from .data.splits import Split, build_split, iterate_batches
from .evaluate import evaluate
from .model import HM4SR, build_model
from .runs import Progress, Run, TrainResult
from .sampling import StepSampler


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
    ``per_user_valid.parquet``, ``steps.csv`` and ``epochs.csv`` are written
    (:class:`hm4sr_core.runs.Run`). ``on_epoch`` receives each epoch row (for live plots
    in notebooks). ``test=False`` (a hyper-parameter search, :mod:`hm4sr_core.tune`)
    never touches ``split.test``: no test scores, no split hash, ``result.test`` is None,
    and no run folder may be written (``out_dir`` must be None).
    """
    ranks = distributed.current()
    if not test and out_dir is not None:
        raise ValueError("train(test=False) writes no run folder: a run folder holds test scores")
    if ranks.active:
        config.check_distributed(ranks.world)
    device = _device(config, ranks)
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
    take_step = steps.TrainingStep(model, net, optimizer, config, ranks, device,
                                   StepSampler.for_model(model, popularity))
    scoring = dict(history=split.train_history() if config.mask_history else None, device=device,
                   time_origin=int(dataset.stats["first_timestamp"]), ranks=ranks)
    run = Run(Path(out_dir) if out_dir is not None else None, dataset, data_hash, model_config, config, ranks)
    state = run.resume(model, optimizer) if resume else Progress()
    batch_size, n_batches, last_epoch = _epoch_plan(config, len(train_part))
    first_epoch = state.epoch + 1 if not state.stopped(config.patience) else last_epoch + 1  # resumed: had it stopped?
    for epoch in range(first_epoch, last_epoch + 1):
        model.train()
        gen = _epoch_generator(config.seed, epoch)
        draws = gen if not ranks.active else \
            torch.Generator().manual_seed(distributed.draw_seed(config.seed, epoch, ranks.rank))
        t0, sums = time.perf_counter(), {}
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}", disable=not progress, leave=False)
        batches = iterate_batches(train_part, batch_size, shuffle=True, generator=gen, bucket=config.bucket_by_length)
        for batch in itertools.islice(batches, n_batches):  # learning rate -> step -> log
            _set_learning_rate(optimizer, config, state.step, n_batches)
            result, batch = take_step(batch, generator=draws)
            _log_step(state, sums, result, model, batch, optimizer, config.log_every, epoch, t0)
            bar.update(1)
            bar.set_postfix(loss=f"{float(result.loss.detach()):.3f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_seconds": train_seconds, **{f"loss_{k}": v / max(n_batches, 1)
                                                                 for k, v in sums.items()}}
        if epoch % config.eval_every == 0 or epoch == last_epoch:  # evaluate -> select
            valid = evaluate(model, split.valid, config, **scoring)
            row.update({f"valid_{k}": v for k, v in valid.metrics.items()})
            state.select(epoch, valid.metrics[config.valid_metric], model)
        row["seconds_since_start"] = (state.epochs[-1]["seconds_since_start"] if state.epochs else 0.0) + \
            (time.perf_counter() - t0)
        state.epochs.append(row)
        state.epoch = epoch
        if progress:
            tqdm.write(f"epoch {epoch}: loss {sum(sums.values()) / max(n_batches, 1):.4f}  "
                       f"valid {config.valid_metric} {row.get('valid_' + config.valid_metric, float('nan')):.4f}  "
                       f"({train_seconds:.1f} s)")
        run.save(model, optimizer, state)  # checkpoint
        if on_epoch is not None:  # after the checkpoint: a callback that interrupts loses nothing
            on_epoch(row)
        if state.stopped(config.patience):  # stop
            break

    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    valid = evaluate(model, split.valid, config, popularity=popularity, **scoring)
    scored = evaluate(model, split.test, config, popularity=popularity, **scoring) if test else None
    return run.finish(model, valid, scored, split.hash() if test else None, state)  # the hash digests split.test


def _device(config: TrainConfig, ranks: distributed.Ranks) -> torch.device:
    """This process's device, with ``config.threads`` set; warns when ``amp`` would
    emulate bf16 on a CPU without bf16 units."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = distributed.rank_device(config.device, ranks)
    if config.amp and device.type == "cpu" and not _cpu_has_bf16():
        warnings.warn("amp=true on a CPU without bf16 units (AVX-512 BF16 / AMX): autocast emulates bf16 "
                      "there and is likely slower than float32", stacklevel=3)
    return device


def _epoch_plan(config: TrainConfig, examples: int) -> tuple[int, int, int]:
    """Batch size, batches per epoch (``max_steps_per_epoch`` at most) and the last epoch
    (``epochs``; with a cosine over ``lr_decay_epochs`` epochs, its end: the rate is 0
    after it, nothing is left to learn)."""
    batch_size = config.batch_size if config.mode == "prefix" else config.dense_batch_size
    n_batches = (examples + batch_size - 1) // batch_size
    if config.max_steps_per_epoch:
        n_batches = min(n_batches, config.max_steps_per_epoch)
    last_epoch = config.epochs
    if config.lr_schedule == "cosine" and config.lr_decay_epochs:
        last_epoch = min(last_epoch, config.lr_decay_epochs)
    return batch_size, n_batches, last_epoch


def _set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, steps_per_epoch: int) -> None:
    """Step ``step``'s rate (:func:`learning_rate`) into the optimiser, unless the rate is
    constant (then the optimiser keeps its own: ``lr``, or a resumed run's)."""
    if config.lr_schedule != "constant" or config.warmup_epochs > 0:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, steps_per_epoch)


def _log_step(state: Progress, sums: dict[str, float], result, model: HM4SR, batch, optimizer: torch.optim.Optimizer,
              log_every: int, epoch: int, started: float) -> None:
    """Add the step's losses to the epoch's ``sums``; every ``log_every``-th step, a row of
    the step history (losses, rate, gate statistics)."""
    for k, v in result.losses.items():
        sums[k] = sums.get(k, 0.0) + float(v.detach())
    if state.step % log_every == 0:
        row = _step_row(result, model, batch, optimizer.param_groups[0]["lr"])
        row.update(step=state.step, epoch=epoch, seconds=time.perf_counter() - started)
        state.steps.append(row)
    state.step += 1


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
