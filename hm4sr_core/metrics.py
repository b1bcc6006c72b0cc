"""Full-ranking metrics and top-k lists (pure functions).

This module implements the measuring half of the evaluation contract
(``docs/evaluation.md``, items 2 and 8): every user's held-out target is ranked
against the *whole* catalogue, with a declared tie policy, and turned into per-user
HR/NDCG/MRR arrays that feed the paired tests between models
(:mod:`hm4sr_core.significance`).

Conventions (shared by every model in the workbench). HM4SR scores an item as
``sum over streams s of <s_s, v_s(i)>`` (``docs/model.md``, section 2.6), which is one
dot product ``<q_u, V_i>`` of the concatenated streams; SASRec's score is one too.

* Items are numbered ``1..N``; column/row 0 is the padding item and is never a
  candidate, whatever its score.
* A user's **rank** is ``1 + greater + tie term`` where ``greater`` counts candidates
  scoring strictly higher than the target and ``equal`` counts the *other* candidates
  with exactly the target's score. The tie term is ``equal / 2`` (``"expected"``, the
  default: expected rank under uniformly random tie-breaking), ``equal``
  (``"pessimistic"``) or ``0`` (``"optimistic"``). :class:`RankCounts` keeps the two
  integer counts so that metrics can be computed exactly rather than from a
  fractional rank.
* **History masking** is optional and off by default (as in the paper's code). An
  excluded item is not a candidate; the target itself is never excluded.
* Metrics under ties (:func:`metrics_from_counts`): with ``greater = g`` and
  ``equal = e`` the target's integer rank under random tie-breaking is uniform on
  ``{g+1, ..., g+1+e}``; each metric is its exact expectation over that set
  (e.g. ``HR@K = #{r <= K in the set} / (e+1)``), never the metric of the fractional
  expected rank. ``"pessimistic"`` and ``"optimistic"`` use the integer ranks
  ``g+e+1`` and ``g+1``. With one target per user, Recall@K equals HR@K.
* Per-user metric definitions for an integer rank ``r``: ``hr@K = [r <= K]``,
  ``ndcg@K = [r <= K] / log2(r + 1)`` (the ideal DCG of one relevant item is 1),
  ``mrr@K = [r <= K] / r``.

:func:`rank_dot_product` ranks ``score(u, i) = <q_u, V_i>`` over chunks of items,
so a million-item catalogue never needs a ``B x N`` score matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

TIE_POLICIES = ("expected", "pessimistic", "optimistic")

DEFAULT_KS = (5, 10, 20, 50)

# Rows of the rare top-k rows whose k-th place is tied are re-resolved this many at a
# time, so the int32 running count stays far below the size of one score chunk.
_TIE_RESOLUTION_ROWS = 64

# Comparisons are counted this many columns at a time through a float32 buffer: on CPU,
# summing a bool mask goes through a slow integer reduction (about 10x slower than
# comparing into float32 and summing floats), and float32 counts are exact up to 2**24.
_COUNT_COLUMNS = 8192


# ---------------------------------------------------------------------------
# Counting competitors of the target
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RankCounts:
    """How many candidates beat or tie each user's target.

    Attributes:
        greater: (B,) int64, candidates scoring strictly higher than the target.
        equal: (B,) int64, *other* candidates scoring exactly the target's score.
    """

    greater: Tensor
    equal: Tensor

    def ranks(self, tie_policy: str = "expected") -> Tensor:
        """(B,) float64 ranks, ``1 + greater + tie term`` (see the module docstring)."""
        _check_tie_policy(tie_policy)
        greater = self.greater.to(torch.float64)
        equal = self.equal.to(torch.float64)
        if tie_policy == "expected":
            return 1.0 + greater + equal / 2.0
        if tie_policy == "pessimistic":
            return 1.0 + greater + equal
        return 1.0 + greater

    def metrics(
        self, ks: Sequence[int] = DEFAULT_KS, tie_policy: str = "expected"
    ) -> dict[str, np.ndarray]:
        """Per-user metrics; shorthand for :func:`metrics_from_counts`."""
        return metrics_from_counts(self.greater, self.equal, ks, tie_policy)


def count_greater_equal(
    scores: Tensor, targets: Tensor, *, exclude: Tensor | None = None
) -> RankCounts:
    """Count the candidates that beat or tie each target in a full score matrix.

    Args:
        scores: (B, N+1) floating scores; column 0 is padding and never a candidate.
            May contain +-inf but not NaN; each target's own score must be finite.
        targets: (B,) integer item ids in ``1..N``.
        exclude: optional (B, N+1) bool, True for items that are not candidates for
            that user (history masking). The target is never excluded, even if marked.

    Returns:
        :class:`RankCounts` with (B,) int64 ``greater`` and ``equal``.
    """
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores: expected a 2-D floating tensor (B, N+1), got "
                         f"{tuple(scores.shape)} {scores.dtype}")
    batch, columns = scores.shape
    targets = _check_targets(targets, batch, columns - 1)
    if torch.isnan(scores).any():
        raise ValueError("scores: contains NaN; a model must score every item")
    rows = torch.arange(batch, device=scores.device)
    target_scores = scores[rows, targets]
    if not torch.isfinite(target_scores).all():
        bad = int(torch.nonzero(~torch.isfinite(target_scores))[0, 0])
        raise ValueError(f"scores: target score of user row {bad} (item {int(targets[bad])}) "
                         f"is {float(target_scores[bad])}; a target must have a finite score")

    candidate = torch.ones_like(scores, dtype=torch.bool)
    if exclude is not None:
        if exclude.shape != scores.shape or exclude.dtype != torch.bool:
            raise ValueError(f"exclude: expected a bool tensor of shape {tuple(scores.shape)}, "
                             f"got {tuple(exclude.shape)} {exclude.dtype}")
        candidate &= ~exclude
    candidate[:, 0] = False
    # The target is ranked, not compared with itself.
    candidate[rows, targets] = False

    threshold = target_scores[:, None]
    greater = ((scores > threshold) & candidate).sum(dim=1)
    equal = ((scores == threshold) & candidate).sum(dim=1)
    return RankCounts(greater=greater.to(torch.int64), equal=equal.to(torch.int64))


def rank_of_targets(
    scores: Tensor,
    targets: Tensor,
    *,
    tie_policy: str = "expected",
    exclude: Tensor | None = None,
) -> Tensor:
    """(B,) float64 rank of each target in a full (B, N+1) score matrix.

    ``rank = 1 + #(candidates strictly higher) + tie term``; see
    :func:`count_greater_equal` for the arguments and :class:`RankCounts` for the
    tie policies.
    """
    _check_tie_policy(tie_policy)
    return count_greater_equal(scores, targets, exclude=exclude).ranks(tie_policy)


# ---------------------------------------------------------------------------
# Chunked full ranking for dot-product scorers
# ---------------------------------------------------------------------------


@torch.no_grad()  # ranking never needs gradients; embedding weights may require them
def count_dot_product(
    queries: Tensor,
    item_table: Tensor,
    targets: Tensor,
    *,
    chunk_items: int = 65536,
    exclude_items: Tensor | Sequence[Tensor] | None = None,
    top_k: int = 10,
) -> tuple[RankCounts, Tensor]:
    """Rank targets against the whole catalogue for ``score(u, i) = <q_u, V_i>``.

    Items are scored ``chunk_items`` at a time, so at most one (B, chunk_items) score
    matrix exists at once. Every chunk, including the last, has the same width (the
    last one overlaps its predecessor and ignores the overlap), and the targets'
    scores come from one more matmul of that same shape, so every score is produced
    by an identically shaped GEMM and an item identical to the target ties with it
    exactly. As a safeguard, each target's score is also read back from the chunk that
    holds it; if a backend ever disagrees, the counts are redone against those
    in-chunk scores, which makes the result equal to :func:`count_greater_equal` on
    the matrix the chunks form.

    Args:
        queries: (B, K) floating query vectors.
        item_table: (N+1, K) item vectors, same dtype and device; row 0 is padding.
        targets: (B,) integer item ids in ``1..N``.
        chunk_items: items scored per matmul (> 0).
        exclude_items: optional history to mask, as a (B, L) integer tensor of item
            ids padded with 0, or a list of B 1-D integer tensors. The target is never
            excluded.
        top_k: length of the returned recommendation lists (0 to skip them; at most N).

    Returns:
        ``(counts, top_items)``: :class:`RankCounts` of (B,) int64 tensors, and a
        (B, top_k) int64 tensor of the highest-scoring candidates, best first, ties
        broken by the lower item id. Slots left without a candidate (history masking
        removed too many items) hold 0.
    """
    if queries.dim() != 2 or item_table.dim() != 2:
        raise ValueError(f"queries (B, K) and item_table (N+1, K) must be 2-D, got "
                         f"{tuple(queries.shape)} and {tuple(item_table.shape)}")
    if queries.shape[1] != item_table.shape[1]:
        raise ValueError(f"queries have K={queries.shape[1]} but item_table has "
                         f"K={item_table.shape[1]}")
    if not queries.is_floating_point() or queries.dtype != item_table.dtype:
        raise ValueError(f"queries and item_table must share one floating dtype, got "
                         f"{queries.dtype} and {item_table.dtype}")
    if queries.device != item_table.device:
        raise ValueError(f"queries on {queries.device} but item_table on {item_table.device}")
    if not isinstance(chunk_items, int) or chunk_items < 1:
        raise ValueError(f"chunk_items must be a positive int, got {chunk_items!r}")
    batch = queries.shape[0]
    columns = item_table.shape[0]
    num_items = columns - 1
    if num_items < 1:
        raise ValueError("item_table must hold the padding row and at least one item")
    if not isinstance(top_k, int) or not 0 <= top_k <= num_items:
        raise ValueError(f"top_k must be an int in [0, N={num_items}], got {top_k!r}")
    targets = _check_targets(targets, batch, num_items)
    if not torch.isfinite(queries).all():
        raise ValueError("queries: contains NaN or inf")
    history = _padded_history(exclude_items, batch, num_items, targets)

    width = min(chunk_items, columns)
    chunks = _chunk_layout(columns, width)
    # The one (B, width) score matrix, reused by every matmul below.
    scores = torch.empty(batch, width, dtype=queries.dtype, device=queries.device)
    target_scores = _target_scores(queries, item_table, targets, scores)
    if not torch.isfinite(target_scores).all():
        raise ValueError("target scores are NaN or inf: item_table has a non-finite target "
                         "row or the dot products overflow")

    counts, in_chunk, top_items = _sweep(
        queries, item_table, targets, target_scores, chunks, scores, history, top_k)
    if not torch.equal(in_chunk, target_scores):
        counts, _, _ = _sweep(
            queries, item_table, targets, in_chunk, chunks, scores, history, 0)
    return counts, top_items


def rank_dot_product(
    queries: Tensor,
    item_table: Tensor,
    targets: Tensor,
    *,
    chunk_items: int = 65536,
    tie_policy: str = "expected",
    exclude_items: Tensor | Sequence[Tensor] | None = None,
    top_k: int = 10,
) -> tuple[Tensor, Tensor]:
    """(B,) float64 ranks and (B, top_k) top items for dot-product scores.

    Same as :func:`count_dot_product` (see it for the arguments) with the counts
    turned into ranks by ``tie_policy``. Use :func:`count_dot_product` when exact
    metrics under ties are wanted.
    """
    _check_tie_policy(tie_policy)
    counts, top_items = count_dot_product(
        queries, item_table, targets, chunk_items=chunk_items,
        exclude_items=exclude_items, top_k=top_k)
    return counts.ranks(tie_policy), top_items


def _chunk_layout(columns: int, width: int) -> list[tuple[int, int]]:
    """(start, owned_from) per chunk of ``width`` columns covering ``0..columns-1``.

    A chunk spans ``start .. start+width-1`` and is responsible for the columns from
    ``owned_from`` on; only the last chunk, shifted back to keep the common width,
    has ``owned_from > start``.
    """
    layout = [(start, start) for start in range(0, columns, width)]
    last_start = layout[-1][0]
    if last_start + width > columns:
        layout[-1] = (columns - width, last_start)
    return layout


def _target_scores(queries: Tensor, item_table: Tensor, targets: Tensor, scores: Tensor) -> Tensor:
    """(B,) score of each user's target, from matmuls shaped like the item chunks
    (written into the (B, width) ``scores`` buffer)."""
    unique, position = torch.unique(targets, return_inverse=True)
    batch, dim = queries.shape
    width = scores.shape[1]
    rows = torch.arange(batch, device=queries.device)
    result = torch.empty(batch, dtype=queries.dtype, device=queries.device)
    for first in range(0, unique.numel(), width):
        block = unique[first:first + width]
        # Zero rows keep the block as wide as an item chunk.
        table = torch.zeros(width, dim, dtype=item_table.dtype, device=item_table.device)
        table[:block.numel()] = item_table[block]
        torch.matmul(queries, table.T, out=scores)  # (B, width)
        mine = (position >= first) & (position < first + block.numel())
        result[mine] = scores[rows[mine], position[mine] - first]
    return result


def _sweep(
    queries: Tensor,
    item_table: Tensor,
    targets: Tensor,
    target_scores: Tensor,
    chunks: list[tuple[int, int]],
    scores: Tensor,
    history: Tensor | None,
    top_k: int,
) -> tuple[RankCounts, Tensor, Tensor]:
    """One pass over the item chunks: counts vs ``target_scores``, in-chunk target
    scores (B,), and the running top-k (B, top_k). ``scores`` is the (B, width)
    buffer every chunk's matmul writes into."""
    batch, width = scores.shape
    device = queries.device
    rows = torch.arange(batch, device=device)
    threshold = target_scores[:, None]
    greater = torch.zeros(batch, dtype=torch.int64, device=device)
    equal = torch.zeros(batch, dtype=torch.int64, device=device)
    in_chunk = torch.empty_like(target_scores)
    buffer = torch.empty(batch, min(width, _COUNT_COLUMNS), dtype=torch.float32, device=device)
    best_scores = torch.full((batch, top_k), -math.inf, dtype=queries.dtype, device=device)
    best_items = torch.zeros(batch, top_k, dtype=torch.int64, device=device)
    if history is not None:
        history_rows = torch.arange(batch, device=device)[:, None].expand_as(history)

    for start, owned_from in chunks:
        end = start + width
        block = item_table[start:end]
        # Checked per chunk so that no (N+1, K) mask is ever built.
        if not torch.isfinite(block).all():
            raise ValueError(f"item_table: rows {start}..{end - 1} contain NaN or inf")
        torch.matmul(queries, block.T, out=scores)  # (B, width)
        here = (targets >= owned_from) & (targets < end)
        in_chunk[here] = scores[rows[here], targets[here] - start]

        # Non-candidates get -inf: with a finite target score they neither beat nor
        # tie it, and they sort last in the top-k.
        if owned_from > start:
            scores[:, :owned_from - start] = -math.inf
        if start == 0:
            scores[:, 0] = -math.inf
        if history is not None:
            hit = (history >= owned_from) & (history < end)
            scores[history_rows[hit], history[hit] - start] = -math.inf

        greater += _count(torch.gt, scores, threshold, buffer)
        equal += _count(torch.eq, scores, threshold, buffer)
        if top_k:
            chunk_scores, chunk_items = _chunk_top_k(scores, min(top_k, width), buffer)
            best_scores, best_items = _merge_top_k(
                best_scores, best_items, chunk_scores, chunk_items + start, top_k)

    # Each target was compared with itself in its own chunk; take that back out.
    greater -= (in_chunk > target_scores).to(torch.int64)
    equal -= (in_chunk == target_scores).to(torch.int64)
    best_items = torch.where(best_scores == -math.inf, torch.zeros_like(best_items), best_items)
    return RankCounts(greater=greater, equal=equal), in_chunk, best_items


def _count(compare, scores: Tensor, threshold: Tensor, buffer: Tensor) -> Tensor:
    """(B,) int64 number of entries of (B, C) ``scores`` for which
    ``compare(scores, threshold)`` holds; ``threshold`` is (B, 1), ``buffer`` (B, c)."""
    total = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
    step = buffer.shape[1]
    for first in range(0, scores.shape[1], step):
        part = scores[:, first:first + step]
        hits = buffer[:, :part.shape[1]]
        compare(part, threshold, out=hits)
        total += hits.sum(dim=1).to(torch.int64)
    return total


def _chunk_top_k(scores: Tensor, k: int, buffer: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k of each row of (B, C) ``scores`` as (values, columns), (B, k) each,
    sorted by value descending then column ascending; a tie at the k-th place keeps
    the lowest columns, so the result does not depend on ``torch.topk``'s tie order."""
    values, columns = torch.topk(scores, k, dim=1)
    kth = values[:, -1:]
    tied_total = _count(torch.eq, scores, kth, buffer)
    tied_taken = (values == kth).sum(dim=1)
    ambiguous = torch.nonzero(tied_total > tied_taken).flatten()
    for first in range(0, ambiguous.numel(), _TIE_RESOLUTION_ROWS):
        which = ambiguous[first:first + _TIE_RESOLUTION_ROWS]
        block = scores[which]
        block_kth = kth[which]
        above = block > block_kth
        need = k - above.sum(dim=1, keepdim=True)
        tied = block == block_kth
        take = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= need))
        columns[which] = torch.nonzero(take)[:, 1].view(-1, k)
    columns, _ = torch.sort(columns, dim=1)
    values = scores.gather(1, columns)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    return values, columns.gather(1, order)


def _merge_top_k(
    best_scores: Tensor, best_items: Tensor, new_scores: Tensor, new_items: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Merge two (value desc, id asc) lists; every id in ``new_items`` is larger than
    those in ``best_items``, so a stable sort keeps equal values in id order."""
    scores = torch.cat([best_scores, new_scores], dim=1)
    items = torch.cat([best_items, new_items], dim=1)
    scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return scores[:, :k], items.gather(1, order[:, :k])


def _padded_history(
    exclude_items: Tensor | Sequence[Tensor] | None, batch: int, num_items: int, targets: Tensor
) -> Tensor | None:
    """(B, L) int64 history ids to mask, with padding and each user's target set to 0
    (0 is padding, which is masked anyway), or None when nothing is excluded."""
    if exclude_items is None:
        return None
    if isinstance(exclude_items, Tensor):
        history = exclude_items
        if history.dim() != 2 or history.shape[0] != batch:
            raise ValueError(f"exclude_items: expected a (B={batch}, L) tensor, got "
                             f"{tuple(history.shape)}")
    else:
        if len(exclude_items) != batch:
            raise ValueError(f"exclude_items: expected {batch} tensors (one per user), "
                             f"got {len(exclude_items)}")
        for user, items in enumerate(exclude_items):
            if not isinstance(items, Tensor) or items.dim() != 1:
                raise ValueError(f"exclude_items[{user}]: expected a 1-D tensor of item ids")
        history = torch.nn.utils.rnn.pad_sequence(
            [items.to(targets.device, torch.int64) for items in exclude_items],
            batch_first=True, padding_value=0)
    if history.dtype.is_floating_point or history.dtype == torch.bool:
        raise ValueError(f"exclude_items: expected integer item ids, got {history.dtype}")
    history = history.to(targets.device, torch.int64)
    if history.numel() and (int(history.min()) < 0 or int(history.max()) > num_items):
        raise ValueError(f"exclude_items: item ids must lie in 0..{num_items} (0 = padding)")
    return torch.where(history == targets[:, None], torch.zeros_like(history), history)


# ---------------------------------------------------------------------------
# Per-user metrics
# ---------------------------------------------------------------------------


def metrics_from_counts(
    greater: Tensor | np.ndarray,
    equal: Tensor | np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    tie_policy: str = "expected",
) -> dict[str, np.ndarray]:
    """Exact per-user HR, NDCG and MRR at each cut-off from competitor counts.

    Under ``"expected"`` each metric is averaged over the integer ranks
    ``g+1 .. g+1+e`` (random tie-breaking), computed in closed form from prefix
    sums; ``"pessimistic"`` / ``"optimistic"`` score the rank ``g+e+1`` / ``g+1``.

    Args:
        greater: (B,) non-negative integer counts (``RankCounts.greater``).
        equal: (B,) non-negative integer counts (``RankCounts.equal``).
        ks: positive cut-offs.
        tie_policy: one of :data:`TIE_POLICIES`.

    Returns:
        ``{"hr@K", "ndcg@K", "mrr@K"}`` for every K, each a (B,) float64 array.
    """
    _check_tie_policy(tie_policy)
    greater = _as_int_array(greater, "greater")
    equal = _as_int_array(equal, "equal")
    if greater.shape != equal.shape:
        raise ValueError(f"greater {greater.shape} and equal {equal.shape} differ in shape")
    if tie_policy == "expected":
        lowest, highest = greater + 1, greater + 1 + equal
    elif tie_policy == "pessimistic":
        lowest = highest = greater + equal + 1
    else:
        lowest = highest = greater + 1
    return _metrics_over_rank_ranges(lowest, highest, _check_ks(ks))


def metrics_from_ranks(
    ranks: Tensor | np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, np.ndarray]:
    """Per-user HR, NDCG and MRR at each cut-off from integer ranks.

    Args:
        ranks: (B,) integer-valued ranks >= 1 (any numeric dtype). A fractional
            expected rank is refused: it does not determine the tie distribution, so
            use :func:`metrics_from_counts` with :class:`RankCounts` instead.
        ks: positive cut-offs.

    Returns:
        ``{"hr@K", "ndcg@K", "mrr@K"}`` for every K, each a (B,) float64 array.
    """
    values = ranks.detach().cpu().numpy() if isinstance(ranks, Tensor) else np.asarray(ranks)
    if values.ndim != 1:
        raise ValueError(f"ranks: expected a 1-D array, got shape {values.shape}")
    if values.dtype.kind not in "iuf":
        raise ValueError(f"ranks: expected numbers, got dtype {values.dtype}")
    if not np.all(np.isfinite(values)) or np.any(values < 1):
        raise ValueError("ranks: every rank must be a finite number >= 1")
    if np.any(values != np.round(values)):
        raise ValueError("ranks: got a fractional rank; expected ranks under ties need "
                         "metrics_from_counts(greater, equal, ...), not a fractional rank")
    integer = values.astype(np.int64)
    return _metrics_over_rank_ranges(integer, integer, _check_ks(ks))


def _metrics_over_rank_ranges(
    lowest: np.ndarray, highest: np.ndarray, ks: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Mean of each metric over the integer ranks ``lowest..highest`` per user."""
    top = max(ks)
    ranks = np.arange(1, top + 1, dtype=np.float64)
    gains = {"ndcg": 1.0 / np.log2(ranks + 1.0), "mrr": 1.0 / ranks}
    # prefix[g][n] = sum of gain over ranks 1..n, so a range sum is one subtraction.
    prefix = {name: np.concatenate([[0.0], np.cumsum(g)]) for name, g in gains.items()}
    count = (highest - lowest + 1).astype(np.float64)
    single = lowest == highest
    out: dict[str, np.ndarray] = {}
    for k in ks:
        below = np.minimum(lowest - 1, k)  # ranks 1..below precede the range
        upto = np.minimum(highest, k)      # ranks in the range that make the cut
        inside = lowest <= k
        out[f"hr@{k}"] = (upto - below) / count
        for name, gain in gains.items():
            ranged = (prefix[name][upto] - prefix[name][below]) / count
            # A single rank reads its gain directly, so hand-computed values are exact.
            exact = np.where(inside, gain[np.minimum(lowest, k) - 1], 0.0)
            out[f"{name}@{k}"] = np.where(single, exact, ranged)
    return {name: out[name] for name in _metric_names(ks)}


def _metric_names(ks: tuple[int, ...]) -> list[str]:
    return [f"{metric}@{k}" for metric in ("hr", "ndcg", "mrr") for k in ks]


def summarise(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean over users of every per-user metric array (all must share one length > 0)."""
    lengths = {name: np.asarray(values).shape for name, values in per_user.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-user arrays differ in shape: {lengths}")
    for name, shape in lengths.items():
        if len(shape) != 1 or shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {shape}")
    return {name: float(np.mean(values)) for name, values in per_user.items()}


def coverage_and_popularity(
    top_items: Tensor | np.ndarray, item_popularity: Tensor | np.ndarray, num_items: int
) -> dict[str, float]:
    """Catalogue coverage and mean popularity of the recommended top-k lists.

    Args:
        top_items: (B, k) item ids, as returned by :func:`count_dot_product`; 0 marks
            an empty slot and is ignored.
        item_popularity: (N+1,) popularity per item id, meant to be the number of
            *training* interactions of the item (index 0 = padding, unused).
        num_items: N, the catalogue size (padding excluded).

    Returns:
        ``{"coverage@k": distinct recommended items / N,
        "popularity@k": mean popularity over all filled slots}``.
    """
    items = top_items.detach().cpu().numpy() if isinstance(top_items, Tensor) else np.asarray(top_items)
    popularity = (item_popularity.detach().cpu().numpy()
                  if isinstance(item_popularity, Tensor) else np.asarray(item_popularity))
    if items.ndim != 2 or items.dtype.kind not in "iu":
        raise ValueError(f"top_items: expected a 2-D integer array (B, k), got "
                         f"{items.shape} {items.dtype}")
    if num_items < 1 or popularity.shape != (num_items + 1,):
        raise ValueError(f"item_popularity: expected shape ({num_items + 1},) for "
                         f"num_items={num_items}, got {popularity.shape}")
    if items.size and (items.min() < 0 or items.max() > num_items):
        raise ValueError(f"top_items: ids must lie in 0..{num_items} (0 = empty slot)")
    k = items.shape[1]
    filled = items[items > 0]
    if filled.size == 0:
        raise ValueError("top_items: no recommended item at all")
    return {
        f"coverage@{k}": np.unique(filled).size / num_items,
        f"popularity@{k}": float(np.mean(popularity[filled])),
    }


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _check_tie_policy(tie_policy: str) -> None:
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")


def _check_targets(targets: Tensor, batch: int, num_items: int) -> Tensor:
    if not isinstance(targets, Tensor) or targets.shape != (batch,):
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets: expected a ({batch},) tensor, got {shape}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected integer item ids, got {targets.dtype}")
    targets = targets.to(torch.int64)
    if batch and (int(targets.min()) < 1 or int(targets.max()) > num_items):
        bad = int(torch.nonzero((targets < 1) | (targets > num_items))[0, 0])
        raise ValueError(f"targets: user row {bad} has item {int(targets[bad])}; expected "
                         f"1..{num_items} (0 is padding and never a target)")
    return targets


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                     for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat, got {ks!r}")
    return tuple(int(k) for k in ks)


def _as_int_array(values: Tensor | np.ndarray, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected a 1-D integer array, got {array.shape} {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name}: counts must be >= 0")
    return array.astype(np.int64)
