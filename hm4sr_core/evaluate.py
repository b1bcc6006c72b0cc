"""Full-ranking evaluation of a trained model on one split part (evaluation.md 1-2, 7-8).

Every model here scores by a dot product (query (B, K) x item matrix (N+1, K)), so
ranking runs in item chunks through :mod:`hm4sr_core.metrics` and never holds a
users x items matrix. The item matrix is computed once per evaluation.

Under distributed training each rank ranks every ``world``-th evaluation batch (the same
batches, so the same floating-point work, as one process) and the rows are gathered
back into one process's order: the per-user metrics equal one process's to the bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import distributed
from .config import TrainConfig
from .data.splits import SequenceBatch, SplitPart, iterate_batches
from .metrics import DEFAULT_KS, RankCounts, coverage_and_popularity, count_dot_product, metrics_from_counts


@dataclass
class EvalResult:
    """Mean metrics, the per-user arrays behind them, and each user's top-10."""

    metrics: dict[str, float]  # "ndcg@10", "hr@10", "mrr@10", ..., "coverage@10", "popularity@10"
    per_user: dict[str, np.ndarray]  # metric name -> (n,) float64, row order = users
    users: np.ndarray  # (n,) user ids
    top_items: np.ndarray  # (n, 10) item ids, best first


def perturb_timestamps(batch: SequenceBatch, mode: str, generator: torch.Generator | None,
                       origin: int) -> SequenceBatch:
    """Control for "is time used at all": ``shuffled`` permutes the real timestamps within
    each sequence; ``zeroed`` sets every real timestamp to the dataset's first one (all
    gaps 0, one date). Padding stays 0."""
    if mode == "real":
        return batch
    real = batch.items > 0
    if mode == "zeroed":
        ts = torch.where(real, torch.full_like(batch.timestamps, origin), batch.timestamps)
    else:
        B, T = batch.items.shape
        noise = torch.rand(B, T, generator=generator).masked_fill(~real, 2.0)
        order = noise.argsort(dim=1)  # a random permutation of the real positions, padding last
        ts = torch.gather(batch.timestamps, 1, order)
    return SequenceBatch(batch.items, ts, batch.lengths, batch.targets, batch.users, batch.position_targets)


QUERY_CHUNK = 256  # sequences encoded together: a (256, 50, S, d) activation stays in cache


@torch.no_grad()
def query_by_length(model, batch: SequenceBatch, chunk: int = QUERY_CHUNK,
                    tables: torch.Tensor | None = None) -> torch.Tensor:
    """``model.query(batch)`` computed over length-sorted chunks, each trimmed to its own
    longest sequence (less padding work), and returned in the batch's row order.
    ``tables``: the model's item tables, computed once by the caller instead of per chunk."""
    if batch.size <= chunk:
        return model.query(batch, tables=tables)
    order = torch.argsort(batch.lengths, stable=True)
    parts = []
    for idx in order.split(chunk):
        width = int(batch.lengths[idx].max())
        parts.append(model.query(SequenceBatch(batch.items[idx, :width], batch.timestamps[idx, :width],
                                               batch.lengths[idx], batch.targets[idx], batch.users[idx]),
                                 tables=tables))
    q = torch.cat(parts)
    out = torch.empty_like(q)
    out[order] = q
    return out


@torch.no_grad()
def evaluate(model, part: SplitPart, config: TrainConfig = TrainConfig(), *,
             history: list[np.ndarray] | None = None, popularity: np.ndarray | None = None,
             device: torch.device | str = "cpu", ks=DEFAULT_KS, time_origin: int = 0,
             chunk_items: int = 65536, ranks: distributed.Ranks = distributed.SINGLE) -> EvalResult:
    """Rank every example's target against the whole catalogue.

    ``history`` (per user id, item ids) is masked only when ``config.mask_history``.
    ``popularity`` ((N+1,) training counts) adds coverage@10 and popularity@10.
    ``ranks`` of an active process group: this rank ranks batches ``rank::world`` and
    every rank returns the whole, gathered result (a collective: call it on every rank).
    """
    was_training = model.training
    model.eval()
    try:
        # The item side once per evaluation: the queries of every chunk of users read the same
        # tables (recomputing them per chunk cost a catalogue-sized projection each time).
        tables = model.item_tables()
        item_matrix = model.item_matrix(tables).to(device)
        greater, equal, tops, users = [], [], [], []
        gen = torch.Generator().manual_seed(config.seed)
        for i, batch in enumerate(iterate_batches(part, config.eval_batch_size)):
            # every rank perturbs every batch, so the draws of its own stay those of one process
            batch = perturb_timestamps(batch, config.eval_time, gen, time_origin)
            if i % ranks.world != ranks.rank:
                continue
            batch = batch.to(device)
            exclude = None
            if config.mask_history and history is not None:
                exclude = [torch.as_tensor(history[u], dtype=torch.int64, device=device)
                           for u in batch.users.tolist()]
            q = query_by_length(model, batch, tables=tables)
            counts, top = count_dot_product(q, item_matrix, batch.targets, chunk_items=chunk_items,
                                            exclude_items=exclude, top_k=min(10, item_matrix.shape[0] - 1))
            greater.append(counts.greater.cpu())
            equal.append(counts.equal.cpu())
            tops.append(top.cpu())
            users.append(batch.users.cpu())
        if ranks.active:  # rank r holds batches r, r + world, ...: interleave them back
            parts = distributed.gather_objects((greater, equal, tops, users), ranks)
            n = sum(len(p[0]) for p in parts)
            greater, equal, tops, users = ([parts[i % ranks.world][f][i // ranks.world] for i in range(n)]
                                           for f in range(4))
        counts = RankCounts(torch.cat(greater), torch.cat(equal))
        per_user = metrics_from_counts(counts.greater, counts.equal, ks, config.tie_policy)
        top_items = torch.cat(tops).numpy()
        metrics = {k: float(v.mean()) for k, v in per_user.items()}
        if popularity is not None:
            metrics.update(coverage_and_popularity(top_items, popularity, item_matrix.shape[0] - 1))
        return EvalResult(metrics, per_user, torch.cat(users).numpy(), top_items)
    finally:
        model.train(was_training)
