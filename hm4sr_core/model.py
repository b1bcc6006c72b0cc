"""HM4SR and its SASRec baseline, in one file read top to bottom (docs/model.md, sections 2-3).

Small modules first, in the order of the forward pass: the feature tables' width
(section 1), the Interactive MoE (2.2), the time embedding (2.3), the Temporal MoE (2.4),
the per-stream Transformer encoders (2.5); then :class:`HM4SR`, then the four losses as
pure functions (section 3), with the sampled next-item loss for large catalogues
(docs/sampled_softmax.md). SASRec is HM4SR with the ID stream alone and every extra part
off (``ModelConfig.sasrec()``). Pure torch: no file I/O, no device choice, no prints.

The contract, RecBole's split of training and scoring: ``forward(batch, draws)`` is a
training step's forward and returns every loss by name with their weighted total and the
gates of both MoE levels (:class:`HM4SROutput`); ``draws``, the step's placeholder
positions and negatives, are drawn outside the model (:mod:`hm4sr_core.sampling`).
Scores come from :meth:`HM4SR.full_sort_predict` and :meth:`HM4SR.predict`, query
vectors from :meth:`HM4SR.query`, and :meth:`HM4SR.encode` gives the sequence side with
its gates for looking inside.

Streams are stacked on one axis: ``(B, T, S, d)`` with S = 1 (ID) + M feature
modalities. Each stream keeps its own weights, stacked as ``(S, ...)`` tensors, and the
code here runs all streams in one batched kernel per operation. Two modules have a second,
CPU-tuned form of the same computation in :mod:`hm4sr_core.kernels` (the encoders stream
by stream with pre-drawn dropout masks, the Interactive MoE's mix in chunks); which form
runs is decided here (:func:`runs_cpu_kernels`, :meth:`HM4SR.use_cpu_kernels`), and each
call into that module is a line here that says ``kernels.``. Gradient caching over parts
of a batch is a form of the training step (:mod:`hm4sr_core.steps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig
from .data.splits import SequenceBatch
from .data.timeunits import SECONDS_PER_DAY
from .sampling import CandidateSample, StepDraws

MAX_GAP_LOG2 = 32  # gaps up to 2**32 s (136 years) get their own bucket; longer ones share the last
PADDING_BUCKET, FIRST_BUCKET, GAP_BUCKET_OFFSET = 0, 1, 2


# ----------------------------------------------------------------------------- output


@dataclass
class HM4SROutput:
    """What the model returns, as named fields (Mixtral-style: the routing comes back
    beside the result). A training step (``HM4SR.forward``) fills every field; the
    sequence side alone (``HM4SR.encode``) leaves the losses empty. Gate fields are None
    when their MoE level is off, and zero at padding positions."""

    sequence: torch.Tensor  # (B, S*d) query vector per sequence (concatenated stream outputs)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, by name
    loss: torch.Tensor | None = None  # weighted total, formed in HM4SR.total_loss
    interactive_gates: torch.Tensor | None = None  # (B, T, S, E) g_s per stream and position
    temporal_gates: torch.Tensor | None = None  # (B, T, E) r per position
    lambdas: torch.Tensor | None = None  # (S,) Interactive-MoE output scale per stream
    interval_buckets: torch.Tensor | None = None  # (B, T) gap bucket (0 padding, 1 first item)
    time_values: torch.Tensor | None = None  # (B, T) absolute time as fed to the embedding
    stream_names: tuple[str, ...] = ()


@dataclass
class SequenceStates:
    """The encoders' outputs for one batch, what the losses read (S streams, the M = S - 1
    feature streams after them)."""

    last: torch.Tensor  # (S, B, d) each stream at each sequence's last item
    every: torch.Tensor | None = None  # (S, B, T, d) at every position (a dense training batch), else None
    augmented: torch.Tensor | None = None  # the feature streams with placeholders: (M, B, d), or (M, B, T, d)
    #                                        with dense_auxiliary="every_position"; None without placeholders
    placeholders: torch.Tensor | None = None  # (B, T) bool, the positions ``augmented`` replaced

    def query(self) -> torch.Tensor:
        """(B, S*d): the streams' last-item outputs side by side, the vector scores use."""
        return self.last.permute(1, 0, 2).reshape(self.last.shape[1], -1)


# ----------------------------------------------------------------------------- modules


def fit_feature_width(table: torch.Tensor, width: int) -> torch.Tensor:
    """A (rows, D) feature table brought to (rows, width), as the released code's fixed
    768-d inputs need: zero columns appended when D < width (a projection of the padded
    table computes the same values, and Adam never moves the weights of all-zero columns);
    when D > width, the table's coordinates on its ``width`` leading right-singular
    directions (no centring, so the zero padding row stays zero), each direction's sign
    fixed by its largest entry so that every device computes the same table."""
    rows, D = table.shape
    if D <= width:
        return F.pad(table, (0, width - D))
    _, _, vh = torch.linalg.svd(table.double(), full_matrices=False)
    basis = vh[:width]  # (min(width, rows), D): a table of fewer rows has no more directions
    top = basis.abs().argmax(dim=1, keepdim=True)
    basis = basis * torch.sign(basis.gather(1, top))
    out = (table.double() @ basis.T).to(table.dtype)
    return F.pad(out, (0, width - out.shape[1]))  # zero columns for the directions it lacks


def transform_features(table: torch.Tensor, available: torch.Tensor, how: str) -> torch.Tensor:
    """A (N+1, D) feature table after ``ModelConfig.feature_transform``: statistics over the
    items that have the modality (``available`` > 0; row 0, padding, never counts); those rows
    transformed, every other row left at zero. "centre" removes the mean row: features whose
    energy sits in one shared direction (the MobileNetV2 vectors of the poster cards put about
    92% there) otherwise reach the model nearly constant across items. "standardise" also
    scales every column to unit variance (a constant column stays zero); "pca" centres and
    rotates onto the principal axes, keeping every direction (columns past the table's rank
    are zero; each axis's sign fixed by its largest entry): the values of a centred PCA
    without its truncation; "l2" scales every row to unit length. Computed in float64,
    returned in the table's dtype."""
    if how == "none":
        return table
    rows = available.bool().clone()
    rows[0] = False
    x = table.double()
    out = torch.zeros_like(x)
    if not bool(rows.any()):
        return table
    real = x[rows]
    if how == "l2":
        norms = real.norm(dim=1, keepdim=True)
        real = torch.where(norms > 0, real / norms.clamp(min=1e-300), real)
    else:
        real = real - real.mean(dim=0, keepdim=True)
        if how == "pca":
            _, _, vh = torch.linalg.svd(real, full_matrices=False)  # (min(n, D), D)
            top = vh.abs().argmax(dim=1, keepdim=True)
            vh = vh * torch.sign(vh.gather(1, top))
            real = F.pad(real @ vh.T, (0, x.shape[1] - vh.shape[0]))
        if how == "standardise":
            sd = real.std(dim=0, unbiased=False, keepdim=True)
            real = torch.where(sd > 0, real / sd.clamp(min=1e-300), torch.zeros_like(real))
    out[rows] = real
    return out.to(table.dtype)


def runs_cpu_kernels(setting: bool | None, x: torch.Tensor) -> bool:
    """Which of its two forms a module runs on ``x``: the CPU-tuned one of
    :mod:`hm4sr_core.kernels` when ``setting`` is True, the batched one written in this
    file when it is False, and, left at None (the default), the CPU-tuned one for tensors
    on a CPU. ``setting`` is the module's ``cpu_kernels``, set for the whole model by
    :meth:`HM4SR.use_cpu_kernels`. Both forms compute the same values up to float
    rounding; in training their dropout masks come from different draws."""
    return x.device.type == "cpu" if setting is None else bool(setting)


class InteractiveMoE(nn.Module):
    """First level (docs/model.md 2.2): E experts Linear(Sd -> Sd) over all streams; one
    softmax gate per stream from its own slice, g_s = softmax(W_s z_s + b_s);
    o_s = lambda_s * sum_k g_s[k] * slice_s(Expert_k(z)).

    Each token's input is z = e(item) + p(position), p added to every stream. Experts and
    gate logits are affine in z, so Expert_k(e + p) = Expert_k(e) + W_k p and
    W_s (e_s + p) + b_s = (W_s e_s + b_s) + W_s p: both are computed once per distinct
    item and once per position, and the (tokens x Sd x ESd) product shrinks to
    (distinct items + T) rows. Only the gate softmax and the mix are per token."""

    def __init__(self, num_streams: int, d: int, num_experts: int, lambda_init: tuple):
        super().__init__()
        self.S, self.d, self.E = num_streams, d, num_experts
        self.experts = nn.Linear(num_streams * d, num_experts * num_streams * d)  # E experts side by side
        self.gate_weight = nn.Parameter(torch.empty(num_streams, d, num_experts))  # W_s
        self.gate_bias = nn.Parameter(torch.zeros(num_streams, num_experts))  # b_s
        lam = [lambda_init[min(s, len(lambda_init) - 1)] for s in range(num_streams)]
        self.lambdas = nn.Parameter(torch.tensor(lam, dtype=torch.float32))
        self.cpu_kernels: bool | None = None  # which form of the mix runs: see runs_cpu_kernels

    def forward(self, rows: torch.Tensor, position: torch.Tensor, index: torch.Tensor):
        """rows (U, S, d): the distinct items' embeddings per stream; position (T, d);
        index (B, T) into rows -> (o (B, T, S, d), gates (B, T, S, E)) for the tokens
        z = rows[index] + position."""
        U, S, d = rows.shape
        B, T = index.shape
        E = self.E
        item_logits = torch.einsum("usd,sde->use", rows, self.gate_weight) + self.gate_bias  # (U, S, E)
        pos_logits = torch.einsum("td,sde->tse", position, self.gate_weight)  # (T, S, E)
        # F.embedding for the row gathers: its CPU backward sums in a fixed order (determinism).
        gates = torch.softmax(F.embedding(index, item_logits.reshape(U, -1)).view(B, T, S, E) + pos_logits,
                              dim=-1)  # (B, T, S, E): g_s per token
        item_out = self.experts(rows.reshape(U, S * d))  # (U, E*S*d): Expert_k(e), bias included
        pos_out = F.linear(position.repeat(1, S), self.experts.weight)  # (T, E*S*d): W_k p
        if runs_cpu_kernels(self.cpu_kernels, rows):
            # The same sum a few sequences at a time, never holding (B, T, E, S, d).
            mixed = kernels.factored_mix(gates, item_out, pos_out, index, E)
        else:
            expert_out = (F.embedding(index, item_out) + pos_out).view(B, T, E, S, d)  # Expert_k(z) per token
            # An elementwise mix: einsum lowers this to B*T*S tiny matmuls, far slower on CPU.
            # Contiguous (B, T, E, S) gates keep the backward's (B, T, E, S, d) gradient contiguous:
            # with the transposed view it came out strided and was copied (about a quarter slower).
            mixed = (expert_out * gates.transpose(2, 3).contiguous().unsqueeze(-1)).sum(2)  # (B, T, S, d)
        return mixed * self.lambdas.view(1, 1, S, 1), gates


class TimeEmbedding(nn.Module):
    """tau = [interval embedding ; absolute-time embedding], (B, T, 2d) (paper eq. for TE).

    interval: bucket = floor(s * log2(gap + 1)) looked up in a table, with padding and
    the first item of a sequence in buckets of their own (the released code computed
    log2 of a negative gap at padding). absolute: cos((w t + b) * f), f_i = 10000^(-i/d).
    """

    def __init__(self, d: int, interval_scale: float, normalise: bool, time_origin: float,
                 shared_zero_bucket: bool = False, timestamps: str = "exact", time_span: float | None = None):
        super().__init__()
        # How the model reads the (B, T) integer seconds (``ModelConfig.timestamps``): exactly,
        # rounded to float32 as RecBole stores them, or min-max scaled over the data set
        # (``time_span`` = last - first timestamp) as RecBole's normalize_all.
        if timestamps == "minmax" and not (time_span and time_span > 0):
            raise ValueError(f"timestamps='minmax' needs the data set's time span (stats last_timestamp - "
                             f"first_timestamp) > 0, got {time_span!r}; a dataset prepared before "
                             f"last_timestamp was recorded needs preparing again")
        self.timestamps = timestamps
        self.time_span = float(time_span) if time_span else None
        self.interval_scale = interval_scale
        # True reproduces the released code (config ``gap_buckets="released"``): padding and
        # the first item land in the zero-gap bucket (its NaN at padding cast to index 0).
        self.shared_zero_bucket = shared_zero_bucket
        self.normalise = normalise
        self.time_origin = float(time_origin)
        self.num_buckets = GAP_BUCKET_OFFSET + int(interval_scale * MAX_GAP_LOG2) + 1
        self.interval = nn.Embedding(self.num_buckets, d)
        self.absolute = nn.Linear(1, d)
        self.register_buffer("freq", 10000.0 ** (-torch.arange(d, dtype=torch.float32) / d), persistent=False)

    def stored(self, timestamps: torch.Tensor) -> torch.Tensor:
        """The (B, T) times as this model reads them: the integer seconds themselves
        (``timestamps="exact"``), or float64 values of the float32 seconds or of the [0, 1]
        min-max clock, each as RecBole would have stored them in float32."""
        if self.timestamps == "float32":
            return timestamps.float().double()
        if self.timestamps == "minmax":
            return ((timestamps.double() - self.time_origin) / self.time_span).float().double()
        return timestamps

    def buckets(self, timestamps: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 bucket ids from (B, T) seconds and the (B, T) real-item mask."""
        if self.timestamps != "exact":
            t = self.stored(timestamps)
            gaps = (t[:, 1:] - t[:, :-1]).clamp(min=0)
        else:
            gaps = (timestamps[:, 1:] - timestamps[:, :-1]).clamp(min=0).double()  # shuffled times can go back
        b = torch.floor(self.interval_scale * torch.log2(gaps + 1.0)).long() + GAP_BUCKET_OFFSET
        b = b.clamp(max=self.num_buckets - 1)
        if self.shared_zero_bucket:
            first, padding = GAP_BUCKET_OFFSET, GAP_BUCKET_OFFSET
        else:
            first, padding = FIRST_BUCKET, PADDING_BUCKET
        out = torch.cat([b.new_full((b.shape[0], 1), first), b], dim=1)  # (B, T), T = 1 included
        return torch.where(real, out, torch.full_like(out, padding))

    def time_values(self, timestamps: torch.Tensor) -> torch.Tensor:
        """(B, T) float32: days since the dataset's first interaction, or raw seconds (or
        the [0, 1] clock with ``timestamps="minmax"``)."""
        if self.timestamps != "exact":
            t = self.stored(timestamps)
            return ((t - self.time_origin) / SECONDS_PER_DAY).float() if self.normalise else t.float()
        if self.normalise:
            return ((timestamps.double() - self.time_origin) / SECONDS_PER_DAY).float()
        return timestamps.float()  # the released code: ~1e9 s straight into Linear -> cos

    def forward(self, timestamps: torch.Tensor, real: torch.Tensor):
        buckets = self.buckets(timestamps, real)
        t = self.time_values(timestamps)
        # t is float32 by definition; the Linear may have been moved to another dtype.
        absolute = torch.cos(self.absolute(t.unsqueeze(-1).to(self.absolute.weight.dtype)) * self.freq)  # (B, T, d)
        return torch.cat([self.interval(buckets), absolute], dim=-1), buckets, t  # (B, T, 2d)


class TemporalMoE(nn.Module):
    """Second level: r = softmax(W_r tau + b_r); y = z * sum_k r_k w_k, w_k in R^{Sd}."""

    def __init__(self, num_streams: int, d: int, num_experts: int, trainable: bool):
        super().__init__()
        self.gate = nn.Linear(2 * d, num_experts)
        # Registered either way (saved, moved by .to()); frozen reproduces the released code,
        # whose experts sat in a plain Python list and never left their random init.
        self.experts = nn.Parameter(torch.empty(num_experts, num_streams * d), requires_grad=trainable)

    def forward(self, z: torch.Tensor, tau: torch.Tensor):
        B, T, S, d = z.shape
        gates = torch.softmax(self.gate(tau), dim=-1)  # (B, T, E)
        gain = (gates @ self.experts).view(B, T, S, d)
        return z * gain, gates


class StackedLinear(nn.Module):
    """S independent Linear layers applied to (S, n, in) at once."""

    def __init__(self, num_streams: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_streams, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(num_streams, 1, d_out))

    def forward(self, x: torch.Tensor, streams: list[int] | None = None,
                columns: slice = slice(None)) -> torch.Tensor:
        """(S', n, in) -> (S', n, out), the streams ``streams`` (default all) in one batched
        product; ``columns`` computes only those outputs."""
        w, b = (self.weight, self.bias) if streams is None else (self.weight[streams], self.bias[streams])
        return torch.baddbmm(b[..., columns], x, w[..., columns])


class StackedLayerNorm(nn.Module):
    """S independent LayerNorms applied to (S, n, d) at once."""

    def __init__(self, num_streams: int, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_streams, 1, d))
        self.bias = nn.Parameter(torch.zeros(num_streams, 1, d))
        self.eps = eps

    def forward(self, x: torch.Tensor, streams: list[int] | None = None) -> torch.Tensor:
        """(S', n, d), each slice with its stream's gain and bias (``streams``, default all)."""
        w, b = (self.weight, self.bias) if streams is None else (self.weight[streams], self.bias[streams])
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * w + b


class StackedTransformerLayer(nn.Module):
    """Post-LN Transformer layer (RecBole's), one set of weights per stream, causal.

    Weights are stacked on a stream axis (S, ...) and every stream runs in one batched
    kernel per operation (what a GPU, bound by kernel launches, wants); on a CPU
    :func:`~hm4sr_core.kernels.encode_per_stream` computes the same layer stream by stream."""

    def __init__(self, S: int, d: int, heads: int, inner: int, hidden_dropout: float,
                 attention_dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = StackedLinear(S, d, 3 * d)
        self.out = StackedLinear(S, d, d)
        self.ln1 = StackedLayerNorm(S, d, eps)
        self.ff1 = StackedLinear(S, d, inner)
        self.ff2 = StackedLinear(S, inner, d)
        self.ln2 = StackedLayerNorm(S, d, eps)
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.recompute = False  # set by HM4SR.recompute_activations

    def forward(self, x: torch.Tensor, streams: list[int] | None, last: torch.Tensor | None) -> torch.Tensor:
        """x (S', B, T, d), slice i with the weights of stream ``streams[i]`` (default all)
        -> (S', B, T, d), or (S', B, 1, d) at ``last`` ((B,) each sequence's last real item)."""
        S, B, T, d = x.shape
        H, dh = self.heads, d // self.heads
        ph, drop = self.hidden_dropout, self.training
        if last is None:
            qkv = self.qkv(x.reshape(S, B * T, d), streams).view(S * B, T, 3, H, dh)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (S*B, H, T, dh), views
            a = kernels.attention(q, k, v, None, self.attention_dropout, drop)
            rows, residual = T, x
        else:
            # Keys and values at every position, the query at the last one only.
            residual = torch.gather(x, 2, last.view(1, B, 1, 1).expand(S, B, 1, d))
            q = self.qkv(residual.reshape(S, B, d), streams, slice(0, d)).view(S * B, 1, H, dh).transpose(1, 2)
            kv = self.qkv(x.reshape(S, B * T, d), streams, slice(d, 3 * d)).view(S * B, T, 2, H, dh)
            k, v = (t.transpose(1, 2) for t in kv.unbind(2))
            allowed = (torch.arange(T, device=x.device).view(1, T) <= last.view(B, 1)).repeat(S, 1)  # (S*B, T)
            a = kernels.attention(q, k, v, allowed, self.attention_dropout, drop)
            rows = 1
        a = a.view(S, B, H, rows, dh).permute(0, 1, 3, 2, 4).reshape(S, B * rows, d)
        h = F.dropout(self.out(a, streams), ph, drop) + residual.reshape(S, B * rows, d)
        h = self.ln1(h, streams)
        f = self.ff2(F.gelu(self.ff1(h, streams)), streams)
        h = self.ln2(F.dropout(f, ph, drop) + h, streams)
        return h.view(S, B, rows, d)


class StreamEncoders(nn.Module):
    """Per stream: LayerNorm -> dropout -> causal Transformer (docs/model.md 2.5)."""

    def __init__(self, S: int, config: ModelConfig):
        super().__init__()
        self.ln = StackedLayerNorm(S, config.hidden_size, config.layer_norm_eps)
        self.dropout = config.hidden_dropout
        self.layers = nn.ModuleList([
            StackedTransformerLayer(S, config.hidden_size, config.num_heads, config.inner_size,
                                    config.hidden_dropout, config.attention_dropout, config.layer_norm_eps)
            for _ in range(config.num_layers)])
        self.cpu_kernels: bool | None = None  # which form runs: see runs_cpu_kernels

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, *, streams: list[int] | None = None,
                last_only: bool = True) -> torch.Tensor:
        """x (S', B, T, d) -> (S', B, d) at the last real position if ``last_only``, else
        (S', B, T, d) at every position. ``streams`` picks whose weights each slice uses."""
        S, B, T, d = x.shape
        ids = list(range(S)) if streams is None else [int(s) for s in streams]
        if len(ids) != S:
            raise ValueError(f"{len(ids)} stream ids for {S} streams of input")
        if runs_cpu_kernels(self.cpu_kernels, x):
            # The same layers stream by stream on (B*T, d) matrices, dropout masks drawn first.
            return kernels.encode_per_stream(self, x, lengths, ids, last_only)
        drop = self.training and self.dropout > 0
        last = lengths - 1
        h = F.dropout(self.ln(x.reshape(S, B * T, d), streams), self.dropout, drop).view(S, B, T, d)
        for i, layer in enumerate(self.layers):
            at = last if (last_only and i == len(self.layers) - 1) else None  # the loss needs the last item only
            h = kernels.recomputed(layer, h, streams, at) if layer.recompute else layer(h, streams, at)
        return h[:, :, 0] if last_only else h


# ----------------------------------------------------------------------------- model


class HM4SR(nn.Module):
    """HM4SR over an ID stream plus any number of feature modalities.

    The item tables are given as tensors (the model reads no files); they are buffers,
    not parameters, and are not saved in the state dict (checkpoints carry the data hash).
    """

    def __init__(self, config: ModelConfig, num_items: int, features: dict[str, torch.Tensor],
                 available: dict[str, torch.Tensor], categories: torch.Tensor, time_origin: float,
                 time_span: float | None = None):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.num_items = num_items
        self.modalities = tuple(features)
        self.stream_names = ("id",) + self.modalities
        S = self.S = len(self.stream_names)

        self.item_embedding = nn.Embedding(num_items + 1, d, padding_idx=0)  # E_id
        self.position = nn.Embedding(config.max_length, d)  # P, shared by every stream
        self.projections = nn.ModuleList()
        unknown = [m for m in config.feature_transform_modalities if m not in features]
        if config.feature_transform != "none" and unknown:
            raise ValueError(f"feature_transform_modalities names {unknown}, not among the model's "
                             f"modalities {list(features)}")
        for i, name in enumerate(self.modalities):
            table = features[name].float()
            if not config.feature_transform_modalities or name in config.feature_transform_modalities:
                table = transform_features(table, available[name], config.feature_transform)
            if config.released.feature_width:
                table = fit_feature_width(table, config.released.feature_width)
            self.register_buffer(f"features_{i}", table, persistent=False)  # (N+1, D_m)
            avail = available[name].float()
            if config.released.padding_row == "trained":  # the released padding column scores W_m 0 + b_m
                avail = avail.clone()
                avail[0] = 1.0
            self.register_buffer(f"available_{i}", avail, persistent=False)  # (N+1,)
            self.projections.append(nn.Linear(table.shape[1], d))  # W_m
        categories = categories.float()
        columns = config.released.category_columns
        if columns > categories.shape[1]:  # always-zero columns, as the released code's fixed 192
            categories = F.pad(categories, (0, columns - categories.shape[1]))
        elif columns and columns < categories.shape[1]:
            raise ValueError(f"category_columns={columns} is fewer than the dataset's "
                             f"{categories.shape[1]} categories")
        self.register_buffer("categories", categories, persistent=False)  # (N+1, C)

        self.interactive = InteractiveMoE(S, d, config.num_experts, config.lambda_init) \
            if config.use_interactive_moe else None
        self.time = TimeEmbedding(d, config.interval_scale, config.released.normalise_time, time_origin,
                                  shared_zero_bucket=config.released.gap_buckets == "released",
                                  timestamps=config.released.timestamps, time_span=time_span) \
            if config.use_temporal_moe or (config.w_placeholder_contrastive > 0 and self.modalities) else None
        self.temporal = TemporalMoE(S, d, config.num_experts, config.released.train_temporal_experts) \
            if config.use_temporal_moe else None
        self.encoders = StreamEncoders(S, config)
        C = categories.shape[1]
        self.category_head = nn.Linear(S * d, C) if (config.w_category > 0 and C > 0) else None
        self.placeholders = StackedLinear(len(self.modalities), 2 * d, d) \
            if (config.w_placeholder_contrastive > 0 and self.modalities) else None
        self._init_weights()

    # -- init: one pass over every module, documented in one place
    def _init_weights(self) -> None:
        """Normal(0, initializer_range) for every weight matrix and embedding, zeros for
        biases, ones for LayerNorm gains, lambda as configured; temporal experts
        Normal(0, 0.1) as released; the ID padding row zero. With ``reference_init`` the
        modules the released code built after its init pass (category head, Interactive
        MoE, placeholders) keep PyTorch's defaults instead. ``interactive_gate_bias=uniform``
        draws the Interactive-MoE gate biases as nn.Linear's default; ``padding_row=trained``
        leaves the padding row at its normal draw."""
        std = self.config.initializer_range
        late = {id(sub) for m in (self.category_head, self.interactive, self.placeholders) if m is not None
                for sub in m.modules()}  # the modules and everything inside them
        for module in self.modules():
            if self.config.released.reference_init and id(module) in late:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, StackedLinear):
                nn.init.normal_(module.weight, 0.0, std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, InteractiveMoE):
                nn.init.normal_(module.gate_weight, 0.0, std)
        if self.config.released.reference_init:
            if self.interactive is not None:  # nn.Linear's default for the hand-made gate too
                bound = 1.0 / math.sqrt(self.interactive.d)
                nn.init.uniform_(self.interactive.gate_weight, -bound, bound)
            if self.placeholders is not None:
                bound = 1.0 / math.sqrt(2 * self.config.hidden_size)
                nn.init.uniform_(self.placeholders.weight, -bound, bound)
                nn.init.uniform_(self.placeholders.bias, -bound, bound)
        if self.interactive is not None and self.config.released.interactive_gate_bias == "uniform":
            bound = 1.0 / math.sqrt(self.interactive.d)  # nn.Linear(d, E)'s default bias
            nn.init.uniform_(self.interactive.gate_bias, -bound, bound)
        if self.temporal is not None:
            with torch.no_grad():
                self.temporal.experts.normal_(0.0, 0.1)
        if self.config.released.padding_row == "zero":
            with torch.no_grad():
                self.item_embedding.weight[0].zero_()

    def recompute_activations(self, on: bool = True) -> "HM4SR":
        """Keep only each Transformer layer's input (and its dropout masks) for the
        backward and recompute the rest there: same values and gradients, less memory
        (a prefix epoch on ml-100k took 1.15 to 1.32 times as long here; ``TrainConfig.recompute``).
        Returns the model."""
        for layer in self.encoders.layers:
            layer.recompute = bool(on)
        return self

    def use_cpu_kernels(self, on: bool | None = True) -> "HM4SR":
        """Choose which form the stream encoders and the Interactive MoE run: True, the
        CPU-tuned forms of :mod:`hm4sr_core.kernels` (the encoders stream by stream with
        dropout masks drawn from random words, the expert mix a few sequences at a time
        with its own backward); False, the batched forms written in this file (one kernel
        for all streams, F.dropout, the direct mix: what a GPU wants, and what an ONNX
        export traces); None (the default), the CPU-tuned forms for tensors on a CPU
        (:func:`runs_cpu_kernels`). Returns the model."""
        for module in (self.encoders, self.interactive):
            if module is not None:
                module.cpu_kernels = on
        return self

    # -- item side
    def item_tables(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N+1, S, d) raw item representations per stream: E_id and W_m x_m + b_m
        (zero for items lacking the modality). Computed once per step, shared by the
        sequence side, the scores and the category head. With ``ids`` ((U,) global item
        ids) only those rows, (U, S, d) in that order: what a sampled-softmax step needs
        (``CandidateSample.ids``), at a cost that grows with U, not with N."""
        if ids is None:
            tables = [self.item_embedding.weight]
            for i, proj in enumerate(self.projections):
                feats = getattr(self, f"features_{i}")
                avail = getattr(self, f"available_{i}")
                tables.append(proj(feats).mul_(avail.unsqueeze(1)))  # in place: one (N+1, d) temporary less
            return torch.stack(tables, dim=1)
        tables = [self.item_embedding.weight[ids]]  # the gradient reaches these rows only
        for i, proj in enumerate(self.projections):
            feats = getattr(self, f"features_{i}")[ids]
            avail = getattr(self, f"available_{i}")[ids]
            tables.append(proj(feats).mul_(avail.unsqueeze(1)))
        return torch.stack(tables, dim=1)

    def item_matrix(self, tables: torch.Tensor | None = None) -> torch.Tensor:
        """(N+1, S*d): scores are sequence (B, S*d) @ item_matrix.T (late fusion)."""
        tables = self.item_tables() if tables is None else tables
        return tables.reshape(tables.shape[0], -1)

    # -- sequence side
    def _streams(self, batch: SequenceBatch, tables: torch.Tensor):
        """Embeddings -> Interactive MoE -> time -> Temporal MoE: z (B, T, S, d), the time
        embedding tau (B, T, 2d) or None, and what both levels routed (the gate fields of
        :class:`HM4SROutput`, zero at padding)."""
        items = batch.items
        B, T = items.shape
        real = items > 0
        position = self.position.weight[:T]  # P, added to every stream
        routing: dict = {}
        if self.interactive is not None:
            uniq, index = torch.unique(items, return_inverse=True)  # sorted: a cheap, deterministic order
            rows = tables[uniq]  # (U, S, d): the distinct items' embeddings
            z = F.embedding(index, rows.view(len(uniq), -1)).view(B, T, *rows.shape[1:]) \
                + position.view(1, T, 1, -1)  # (B, T, S, d)
            o, g = self.interactive(rows, position, index)  # o = the MoE's output for z, per token
            z = z + o
            routing["interactive_gates"] = g * real.view(B, T, 1, 1)
            routing["lambdas"] = self.interactive.lambdas.detach()
        else:
            z = tables[items] + position.view(1, T, 1, -1)
        tau = None
        if self.time is not None:
            tau, buckets, t = self.time(batch.timestamps, real)
            routing["interval_buckets"] = buckets
            routing["time_values"] = t * real
        if self.temporal is not None:
            z, r = self.temporal(z, tau)
            routing["temporal_gates"] = r * real.unsqueeze(-1)
        return z, tau, routing

    def encode_states(self, batch: SequenceBatch, tables: torch.Tensor, placeholders: torch.Tensor | None = None,
                      *, every: bool = False) -> tuple[SequenceStates, dict]:
        """The sequence side of ``batch`` with the item tables ``tables`` (rows in the
        batch's item ids): :meth:`_streams`, then the encoders; with ``placeholders``
        ((B, T) bool) the feature streams again with those positions replaced by their
        placeholders (a Linear(2d -> d) of tau per modality), through the same encoders.
        ``every`` keeps every position (dense training), for the augmented streams too
        with ``dense_auxiliary="every_position"``. Returns the states and the routing."""
        z, tau, routing = self._streams(batch, tables)
        x = z.permute(2, 0, 1, 3)  # (S, B, T, d)
        h = self.encoders(x, batch.lengths, last_only=not every)
        h_aug = None
        if placeholders is not None:
            M = len(self.modalities)
            ph = self.placeholders(tau.reshape(1, -1, tau.shape[-1]).expand(M, -1, -1)).view(M, *tau.shape[:2], -1)
            aug = torch.where(placeholders.unsqueeze(0).unsqueeze(-1), ph, x[1:])  # (M, B, T, d)
            aug_every = every and self.config.dense_auxiliary == "every_position"
            h_aug = self.encoders(aug, batch.lengths, streams=list(range(1, self.S)), last_only=not aug_every)
        if not every:
            return SequenceStates(h, None, h_aug, placeholders), routing
        last = (batch.lengths - 1).view(1, -1, 1, 1).expand(h.shape[0], -1, 1, h.shape[-1])
        return SequenceStates(torch.gather(h, 2, last).squeeze(2), h, h_aug, placeholders), routing

    # -- training: every loss by name, from the step's draws
    def forward(self, batch: SequenceBatch, draws: StepDraws) -> HM4SROutput:
        """One training step's forward: every enabled loss by name (unweighted) and their
        weighted total, with the sequence vectors and what both MoE levels routed.
        ``batch`` needs its targets; a dense batch (``position_targets`` set) makes every
        position with a next item an example. ``draws`` are the step's placeholder
        positions and, with ``rec_loss="sampled"``, its negatives
        (:class:`~hm4sr_core.sampling.StepSampler`); a sampled step computes the item side
        for its own rows only. Scores come from :meth:`full_sort_predict` and :meth:`predict`."""
        place, sample = self.draws_in_use(draws)
        if sample is not None:  # the batch in the sample's local rows, the item side for those rows only
            batch, tables = sample.local(batch), self.item_tables(sample.ids)
        else:
            tables = self.item_tables()
        states, routing = self.encode_states(batch, tables, place, every=batch.position_targets is not None)
        named = self.named_losses(batch, states, self.item_matrix(tables), sample)
        return HM4SROutput(sequence=states.query(), losses=named, loss=self.total_loss(named),
                           stream_names=self.stream_names, **routing)

    def draws_in_use(self, draws: StepDraws) -> tuple[torch.Tensor | None, CandidateSample | None]:
        """The placeholder positions and the candidate sample this model uses from
        ``draws``, checked against its configuration; the positions are None when the
        placeholder contrast is off or no sequence was long enough to get one."""
        if self.config.rec_loss == "sampled" and draws.candidates is None:
            raise ValueError("rec_loss='sampled' needs the step's negatives: draws = "
                             "hm4sr_core.sampling.StepSampler.for_model(model, item_counts)(batch, generator)")
        if self.config.rec_loss != "sampled" and draws.candidates is not None:
            raise ValueError(f"draws carry sampled-softmax negatives, but this model's rec_loss is "
                             f"{self.config.rec_loss!r}")
        if self.placeholders is None:
            if draws.placeholders is not None:
                raise ValueError("draws carry placeholder positions, but this model has no placeholder contrast "
                                 "(w_placeholder_contrastive = 0, or no feature stream)")
            return None, draws.candidates
        if draws.placeholders is None:
            raise ValueError("this model's placeholder contrast needs the step's placeholder positions: "
                             "draws = hm4sr_core.sampling.StepSampler.for_model(model)(batch, generator)")
        return (draws.placeholders if bool(draws.placeholders.any()) else None), draws.candidates

    def named_losses(self, batch: SequenceBatch, states: SequenceStates, item_matrix: torch.Tensor,
                     sample: CandidateSample | None = None) -> dict[str, torch.Tensor]:
        """Every enabled loss by name, unweighted (docs/model.md section 3), from the
        encoders' ``states`` for ``batch``. With ``sample`` (sampled softmax) ``batch`` and
        ``item_matrix`` are in the sample's local rows (:meth:`CandidateSample.local`)."""
        cfg = self.config
        h, h_all, h_aug, place = states.last, states.every, states.augmented, states.placeholders
        dense = h_all is not None
        every = dense and cfg.dense_auxiliary == "every_position"
        seq = states.query()
        named = {}
        B, T = batch.items.shape
        if dense:
            q = h_all.permute(1, 2, 0, 3).reshape(B, T, -1)  # (B, T, S*d)
            has = batch.position_targets > 0
            rec_query, rec_targets = q[has], batch.position_targets[has]
        else:
            rec_query, rec_targets = seq, batch.targets
        if sample is None:
            named["rec"] = rec_loss(rec_query, item_matrix, rec_targets,
                                    include_padding=cfg.released.padding_row == "trained")
        else:
            neg = sample.negatives
            named["rec"] = sampled_rec_loss(rec_query, item_matrix[rec_targets], item_matrix[neg], rec_targets,
                                            neg, sample.log_expected[rec_targets], sample.log_expected[neg])
        window = torch.arange(B, device=h.device).view(B, 1).expand(B, T)  # (B, T) window of each position
        if every:
            # Every position with a next item is an example, as each prefix is in prefix
            # mode; positions of the same window are not each other's negatives (in
            # prefix mode in-batch negatives are almost always other users).
            targets, groups, id_rows = batch.position_targets[has], window[has], h_all[0][has]
        else:
            targets, groups, id_rows = batch.targets, None, h[0]
        if cfg.w_id_contrastive > 0:
            # Sampled: the targets' ID rows are the local tables' first stream (the same values).
            target_id = self.item_embedding(targets) if sample is None else item_matrix[targets, :cfg.hidden_size]
            named["id_contrastive"] = id_contrastive_loss(
                id_rows, target_id, targets, cfg.id_contrastive_temperature, cfg.released.mask_same_target, groups)
        if self.category_head is not None:
            categories = self.categories if sample is None else self.categories[sample.ids]
            named["category"] = category_loss(self.category_head, item_matrix, categories, batch.items,
                                              batch.items > 0)
        if self.placeholders is not None:
            if place is not None and every:
                # Positions whose prefix holds at least one of the window's placeholders
                # (drawn once per window, floor(ratio * window length)) and has at least
                # placeholder_min_length items. Prefix mode draws floor(ratio * n) per
                # prefix instead and contrasts every prefix, placeholders or not: the two
                # are close, not equal (the ID contrast, by contrast, is equal).
                pos = torch.arange(T, device=h.device).view(1, T)
                sel = has & (place.cumsum(1) > 0) & (pos + 1 >= cfg.placeholder_min_length)
                terms = [contrastive_loss(h_all[s][sel], h_aug[s - 1][sel], batch.position_targets[sel],
                                          cfg.placeholder_temperature, cfg.released.mask_same_target, window[sel])
                         for s in range(1, self.S)] if bool(sel.any()) else []
            elif place is not None:
                terms = [contrastive_loss(h[s], h_aug[s - 1], batch.targets, cfg.placeholder_temperature,
                                          cfg.released.mask_same_target) for s in range(1, self.S)]
            else:
                terms = []
            named["placeholder_contrastive"] = torch.stack(terms).mean() if terms else seq.new_zeros(())
        return named

    def total_loss(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        """The one place the weighted total is formed."""
        weights = self.config.loss_weights
        return sum(weights[k] * v for k, v in named.items())

    # -- scoring (RecBole's contract: the query side, full-catalogue and candidate scores)
    def encode(self, batch: SequenceBatch, tables: torch.Tensor | None = None) -> HM4SROutput:
        """The sequence side without losses or draws: (B, S*d) query vectors and what both
        MoE levels routed (gates, lambda, the time inputs), for ranking and for looking
        inside. ``tables``: :meth:`item_tables` of these weights when the caller has them
        already (evaluation computes them once, not once per chunk of users)."""
        states, routing = self.encode_states(batch, self.item_tables() if tables is None else tables)
        return HM4SROutput(sequence=states.query(), stream_names=self.stream_names, **routing)

    @torch.no_grad()
    def query(self, batch: SequenceBatch, tables: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S*d) query vectors for ranking: score = query @ item_matrix().T."""
        return self.encode(batch, tables).sequence

    @torch.no_grad()
    def full_sort_predict(self, batch: SequenceBatch) -> torch.Tensor:
        """(B, N+1) scores over the whole catalogue (padding column = -inf)."""
        tables = self.item_tables()
        return score_all(self.encode(batch, tables).sequence, self.item_matrix(tables))

    @torch.no_grad()
    def predict(self, batch: SequenceBatch, candidates: torch.Tensor) -> torch.Tensor:
        """(B, K) scores of the given candidate items (B, K) (sampled evaluation)."""
        tables = self.item_tables()
        return torch.einsum("bk,bck->bc", self.query(batch, tables), self.item_matrix(tables)[candidates])


def build_model(config: ModelConfig, dataset) -> HM4SR:
    """An :class:`HM4SR` sized from an in-memory :class:`~hm4sr_core.data.schema.Dataset`."""
    names = list(dataset.modalities) if not config.modalities else \
        [m for m in config.modalities if m != "none"]
    unknown = [m for m in names if m not in dataset.modalities]
    if unknown:
        raise ValueError(f"modalities {unknown} not in dataset {dataset.name!r} "
                         f"(has {list(dataset.modalities)})")
    feats = {m: torch.from_numpy(dataset.modalities[m].features) for m in names}
    avail = {m: torch.from_numpy(dataset.modalities[m].available) for m in names}
    first = float(dataset.stats["first_timestamp"])
    span = float(dataset.stats["last_timestamp"]) - first if "last_timestamp" in dataset.stats else None
    return HM4SR(config, dataset.num_items, feats, avail, torch.from_numpy(dataset.categories), first, span)


# ----------------------------------------------------------------------------- losses


def score_all(sequence: torch.Tensor, item_matrix: torch.Tensor) -> torch.Tensor:
    """(B, K) x (N+1, K) -> (B, N+1); padding item 0 can never win."""
    s = sequence @ item_matrix.T
    s[:, 0] = float("-inf")
    return s


def rec_loss(sequence: torch.Tensor, item_matrix: torch.Tensor, targets: torch.Tensor,
             include_padding: bool = False) -> torch.Tensor:
    """Cross-entropy of the full-catalogue scores against the next item; padding excluded,
    or with ``include_padding`` a column like any other (the released code's training loss;
    evaluation always excludes it)."""
    if include_padding:
        return F.cross_entropy(sequence @ item_matrix.T, targets)
    return F.cross_entropy(score_all(sequence, item_matrix), targets)


def sampled_rec_loss(query: torch.Tensor, target_rows: torch.Tensor, negative_rows: torch.Tensor,
                     targets: torch.Tensor, negatives: torch.Tensor, target_log_expected: torch.Tensor,
                     negative_log_expected: torch.Tensor) -> torch.Tensor:
    """Sampled softmax with logQ correction: the cross-entropy of each example's target
    among its target and K shared negatives drawn with replacement from Q.

    query (n, D), target_rows (n, D) and negative_rows (K, D) are item representations;
    targets (n,) and negatives (K,) ids in one id space (to find accidental hits);
    ``*_log_expected`` is log(K * Q(c)), the expected number of copies of c among the
    draws. Every candidate's logit, the target's included, is s(c) - log(K * Q(c)); the
    shared log K cancels in the softmax, so this is the s(c) - log Q(c) form too. A
    negative equal to the example's target is an accidental hit and is left out. When
    the negatives are every item once under a uniform Q (K = N, K * Q = 1) this is the
    full-catalogue cross-entropy exactly."""
    dtype = torch.promote_types(query.dtype, negative_rows.dtype)
    pos = (query * target_rows).sum(-1).to(dtype) - target_log_expected.to(dtype)  # (n,)
    neg = (query @ negative_rows.T).to(dtype) - negative_log_expected.to(dtype).view(1, -1)  # (n, K)
    neg = neg.masked_fill(targets.view(-1, 1) == negatives.view(1, -1), float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=logits.device))


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor, temperature: float,
                     mask_same_target: bool, groups: torch.Tensor | None = None) -> torch.Tensor:
    """In-batch InfoNCE between rows of a (B, d) and b (B, d), cosine / temperature.

    Off-diagonal pairs that share a target are false negatives: masked out of the
    denominator (default), or given logit 0 as the released code did. Off-diagonal
    pairs that share a ``groups`` value (positions of one dense window) are left out
    of the denominator too."""
    # in place: mm saves its inputs for the backward, not its output
    logits = (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T).div_(temperature)
    same = targets.view(-1, 1) == targets.view(1, -1)
    in_window = groups.view(-1, 1) == groups.view(1, -1) if groups is not None else None
    if in_window is not None and mask_same_target:  # both leave the denominator: one mask, one fill
        same |= in_window
        in_window = None
    logits.masked_fill_(same.fill_diagonal_(False), float("-inf") if mask_same_target else 0.0)
    if in_window is not None:  # released behaviour: same-target pairs at logit 0, in-window pairs out
        logits.masked_fill_(in_window.fill_diagonal_(False), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(targets), device=logits.device))


def id_contrastive_loss(sequence_id: torch.Tensor, target_embedding: torch.Tensor, targets: torch.Tensor,
                        temperature: float, mask_same_target: bool,
                        groups: torch.Tensor | None = None) -> torch.Tensor:
    """IDCL: normalised s_id against the normalised ID embedding of each target."""
    return contrastive_loss(sequence_id, target_embedding, targets, temperature, mask_same_target, groups)


def category_loss(head: nn.Linear, item_matrix: torch.Tensor, categories: torch.Tensor,
                  items: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """CP: multi-label BCE of Linear(Sd -> C) over each real input item's raw representation.

    Depends on the item alone, so it is computed once per distinct item and weighted
    by how often the item occurs: equal to the per-token mean, at a fraction of the cost."""
    uniq, counts = torch.unique(items[real], return_counts=True)
    per_item = F.binary_cross_entropy_with_logits(head(item_matrix[uniq]), categories[uniq],
                                                  reduction="none").mean(-1)
    return (per_item * counts).sum() / counts.sum()
