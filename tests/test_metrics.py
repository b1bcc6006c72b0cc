"""Tests for hm4sr_core.metrics: hand-computed metrics, tie policies, chunked ranking.

Mirrors docs/evaluation.md item 2: permutation invariance, the random baseline of a
constant scorer, hand-computed HR/NDCG/MRR, padding never a candidate, history
masking that never hides the target.
"""

import math

import numpy as np
import pytest
import torch
from conftest import FLOAT64_EPS, assert_float_close, float_tol

from hm4sr_core.metrics import (
    TIE_POLICIES,
    RankCounts,
    count_dot_product,
    count_greater_equal,
    coverage_and_popularity,
    metrics_from_counts,
    metrics_from_ranks,
    rank_dot_product,
    rank_of_targets,
    summarise,
)


def _integer_problem(seed, batch=17, num_items=1000, dim=6, low=-2, high=3):
    """Queries and items with small integer entries: dot products are exact in
    float32 whatever the summation order, and ties are plentiful."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randint(low, high, (batch, dim), generator=gen).float()
    table = torch.randint(low, high, (num_items + 1, dim), generator=gen).float()
    targets = torch.randint(1, num_items + 1, (batch,), generator=gen)
    return queries, table, targets


def _history(seed, batch, num_items, length, targets):
    """(B, L) padded histories that contain the target for some users."""
    gen = torch.Generator().manual_seed(seed)
    history = torch.randint(1, num_items + 1, (batch, length), generator=gen)
    history[:, -3:] = 0  # padding tail
    history[::3, 0] = targets[::3]  # the target sits in these users' histories
    return history


def _mask_from_history(history, columns):
    mask = torch.zeros(history.shape[0], columns, dtype=torch.bool)
    mask.scatter_(1, history, True)
    mask[:, 0] = False
    return mask


# --- hand-computed metrics -------------------------------------------------------


def test_metrics_from_ranks_hand_computed():
    got = metrics_from_ranks(torch.tensor([1, 3, 7, 11]), ks=(5, 10))
    assert got["hr@5"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert got["hr@10"].tolist() == [1.0, 1.0, 1.0, 0.0]
    # 1/log2(2) = 1, 1/log2(4) = 0.5, 1/log2(8) = 1/3
    assert got["ndcg@5"].tolist() == [1.0, 0.5, 0.0, 0.0]
    assert got["ndcg@10"].tolist() == [1.0, 0.5, 1.0 / 3.0, 0.0]
    assert got["mrr@5"].tolist() == [1.0, 1.0 / 3.0, 0.0, 0.0]
    assert got["mrr@10"].tolist() == [1.0, 1.0 / 3.0, 1.0 / 7.0, 0.0]
    assert list(got) == ["hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr@5", "mrr@10"]


def test_rank_at_cutoff_counts_and_next_rank_does_not():
    got = metrics_from_ranks(np.array([5.0, 6.0]), ks=(5,))
    assert got["hr@5"].tolist() == [1.0, 0.0]
    assert got["ndcg@5"][0] == pytest.approx(1.0 / math.log2(6.0))
    assert got["ndcg@5"][1] == 0.0
    assert got["mrr@5"].tolist() == [0.2, 0.0]


def test_expected_metrics_under_ties_hand_computed():
    # One candidate above, two tied: the integer rank is 2, 3 or 4 with prob. 1/3 each.
    got = metrics_from_counts(np.array([1]), np.array([2]), ks=(3,))
    assert got["hr@3"][0] == pytest.approx(2.0 / 3.0)
    assert got["mrr@3"][0] == pytest.approx((1.0 / 2.0 + 1.0 / 3.0) / 3.0)  # 5/18
    assert got["ndcg@3"][0] == pytest.approx((1.0 / math.log2(3.0) + 0.5) / 3.0)
    pessimistic = metrics_from_counts(np.array([1]), np.array([2]), ks=(3,), tie_policy="pessimistic")
    assert pessimistic["hr@3"][0] == 0.0  # rank 4
    optimistic = metrics_from_counts(np.array([1]), np.array([2]), ks=(3,), tie_policy="optimistic")
    assert optimistic["mrr@3"][0] == 0.5  # rank 2


def test_expected_metrics_equal_average_over_tie_breaks():
    greater = np.array([0, 0, 3, 4, 9, 10, 0, 48])
    equal = np.array([0, 12, 5, 0, 3, 7, 60, 5])
    ks = (1, 5, 10, 50)
    got = metrics_from_counts(greater, equal, ks)
    for user, (g, e) in enumerate(zip(greater, equal)):
        possible = metrics_from_ranks(np.arange(g + 1, g + e + 2), ks)
        # float64 sums of terms <= 1: prefix sums up to the largest cut-off on one side, the
        # e + 1 tied ranks on the other
        terms = max(ks) + e + 1
        for name, values in possible.items():
            assert got[name][user] == pytest.approx(values.mean(), rel=0, abs=float_tol(terms, terms, FLOAT64_EPS)), \
                (name, g, e)


def test_metrics_from_ranks_refuses_fractional_rank():
    with pytest.raises(ValueError, match="metrics_from_counts"):
        metrics_from_ranks(np.array([1.0, 2.5]))
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([0, 2]))
    with pytest.raises(ValueError):
        metrics_from_counts(np.array([1]), np.array([0]), ks=(0,))


# --- ranks on a full score matrix ------------------------------------------------


def test_rank_of_targets_hand_computed_with_padding_ties_and_exclusion():
    #                      pad   1    2    3    4    5
    scores = torch.tensor([[99., 0.5, 0.9, 0.5, 0.1, 0.5]])
    target = torch.tensor([1])
    counts = count_greater_equal(scores, target)
    assert counts.greater.tolist() == [1] and counts.equal.tolist() == [2]
    assert rank_of_targets(scores, target).tolist() == [3.0]  # 1 + 1 + 2/2
    assert rank_of_targets(scores, target, tie_policy="pessimistic").tolist() == [4.0]
    assert rank_of_targets(scores, target, tie_policy="optimistic").tolist() == [2.0]
    exclude = torch.tensor([[False, True, True, False, False, True]])  # target marked too
    assert rank_of_targets(scores, target, exclude=exclude).tolist() == [1.5]  # only 3 ties
    assert rank_of_targets(scores, target, exclude=exclude).dtype == torch.float64


def test_constant_scores_give_the_random_baseline():
    num_items, batch = 37, 5
    scores = torch.full((batch, num_items + 1), 0.25)
    targets = torch.tensor([1, 7, 20, 36, 37])
    expected = rank_of_targets(scores, targets)
    assert expected.tolist() == [1 + (num_items - 1) / 2] * batch
    assert rank_of_targets(scores, targets, tie_policy="pessimistic").tolist() == [37.0] * batch
    assert rank_of_targets(scores, targets, tie_policy="optimistic").tolist() == [1.0] * batch
    counts = count_greater_equal(scores, targets)
    metrics = summarise(counts.metrics(ks=(5, 10, 20)))
    for k in (5, 10, 20):
        assert metrics[f"hr@{k}"] == k / num_items
        assert metrics[f"ndcg@{k}"] == pytest.approx(
            sum(1 / math.log2(r + 1) for r in range(1, k + 1)) / num_items)
    # The same through the chunked dot product: a zero query scores everything 0.
    ranks, _ = rank_dot_product(torch.zeros(batch, 4), torch.randn(num_items + 1, 4), targets,
                                chunk_items=8, tie_policy="pessimistic")
    assert ranks.tolist() == [float(num_items)] * batch


def test_permuting_candidates_leaves_every_metric_unchanged():
    gen = torch.Generator().manual_seed(3)
    batch, num_items = 40, 300
    scores = torch.randint(0, 25, (batch, num_items + 1), generator=gen).float()
    targets = torch.randint(1, num_items + 1, (batch,), generator=gen)
    exclude = torch.rand(batch, num_items + 1, generator=gen) < 0.1
    perm = torch.cat([torch.zeros(1, dtype=torch.int64), 1 + torch.randperm(num_items, generator=gen)])
    new_id = torch.empty_like(perm)
    new_id[perm] = torch.arange(num_items + 1)  # old item id -> column after permuting
    for policy in TIE_POLICIES:
        before = count_greater_equal(scores, targets, exclude=exclude).metrics(tie_policy=policy)
        after = count_greater_equal(scores[:, perm], new_id[targets],
                                    exclude=exclude[:, perm]).metrics(tie_policy=policy)
        for name in before:
            np.testing.assert_array_equal(before[name], after[name])

    queries, table, targets = _integer_problem(seed=4, batch=9, num_items=200)
    before, _ = count_dot_product(queries, table, targets, chunk_items=64)
    perm = torch.cat([torch.zeros(1, dtype=torch.int64), 1 + torch.randperm(200, generator=gen)])
    new_id = torch.empty_like(perm)
    new_id[perm] = torch.arange(201)
    after, _ = count_dot_product(queries, table[perm], new_id[targets], chunk_items=64)
    assert torch.equal(before.greater, after.greater) and torch.equal(before.equal, after.equal)


# --- chunked ranking for dot products --------------------------------------------


@pytest.mark.parametrize("chunk_items, tie_policy", [
    (1, "expected"), (7, "pessimistic"), (64, "optimistic"), (300, "expected"),
    (301, "pessimistic"), (4096, "expected")])
def test_chunked_counts_equal_full_matrix_with_ties_and_exclusions(chunk_items, tie_policy):
    queries, table, targets = _integer_problem(seed=1, num_items=300)
    history = _history(seed=2, batch=17, num_items=300, length=12, targets=targets)
    full = queries @ table.T
    mask = _mask_from_history(history, 301)
    reference = count_greater_equal(full, targets, exclude=mask)
    assert int(reference.equal.min()) > 0  # the fixture really has ties
    counts, top = count_dot_product(queries, table, targets, chunk_items=chunk_items,
                                    exclude_items=history, top_k=10)
    assert torch.equal(counts.greater, reference.greater)
    assert torch.equal(counts.equal, reference.equal)
    ranks, _ = rank_dot_product(queries, table, targets, chunk_items=chunk_items,
                                exclude_items=history, tie_policy=tie_policy, top_k=0)
    assert torch.equal(ranks, rank_of_targets(full, targets, exclude=mask, tie_policy=tie_policy))
    for name, values in counts.metrics(tie_policy=tie_policy).items():
        np.testing.assert_array_equal(values, reference.metrics(tie_policy=tie_policy)[name])
    # Top-k under ties: best score first, ties by lower item id, masked items never.
    masked = full.clone()
    masked[mask & (torch.arange(301) != targets[:, None])] = -math.inf
    masked[:, 0] = -math.inf
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :10]
    assert torch.equal(top, order)


def test_duplicated_item_rows_tie_exactly_with_the_target():
    gen = torch.Generator().manual_seed(5)
    batch, num_items, dim = 12, 3000, 32
    queries = torch.randn(batch, dim, generator=gen)
    table = torch.randn(num_items + 1, dim, generator=gen)
    targets = torch.randint(1, num_items + 1, (batch,), generator=gen)
    copies = 4
    for user in range(batch):
        spots = torch.randint(1, num_items + 1, (copies,), generator=gen)
        spots = spots[spots != targets[user]]
        table[spots] = table[targets[user]].clone()
    full = queries @ table.T
    reference = count_greater_equal(full, targets)
    # The chunks' products may round other than the full matrix's (random floats, not the
    # integer problem): an item within rounding of the target's score may change sides.
    target_score = full.gather(1, targets.view(-1, 1))
    near = ((full - target_score).abs() <= 2 * float_tol(full.abs().amax(1, keepdim=True), dim)) \
        & (full != target_score)
    slack = near[:, 1:].sum(1)
    # Straight from a model's embedding, which requires grad.
    table = torch.nn.Parameter(table)
    for chunk_items in (97, 1000, 3001, 65536):
        counts, _ = count_dot_product(queries, table, targets, chunk_items=chunk_items)
        assert torch.equal(counts.equal, reference.equal)  # the copies: the same row, the same bits
        assert bool(((counts.greater - reference.greater).abs() <= slack).all())
        # Copies of another user's target may land on this user's target too.
        assert bool((counts.equal >= 1).all())


def test_splitting_users_into_batches_changes_nothing():
    queries, table, targets = _integer_problem(seed=6, batch=17, num_items=500)
    history = _history(seed=7, batch=17, num_items=500, length=9, targets=targets)
    whole, whole_top = count_dot_product(queries, table, targets, chunk_items=128,
                                         exclude_items=history)
    pieces = [slice(0, 5), slice(5, 6), slice(6, 17)]
    parts = [count_dot_product(queries[p], table, targets[p], chunk_items=128,
                               exclude_items=history[p]) for p in pieces]
    assert torch.equal(torch.cat([c.greater for c, _ in parts]), whole.greater)
    assert torch.equal(torch.cat([c.equal for c, _ in parts]), whole.equal)
    assert torch.equal(torch.cat([t for _, t in parts]), whole_top)


def test_top_k_matches_torch_topk_on_the_full_matrix():
    gen = torch.Generator().manual_seed(8)
    batch, num_items = 20, 2500
    queries = torch.randn(batch, 16, generator=gen)
    table = torch.randn(num_items + 1, 16, generator=gen)
    targets = torch.randint(1, num_items + 1, (batch,), generator=gen)
    history = [torch.randint(1, num_items + 1, (n,), generator=gen) for n in range(batch)]
    mask = torch.zeros(batch, num_items + 1, dtype=torch.bool)
    for user, items in enumerate(history):
        mask[user, items] = True
        mask[user, targets[user]] = False
    full = queries @ table.T
    full[mask] = -math.inf
    full[:, 0] = -math.inf
    expected = torch.topk(full, 50, dim=1).indices
    for chunk_items in (97, 700, 2501):
        _, top = count_dot_product(queries, table, targets, chunk_items=chunk_items,
                                   exclude_items=history, top_k=50)
        # Random floats: the chunks' products may round other than the full matrix's, so two
        # items within rounding of each other may swap; the lists hold the same scores.
        assert bool((top > 0).all()) and all(len(set(row)) == 50 for row in top.tolist())
        assert_float_close(full.gather(1, top), full.gather(1, expected), 16)


def test_padding_is_never_a_candidate_even_when_it_scores_highest():
    # Positive entries only, so a large padding row outscores every item for everybody.
    queries, table, targets = _integer_problem(seed=9, batch=10, num_items=300, low=1, high=4)
    low, _ = count_dot_product(queries, table, targets, chunk_items=50)
    table[0] = 1000.0
    assert bool(((queries @ table[0]) > (queries @ table[1:].T).max(1).values).all())
    high, top = count_dot_product(queries, table, targets, chunk_items=50, top_k=300)
    assert torch.equal(low.greater, high.greater) and torch.equal(low.equal, high.equal)
    assert bool((top != 0).all())
    full_ranks = rank_of_targets(queries @ table.T, targets)
    assert torch.equal(full_ranks, low.ranks())


def test_history_exclusion_removes_competitors_but_never_the_target():
    #                    pad  1   2   3   4   5   6
    table = torch.tensor([[5.], [1.], [4.], [3.], [2.], [3.], [0.]])
    queries = torch.tensor([[1.], [1.]])
    targets = torch.tensor([3, 4])
    plain, _ = rank_dot_product(queries, table, targets, chunk_items=3, top_k=0)
    assert plain.tolist() == [2.5, 4.0]  # 3 ties with 5; 4 is behind 2, 3, 5
    history = torch.tensor([[2, 3, 0], [3, 4, 5]])  # user 0's target is in its history
    ranks, top = rank_dot_product(queries, table, targets, chunk_items=3,
                                  exclude_items=history, top_k=3)
    assert ranks.tolist() == [1.5, 2.0]
    assert top.tolist() == [[3, 5, 4], [2, 4, 1]]
    as_list, top_list = rank_dot_product(queries, table, targets, chunk_items=4,
                                         exclude_items=[torch.tensor([2, 3]), torch.tensor([3, 4, 5])],
                                         top_k=3)
    assert torch.equal(as_list, ranks) and torch.equal(top_list, top)


def test_top_k_slots_without_candidates_hold_zero():
    table = torch.tensor([[9.], [1.], [2.], [3.], [4.]])
    ranks, top = rank_dot_product(torch.ones(1, 1), table, torch.tensor([1]),
                                  exclude_items=torch.tensor([[2, 4]]), top_k=4)
    assert ranks.tolist() == [2.0]
    assert top.tolist() == [[3, 1, 0, 0]]


def test_bad_inputs_are_refused():
    queries, table, targets = _integer_problem(seed=10, batch=3, num_items=20)
    with pytest.raises(ValueError, match="0 is padding"):
        count_dot_product(queries, table, torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="1..20"):
        count_dot_product(queries, table, torch.tensor([1, 21, 2]))
    with pytest.raises(ValueError, match="dtype"):
        count_dot_product(queries.double(), table, targets)
    with pytest.raises(ValueError, match="tie_policy"):
        rank_dot_product(queries, table, targets, tie_policy="random")
    with pytest.raises(ValueError, match="top_k"):
        count_dot_product(queries, table, targets, top_k=21)
    broken = table.clone()
    broken[4, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        count_dot_product(queries, broken, targets)
    with pytest.raises(ValueError, match="NaN"):
        count_greater_equal(queries @ broken.T, targets)
    with pytest.raises(ValueError, match="exclude_items"):
        count_dot_product(queries, table, targets, exclude_items=torch.tensor([[21], [0], [0]]))


# --- coverage, summaries and significance ----------------------------------------


def test_summarise_and_rank_counts_round_trip():
    counts = RankCounts(greater=torch.tensor([0, 2, 40]), equal=torch.tensor([0, 0, 0]))
    means = summarise(counts.metrics(ks=(5,)))
    assert means["hr@5"] == pytest.approx(2.0 / 3.0)
    assert means["mrr@5"] == pytest.approx((1.0 + 1.0 / 3.0) / 3.0)
    assert means["ndcg@5"] == pytest.approx((1.0 + 0.5) / 3.0)
    with pytest.raises(ValueError):
        summarise({"hr@5": np.ones(3), "mrr@5": np.ones(2)})


def test_coverage_and_popularity_hand_computed():
    top = torch.tensor([[1, 2, 3], [2, 3, 0], [2, 5, 3]])
    popularity = np.array([0, 10, 20, 30, 40, 50, 60])  # items 1..6
    got = coverage_and_popularity(top, popularity, num_items=6)
    assert got["coverage@3"] == 4 / 6  # items 1, 2, 3, 5
    assert got["popularity@3"] == pytest.approx((10 + 20 + 30 + 20 + 30 + 20 + 50 + 30) / 8)
    with pytest.raises(ValueError):
        coverage_and_popularity(top, popularity[:-1], num_items=6)

