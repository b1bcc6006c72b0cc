"""The forms of one training step, and :class:`TrainingStep`, which picks one.

:func:`backward_plain` (one process), :func:`backward_weighted` (a data-parallel rank:
its shard's loss weighted so DDP's average is the global batch's mean) and
:func:`backward_in_parts` (``TrainConfig.micro_batches``): a prefix-mode step whose sequence
side runs on a few slices of the batch at a time, with gradient caching, so activation
memory falls with the number of parts while every loss still sees the whole batch. It
drives the model's pieces (``HM4SR.encode_states`` and ``HM4SR.named_losses``) in an
order of its own, so it lives beside the trainer, above the model. Every form takes the
step's :class:`~hm4sr_core.sampling.StepDraws` (placeholder positions, negatives), which
:class:`TrainingStep` draws with its :class:`~hm4sr_core.sampling.StepSampler`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import distributed
from .config import TrainConfig
from .data.splits import SequenceBatch
from .model import HM4SR, HM4SROutput, SequenceStates
from .sampling import StepDraws, StepSampler


def backward_in_parts(model: HM4SR, batch: SequenceBatch, draws: StepDraws, parts: int, *,
                      autocast_dtype: torch.dtype | None = None) -> HM4SROutput:
    """A prefix-mode training step's forward and backward with the sequence side run on
    ``parts`` slices of the batch at a time (``TrainConfig.micro_batches``): about
    1/``parts`` of its activation memory, for one more forward pass of the sequence side
    (and the item side's projection once more per part: the catalogue's, or with
    ``rec_loss="sampled"`` the step's rows only). ``draws`` are the whole batch's.

    The losses still see the whole batch (the contrastive ones take in-batch
    negatives): the sequence vectors are first computed part by part without a graph,
    the losses and their gradients with respect to those vectors are formed once, and
    each part is then run again with a graph and back-propagated from its slice of
    those gradients (gradient caching). The random state is rewound before each rerun,
    so the rerun draws the same dropout masks: the parameter gradients are those of
    the whole batch's loss under these masks. The masks differ from a one-part step's
    (they are drawn per part), so a run is not bit-identical to ``parts=1``.
    Leaves the gradients in ``.grad`` (accumulated, as ``loss.backward()`` would) and
    returns the output with detached losses. ``autocast_dtype`` (e.g. bf16 on CUDA) runs
    each forward piece under autocast, each in an autocast region of its own (so no
    weight cast made without a graph is reused) and every backward outside one; call
    this function outside autocast."""
    if batch.position_targets is not None:
        raise ValueError("backward_in_parts takes a prefix-mode batch (one target per sequence); "
                         "this one has position targets (dense mode)")
    B = batch.items.shape[0]
    if not 1 <= parts <= B:
        raise ValueError(f"parts must be between 1 and the batch size {B}, got {parts}")
    place, sample = model.draws_in_use(draws)
    ids = None
    if sample is not None:  # the batch in the sample's local rows
        batch, ids = sample.local(batch), sample.ids
    slices = [slice(int(c[0]), int(c[-1]) + 1) for c in torch.arange(B).tensor_split(parts)]
    device = batch.items.device

    def part(sl: slice) -> tuple[SequenceBatch, torch.Tensor | None]:
        sub = SequenceBatch(batch.items[sl], batch.timestamps[sl], batch.lengths[sl], batch.targets[sl],
                            batch.users[sl])
        return sub, (place[sl] if place is not None else None)

    def rng_state():
        return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def set_rng_state(state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)

    def amp():
        return torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                              enabled=autocast_dtype is not None)

    states, hs, augs, extras = [], [], [], []
    with torch.no_grad():  # 1: the sequence vectors, part by part, no graph kept
        with amp():
            tables = model.item_tables(ids)
        for sl in slices:
            states.append(rng_state())
            sub, sub_place = part(sl)
            with amp():
                part_states, routing = model.encode_states(sub, tables, sub_place)
            hs.append(part_states.last)
            augs.append(part_states.augmented)
            extras.append(routing)
        del tables
    after = rng_state()
    h = torch.cat(hs, dim=1).requires_grad_()  # (S, B, d), a leaf
    h_aug = None
    if place is not None:  # every part is augmented (a part without placeholders too, as in one pass)
        h_aug = torch.cat(augs, dim=1).requires_grad_()
    # 2: every loss on the whole batch; gradients to the item side and to the vectors
    with amp():
        item_matrix = model.item_matrix(model.item_tables(ids))
        named = model.named_losses(batch, SequenceStates(h, None, h_aug, place), item_matrix, sample)
        total = model.total_loss(named)
    total.backward()
    # 3: each part again, with a graph and the same dropout masks, fed its slice of the gradients
    for state, sl in zip(states, slices):
        set_rng_state(state)
        sub, sub_place = part(sl)
        with amp():  # the item side's projection again: the part's graph must reach its weights
            part_states, _ = model.encode_states(sub, model.item_tables(ids), sub_place)
        outputs, grads = [part_states.last], [h.grad[:, sl]]
        if part_states.augmented is not None:
            outputs.append(part_states.augmented)
            grads.append(h_aug.grad[:, sl])
        torch.autograd.backward(outputs, grads)
    set_rng_state(after)
    merged = {k: torch.cat([e[k] for e in extras]) if k != "lambdas" else extras[0][k] for k in extras[0]}
    seq = h.detach().permute(1, 0, 2).reshape(B, -1)
    return HM4SROutput(sequence=seq, losses={k: v.detach() for k, v in named.items()}, loss=total.detach(),
                       stream_names=model.stream_names, **merged)


def backward_plain(net: torch.nn.Module, batch: SequenceBatch, draws: StepDraws, *, amp: bool = False) -> HM4SROutput:
    """One process's step: the whole batch's forward (under bf16 autocast with ``amp``),
    then ``loss.backward()``; the gradients are left in ``.grad``."""
    with torch.autocast(batch.items.device.type, dtype=torch.bfloat16, enabled=amp):
        out = net(batch, draws)
    out.loss.backward()
    return out


def backward_weighted(net: torch.nn.Module, batch: SequenceBatch, shard: distributed.Shard, draws: StepDraws, *,
                      amp: bool = False) -> HM4SROutput:
    """A data-parallel rank's step: ``batch`` is this rank's shard of the global batch (on
    its device), ``net`` the DDP-wrapped model. The backward runs from the shard's loss
    times ``shard.weight``, so DDP's average over the ranks is the example-weighted mean
    of the global batch's loss. Returns the output with the global batch's losses (one
    all-reduce of a few numbers), which is what the history shows."""
    with torch.autocast(batch.items.device.type, dtype=torch.bfloat16, enabled=amp):
        out = net(batch, draws)
    (out.loss * shard.weight).backward()
    losses, total = distributed.weighted_losses(out.losses, out.loss, shard)
    return dataclasses.replace(out, losses=losses, loss=total)


@dataclass
class TrainingStep:
    """One optimiser step in the form the training config asks for: gradients cleared,
    forward and backward (:func:`backward_plain`; :func:`backward_weighted` under DDP;
    :func:`backward_in_parts` with ``micro_batches > 1``), gradients clipped to
    ``grad_clip``, ``optimizer.step()``. The learning rate is the optimiser's as it
    stands (the trainer sets it first). ``sampler`` draws each step's placeholder
    positions and negatives from the generator the step is given."""

    model: HM4SR
    net: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    ranks: distributed.Ranks
    device: torch.device
    sampler: StepSampler

    def __call__(self, batch: SequenceBatch, *, generator: torch.Generator) -> tuple[HM4SROutput, SequenceBatch]:
        """Train on ``batch`` (a global batch, on the CPU); return the step's output and
        the rows this process ran, on its device (its shard under DDP)."""
        config, amp = self.config, self.config.amp  # bf16 autocast on CUDA, and on CPUs with bf16 units
        shard = distributed.shard_batch(batch, self.ranks) if self.ranks.active else None
        batch = (shard.batch if shard is not None else batch).to(self.device)
        draws = self.sampler(batch, generator)  # placeholder positions, then negatives
        self.optimizer.zero_grad(set_to_none=True)
        if config.micro_batches > 1:  # autocast inside each piece
            out = backward_in_parts(self.model, batch, draws, min(config.micro_batches, batch.size),
                                    autocast_dtype=torch.bfloat16 if amp else None)
        elif shard is None:
            out = backward_plain(self.net, batch, draws, amp=amp)
        else:
            out = backward_weighted(self.net, batch, shard, draws, amp=amp)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           config.grad_clip)
        self.optimizer.step()
        return out, batch
