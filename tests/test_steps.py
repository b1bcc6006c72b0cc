"""Tests for hm4sr_core.steps' TrainingStep: one optimiser step in the form the config asks
for (the forms themselves: test_train, test_sampled, test_kernels, test_distributed)."""

from __future__ import annotations

import pytest
import torch

from hm4sr_core import distributed, steps
from hm4sr_core.data.splits import iterate_batches
from hm4sr_core.sampling import StepSampler
from hm4sr_core.train import initial_model


def _optimised(ds, model_config, config):
    model = initial_model(ds, model_config, config.seed).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                 weight_decay=config.weight_decay)
    return model, optimizer


def test_two_training_steps_are_two_cleared_clipped_adam_steps(tiny_ds, tiny_split, tiny_model_config,
                                                               tiny_train_config):
    # Spelled out by hand: forward, backward, clip, step, with the gradients cleared before
    # each step. A second step that accumulated onto the first one's gradients, or a missing
    # clip (the norm here is far above 0.05), gives other weights. Same ops in the same
    # order on one CPU: equal to the bit.
    config = tiny_train_config.replace(grad_clip=0.05)
    batches = list(iterate_batches(tiny_split.train_dense, 32))[:2]
    model, optimizer = _optimised(tiny_ds, tiny_model_config, config)
    take_step = steps.TrainingStep(model, model, optimizer, config, distributed.current(), torch.device("cpu"),
                                   StepSampler.for_model(model))
    ref, ref_optimizer = _optimised(tiny_ds, tiny_model_config, config)
    sampler = StepSampler.for_model(ref)
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)  # the dropout masks
        out, ran = take_step(batch, generator=torch.Generator().manual_seed(i))
        assert ran is not batch and torch.equal(ran.items, batch.items)  # the rows it ran, on the device

        torch.manual_seed(100 + i)
        ref_optimizer.zero_grad(set_to_none=True)
        ref_out = ref(batch, sampler(batch, torch.Generator().manual_seed(i)))
        ref_out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], config.grad_clip)
        assert norm > 10 * config.grad_clip  # the clip bites
        ref_optimizer.step()
        assert torch.equal(out.loss, ref_out.loss)
    for (name, got), want in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(got, want), name


def test_micro_batches_take_the_in_parts_form(tiny_ds, tiny_split, tiny_model_config, tiny_train_config):
    config = tiny_train_config.replace(mode="prefix", micro_batches=2)
    model, optimizer = _optimised(tiny_ds, tiny_model_config, config)
    take_step = steps.TrainingStep(model, model, optimizer, config, distributed.current(), torch.device("cpu"),
                                   StepSampler.for_model(model))
    dense = next(iter(iterate_batches(tiny_split.train_dense, 32)))
    with pytest.raises(ValueError, match="backward_in_parts takes a prefix-mode batch"):
        take_step(dense, generator=torch.Generator().manual_seed(0))
    prefix = next(iter(iterate_batches(tiny_split.train_prefix, 32)))
    out, _ = take_step(prefix, generator=torch.Generator().manual_seed(0))
    assert not out.loss.requires_grad  # the in-parts form returns detached losses
