"""How the model of :mod:`hm4sr_core.model` is executed: CPU fast paths and memory savers.

``model.py`` states what HM4SR computes (docs/model.md section 2) with stock torch
operations, all streams of a layer in one batched kernel per operation: the form a GPU
runs and a reader can check against the paper. This module computes the same thing
faster on a CPU, or in less memory, and nothing here changes what is computed:

- dropout masks drawn as floats from random words (:func:`dropout_mask`), and attention
  with the scale and the mask folded into one ``baddbmm`` (:func:`attention`);
- the per-stream encoder (:func:`encode_per_stream`): each stream's Transformer layers on
  (B*T, d) matrices, with the masks drawn before the stream loop;
- the Interactive MoE's mix a few sequences at a time (:func:`factored_mix`, the custom
  autograd :class:`FactoredMix`), from the expert outputs the module computes once per
  distinct item and once per position;
- recomputation (:func:`recomputed`, ``TrainConfig.recompute``).

Which form runs is chosen in model.py, where each call into this module is a line that
says ``kernels.``: ``StreamEncoders.forward`` hands its input to :func:`encode_per_stream`
and ``InteractiveMoE.forward`` its expert outputs to :func:`factored_mix` when
``runs_cpu_kernels`` says so (by default on a CPU; ``HM4SR.use_cpu_kernels`` sets it for
every device); otherwise the encoders run their layers through :func:`recomputed` when
recomputation is on, and through :func:`attention`. These paths take modules and tensors
and import no model class (model.py imports this module); the training step that
caches gradients over parts of a batch lives in :mod:`hm4sr_core.steps`. Streams are
stacked on one axis as in the model: weights ``(S, ...)``, inputs ``(S, B, T, d)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- dropout and attention


_BYTE_BITS = ((torch.arange(256).view(256, 1) >> torch.arange(8)) & 1).float()  # row b: the bits of byte b


def dropout_mask(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """Inverted-dropout mask: 1 / (1 - p) where kept, 0 where dropped; the drop
    probability is p rounded to the nearest 1/65536 (exact when p is a multiple of
    1/256); multiplying by it is the whole dropout, forward and backward.

    On CPU torch's Bernoulli draw costs a generator call per element, most of a dropout's
    time. Here random int64 words are cut into lanes: one bit per element when p = 0.5
    (the default: kept when the bit is set), else eight bits when p is a multiple of
    1/256 or sixteen otherwise (kept when the lane, read unsigned, is >= p * 2**bits).
    The mask is written as floats directly. Seeded by torch's global generator, like
    F.dropout."""
    n = math.prod(shape)
    scale = 1.0 / (1.0 - p)
    bits = 1 if p == 0.5 else 8 if float(p * 256).is_integer() else 16
    per_word = 64 // bits
    words = torch.randint(-(2**63), 2**63 - 1, ((n + per_word - 1) // per_word,), dtype=torch.int64,
                          device=like.device)
    if bits == 1:  # each byte picks its row of eight mask values: one gather pass
        table = _BYTE_BITS.to(device=like.device, dtype=like.dtype) * scale  # (256, 8)
        return F.embedding(words.view(torch.uint8).long(), table).view(-1)[:n].view(shape)
    lanes = words.view(torch.int8 if bits == 8 else torch.int16)[:n].view(shape)
    mask = torch.empty(shape, dtype=like.dtype, device=like.device)
    torch.ge(lanes, int(round(p * 2**bits)) - 2 ** (bits - 1), out=mask)
    return mask.mul_(scale)


def dropout_add(x: torch.Tensor, residual: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """residual + dropout(x) in one pass, ``mask`` from :func:`dropout_mask` (None: no dropout)."""
    return x + residual if mask is None else torch.addcmul(residual, x, mask)


def score_bias(allowed: torch.Tensor | None, T: int, H: int, like: torch.Tensor) -> torch.Tensor:
    """Additive attention mask: 0 where a query may look, -inf elsewhere. Causal (T, T)
    when ``allowed`` is None, else (B*H, 1, T) from ``allowed`` (B, T), per head."""
    if allowed is None:
        hide = torch.ones(T, T, dtype=torch.bool, device=like.device).triu_(1)
        return torch.zeros(T, T, dtype=like.dtype, device=like.device).masked_fill_(hide, float("-inf"))
    B = allowed.shape[0]
    bias = torch.zeros(B, 1, T, dtype=like.dtype, device=like.device).masked_fill_(~allowed.view(B, 1, T), float("-inf"))
    return bias.repeat_interleave(H, dim=0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
              p: float, training: bool, mask: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, (B, H, Tq, dh) x (B, H, T, dh) -> (B, H, Tq, dh).

    Causal when ``allowed`` is None, else ``allowed`` (B, T) marks the keys every query
    may see. Without dropout (evaluation, or p = 0) the fused kernel runs. With it
    (training) the scores are one ``baddbmm`` (the scale and the additive mask of
    :func:`score_bias` folded in; pass ``bias`` to reuse one) and the probabilities are
    multiplied by ``mask`` ((B*H, Tq, T), values 0 and 1/(1-p)) when given, else by
    F.dropout; on CPU this is several times cheaper than the fused kernel's dropout."""
    B, H, Tq, dh = q.shape
    T = k.shape[2]
    if not training or p == 0.0:
        bool_mask = None if allowed is None else allowed.view(B, 1, 1, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, is_causal=allowed is None)
    if bias is None:
        bias = score_bias(allowed, T, H, q)
    scores = torch.baddbmm(bias, q.reshape(B * H, Tq, dh), k.reshape(B * H, T, dh).transpose(1, 2),
                           alpha=dh ** -0.5)
    probs = torch.softmax(scores, dim=-1)
    probs = probs * mask if mask is not None else F.dropout(probs, p, True)
    return torch.bmm(probs, v.reshape(B * H, T, dh)).view(B, H, Tq, dh)


# ----------------------------------------------------------------------------- the factored expert mix


def factored_mix(gates: torch.Tensor, item_out: torch.Tensor, pos_out: torch.Tensor, index: torch.Tensor,
                 E: int) -> torch.Tensor:
    """The Interactive MoE's unscaled mix from its factored expert outputs (model.py,
    ``InteractiveMoE.forward``): mixed[b, t, s] = sum_e gates[b, t, s, e] *
    (item_out[index[b, t], e, s] + pos_out[t, e, s]), computed by :class:`FactoredMix`.
    gates (B, T, S, E), item_out (U, E*S*d), pos_out (T, E*S*d), index (B, T) -> (B, T, S, d)."""
    return FactoredMix.apply(gates, item_out, pos_out, index, E)


class FactoredMix(torch.autograd.Function):
    """mixed[b, t, s] = sum_e gates[b, t, s, e] * (item_out[index[b, t], e, s] + pos_out[t, e, s]),
    a few sequences at a time.

    The direct form materialises the (B, T, E, S, d) expert outputs (157 MB for a prefix
    batch of 1024 x 50 on ml-100k), its product with the gates and their gradients, each
    a pass through main memory. Here each chunk's slice stays small, and the backward
    recomputes it from the saved (U, E*S*d) item and (T, E*S*d) position rows instead of
    keeping it. Gradients reach all three inputs; the item rows accumulate with
    ``index_add_`` in token order (deterministic on CPU). Shapes: gates (B, T, S, E),
    item_out (U, E*S*d), pos_out (T, E*S*d), index (B, T) -> (B, T, S, d)."""

    CHUNK = 32  # sequences per chunk: 32 x 50 tokens x 768 floats ~ 5 MB

    @staticmethod
    def forward(ctx, gates, item_out, pos_out, index, E):
        B, T, S, _ = gates.shape
        U, d = item_out.shape[0], item_out.shape[1] // (E * S)
        items, pos = item_out.view(U, E, S, d), pos_out.view(T, E, S, d).to(item_out.dtype)
        g = gates.transpose(2, 3).to(item_out.dtype).contiguous()  # (B, T, E, S), one dtype throughout
        out = item_out.new_empty(B, T, S, d)
        for b0 in range(0, B, FactoredMix.CHUNK):
            b1 = min(B, b0 + FactoredMix.CHUNK)
            x = items.index_select(0, index[b0:b1].reshape(-1)).view(b1 - b0, T, E, S, d)
            x += pos
            x *= g[b0:b1].unsqueeze(-1)
            torch.sum(x, dim=2, out=out[b0:b1])
        ctx.save_for_backward(g, item_out, pos_out, index)
        ctx.E, ctx.dtypes = E, (gates.dtype, item_out.dtype, pos_out.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        g, item_out, pos_out, index = ctx.saved_tensors
        E = ctx.E
        want_g, want_items, want_pos = ctx.needs_input_grad[:3]
        B, T, _, S = g.shape
        U, d = item_out.shape[0], item_out.shape[1] // (E * S)
        items, pos = item_out.view(U, E, S, d), pos_out.view(T, E, S, d).to(item_out.dtype)
        grad = grad.to(item_out.dtype).contiguous()
        grad_g = g.new_empty(B, T, E, S) if want_g else None
        grad_items = torch.zeros_like(item_out) if want_items else None
        grad_pos = item_out.new_zeros(T, E, S, d) if want_pos else None
        for b0 in range(0, B, FactoredMix.CHUNK):
            b1 = min(B, b0 + FactoredMix.CHUNK)
            idx = index[b0:b1].reshape(-1)
            gr = grad[b0:b1].unsqueeze(2)  # (n, T, 1, S, d)
            if want_g:
                x = items.index_select(0, idx).view(b1 - b0, T, E, S, d)
                x += pos
                torch.sum(x.mul_(gr), dim=-1, out=grad_g[b0:b1])  # d mixed / d gate = that expert's output
            if want_items or want_pos:
                gx = g[b0:b1].unsqueeze(-1) * gr  # (n, T, E, S, d)
                if want_pos:
                    grad_pos += gx.sum(0)
                if want_items:
                    grad_items.index_add_(0, idx, gx.view(-1, E * S * d))
        dg, di, dp = ctx.dtypes
        return (grad_g.transpose(2, 3).to(dg) if want_g else None, grad_items.to(di) if want_items else None,
                grad_pos.view(T, -1).to(dp) if want_pos else None, None, None)


# ----------------------------------------------------------------------------- the per-stream encoder


def encode_per_stream(encoders: nn.Module, x: torch.Tensor, lengths: torch.Tensor, streams: list[int],
                      last_only: bool) -> torch.Tensor:
    """``encoders(x, lengths, streams=streams, last_only=last_only)`` computed stream by
    stream on (B*T, d) matrices: x (S', B, T, d) -> (S', B, d), or (S', B, T, d) at every
    position without ``last_only``; ``streams`` (S' ids) picks whose weights each slice uses.

    On CPU a plain ``addmm`` per stream is a quarter to a third faster than one batched
    ``baddbmm``, LayerNorm takes its stream's gain and bias in the fused kernel, and
    dropout-then-residual is one ``addcmul`` with masks drawn before the stream loop (the
    input mask, then per layer attention, output and feed-forward, each for all streams
    at once)."""
    S, B, T, d = x.shape
    drop = encoders.training and encoders.dropout > 0
    last = lengths - 1
    mask = dropout_mask((S, B * T, d), encoders.dropout, x) if drop else None
    hs = []
    for i, s in enumerate(streams):
        h = _layer_norm(encoders.ln, x[i].reshape(B * T, d), s)
        hs.append(h * mask[i] if mask is not None else h)
    for i, layer in enumerate(encoders.layers):
        final = i == len(encoders.layers) - 1
        hs = _layer_per_stream(layer, hs, streams, B, last if (final and last_only) else None)
    return torch.stack(hs) if last_only else torch.stack(hs).view(S, B, T, d)


def _linear(layer: nn.Module, x: torch.Tensor, s: int, columns: slice = slice(None)) -> torch.Tensor:
    """(n, in) -> (n, out) with stream ``s``'s layer; ``columns`` computes only those outputs."""
    return torch.addmm(layer.bias[s, 0, columns], x, layer.weight[s, :, columns])


def _layer_norm(norm: nn.Module, x: torch.Tensor, s: int) -> torch.Tensor:
    """(n, d) normalised with stream ``s``'s gain and bias (one fused kernel)."""
    return F.layer_norm(x, x.shape[-1:], norm.weight[s, 0], norm.bias[s, 0], norm.eps)


def _layer_per_stream(layer: nn.Module, xs: list[torch.Tensor], streams: list[int], batch: int,
                      last: torch.Tensor | None) -> list[torch.Tensor]:
    """One Transformer layer on xs: per stream (B*T, d), B = ``batch``; ``streams`` picks
    whose weights each uses. With ``last`` ((B,) index of each sequence's last real item)
    only that position is computed and (B, d) per stream returned: keys and values still
    span the sequence, queries, attention output and feed-forward only the last row.
    Otherwise (B*T, d) per stream."""
    B, d = batch, xs[0].shape[1]
    T, H = xs[0].shape[0] // B, layer.heads
    rows = T if last is None else 1
    ph, pa = layer.hidden_dropout, layer.attention_dropout
    drop_a, drop_h = layer.training and pa > 0, layer.training and ph > 0
    n = len(xs)
    masks = [dropout_mask((n, B * H, rows, T), pa, xs[0]) if drop_a else None,
             dropout_mask((n, B * rows, d), ph, xs[0]) if drop_h else None,
             dropout_mask((n, B * rows, d), ph, xs[0]) if drop_h else None]
    if last is None:
        pick, allowed = None, None  # causal: the mask alone keeps padding (after the last item) out
    else:
        pick = torch.arange(B, device=last.device) * T + last  # row of each sequence's last item
        allowed = torch.arange(T, device=last.device).view(1, T) <= last.view(B, 1)  # (B, T)
    bias = score_bias(allowed, T, H, xs[0]) if drop_a else None  # shared by the streams
    recompute = layer.recompute and torch.is_grad_enabled()
    outs = []
    for i, s in enumerate(streams):
        m = [mk[i] if mk is not None else None for mk in masks]
        if recompute:  # the masks are inputs, so the recomputed forward is the same
            outs.append(checkpoint(_stream, layer, xs[i], s, B, pick, allowed, bias, drop_a, *m,
                                   use_reentrant=False, preserve_rng_state=False))
        else:
            outs.append(_stream(layer, xs[i], s, B, pick, allowed, bias, drop_a, *m))
    return outs


def _stream(layer: nn.Module, x: torch.Tensor, s: int, B: int, pick: torch.Tensor | None,
            allowed: torch.Tensor | None, bias: torch.Tensor | None, drop_a: bool, mask_a: torch.Tensor | None,
            mask_out: torch.Tensor | None, mask_ff: torch.Tensor | None) -> torch.Tensor:
    """The layer for one stream's (B*T, d) input (see :func:`_layer_per_stream`)."""
    d, H = x.shape[1], layer.heads
    T = x.shape[0] // B
    if pick is None:
        residual = x
        q, k, v = _linear(layer.qkv, x, s).view(B, T, 3, H, d // H).unbind(2)
    else:
        residual = x.index_select(0, pick)  # (B, d)
        q = _linear(layer.qkv, residual, s, slice(0, d)).view(B, 1, H, d // H)
        k, v = _linear(layer.qkv, x, s, slice(d, 3 * d)).view(B, T, 2, H, d // H).unbind(2)
    a = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed, layer.attention_dropout,
                  drop_a, mask_a, bias)  # (B, H, rows, dh)
    a = a.transpose(1, 2).reshape(residual.shape[0], d)
    h = _layer_norm(layer.ln1, dropout_add(_linear(layer.out, a, s), residual, mask_out), s)
    f = _linear(layer.ff2, F.gelu(_linear(layer.ff1, h, s)), s)
    return _layer_norm(layer.ln2, dropout_add(f, h, mask_ff), s)


# ----------------------------------------------------------------------------- memory: recomputation, gradient caching


def recomputed(layer: nn.Module, *inputs):
    """``layer(*inputs)`` keeping only its inputs for the backward, which recomputes the
    rest (``TrainConfig.recompute``); F.dropout's random state is replayed there, so the
    values and gradients are the plain call's. Without a graph being built, a plain call."""
    if not torch.is_grad_enabled():
        return layer(*inputs)
    return checkpoint(layer, *inputs, use_reentrant=False)
