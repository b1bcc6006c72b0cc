"""What a training step draws besides dropout, drawn outside the model and handed to it.

Two of HM4SR's losses need random choices per step: the placeholder contrast
(docs/model.md section 3) replaces floor(ratio * n) positions of each sequence by
placeholders, and the sampled next-item loss (docs/sampled_softmax.md) scores each
example's target against K shared negatives drawn from a proposal Q. Both are drawn
here, as RecBole draws its negatives in its sampler and not in the model:
:class:`StepSampler` turns a batch and the step's generator into :class:`StepDraws`,
which ``HM4SR.forward(batch, draws)`` takes. Every draw comes from that generator, in a
fixed order: the placeholder positions, then the negatives.

Pure torch, like the model: no file I/O, no device choice (draws happen on the CPU,
where the training loop's generator lives, and move to the batch's device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .data.splits import SequenceBatch


@dataclass
class CandidateSample:
    """The item rows one sampled-softmax step needs (``ModelConfig.rec_loss="sampled"``).

    Local row r stands for global item ``ids[r]``; ``ids`` is sorted and starts with the
    padding item 0, so a batch remapped by :meth:`local` keeps 0 as padding and every
    real item > 0."""

    ids: torch.Tensor  # (U,) global ids: the batch's inputs and targets, the negatives, and 0
    negatives: torch.Tensor  # (K,) local rows of the K drawn negatives (repeats kept: drawn with replacement)
    log_expected: torch.Tensor  # (U,) log(K * Q(item)), the logQ correction of each row (-inf at padding, never used)

    def local(self, batch: SequenceBatch) -> SequenceBatch:
        """``batch`` (the one this sample was drawn for) with its items, targets and
        position targets as local rows."""
        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.searchsorted(self.ids, t)

        return SequenceBatch(rows(batch.items), batch.timestamps, batch.lengths, rows(batch.targets),
                             batch.users, rows(batch.position_targets))


@dataclass
class StepDraws:
    """One training step's draws, for ``HM4SR.forward``; a field is None when the model's
    configuration does not use it."""

    placeholders: torch.Tensor | None = None  # (B, T) bool: positions the placeholder contrast replaces
    candidates: CandidateSample | None = None  # the sampled softmax's rows and negatives


def placeholder_positions(lengths: torch.Tensor, T: int, ratio: float, min_length: int,
                          generator: torch.Generator | None) -> torch.Tensor:
    """(B, T) bool: floor(ratio * n) distinct real positions per sequence (none when n <
    min_length), drawn without a Python loop from ``generator``."""
    B = lengths.shape[0]
    noise = torch.rand(B, T, generator=generator).to(lengths.device)
    pos = torch.arange(T, device=lengths.device).view(1, T)
    noise = noise.masked_fill(pos >= lengths.view(B, 1), 2.0)  # padding sorts last
    rank = noise.argsort(dim=1).argsort(dim=1)
    k = torch.floor(lengths.double() * ratio).long()
    k = torch.where(lengths >= min_length, k, torch.zeros_like(k))
    return rank < k.view(B, 1)


class NegativeProposal:
    """The proposal Q of the sampled softmax over items 1..N (Q(0) = 0, the padding item).

    ``"uniform"``: Q(i) = 1/N. ``"popularity"``: Q(i) proportional to
    (count_i + 1) ** ``exponent`` with ``counts`` ((N+1,), index 0 the padding item) the
    training interaction count of each item (:func:`hm4sr_core.train.item_popularity`);
    the +1 keeps items unseen in training drawable."""

    def __init__(self, num_items: int, kind: str = "uniform", counts=None, exponent: float = 1.0):
        if kind not in ("uniform", "popularity"):
            raise ValueError(f"negative_proposal must be 'uniform' or 'popularity', got {kind!r}")
        self.num_items, self.kind = num_items, kind
        self._cdf: torch.Tensor | None = None  # (N+1,) float64 on the CPU, where the generator draws
        self._log_prob: torch.Tensor | None = None  # (N+1,) float32 log Q, -inf at padding
        if kind == "uniform":
            return
        if counts is None:
            raise ValueError("negative_proposal='popularity' needs the training counts: pass "
                             "item_counts=train.item_popularity(split, num_items) (train() does)")
        counts = torch.as_tensor(counts, dtype=torch.float64).cpu()
        if counts.shape != (num_items + 1,):
            raise ValueError(f"item counts must have shape ({num_items + 1},) (padding item 0 first), "
                             f"got {tuple(counts.shape)}")
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise ValueError("item counts must be finite and >= 0")
        q = (counts + 1.0) ** exponent
        q[0] = 0.0
        q = q / q.sum()
        cdf = q.cumsum(0)
        self._cdf = cdf / cdf[-1]
        self._log_prob = torch.log(q).float()

    def probabilities(self) -> torch.Tensor:
        """(N+1,) float64 Q on the CPU (Q(0) = 0, sums to 1)."""
        if self.kind == "uniform":
            q = torch.full((self.num_items + 1,), 1.0 / self.num_items, dtype=torch.float64)
            q[0] = 0.0
            return q
        return torch.diff(self._cdf, prepend=self._cdf.new_zeros(1))

    def draw(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(k,) int64 global item ids in 1..N drawn with replacement from Q, on the CPU
        (from ``generator``: the same generator gives the same draws)."""
        if self.kind == "uniform":
            return torch.randint(1, self.num_items + 1, (k,), generator=generator)
        u = torch.rand(k, generator=generator, dtype=torch.float64)
        # The first item whose CDF exceeds u: never 0 (CDF 0 there), never an item of Q = 0.
        return torch.searchsorted(self._cdf, u, right=True).clamp_(1, self.num_items)

    def log_prob(self, ids: torch.Tensor) -> torch.Tensor:
        """(U,) float32 log Q of the global ids ``ids``, on their device (-inf at padding)."""
        if self.kind == "uniform":
            log_q = torch.full(ids.shape, -math.log(self.num_items), device=ids.device)
            log_q[ids == 0] = float("-inf")
            return log_q
        if self._log_prob.device != ids.device:
            self._log_prob = self._log_prob.to(ids.device)  # once: every later step reads it there
        return self._log_prob[ids]

    def candidates(self, batch: SequenceBatch, negatives: torch.Tensor) -> CandidateSample:
        """The rows a sampled-softmax step on ``batch`` needs with the negatives
        ``negatives`` ((K,) global ids): the union of the batch's input items, its targets,
        the negatives and the padding item, each with its log(K * Q)."""
        device = batch.items.device
        negatives = negatives.to(device)
        parts = [batch.items.reshape(-1), batch.targets.reshape(-1), negatives,
                 torch.zeros(1, dtype=batch.items.dtype, device=device)]
        if batch.position_targets is not None:
            parts.append(batch.position_targets.reshape(-1))
        ids = torch.unique(torch.cat(parts))  # sorted, so 0 is row 0 and the remap keeps the order of ids
        return CandidateSample(ids, torch.searchsorted(ids, negatives), math.log(len(negatives)) + self.log_prob(ids))


class StepSampler:
    """Each training step's :class:`StepDraws` for a model configuration: placeholder
    positions when the placeholder contrast is on and there are feature streams, the
    step's ``num_negatives`` shared negatives and their rows when ``rec_loss="sampled"``.

    ``num_modalities``: the model's feature streams (``len(model.modalities)``);
    ``item_counts``: the training count of each item, for the popularity proposal."""

    def __init__(self, config: ModelConfig, num_items: int, num_modalities: int, item_counts=None):
        self.config = config
        self.placeholders = config.w_placeholder_contrastive > 0 and num_modalities > 0
        self.proposal = None
        if config.rec_loss == "sampled":
            self.proposal = NegativeProposal(num_items, config.negative_proposal, item_counts,
                                             config.popularity_exponent)

    @classmethod
    def for_model(cls, model, item_counts=None) -> "StepSampler":
        """The sampler ``model`` (an ``HM4SR``) needs: its config, catalogue and streams."""
        return cls(model.config, model.num_items, len(model.modalities), item_counts)

    def __call__(self, batch: SequenceBatch, generator: torch.Generator | None = None) -> StepDraws:
        """The draws for ``batch`` (on its device) from ``generator`` (torch's global
        generator when None): placeholder positions first, then the negatives."""
        cfg = self.config
        draws = StepDraws()
        if self.placeholders:
            draws.placeholders = placeholder_positions(batch.lengths, batch.items.shape[1], cfg.placeholder_ratio,
                                                       cfg.placeholder_min_length, generator)
        if self.proposal is not None:
            draws.candidates = self.proposal.candidates(batch, self.proposal.draw(cfg.num_negatives, generator))
        return draws
