"""Tests for the sampled softmax (ModelConfig.rec_loss="sampled", docs/sampled_softmax.md):
the logQ-corrected loss by hand, its relation to the full softmax, accidental hits,
the proposals (padding never drawn, popularity sums to 1), reproducible draws, the item
side computed for the step's rows only (a 200,000-item catalogue), micro-batches,
config validation and the CLI, and a falling loss on the synthetic world."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import FLOAT64_EPS, TINY_FORWARD_TERMS, assert_float_close, batch_terms, float_tol, step_forward

from hm4sr_core import steps
from hm4sr_core.cli import parse_overrides
from hm4sr_core.config import ModelConfig, TrainConfig
from hm4sr_core.data.splits import SequenceBatch, iterate_batches
from hm4sr_core.model import HM4SR, rec_loss, sampled_rec_loss
from hm4sr_core.sampling import NegativeProposal, StepDraws, StepSampler
from hm4sr_core.train import item_popularity, train

from test_model import LOSSES, _dense_batch, _model


def _every_item_once(model: HM4SR, batch: SequenceBatch, seed: int) -> StepDraws:
    """The step's draws (placeholders from a generator seeded with ``seed``) with every
    item 1..N once as the negatives (K = N): under a uniform Q the sampled softmax is
    then the full softmax (sampled_rec_loss's docstring)."""
    sampler = StepSampler.for_model(model)
    draws = sampler(batch, torch.Generator().manual_seed(seed))
    draws.candidates = sampler.proposal.candidates(batch, torch.arange(1, model.num_items + 1))
    return draws


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- the loss function -----------------------------------------------------------------


def test_logq_corrected_loss_by_hand():
    """One example, target 1, negatives (2, 3, 2) with Q = (., 0.5, 0.25, 0.25), K = 3."""
    q = torch.tensor([[1.0, 0.0]])
    rows = {1: torch.tensor([2.0, 0.0]), 2: torch.tensor([0.0, 1.0]), 3: torch.tensor([1.0, 1.0])}
    Q = {1: 0.5, 2: 0.25, 3: 0.25}
    negatives = torch.tensor([2, 3, 2])
    log_kq = {i: math.log(3 * Q[i]) for i in Q}
    loss = sampled_rec_loss(q, rows[1].view(1, 2), torch.stack([rows[int(i)] for i in negatives]),
                            torch.tensor([1]), negatives, torch.tensor([log_kq[1]]),
                            torch.tensor([log_kq[int(i)] for i in negatives]))
    # logits: target 2 - log 1.5; item 2 (twice): 0 - log 0.75; item 3: 1 - log 0.75
    pos = 2.0 - math.log(1.5)
    negs = [0.0 - math.log(0.75), 1.0 - math.log(0.75), 0.0 - math.log(0.75)]
    expected = -pos + math.log(math.exp(pos) + sum(math.exp(v) for v in negs))
    # float32: dot products of width 2, corrections rounded once, a log-sum-exp of 4 logits <= 2
    assert float(loss) == pytest.approx(expected, rel=0, abs=float_tol(2.0, 2 + 1 + (2 * 4 + 3)))
    # Without the correction the value differs: the correction is applied.
    plain = -2.0 + math.log(math.exp(2.0) + 1 + math.e + 1)
    assert abs(expected - plain) > 0.1


def test_every_item_once_under_uniform_q_is_the_full_softmax():
    """K = N, each item once, Q = 1/N: log(K Q) = 0, the target's own copy is an accidental
    hit and left out, so the candidates are exactly the catalogue: equal to rec_loss."""
    torch.manual_seed(0)
    N, D, n = 30, 8, 12
    matrix = torch.randn(N + 1, D)
    query = torch.randn(n, D)
    targets = torch.randint(1, N + 1, (n,))
    negatives = torch.arange(1, N + 1)
    zeros = torch.zeros(N)
    sampled = sampled_rec_loss(query, matrix[targets], matrix[negatives], targets, negatives,
                               torch.zeros(n), zeros)
    # log-sum-exps over N + 1 logits (dot products of width D), then a mean of n
    scale = float((query @ matrix.T).abs().max())
    assert_float_close(sampled, rec_loss(query, matrix, targets), D + 2 * (N + 1) + 3 + n, magnitude=scale)
    # Without masking the hit the target would count twice in the denominator: larger.
    unmasked = sampled_rec_loss(query, matrix[targets], matrix[negatives], targets, negatives + N + 1,
                                torch.zeros(n), zeros)
    assert float(unmasked) > float(sampled) + 1e-3


def test_accidental_hits_are_masked():
    """A negative equal to an example's target is left out for that example only: the same
    loss as with that negative removed from the example's candidates."""
    torch.manual_seed(1)
    D = 4
    rows = torch.randn(6, D)
    query = torch.randn(2, D)
    targets = torch.tensor([2, 5])
    negatives = torch.tensor([2, 3, 4])  # item 2 is example 0's target, not example 1's
    corr = torch.tensor([0.3, -0.2, 0.1])
    t_corr = torch.tensor([0.7, 0.4])
    both = sampled_rec_loss(query, rows[targets], rows[negatives], targets, negatives, t_corr, corr)
    keep0 = torch.tensor([1, 2])
    first = sampled_rec_loss(query[:1], rows[targets[:1]], rows[negatives[keep0]], targets[:1], negatives[keep0],
                             t_corr[:1], corr[keep0])
    second = sampled_rec_loss(query[1:], rows[targets[1:]], rows[negatives], targets[1:], negatives,
                              t_corr[1:], corr)
    scale = float((query @ rows.T).abs().max()) + 1  # logits: dot products of width D plus corrections < 1
    assert_float_close(both, (first + second) / 2, D + 1 + 2 * 4 + 3 + 2, magnitude=scale)


# --- the model: the sampled path against the full path ----------------------------------------


@pytest.mark.parametrize("mode", ["dense", "prefix"])
def test_sampled_model_with_every_item_once_equals_the_full_model(tiny_ds, tiny_split, tiny_model_config, mode):
    """The remapped local rows compute what the full tables compute: with every item once
    as the negatives, every loss and every gradient of the sampled step equal the full
    step's (dropout off, so both draw nothing but the placeholders)."""
    base = tiny_model_config.replace(hidden_dropout=0.0, attention_dropout=0.0)
    part = tiny_split.train_dense if mode == "dense" else tiny_split.train_prefix
    batch = next(iterate_batches(part, 32, shuffle=True, generator=torch.Generator().manual_seed(4)))
    full = _model(base, tiny_ds).train()
    out_full = step_forward(full, batch, 5)
    out_full.loss.backward()
    sampled = _model(base.replace(rec_loss="sampled", num_negatives=tiny_ds.num_items), tiny_ds).train()
    out_s = sampled(batch, _every_item_once(sampled, batch, 5))
    out_s.loss.backward()
    assert out_s.losses.keys() == out_full.losses.keys() == LOSSES
    terms = batch_terms(32 * base.max_length, base)  # 32 windows x T positions, or 32 prefixes
    for k in LOSSES:
        assert_float_close(out_s.losses[k], out_full.losses[k], terms, msg=k)
    g_full, g_s = _grads(full), _grads(sampled)
    assert g_full.keys() == g_s.keys() and len(g_full) > 10
    for name in g_full:
        assert_float_close(g_s[name], g_full[name], terms, msg=name)


def test_sampled_scores_still_rank_the_whole_catalogue(tiny_ds, tiny_split, tiny_model_config):
    """Training draws negatives, scoring does not: a sampled model's full_sort_predict and
    predict score every item with the whole catalogue's tables."""
    model = _model(tiny_model_config.replace(rec_loss="sampled", num_negatives=5), tiny_ds).eval()
    batch = _dense_batch(tiny_split, 8)
    scores = model.full_sort_predict(batch)
    assert scores.shape == (8, tiny_ds.num_items + 1) and bool(torch.isneginf(scores[:, 0]).all())
    with torch.no_grad():
        want = model.encode(batch).sequence @ model.item_matrix().T  # (8, N+1)
    assert_float_close(scores[:, 1:], want[:, 1:], TINY_FORWARD_TERMS)
    candidates = torch.randint(1, tiny_ds.num_items + 1, (8, 5), generator=torch.Generator().manual_seed(0))
    assert_float_close(model.predict(batch, candidates), want.gather(1, candidates), TINY_FORWARD_TERMS)


def test_same_generator_same_negatives_and_padding_never_drawn(tiny_ds, tiny_split, tiny_model_config):
    for proposal in ("uniform", "popularity"):
        model = _model(tiny_model_config.replace(rec_loss="sampled", num_negatives=5000,
                                                 negative_proposal=proposal), tiny_ds)
        sampler = StepSampler.for_model(model, item_popularity(tiny_split, tiny_ds.num_items))
        a = sampler.proposal.draw(5000, torch.Generator().manual_seed(9))
        b = sampler.proposal.draw(5000, torch.Generator().manual_seed(9))
        c = sampler.proposal.draw(5000, torch.Generator().manual_seed(10))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert int(a.min()) >= 1 and int(a.max()) <= tiny_ds.num_items, proposal
        # 5,000 draws over ~40 items: every item turns up, padding never does.
        assert set(a.tolist()) == set(range(1, tiny_ds.num_items + 1)), proposal
        sample = sampler(_dense_batch(tiny_split, 8), torch.Generator().manual_seed(9)).candidates
        assert int(sample.ids[0]) == 0 and int(sample.negatives.min()) >= 1


def test_popularity_proposal_sums_to_one_and_excludes_padding(tiny_ds, tiny_split, tiny_model_config):
    counts = item_popularity(tiny_split, tiny_ds.num_items)
    model = _model(tiny_model_config.replace(rec_loss="sampled", negative_proposal="popularity",
                                             popularity_exponent=0.5), tiny_ds)
    with pytest.raises(ValueError, match="needs the training counts: pass item_counts="):
        StepSampler.for_model(model)
    proposal = StepSampler.for_model(model, counts).proposal
    q = proposal.probabilities()
    assert q.shape == (tiny_ds.num_items + 1,) and float(q[0]) == 0.0
    N = tiny_ds.num_items  # float64: powers (a few ulp), a sum of N, a division
    assert float(q.sum()) == pytest.approx(1.0, rel=0, abs=float_tol(1.0, 2 * N + 8, FLOAT64_EPS))
    smoothed = (counts[1:] + 1.0) ** 0.5
    np.testing.assert_allclose(q[1:].numpy(), smoothed / smoothed.sum(), rtol=float_tol(1.0, 2 * N + 8, FLOAT64_EPS))
    assert not np.allclose(q[1:].numpy(), 1.0 / tiny_ds.num_items)  # not uniform on this data
    # The drawn frequencies follow Q.
    draws = proposal.draw(200_000, torch.Generator().manual_seed(0))
    freq = np.bincount(draws.numpy(), minlength=len(q)) / len(draws)
    assert np.abs(freq - q.numpy()).max() < 0.005
    uniform = NegativeProposal(tiny_ds.num_items, "uniform").probabilities()
    assert float(uniform[0]) == 0.0 and float(uniform.sum()) == pytest.approx(1.0, rel=0, abs=float_tol(1.0, N + 2))
    with pytest.raises(ValueError, match=r"item counts must have shape \(41,\)"):
        StepSampler.for_model(model, counts[1:])


# --- the item side: only the rows the step needs --------------------------------------


def _large_model(num_items: int, rec: str, K: int = 256) -> HM4SR:
    torch.manual_seed(0)
    width = 64
    feats = {"text": torch.randn(num_items + 1, width)}
    avail = {"text": torch.ones(num_items + 1)}
    feats["text"][0] = 0.0
    avail["text"][0] = 0.0
    cats = (torch.rand(num_items + 1, 5) < 0.3).float()
    config = ModelConfig(hidden_size=16, max_length=20, num_layers=1, num_heads=2, inner_size=32,
                         rec_loss=rec, num_negatives=K)
    return HM4SR(config, num_items, feats, avail, cats, 0.0).train()


def test_a_sampled_step_touches_only_the_needed_item_rows():
    """A 200,000-item catalogue: the step's item tables hold batch + K rows, and the ID
    rows outside them get a gradient of exactly zero."""
    N, B, T, K = 200_000, 16, 20, 256
    model = _large_model(N, "sampled", K)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    pos = torch.arange(T).view(1, T)
    items = torch.randint(1, N + 1, (B, T), generator=g).masked_fill(pos >= lengths.view(B, 1), 0)
    stamps = (pos * 3600 + 1_000_000).expand(B, T).masked_fill(pos >= lengths.view(B, 1), 0)
    batch = SequenceBatch(items, stamps, lengths, torch.randint(1, N + 1, (B,), generator=g), torch.arange(B))
    asked, shapes = [], []
    original = model.item_tables

    def recording(ids=None):  # the real method, the rows asked for and returned noted
        out = original(ids)
        asked.append(ids)
        shapes.append(out.shape[0])
        return out

    model.item_tables = recording
    out = step_forward(model, batch, 1)
    out.loss.backward()
    assert out.losses.keys() == LOSSES
    assert len(shapes) == 1 and shapes[0] <= B * T + B + K + 1 and shapes[0] < N / 100
    used = asked[0]
    inputs = torch.unique(torch.cat([items.reshape(-1), batch.targets]))
    assert bool(torch.isin(inputs, used).all())  # every input and target item is among them
    assert len(used) - len(inputs) > K / 2  # and the negatives (fewer than K: repeats and hits)
    grad = model.item_embedding.weight.grad
    outside = torch.ones(N + 1, dtype=torch.bool)
    outside[used] = False
    assert int(outside.sum()) == N + 1 - len(used)
    assert bool((grad[outside] == 0).all())
    assert bool((grad[used[1:]].abs().sum(1) > 0).all())  # every used row but padding learns
    assert model.projections[0].weight.grad is not None and float(model.projections[0].weight.grad.abs().sum()) > 0


# --- micro-batches ------------------------------------------------------------------


def test_sampled_backward_in_parts_equals_one_pass_without_dropout(tiny_ds, tiny_split, tiny_model_config):
    """Gradient caching with sampled negatives: drawn once per batch, the same draws as a
    one-pass step from the same generator, so without dropout the same gradients."""
    config = tiny_model_config.replace(hidden_dropout=0.0, attention_dropout=0.0, rec_loss="sampled",
                                       num_negatives=7)
    batch = next(iterate_batches(tiny_split.train_prefix, 40, shuffle=True, generator=torch.Generator().manual_seed(2)))
    one = _model(config, tiny_ds).train()
    out1 = step_forward(one, batch, 3)
    out1.loss.backward()
    parts = _model(config, tiny_ds).train()
    out3 = steps.backward_in_parts(parts, batch, StepSampler.for_model(parts)(batch, torch.Generator().manual_seed(3)), 3)
    terms = batch_terms(40, config)  # the batch in 3 parts or at once: other shapes, other orders
    for k in LOSSES:
        assert_float_close(out3.losses[k], out1.losses[k].detach(), terms, msg=k)
    g1, g3 = _grads(one), _grads(parts)
    assert g1.keys() == g3.keys() and len(g1) > 10
    for name in g1:
        assert_float_close(g3[name], g1[name], terms, msg=name)


# --- configuration, CLI, training -----------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(rec_loss="sample"), "rec_loss must be 'full' or 'sampled', got 'sample'"),
    (dict(num_negatives=0), "num_negatives must be >= 1, got 0"),
    (dict(negative_proposal="zipf"), "negative_proposal must be 'uniform' or 'popularity', got 'zipf'"),
    (dict(popularity_exponent=1.5), r"popularity_exponent must be in \[0, 1\], got 1.5"),
])
def test_sampled_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_cli_set_reaches_the_sampled_fields():
    model, train_over = parse_overrides(["rec_loss=sampled", "num_negatives=256", "negative_proposal=popularity",
                                         "popularity_exponent=0.5"])
    assert model == dict(rec_loss="sampled", num_negatives=256, negative_proposal="popularity",
                         popularity_exponent=0.5) and train_over == {}
    assert ModelConfig(**model).num_negatives == 256


@pytest.mark.parametrize("proposal", ["uniform", "popularity"])
def test_sampled_training_loss_falls_on_the_synthetic_world(tiny_ds, tiny_split, tiny_model_config, proposal):
    config = tiny_model_config.replace(rec_loss="sampled", num_negatives=16, negative_proposal=proposal)
    result = train(tiny_ds, config, TrainConfig(epochs=6, dense_batch_size=16, eval_batch_size=64, seed=3,
                                                patience=10), progress=False, split=tiny_split)
    rec = result.epochs["loss_rec"].to_numpy()
    assert np.isfinite(rec).all() and rec[-1] < rec[0] - 0.1, rec
    assert result.test.metrics["ndcg@10"] > 0
