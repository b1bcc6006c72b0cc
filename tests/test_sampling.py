"""Tests for hm4sr_core.sampling: what a training step draws outside the model and hands
to it. The placeholder positions (count, real positions only, reproducibility), the draw
order (placeholders, then negatives, from one generator), a sample's local rows, and the
model's forward using exactly the draws it is given and refusing draws that do not fit
its configuration."""

from __future__ import annotations

import pytest
import torch

from conftest import float_tol

from hm4sr_core.config import ModelConfig
from hm4sr_core.sampling import StepDraws, StepSampler, placeholder_positions

from test_model import _dense_batch, _model


def test_placeholder_positions_count_and_reproducibility():
    lengths = torch.tensor([1, 2, 3, 4, 5, 6, 9, 10, 10])
    T = 10
    mask = placeholder_positions(lengths, T, 0.3, 4, torch.Generator().manual_seed(7))
    assert mask.shape == (9, T) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [0, 0, 0, 1, 1, 1, 2, 3, 3]  # floor(0.3 n), none when n <= 3
    positions = torch.arange(T).view(1, T)
    assert not (mask & (positions >= lengths.view(-1, 1))).any()  # only real positions
    again = placeholder_positions(lengths, T, 0.3, 4, torch.Generator().manual_seed(7))
    assert torch.equal(mask, again)
    draws = {placeholder_positions(lengths, T, 0.3, 4, torch.Generator().manual_seed(s)).numpy().tobytes()
             for s in range(6)}
    assert len(draws) > 1  # the generator, not a constant, picks the positions
    # every real position can be picked
    many = placeholder_positions(torch.full((400,), 10), T, 0.3, 4, torch.Generator().manual_seed(0))
    assert many.any(0).all()


def test_a_step_draws_placeholders_then_negatives_from_one_generator(tiny_ds, tiny_split, tiny_model_config):
    """The sampler's draws are the placeholder draw followed by the negatives' draw on the
    same generator (the order the model used when it drew them itself), and a sample's
    local rows map back to the batch's item ids."""
    config = tiny_model_config.replace(rec_loss="sampled", num_negatives=9)
    model = _model(config, tiny_ds)
    batch = _dense_batch(tiny_split, 8)
    sampler = StepSampler.for_model(model)
    draws = sampler(batch, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    place = placeholder_positions(batch.lengths, batch.items.shape[1], config.placeholder_ratio,
                                  config.placeholder_min_length, g)
    negatives = sampler.proposal.draw(9, g)
    assert torch.equal(draws.placeholders, place)
    sample = draws.candidates
    assert torch.equal(sample.ids[sample.negatives], negatives)
    local = sample.local(batch)
    for name in ("items", "targets", "position_targets"):
        assert torch.equal(sample.ids[getattr(local, name)], getattr(batch, name)), name
    assert int(sample.ids[0]) == 0 and bool((sample.ids[1:] > 0).all())
    # log(K Q) under the uniform proposal: log(9 / N) at every real row
    want = torch.log(torch.tensor(9.0 / tiny_ds.num_items, dtype=torch.float64))
    assert float((sample.log_expected[1:].double() - want).abs().max()) <= float_tol(float(want.abs()), 3)
    # SASRec draws nothing
    sasrec = _model(ModelConfig.sasrec(hidden_size=16, max_length=tiny_model_config.max_length), tiny_ds)
    nothing = StepSampler.for_model(sasrec)(batch, torch.Generator().manual_seed(4))
    assert nothing.placeholders is None and nothing.candidates is None


def test_the_forward_uses_the_placeholders_it_is_handed(tiny_ds, tiny_split, tiny_model_config):
    """The placeholder contrast reads the handed-in positions: none give a zero term, two
    different draws two different terms, the same draw the same loss; the other losses do
    not depend on them (dropout off)."""
    model = _model(tiny_model_config.replace(hidden_dropout=0.0, attention_dropout=0.0), tiny_ds).train()
    batch = _dense_batch(tiny_split, 16)
    sampler = StepSampler.for_model(model)
    a, b = (sampler(batch, torch.Generator().manual_seed(s)) for s in (1, 2))
    assert not torch.equal(a.placeholders, b.placeholders)
    with torch.no_grad():
        out_a, out_b, again = model(batch, a), model(batch, b), model(batch, a)
        none = model(batch, StepDraws(placeholders=torch.zeros_like(a.placeholders)))
    assert float(none.losses["placeholder_contrastive"]) == 0.0
    assert float(out_a.losses["placeholder_contrastive"]) > 0
    assert float(out_a.losses["placeholder_contrastive"]) != float(out_b.losses["placeholder_contrastive"])
    assert torch.equal(again.losses["placeholder_contrastive"], out_a.losses["placeholder_contrastive"])
    for name in ("rec", "id_contrastive", "category"):
        assert torch.equal(none.losses[name], out_a.losses[name]), name


def test_the_forward_refuses_draws_that_do_not_fit_the_configuration(tiny_ds, tiny_split, tiny_model_config):
    batch = _dense_batch(tiny_split, 8)
    hm4sr = _model(tiny_model_config, tiny_ds)
    sampled = _model(tiny_model_config.replace(rec_loss="sampled", num_negatives=5), tiny_ds)
    sasrec = _model(ModelConfig.sasrec(hidden_size=16, max_length=tiny_model_config.max_length), tiny_ds)
    full_draws = StepSampler.for_model(hm4sr)(batch, torch.Generator().manual_seed(0))
    sampled_draws = StepSampler.for_model(sampled)(batch, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="placeholder contrast needs the step's placeholder positions"):
        hm4sr(batch, StepDraws())
    with pytest.raises(ValueError, match="rec_loss='sampled' needs the step's negatives"):
        sampled(batch, full_draws)
    with pytest.raises(ValueError, match="draws carry sampled-softmax negatives, but this model's rec_loss is 'full'"):
        hm4sr(batch, sampled_draws)
    with pytest.raises(ValueError, match="draws carry placeholder positions, but this model has no placeholder"):
        sasrec(batch, full_draws)
