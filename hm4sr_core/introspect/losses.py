"""Each named loss per step and its share of the weighted total (from a run's step log),
and how hard each loss pulls on the weights the losses share (docs/model.md section 3)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..config import LOSS_NAMES
from ..data.splits import SequenceBatch
from ..model import HM4SR
from ..sampling import StepSampler
from ._common import model_device


def loss_table(steps_df: pd.DataFrame) -> pd.DataFrame:
    """Each named loss per logged step, long format.

    Args:
        steps_df: ``TrainResult.steps`` (or a run's steps.csv): columns step, epoch,
            loss_<name>, weighted_<name>.
    Returns:
        One row per (step, task): step, epoch, task, value (unweighted), weighted,
        share (weighted / sum of the weighted losses at that step; NaN where that sum is 0).
        Tasks keep the order of ``LOSS_NAMES``.
    """
    if "step" not in steps_df.columns:
        raise ValueError(f"loss_table: steps_df needs a 'step' column; has {list(steps_df.columns)}")
    tasks = [c[len("loss_"):] for c in steps_df.columns if c.startswith("loss_")]
    if not tasks:
        raise ValueError(f"loss_table: no loss_<name> columns in {list(steps_df.columns)}")
    tasks.sort(key=lambda t: (LOSS_NAMES.index(t) if t in LOSS_NAMES else len(LOSS_NAMES), t))
    frames = []
    for t in tasks:
        value = steps_df[f"loss_{t}"].astype(float)
        weighted = steps_df[f"weighted_{t}"].astype(float) if f"weighted_{t}" in steps_df else value
        frames.append(pd.DataFrame({"step": steps_df["step"].to_numpy(),
                                    "epoch": steps_df["epoch"].to_numpy() if "epoch" in steps_df else 0,
                                    "task": t, "value": value.to_numpy(), "weighted": weighted.to_numpy()}))
    out = pd.concat(frames, ignore_index=True)
    total = out.groupby("step")["weighted"].transform("sum")
    out["share"] = out["weighted"] / total.where(total != 0)
    out["task"] = pd.Categorical(out["task"], categories=tasks)
    return out.sort_values(["step", "task"], kind="stable").reset_index(drop=True)


def smooth(df: pd.DataFrame, window: int, *, columns: list[str] | None = None, by: str | None = "task",
           order: str = "step") -> pd.DataFrame:
    """Trailing rolling mean over ``window`` rows (ordered by ``order``), per ``by`` group.

    Args:
        df: a long table (e.g. :func:`loss_table`) or a wide one (``by=None``).
        window: rows per mean, >= 1 (1 returns a copy unchanged); the first rows average
            what is there (min_periods=1).
        columns: which columns to smooth; default every float column.
    Returns:
        A copy of ``df`` (same rows, same order) with those columns smoothed.
    """
    if int(window) != window or window < 1:
        raise ValueError(f"smooth: window must be an integer >= 1, got {window!r}")
    if columns is None:
        columns = [c for c in df.columns if pd.api.types.is_float_dtype(df[c]) and c not in (order, by)]
    if window == 1 or not columns:
        return df.copy()
    out = df.reset_index(drop=True)  # positional labels, so a repeated index cannot misalign the result
    out[columns] = out[columns].astype(np.float64)
    ordered = out.sort_values(order, kind="stable") if order in out.columns else out
    if by is not None and by in out.columns:
        rolled = ordered.groupby(by, observed=True)[columns].transform(
            lambda s: s.rolling(int(window), min_periods=1).mean())
    else:
        rolled = ordered[columns].rolling(int(window), min_periods=1).mean()
    out.loc[rolled.index, columns] = rolled
    out.index = df.index
    return out


def gradient_shares(model: HM4SR, batch: SequenceBatch, *, seed: int = 0, item_counts=None) -> pd.DataFrame:
    """How hard each named loss pulls on the parameters the losses share.

    Shared parameters are those that receive a gradient from at least two losses (the
    embeddings, projections, MoE levels and encoders; not the category head or the
    placeholder generator). Each loss is differentiated on its own (``autograd.grad``);
    dropout is off so the numbers are repeatable, and placeholder positions come from a
    generator seeded with ``seed``.

    Args:
        batch: a training batch (prefix or dense), on any device.
        item_counts: the training count of each item ((N+1,)), for a model whose sampled
            softmax draws negatives from the popularity proposal.
    Returns:
        One row per loss: task, weight, loss (unweighted value), grad_norm (L2 over the
        shared parameters, unweighted), weighted_grad_norm (x weight: what the optimiser
        sees), share (of the summed weighted norms), cosine_to_rec (direction against the
        rec gradient; negative = the losses disagree). ``attrs["shared_parameters"]``
        names the shared parameters.
    """
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(seed)
        batch = batch.to(model_device(model))
        out = model(batch, StepSampler.for_model(model, item_counts)(batch, gen))
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        params = list(named.values())
        grads = {}
        for task, loss in out.losses.items():
            if not loss.requires_grad:  # e.g. no placeholders in a batch of short sequences
                grads[task] = [None] * len(params)
                continue
            grads[task] = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    finally:
        model.train(was_training)
    users = [sum(g[i] is not None and bool(g[i].abs().sum() > 0) for g in grads.values()) for i in range(len(params))]
    shared = [i for i, k in enumerate(users) if k >= 2]
    names = list(named)
    weights = model.config.loss_weights

    def flat(task: str) -> torch.Tensor:
        return torch.cat([(grads[task][i] if grads[task][i] is not None else torch.zeros_like(params[i])).reshape(-1)
                          for i in shared]).double().cpu()

    vectors = {t: flat(t) for t in grads}
    rec = vectors.get("rec")
    rows = []
    for t, v in vectors.items():
        norm = float(v.norm())
        cos = math.nan
        if rec is not None and norm > 0 and float(rec.norm()) > 0:
            cos = float(torch.nn.functional.cosine_similarity(v, rec, dim=0))
        rows.append({"task": t, "weight": weights[t], "loss": float(out.losses[t].detach()), "grad_norm": norm,
                     "weighted_grad_norm": weights[t] * norm, "cosine_to_rec": cos})
    frame = pd.DataFrame(rows)
    total = frame["weighted_grad_norm"].sum()
    frame["share"] = frame["weighted_grad_norm"] / total if total > 0 else math.nan
    frame.attrs["shared_parameters"] = [names[i] for i in shared]
    return frame[["task", "weight", "loss", "grad_norm", "weighted_grad_norm", "share", "cosine_to_rec"]]
