"""Tests for hm4sr_core.kernels: every fast path computes what the model's plain form
computes. The drawn dropout masks (values, rate, seeding), attention's training path
against the fused kernel, the per-stream encoder against a direct transcription of
RecBole's layer (with the drawn masks replayed), the factored expert mix (gradcheck),
recomputation and gradient caching against one plain pass, and the whole model's losses
and gradients with the CPU paths on and off."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hm4sr_core import kernels, steps
from hm4sr_core.config import ModelConfig
from hm4sr_core.data.splits import SequenceBatch, iterate_batches
from hm4sr_core.model import SequenceStates
from hm4sr_core.sampling import StepSampler

from conftest import TINY_FORWARD_TERMS, assert_float_close, batch_terms, float_tol, forward_terms, step_forward
from test_model import LOSSES, _dense_batch, _model  # the same seeded model and batch as the model's tests

# The encoder of _encoder_and_reference: 2 layers, d 16, feed-forward 32
ENCODER_TERMS = forward_terms(ModelConfig(hidden_size=16, num_heads=2, inner_size=32, num_layers=2))


@pytest.mark.parametrize("cpu", [True, False], ids=["chunked mix (CPU)", "direct mix (GPU)"])
def test_interactive_moe_computes_the_papers_per_token_experts_and_gates(cpu):
    """The module's factored form (experts and gate logits once per distinct item and once
    per position) in either mix gives the paper's per-token computation, written here
    from the module's weights in float64: g_s = softmax(W_s z_s + b_s) and
    o_s = lambda_s * sum_k g_s[k] * slice_s(Expert_k(z)) for z = e(item) + p(position)."""
    from hm4sr_core.model import InteractiveMoE
    torch.manual_seed(0)
    B, T, S, d, E = 5, 7, 3, 8, 4
    moe = InteractiveMoE(S, d, E, (0.3, 1.0, 1.0))
    moe.cpu_kernels = cpu
    torch.nn.init.normal_(moe.gate_weight)
    torch.nn.init.normal_(moe.gate_bias)
    items = torch.randint(0, 20, (B, T))
    table, position = torch.randn(20, S, d), torch.randn(T, d)
    uniq, index = torch.unique(items, return_inverse=True)
    out, gates = moe(table[uniq], position, index)

    z = (table[items] + position.view(1, T, 1, d)).double()  # (B, T, S, d), every token
    w, b = moe.gate_weight.double(), moe.gate_bias.double()
    want_gates = torch.softmax(torch.einsum("btsd,sde->btse", z, w) + b, dim=-1)  # (B, T, S, E)
    experts = (z.reshape(B, T, S * d) @ moe.experts.weight.double().T + moe.experts.bias.double()).view(B, T, E, S, d)
    want = torch.einsum("btse,btesd->btsd", want_gates, experts) * moe.lambdas.double().view(1, 1, S, 1)
    # gate logits (width 3 streams x 8), a softmax over 4, experts (width 24), the mix of 4: <= 4 x 24 steps
    assert_float_close(out, want, 4 * 24)
    assert_float_close(gates, want_gates, 4 * 24, magnitude=1.0)
    assert gates.std() > 0.05  # the gates are not trivially uniform


@pytest.mark.parametrize("p", [0.5, 0.25, 0.2])  # one-bit, 8-bit and 16-bit lanes
def test_dropout_mask_values_keep_rate_and_seeding(p):
    """Masks hold 0 and 1/(1-p) only, keep 1-p of the elements (within 6 sd), do not
    pair neighbours, follow torch's seed, and fit sizes that are no multiple of a word."""
    like = torch.empty(0)
    torch.manual_seed(0)
    m = kernels.dropout_mask((7, 1001, 13), p, like)
    assert m.shape == (7, 1001, 13) and m.dtype == torch.float32
    values = torch.unique(m)
    # 1 / (1 - p) in float32: p, 1 - p and the quotient each rounded once
    assert len(values) == 2 and float(values[0]) == 0.0 and abs(float(values[1]) - 1 / (1 - p)) <= float_tol(2.0, 3)
    kept = (m > 0).double().flatten()
    n = kept.numel()
    assert abs(float(kept.mean()) - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)
    both = float((kept[:-1] * kept[1:]).mean())  # neighbours share a random word
    assert abs(both - (1 - p) ** 2) < 0.01
    torch.manual_seed(0)
    assert torch.equal(kernels.dropout_mask((7, 1001, 13), p, like), m)
    assert not torch.equal(kernels.dropout_mask((7, 1001, 13), p, like), m)


def test_attention_training_path_equals_the_fused_kernel_when_nothing_is_dropped():
    """The training path (baddbmm with the scale and an additive -inf mask, then the
    dropout mask) with a keep-everything mask is the fused causal kernel, and its
    last-position form is the causal result at each sequence's last item."""
    torch.manual_seed(0)
    B, H, T, dh = 4, 2, 6, 8
    q, k, v = (torch.randn(B, H, T, dh) for _ in range(3))
    full = kernels.attention(q, k, v, None, 0.5, True, torch.ones(B * H, T, T))
    terms = dh + (2 * T + 3) + T  # scores (width dh), the softmax over T, the mix of T values
    assert_float_close(full, F.scaled_dot_product_attention(q, k, v, is_causal=True), terms)
    last = torch.tensor([5, 0, 3, 2])
    allowed = torch.arange(T).view(1, T) <= last.view(B, 1)
    rows = torch.arange(B)
    one = kernels.attention(q[rows, :, last].unsqueeze(2), k, v, allowed, 0.5, True, torch.ones(B * H, 1, T))
    assert_float_close(one, full[rows, :, last].unsqueeze(2), terms)
    assert_float_close(kernels.attention(q[rows, :, last].unsqueeze(2), k, v, allowed, 0.5, False), one, terms)


def _encoder_and_reference(d=16, H=2, S=3, B=5, T=7):
    """A small StreamEncoders with random weights, an input, lengths, and a direct
    transcription of RecBole's post-LN layer for one stream with its own weights.
    ``masks`` (optional) replays dropout: the input mask, then per layer the attention,
    output and feed-forward masks, each for all streams, as the encoder draws them;
    ``last`` computes the final layer at each sequence's last item only, as the encoder
    does for the prefix loss."""
    from hm4sr_core.model import StreamEncoders
    cfg = ModelConfig(hidden_size=d, num_heads=H, inner_size=32, num_layers=2)
    torch.manual_seed(0)
    enc = StreamEncoders(S, cfg).eval()
    with torch.no_grad():
        for prm in enc.parameters():
            prm.normal_(0.0, 0.3)
    x = torch.randn(S, B, T, d)
    lengths = torch.tensor([7, 3, 1, 5, 7])
    causal = torch.full((T, T), float("-inf")).triu(1)
    rows = torch.arange(B)

    def ln(h, mod, s):
        return F.layer_norm(h, (d,), eps=mod.eps) * mod.weight[s, 0] + mod.bias[s, 0]

    def reference(s, h, i=None, masks=None, last=None):  # weights of stream s, slot i of the masks
        drop = (lambda m, t: t * m[i].view(t.shape)) if masks else (lambda m, t: t)
        m = iter(masks or [None] * 7)
        h = drop(next(m), ln(h, enc.ln, s))
        for j, layer in enumerate(enc.layers):
            m_att, m_out, m_ff = next(m), next(m), next(m)
            q, k, v = (h @ layer.qkv.weight[s] + layer.qkv.bias[s, 0]).split(d, dim=-1)
            q, k, v = (t.reshape(B, T, H, d // H).transpose(1, 2) for t in (q, k, v))
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // H) + causal, dim=-1)  # (B, H, T, T)
            if last is not None and j == len(enc.layers) - 1:  # the query at the last item only
                probs, h = probs[rows, :, last].unsqueeze(2), h[rows, last].unsqueeze(1)  # (B, H, 1, T), (B, 1, d)
            att = drop(m_att, probs) @ v
            a = att.transpose(1, 2).reshape(B, -1, d) @ layer.out.weight[s] + layer.out.bias[s, 0]
            h = ln(drop(m_out, a) + h, layer.ln1, s)
            f = F.gelu(h @ layer.ff1.weight[s] + layer.ff1.bias[s, 0]) @ layer.ff2.weight[s] + layer.ff2.bias[s, 0]
            h = ln(drop(m_ff, f) + h, layer.ln2, s)
        return h if last is None else h[:, 0]

    return enc, x, lengths, reference


@pytest.mark.parametrize("cpu_paths", [True, False], ids=["per-stream (CPU)", "stacked (GPU)"])
def test_stream_encoders_equal_a_plain_post_ln_transformer_per_stream(cpu_paths):
    """The encoder against a direct transcription of RecBole's post-LN layer, stream by
    stream with each stream's own weights: every position, the last position only, and
    a subset of streams (as the placeholder pass uses); both the CPU's per-stream path
    and the stacked path a GPU takes."""
    enc, x, lengths, reference = _encoder_and_reference()
    enc.cpu_kernels = cpu_paths
    S, B = x.shape[:2]
    with torch.no_grad():
        want = torch.stack([reference(s, x[s]) for s in range(S)])  # (S, B, T, d)
        assert_float_close(enc(x, lengths, last_only=False), want, ENCODER_TERMS)
        at_last = want[:, torch.arange(B), lengths - 1]  # (S, B, d)
        assert_float_close(enc(x, lengths), at_last, ENCODER_TERMS)
        sub = enc(x[1:], lengths, streams=[1, 2])
        assert_float_close(sub, at_last[1:], ENCODER_TERMS)
        with pytest.raises(ValueError, match="2 stream ids for 3 streams"):
            enc(x, lengths, streams=[1, 2])


def test_stream_encoders_apply_each_drawn_dropout_mask_where_it_belongs(monkeypatch):
    """Training mode on the CPU: the masks the encoder draws, replayed into the plain
    transcription, give the encoder's output, so each stream gets its own slice of each
    mask and no two masks are swapped; at every position, and at the last position only
    for a subset of streams (the placeholder pass of prefix mode)."""
    enc, x, lengths, reference = _encoder_and_reference()
    S = x.shape[0]
    real, drawn = kernels.dropout_mask, []

    def recording(shape, p, like):
        drawn.append(real(shape, p, like))
        return drawn[-1]

    monkeypatch.setattr(kernels, "dropout_mask", recording)
    enc.train()
    with torch.no_grad():
        got = enc(x, lengths, last_only=False)
        assert len(drawn) == 7 and all(set(torch.unique(m).tolist()) == {0.0, 2.0} for m in drawn)
        want = torch.stack([reference(s, x[s], s, drawn) for s in range(S)])
        assert_float_close(got, want, ENCODER_TERMS)
        drawn.clear()
        got = enc(x[1:], lengths, streams=[1, 2])
        want = torch.stack([reference(s, x[s], i, drawn, last=lengths - 1) for i, s in enumerate((1, 2))])
        assert_float_close(got, want, ENCODER_TERMS)


@pytest.mark.parametrize("cpu", [True, False], ids=["per-stream", "stacked"])
def test_recompute_gives_the_same_loss_and_gradients(tiny_ds, tiny_split, tiny_model_config, cpu):
    """recompute_activations keeps less for the backward and recomputes the rest; with
    dropout on (masks drawn once, or F.dropout's RNG replayed) the loss and every gradient
    equal the plain run's, in both encoder paths, and the encoder keeps fewer tensors."""
    batch = next(iterate_batches(tiny_split.train_prefix, 32, shuffle=True, generator=torch.Generator().manual_seed(2)))
    runs = []
    for on in (False, True):
        model = _model(tiny_model_config, tiny_ds).train().recompute_activations(on).use_cpu_kernels(cpu)
        saved = []
        torch.manual_seed(7)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = step_forward(model, batch, 3)
        out.loss.backward()
        runs.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                     sum(saved)))
    (loss0, grads0, kept0), (loss1, grads1, kept1) = runs
    assert torch.equal(loss0, loss1)  # exact: the forward runs the same ops either way
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    for name in grads0:  # the backward's graph differs (recomputed pieces): other summation orders
        assert_float_close(grads1[name], grads0[name], batch_terms(32, tiny_model_config), msg=name)
    assert kept1 < 0.8 * kept0  # what the forward keeps for the backward (the checkpoint hides its inner tensors)
    assert all(layer.recompute for layer in model.encoders.layers)
    assert not any(layer.recompute for layer in model.recompute_activations(False).encoders.layers)


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cpu", [True, False], ids=["per-stream", "stacked"])
def test_backward_in_parts_equals_one_pass_without_dropout(tiny_ds, tiny_split, tiny_model_config, cpu):
    """Gradient caching is exact: with dropout off, three parts give the one-pass losses and
    every gradient (the in-batch contrastive losses still see the whole batch), and the
    introspection tensors come back whole."""
    config = tiny_model_config.replace(hidden_dropout=0.0, attention_dropout=0.0)
    batch = next(iterate_batches(tiny_split.train_prefix, 40, shuffle=True, generator=torch.Generator().manual_seed(2)))
    one = _model(config, tiny_ds).train().use_cpu_kernels(cpu)
    out1 = step_forward(one, batch, 3)
    out1.loss.backward()
    parts = _model(config, tiny_ds).train().use_cpu_kernels(cpu)
    out3 = steps.backward_in_parts(parts, batch, StepSampler.for_model(parts)(batch, torch.Generator().manual_seed(3)), 3)
    assert out3.losses.keys() == out1.losses.keys() == LOSSES
    assert float(out1.losses["placeholder_contrastive"].detach()) > 0
    terms = batch_terms(40, config)  # the batch in 3 parts or at once: other shapes, other orders
    for k in out1.losses:
        assert_float_close(out3.losses[k], out1.losses[k].detach(), terms, msg=k)
    g1, g3 = _grads(one), _grads(parts)
    assert g1.keys() == g3.keys() and len(g1) > 10
    for name in g1:
        assert_float_close(g3[name], g1[name], terms, msg=name)
    assert_float_close(out3.interactive_gates, out1.interactive_gates.detach(), TINY_FORWARD_TERMS, magnitude=1.0)
    assert_float_close(out3.temporal_gates, out1.temporal_gates.detach(), TINY_FORWARD_TERMS, magnitude=1.0)
    assert out3.sequence.shape == out1.sequence.shape and not out3.loss.requires_grad


@pytest.mark.parametrize("cpu", [True, False], ids=["per-stream", "stacked"])
def test_backward_in_parts_replays_each_parts_dropout(tiny_ds, tiny_split, tiny_model_config, cpu):
    """With dropout on, the parameter gradients are those of the whole batch's loss with
    each part encoded under the random state the part started from (the rerun draws the
    same masks), and the global random state ends where the first pass left it."""
    batch = next(iterate_batches(tiny_split.train_prefix, 40, shuffle=True, generator=torch.Generator().manual_seed(2)))
    model = _model(tiny_model_config, tiny_ds).train().use_cpu_kernels(cpu)
    torch.manual_seed(5)
    draws = StepSampler.for_model(model)(batch, torch.Generator().manual_seed(3))
    out = steps.backward_in_parts(model, batch, draws, 2)
    after = torch.get_rng_state()
    got = _grads(model)

    direct = _model(tiny_model_config, tiny_ds).train().use_cpu_kernels(cpu)
    place = draws.placeholders
    torch.manual_seed(5)
    hs, augs = [], []
    for sl in (slice(0, 20), slice(20, 40)):
        sub = SequenceBatch(batch.items[sl], batch.timestamps[sl], batch.lengths[sl], batch.targets[sl], batch.users[sl])
        states, _ = direct.encode_states(sub, direct.item_tables(), place[sl])
        hs.append(states.last)
        augs.append(states.augmented)
    assert torch.equal(torch.get_rng_state(), after)
    named = direct.named_losses(batch, SequenceStates(torch.cat(hs, 1), None, torch.cat(augs, 1), place),
                                direct.item_matrix())
    direct.total_loss(named).backward()
    want = _grads(direct)
    assert want.keys() == got.keys()
    terms = batch_terms(40, tiny_model_config)  # parts rerun inside backward against one graph
    for name in want:
        assert_float_close(got[name], want[name], terms, msg=name)
    assert_float_close(out.losses["rec"], named["rec"].detach(), terms)
    with pytest.raises(ValueError, match="between 1 and the batch size 40"):
        steps.backward_in_parts(model, batch, draws, 41)
    with pytest.raises(ValueError, match="prefix-mode batch"):
        steps.backward_in_parts(model, _dense_batch(tiny_split), draws, 2)


def test_chunked_expert_mix_gradients(monkeypatch):
    """The chunked Interactive-MoE mix (no (B, T, E, S, d) tensor) has the analytic
    gradients for gates, item rows and position rows (float64 gradcheck, chunks of 2
    sequences over 5 so the last chunk is short) and equals the direct form."""
    monkeypatch.setattr(kernels.FactoredMix, "CHUNK", 2)
    torch.manual_seed(0)
    B, T, S, E, d, U = 5, 3, 2, 3, 4, 6
    gates = torch.softmax(torch.randn(B, T, S, E, dtype=torch.float64), -1).requires_grad_()
    items = torch.randn(U, E * S * d, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(T, E * S * d, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, U, (B, T))
    assert torch.autograd.gradcheck(lambda g, i, p: kernels.FactoredMix.apply(g, i, p, index, E), (gates, items, pos))
    direct = ((items[index] + pos).view(B, T, E, S, d) * gates.transpose(2, 3).unsqueeze(-1)).sum(2)
    torch.testing.assert_close(kernels.FactoredMix.apply(gates, items, pos, index, E), direct)
    # only the item rows trainable; then float32 gates with bf16 rows (CPU autocast): one dtype inside,
    # each gradient in its input's dtype
    assert torch.autograd.gradcheck(lambda i: kernels.FactoredMix.apply(gates.detach(), i, pos.detach(), index, E), (items,))
    g32 = gates.detach().float().requires_grad_()
    i16, p16 = (t.detach().bfloat16().requires_grad_() for t in (items, pos))
    kernels.FactoredMix.apply(g32, i16, p16, index, E).float().sum().backward()
    assert (g32.grad.dtype, i16.grad.dtype, p16.grad.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)


def test_the_stock_kernel_paths_used_off_the_cpu_agree_with_the_cpu_paths(tiny_ds, tiny_split, tiny_model_config):
    """Off the CPU (a GPU) dropout is F.dropout and the expert mix is the direct form.
    Run those paths here: without dropout they give the CPU paths' result, and with it
    every parameter still gets a gradient."""
    model = _model(tiny_model_config, tiny_ds)
    batch = _dense_batch(tiny_split, 8, seed=1)
    model.eval()
    with torch.no_grad():
        cpu, cpu_scores = step_forward(model, batch, 0), model.full_sort_predict(batch)
        model.use_cpu_kernels(False)
        stock, stock_scores = step_forward(model, batch, 0), model.full_sort_predict(batch)
    assert_float_close(stock_scores, cpu_scores, TINY_FORWARD_TERMS)
    for name in cpu.losses:  # means over 8 windows x 10 positions
        assert_float_close(stock.losses[name], cpu.losses[name], batch_terms(80, tiny_model_config), msg=name)
    model.train()
    out = step_forward(model, batch, 0)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing and torch.isfinite(out.loss)


def test_use_cpu_kernels_decides_which_form_runs(tiny_ds, tiny_split, tiny_model_config, monkeypatch):
    """The setting model.py reads is the one that runs: by default the CPU-tuned forms of
    kernels.py on CPU tensors, with True too; with False neither the per-stream encoder
    nor the chunked mix is called (so the comparisons of the two forms compare two)."""
    calls = []
    for name in ("encode_per_stream", "factored_mix"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    model = _model(tiny_model_config, tiny_ds).eval()
    batch = _dense_batch(tiny_split, 4)
    for setting, cpu_forms in ((None, True), (True, True), (False, False), (None, True)):
        calls.clear()
        model.use_cpu_kernels(setting).query(batch)
        assert set(calls) == ({"encode_per_stream", "factored_mix"} if cpu_forms else set()), setting


@pytest.mark.parametrize("mode", ["dense", "prefix"])
@pytest.mark.parametrize("preset", ["hm4sr", "sasrec"])
def test_the_fast_paths_give_the_plain_forms_losses_and_gradients(tiny_ds, tiny_split, tiny_model_config,
                                                                  preset, mode):
    """The whole model with the CPU paths (per-stream encoder, factored and chunked
    expert mix) and with the batched form model.py states (``use_cpu_kernels(False)``), dropout
    off so both see the same function: the same scores, every named loss and every
    parameter's gradient, in dense and prefix mode, for HM4SR and SASRec."""
    config = tiny_model_config.replace(hidden_dropout=0.0, attention_dropout=0.0)
    if preset == "sasrec":
        config = ModelConfig.sasrec(**{k: getattr(config, k) for k in (
            "hidden_size", "max_length", "num_layers", "num_heads", "inner_size", "hidden_dropout",
            "attention_dropout")})
    part = tiny_split.train_dense if mode == "dense" else tiny_split.train_prefix
    batch = next(iterate_batches(part, 24, shuffle=True, generator=torch.Generator().manual_seed(4)))
    runs = {}
    for fast in (True, False):
        model = _model(config, tiny_ds).train().use_cpu_kernels(fast)
        out = step_forward(model, batch, 3)
        out.loss.backward()
        runs[fast] = out, _grads(model), model.full_sort_predict(batch)
    (fast_out, fast_grads, fast_scores), (plain_out, plain_grads, plain_scores) = runs[True], runs[False]
    assert fast_out.losses.keys() == plain_out.losses.keys() == (LOSSES if preset == "hm4sr" else {"rec"})
    assert_float_close(fast_scores, plain_scores, forward_terms(config))
    terms = batch_terms(24 * config.max_length, config)  # 24 windows x T positions, or 24 prefixes
    for name in plain_out.losses:
        assert_float_close(fast_out.losses[name], plain_out.losses[name], terms, msg=name)
    assert fast_grads.keys() == plain_grads.keys() and len(plain_grads) >= 10
    for name in plain_grads:
        assert_float_close(fast_grads[name], plain_grads[name], terms, msg=name)
    assert any(float(g.abs().max()) > 1e-3 for g in plain_grads.values())  # gradients that could differ
