"""Tests for hm4sr_core.model (docs/model.md sections 2-4): every parameter registered
and trained, the temporal-expert switch, gates, padding invariance, dense = prefix,
loss magnitudes, the loss functions on hand-made tensors, presets and ablations,
config validation, and a checkpoint round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FLOAT64_EPS, TINY_FORWARD_TERMS, assert_float_close, float_tol, step_forward

from hm4sr_core.config import ModelConfig, PreprocessConfig, SplitConfig, TrainConfig
from hm4sr_core.data.splits import SequenceBatch, iterate_batches
from hm4sr_core.model import (
    HM4SR,
    build_model,
    category_loss,
    contrastive_loss,
    id_contrastive_loss,
)
from hm4sr_core.runs import load_checkpoint, model_from_checkpoint

LOSSES = {"rec", "id_contrastive", "category", "placeholder_contrastive"}


def _model(config, ds, seed=0) -> HM4SR:
    torch.manual_seed(seed)
    return build_model(config, ds)


def _dense_batch(split, size=64, seed=0) -> SequenceBatch:
    return next(iterate_batches(split.train_dense, size, shuffle=True, generator=torch.Generator().manual_seed(seed)))


def _graph_leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """Every leaf tensor the autograd graph of ``loss`` accumulates a gradient into."""
    seen, stack, leaves = set(), [loss.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.append(fn.variable)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


# --- registration and training of every parameter ----------------------------------


def test_every_parameter_is_registered_and_gets_a_gradient(tiny_ds, tiny_split, tiny_model_config):
    model = _model(tiny_model_config, tiny_ds).train()
    out = step_forward(model, _dense_batch(tiny_split), 1)
    assert set(out.losses) == LOSSES
    params = dict(model.named_parameters())
    registered = {id(p) for p in params.values()}
    leaves = _graph_leaves(out.loss)
    # whatever the loss depends on and could train is a registered parameter (the released
    # code's temporal experts were leaves outside the module tree)
    assert all(id(leaf) in registered for leaf in leaves)
    used = {id(leaf) for leaf in leaves}
    out.loss.backward()
    for name, p in params.items():
        assert p.requires_grad, name
        assert id(p) in used, f"{name} is registered but not used by the forward pass"
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # rows of the item/position/interval tables that the batch does not touch get no
        # gradient, and lambda_id = 0 zeroes the ID gate's: check each tensor as a whole
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_temporal_experts_are_trained_by_default(tiny_ds, tiny_model_config):
    model = _model(tiny_model_config, tiny_ds)
    names = dict(model.named_parameters())
    assert "temporal.experts" in names and names["temporal.experts"].requires_grad
    assert "temporal.experts" in model.state_dict()
    assert names["temporal.experts"].shape == (tiny_model_config.num_experts, 3 * tiny_model_config.hidden_size)


def test_frozen_temporal_experts_are_saved_but_never_change(tiny_ds, tiny_split, tiny_model_config):
    model = _model(tiny_model_config.replace(train_temporal_experts=False), tiny_ds).train()
    experts = model.temporal.experts
    assert "temporal.experts" in model.state_dict() and not experts.requires_grad
    before = experts.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    out = step_forward(model, _dense_batch(tiny_split), 1)
    out.loss.backward()
    assert experts.grad is None
    assert model.temporal.gate.weight.grad is not None  # the time gate still trains
    optimizer.step()
    assert torch.equal(experts.detach(), before)  # no gradient: the step leaves them untouched
    # the frozen random values survive a save/load into a differently seeded model
    other = _model(tiny_model_config.replace(train_temporal_experts=False), tiny_ds, seed=5)
    assert not torch.equal(other.temporal.experts, experts)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.temporal.experts, experts)


def test_to_dtype_moves_every_parameter(tiny_ds, tiny_split, tiny_model_config):
    for cfg in (tiny_model_config, tiny_model_config.replace(train_temporal_experts=False)):
        model = _model(cfg, tiny_ds).to(torch.float64)
        assert model.temporal.experts.dtype == torch.float64
        assert all(p.dtype == torch.float64 for p in model.parameters())
        out = step_forward(model, _dense_batch(tiny_split, 8), 0)
        assert out.sequence.dtype == torch.float64 and torch.isfinite(out.loss)


# --- gates, lambda, padding ------------------------------------------------------------


def test_gates_sum_to_one_at_real_positions_and_zero_at_padding(tiny_ds, tiny_split, tiny_model_config):
    model = _model(tiny_model_config, tiny_ds).eval()
    batch = next(iterate_batches(tiny_split.train_prefix, 32, trim=False))
    real = batch.items > 0
    assert (~real).any()  # the batch has padding
    out = model.encode(batch)
    g, r = out.interactive_gates, out.temporal_gates
    assert g.shape == (*batch.items.shape, 3, tiny_model_config.num_experts)
    assert r.shape == (*batch.items.shape, tiny_model_config.num_experts)
    softmax_sum = 2 * tiny_model_config.num_experts + 3  # exp, a sum of E, a division; summed again
    assert_float_close(g.sum(-1)[real], torch.ones_like(g.sum(-1)[real]), softmax_sum)
    assert_float_close(r.sum(-1)[real], torch.ones_like(r.sum(-1)[real]), softmax_sum)
    assert (g[~real] == 0).all() and (r[~real] == 0).all()
    assert (g[real] > 0).all() and (r[real] > 0).all()
    assert out.stream_names == ("id", "text", "image")
    assert (out.interval_buckets[~real] == 0).all() and (out.interval_buckets[:, 0] == 1).all()
    assert (out.interval_buckets[real] >= 1).all()


def test_lambda_starts_at_0_1_1(tiny_ds, tiny_model_config):
    model = _model(tiny_model_config, tiny_ds)
    assert model.interactive.lambdas.tolist() == [0.0, 1.0, 1.0]
    assert "interactive.lambdas" in dict(model.named_parameters())
    # a shorter lambda_init repeats its last value over the remaining streams
    model = _model(tiny_model_config.replace(lambda_init=(0.5, 2.0)), tiny_ds)
    assert model.interactive.lambdas.tolist() == [0.5, 2.0, 2.0]


def test_padding_content_does_not_change_real_positions(tiny_ds, tiny_split, tiny_model_config):
    model = _model(tiny_model_config, tiny_ds).eval()
    batch = next(iterate_batches(tiny_split.valid, 40, trim=False))
    pad = batch.items == 0
    assert pad.any()
    gen = torch.Generator().manual_seed(3)
    noisy = SequenceBatch(
        items=torch.where(pad, torch.randint(1, tiny_ds.num_items + 1, batch.items.shape, generator=gen), batch.items),
        timestamps=torch.where(pad, torch.randint(0, 2**31, batch.items.shape, generator=gen), batch.timestamps),
        lengths=batch.lengths, targets=batch.targets, users=batch.users)
    a, b = model.encode(batch), model.encode(noisy)
    # masked padding adds exact zeros, but other padded items change the distinct-item tables
    # the factored mix works on, so the order of some sums: a forward's rounding apart
    assert_float_close(a.sequence, b.sequence, TINY_FORWARD_TERMS)
    assert_float_close(model.full_sort_predict(batch), model.full_sort_predict(noisy), TINY_FORWARD_TERMS)
    real = ~pad
    assert_float_close(a.temporal_gates[real], b.temporal_gates[real], TINY_FORWARD_TERMS, magnitude=1.0)
    assert_float_close(a.interactive_gates[real], b.interactive_gates[real], TINY_FORWARD_TERMS, magnitude=1.0)


def test_dense_loss_at_each_position_equals_the_prefix_example(tiny_ds, tiny_split, tiny_model_config):
    model = _model(tiny_model_config, tiny_ds).eval()
    dense = tiny_split.train_dense
    row = int(np.argmax(dense.lengths))  # a full window
    n = int(dense.lengths[row])
    items = torch.from_numpy(dense.items[row:row + 1])
    times = torch.from_numpy(dense.timestamps[row:row + 1])
    targets = torch.from_numpy(dense.position_targets[row:row + 1])
    user = torch.from_numpy(dense.users[row:row + 1])
    # a softmax cross-entropy over the N + 1 scores of one forward: logits of a few units
    with torch.no_grad():
        scale = float(model.full_sort_predict(SequenceBatch(items, times, torch.tensor([n]), targets[:, n - 1],
                                                            user)).abs().max())
    tol = float_tol(max(scale, math.log(tiny_ds.num_items)), TINY_FORWARD_TERMS + tiny_ds.num_items + 1)
    for j in range(n):
        only_j = torch.zeros_like(targets)
        only_j[0, j] = targets[0, j]
        with torch.no_grad():
            d = step_forward(model, SequenceBatch(items, times, torch.tensor([n]), targets[:, n - 1], user, only_j))
            p = step_forward(model, SequenceBatch(items[:, : j + 1], times[:, : j + 1], torch.tensor([j + 1]),
                                                  targets[:, j], user))
        assert abs(float(d.losses["rec"]) - float(p.losses["rec"])) <= tol, j
    # and the mean over positions is what dense mode reports
    with torch.no_grad():
        full = step_forward(model, SequenceBatch(items, times, torch.tensor([n]), targets[:, n - 1], user, targets))
        per_position = [float(step_forward(model, SequenceBatch(items[:, : j + 1], times[:, : j + 1],
                                                                torch.tensor([j + 1]), targets[:, j], user)).losses["rec"])
                        for j in range(n)]
    assert float(full.losses["rec"]) == pytest.approx(np.mean(per_position), rel=0, abs=tol + float_tol(tol, n))


def test_starting_losses_have_the_documented_magnitudes(tiny_ds, tiny_split, tiny_model_config):
    # docs/model.md section 3: rec ~ ln N, contrastive ~ ln B, category ~ ln 2
    model = _model(tiny_model_config, tiny_ds).train()
    batch = _dense_batch(tiny_split, 64)
    out = step_forward(model, batch, 0)
    losses = {k: float(v.detach()) for k, v in out.losses.items()}
    assert all(math.isfinite(v) for v in losses.values())
    n_items = tiny_ds.num_items
    assert abs(losses["rec"] - math.log(n_items)) < 0.35
    assert abs(losses["category"] - math.log(2)) < 0.01
    # Dense mode, auxiliary losses at every position: each position with a target is a
    # row; its candidates are itself and every position of the other windows.
    per_window = (batch.position_targets > 0).sum(1)
    rows = int(per_window.sum())
    b = float(torch.exp(torch.log((rows - per_window + 1).double()).repeat_interleave(per_window).mean()))
    assert b > 2 * batch.size  # far more candidates than windows
    # random cosines at d = 16 spread the logits, which lifts log-sum-exp above ln B a little
    assert math.log(b) - 1.0 < losses["id_contrastive"] < math.log(b) + 1.2
    # placeholder: positives start close (few positions replaced), so below ln B, above the floor
    assert math.log(b - 1) - 2.5 < losses["placeholder_contrastive"] < math.log(b) + 0.3
    expected_total = sum(tiny_model_config.loss_weights[k] * v for k, v in losses.items())
    # the model's float32 sum of 4 weighted positive losses: 4 products and 3 additions
    assert float(out.loss.detach()) == pytest.approx(expected_total, rel=float_tol(1.0, 8), abs=0)


# --- the loss functions on hand-made tensors --------------------------------------------


def test_contrastive_same_target_masking_by_hand():
    # rows 0 and 1 share target 3: each is the other's false negative
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 5.0]])  # cosine matrix [[1,1,0],[1,1,0],[0,0,1]]
    targets = torch.tensor([3, 3, 4])
    e = math.e
    masked = np.mean([-math.log(e / (e + 1)), -math.log(e / (e + 1)), -math.log(e / (1 + 1 + e))])
    zeroed = np.mean([-math.log(e / (e + 1 + 1)), -math.log(e / (1 + e + 1)), -math.log(e / (1 + 1 + e))])
    plain = np.mean([-math.log(e / (e + e + 1)), -math.log(e / (e + e + 1)), -math.log(e / (1 + 1 + e))])
    # float32: cosines of width 2, a log-sum-exp of 3 logits of size <= 1 / temperature, a mean
    # of 3, against float64 by hand
    tol = float_tol(1.0, 16)
    assert float(contrastive_loss(a, b, targets, 1.0, True)) == pytest.approx(masked, rel=0, abs=tol)
    assert float(contrastive_loss(a, b, targets, 1.0, False)) == pytest.approx(zeroed, rel=0, abs=tol)
    assert float(contrastive_loss(a, b, torch.tensor([3, 5, 4]), 1.0, True)) == pytest.approx(plain, rel=0, abs=tol)
    # temperature divides the cosines: at 0.5 the positive logit is 2
    e2 = math.e ** 2
    hot = np.mean([-math.log(e2 / (e2 + 1)), -math.log(e2 / (e2 + 1)), -math.log(e2 / (1 + 1 + e2))])
    assert float(id_contrastive_loss(a, b, targets, 0.5, True)) == pytest.approx(hot, rel=0, abs=float_tol(2.0, 16))


def test_category_loss_equals_the_naive_per_token_mean(tiny_ds, tiny_split, tiny_model_config):
    model = _model(tiny_model_config, tiny_ds)
    batch = next(iterate_batches(tiny_split.valid, 16, trim=False))
    real = batch.items > 0
    matrix = model.item_matrix()
    fast = category_loss(model.category_head, matrix, model.categories, batch.items, real)
    naive = []
    for i in batch.items[real].tolist():  # every real token, repeats included
        logits = model.category_head(matrix[i])
        naive.append(F.binary_cross_entropy_with_logits(logits, model.categories[i]))
    assert len(set(batch.items[real].tolist())) < len(naive)  # repeats are there to weigh
    # positive terms, so an additive count bounds it: logits of width 3 streams x d, the BCE's
    # log1p(exp) and the mean over the categories, then the mean over the tokens
    terms = 3 * tiny_model_config.hidden_size + 4 + tiny_ds.categories.shape[1] + len(naive)
    assert_float_close(fast, torch.stack(naive).mean(), terms)


# --- presets, ablations, validation ------------------------------------------------------


def test_sasrec_preset_is_id_only(tiny_ds, tiny_split, tiny_model_config):
    cfg = ModelConfig.sasrec(**{k: v for k, v in tiny_model_config.to_dict().items() if k in
                                ("hidden_size", "max_length", "num_layers", "inner_size")})
    model = _model(cfg, tiny_ds)
    assert model.stream_names == ("id",) and model.S == 1
    assert model.interactive is None and model.temporal is None and model.time is None
    assert model.category_head is None and model.placeholders is None and len(model.projections) == 0
    prefixes = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert prefixes == {"item_embedding", "position", "encoders"}
    out = step_forward(model, _dense_batch(tiny_split, 16))
    assert set(out.losses) == {"rec"} and out.interactive_gates is None and out.temporal_gates is None
    assert model.item_matrix().shape == (tiny_ds.num_items + 1, cfg.hidden_size)


@pytest.mark.parametrize("change, absent_modules, absent_losses", [
    (dict(use_interactive_moe=False), {"interactive"}, set()),
    (dict(use_temporal_moe=False), {"temporal"}, set()),
    (dict(use_temporal_moe=False, w_placeholder_contrastive=0.0), {"temporal", "time", "placeholders"},
     {"placeholder_contrastive"}),
    (dict(w_category=0.0), {"category_head"}, {"category"}),
    (dict(w_id_contrastive=0.0), set(), {"id_contrastive"}),
    (dict(w_placeholder_contrastive=0.0), {"placeholders"}, {"placeholder_contrastive"}),
])
def test_ablation_switches_remove_modules_and_losses(tiny_ds, tiny_split, tiny_model_config, change,
                                                     absent_modules, absent_losses):
    model = _model(tiny_model_config.replace(**change), tiny_ds)
    prefixes = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert not (prefixes & absent_modules)
    full = {"item_embedding", "position", "projections", "interactive", "time", "temporal", "encoders",
            "category_head", "placeholders"}
    assert prefixes == full - absent_modules
    out = step_forward(model, _dense_batch(tiny_split, 16), 0)
    assert set(out.losses) == LOSSES - absent_losses
    assert (out.interactive_gates is None) == ("interactive" in absent_modules)
    assert (out.temporal_gates is None) == ("temporal" in absent_modules)


def test_modalities_are_chosen_by_name(tiny_ds, tiny_model_config):
    model = _model(tiny_model_config.replace(modalities=("text",)), tiny_ds)
    assert model.stream_names == ("id", "text") and len(model.projections) == 1
    assert model.projections[0].in_features == tiny_ds.modalities["text"].dim
    with pytest.raises(ValueError, match=r"modalities \['audio'\] not in dataset 'synthetic'"):
        build_model(tiny_model_config.replace(modalities=("text", "audio")), tiny_ds)


@pytest.mark.parametrize("cls, kwargs, message", [
    (ModelConfig, dict(hidden_size=15), "hidden_size must be even >= 2, got 15"),
    (ModelConfig, dict(hidden_size=16, num_heads=3), "divisible by num_heads 3"),
    (ModelConfig, dict(hidden_dropout=1.0), r"hidden_dropout must be in \[0, 1\), got 1.0"),
    (ModelConfig, dict(placeholder_ratio=-0.1), r"placeholder_ratio must be in \[0, 1\)"),
    (ModelConfig, dict(w_rec=0.0), "w_rec must be > 0"),
    (TrainConfig, dict(valid_metric="auc@10"), r"valid_metric must be ndcg\|hr\|mrr @ 5\|10\|20\|50"),
    (TrainConfig, dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (TrainConfig, dict(eval_time="later"), "eval_time must be real|shuffled|zeroed"),
    (SplitConfig, dict(valid_quantile=0.9, test_quantile=0.8), "need 0 < valid_quantile < test_quantile < 1"),
    (PreprocessConfig, dict(max_length=1), r"max_length must be in \[2, 1024\], got 1"),
    (PreprocessConfig, dict(dedup="all"), "dedup must be 'none', 'exact' or 'first'"),
])
def test_config_validation_names_the_allowed_range(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_config_parse_value_types_and_rejects():
    assert ModelConfig.parse_value("use_temporal_moe", "false") is False
    assert ModelConfig.parse_value("hidden_size", "32") == 32
    assert ModelConfig.parse_value("modalities", "text,image") == ("text", "image")
    assert TrainConfig.parse_value("lr", "1e-2") == 0.01
    with pytest.raises(ValueError, match="cannot read 'abc' as int"):
        TrainConfig.parse_value("batch_size", "abc")
    with pytest.raises(ValueError, match="unknown ModelConfig key 'nonsense'"):
        ModelConfig.parse_value("nonsense", "1")


# --- checkpoints --------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_scores(tiny_ds, tiny_split, tiny_run):
    result, out = tiny_run
    payload = load_checkpoint(out / "best.pt")  # weights_only=True inside
    assert "temporal.experts" in payload["best_state"]
    restored = model_from_checkpoint(payload, tiny_ds).eval()
    trained = result.model.eval()
    for batch in iterate_batches(tiny_split.test, 25):
        with torch.no_grad():
            assert torch.equal(restored.full_sort_predict(batch), trained.full_sort_predict(batch))
    assert ModelConfig.from_dict(payload["model_config"]) == result.model.config


def test_load_checkpoint_rejects_another_version(tiny_run, tmp_path):
    _, out = tiny_run
    payload = load_checkpoint(out / "last.pt")
    payload["checkpoint_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="checkpoint_version 99, expected 1"):
        load_checkpoint(tmp_path / "future.pt")


def test_reference_init_leaves_late_modules_at_pytorch_defaults():
    """The released code built the Interactive MoE, category head and placeholders after its
    init pass: with reference_init their weights keep nn.Linear's uniform(+-1/sqrt(fan_in))."""
    N, feats = 30, {"text": torch.randn(31, 8), "image": torch.randn(31, 8)}
    avail = {k: torch.ones(31) for k in feats}
    cats = torch.zeros(31, 3)
    ours = HM4SR(ModelConfig(hidden_size=32, num_heads=2), N, feats, avail, cats, 0.0)
    ref = HM4SR(ModelConfig.reference(hidden_size=32, num_heads=2), N, feats, avail, cats, 0.0)
    fan_in = 3 * 32
    bound = fan_in ** -0.5
    assert abs(float(ours.interactive.experts.weight.detach().std()) - 0.02) < 0.002
    assert abs(float(ref.interactive.experts.weight.detach().std()) - bound / 3 ** 0.5) < 0.01
    assert float(ref.interactive.experts.weight.detach().abs().max()) <= bound
    assert float(ref.category_head.weight.detach().abs().max()) <= bound
    assert float(ref.category_head.weight.detach().std()) > 0.04  # not the 0.02 normal init
    # modules built before the released init pass get the normal init in both
    assert abs(float(ref.encoders.layers[0].ff1.weight.detach().std()) - 0.02) < 0.002


def test_dense_id_contrastive_at_every_position_equals_it_over_the_prefix_examples(tiny_ds, tiny_split,
                                                                                   tiny_model_config):
    """Dense mode's IDCL at every position is the prefix-mode IDCL over the same prefixes,
    with positions of one window kept out of each other's denominators."""
    from hm4sr_core.model import id_contrastive_loss
    model = _model(tiny_model_config.replace(w_placeholder_contrastive=0.0), tiny_ds).eval()
    batch = _dense_batch(tiny_split, 4, seed=3)
    with torch.no_grad():
        dense = step_forward(model, batch).losses["id_contrastive"]
        rows, targets, groups = [], [], []
        for w in range(batch.size):
            for j in range(int(batch.lengths[w])):
                t = int(batch.position_targets[w, j])
                if t == 0:
                    continue
                prefix = SequenceBatch(batch.items[w:w + 1, : j + 1], batch.timestamps[w:w + 1, : j + 1],
                                       torch.tensor([j + 1]), torch.tensor([t]), batch.users[w:w + 1])
                rows.append(model.encode(prefix).sequence[0, : tiny_model_config.hidden_size])
                targets.append(t)
                groups.append(w)
        targets = torch.tensor(targets)
        prefix_loss = id_contrastive_loss(torch.stack(rows), model.item_embedding(targets), targets,
                                          tiny_model_config.id_contrastive_temperature, True, torch.tensor(groups))
        assert len(targets) > 2 * batch.size
    # rows from forwards of other shapes, then a log-sum-exp over the rows of logits up to
    # 1 / temperature
    tol = float_tol(1 / tiny_model_config.id_contrastive_temperature, TINY_FORWARD_TERMS + 2 * len(targets))
    assert float(dense) == pytest.approx(float(prefix_loss), rel=0, abs=tol)
    model_last = _model(tiny_model_config.replace(w_placeholder_contrastive=0.0,
                                                  dense_auxiliary="last_position"), tiny_ds).eval()
    with torch.no_grad():  # the last-position variant sees one row per window: another loss
        last = float(step_forward(model_last, batch).losses["id_contrastive"])
    assert abs(last - float(dense)) > 100 * tol, (last, float(dense), tol)


def test_category_columns_pads_the_target_with_zero_columns_as_the_released_code(tiny_ds, tiny_model_config):
    from hm4sr_core.model import build_model
    C = tiny_ds.categories.shape[1]
    padded = build_model(tiny_model_config.replace(category_columns=C + 7), tiny_ds)
    assert padded.category_head.out_features == C + 7
    assert torch.equal(padded.categories[:, :C], torch.from_numpy(tiny_ds.categories).float())
    assert not padded.categories[:, C:].any()
    assert build_model(tiny_model_config, tiny_ds).category_head.out_features == C
    with pytest.raises(ValueError, match="fewer than the dataset's"):
        build_model(tiny_model_config.replace(category_columns=C - 1), tiny_ds)


def test_gap_buckets_released_puts_padding_and_first_item_in_the_zero_gap_bucket(
        tiny_ds, tiny_split, tiny_model_config):
    from hm4sr_core.model import GAP_BUCKET_OFFSET
    batch = next(iterate_batches(tiny_split.train_prefix, 32, trim=False))
    real = batch.items > 0
    ours = _model(tiny_model_config, tiny_ds).eval()
    released = _model(tiny_model_config.replace(gap_buckets="released"), tiny_ds).eval()
    b_ours = ours.encode(batch).interval_buckets
    b_rel = released.encode(batch).interval_buckets
    assert (b_rel[~real] == GAP_BUCKET_OFFSET).all() and (b_rel[:, 0] == GAP_BUCKET_OFFSET).all()
    later = real.clone()
    later[:, 0] = False  # real items after the first: a gap of their own, the same in both
    assert torch.equal(b_rel[later], b_ours[later])
    assert (b_ours[later] >= GAP_BUCKET_OFFSET).all()
    # the first item's interval embedding is the zero-gap row's, as in the released code
    tau = released.time(batch.timestamps, real)[0]
    row = released.time.interval.weight[GAP_BUCKET_OFFSET]
    assert torch.equal(tau[:, 0, :row.numel()], row.expand(len(batch.items), -1))  # a table lookup, copied
    with pytest.raises(ValueError, match="gap_buckets"):
        tiny_model_config.replace(gap_buckets="shared")


def test_fit_feature_width_pads_or_keeps_the_leading_singular_directions():
    from hm4sr_core.model import fit_feature_width
    g = torch.Generator().manual_seed(0)
    narrow = torch.randn(9, 5, generator=g)
    padded = fit_feature_width(narrow, 8)
    assert padded.shape == (9, 8) and torch.equal(padded[:, :5], narrow) and not padded[:, 5:].any()
    # wider than the target, rank within it: inner products between rows are kept exactly
    low_rank = torch.randn(12, 3, generator=g) @ torch.randn(3, 20, generator=g)
    low_rank[0] = 0  # the padding row
    fitted = fit_feature_width(low_rank, 6)
    assert fitted.shape == (12, 6) and not fitted[0].any()
    # an SVD of a rank-3 matrix of entries ~3 (products of width 3): its inner products, of
    # width 20, kept to the SVD's rounding, counted as a sum over the 12 x 20 entries
    assert_float_close(fitted @ fitted.T, low_rank @ low_rank.T, 12 * 20)
    # full rank: the kept directions hold the most energy; the signs are fixed, so a copy
    # with flipped columns of the basis cannot come out
    full = torch.randn(30, 10, generator=g)
    cut = fit_feature_width(full, 4)
    s = torch.linalg.svdvals(full.double())
    assert_float_close(cut.double().pow(2).sum(), s[:4].pow(2).sum(), 30 * 10)  # float32 SVD of 30 x 10
    assert torch.equal(fit_feature_width(full, 4), cut)  # exact: the same call again
    basis = torch.linalg.lstsq(full.double(), cut.double()).solution.T  # (4, 10)
    top = basis.abs().argmax(dim=1)
    assert (basis[torch.arange(4), top] > 0).all()
    # fewer rows than the width: all the directions there are, then zero columns
    few = torch.randn(3, 10, generator=g)
    out = fit_feature_width(few, 5)
    assert out.shape == (3, 5) and not out[:, 3:].any()
    assert_float_close(out @ out.T, few @ few.T, 3 * 10)  # float32 SVD of 3 x 10


def test_feature_width_sets_every_projection_width(tiny_ds, tiny_split, tiny_model_config):
    model = build_model(tiny_model_config.replace(feature_width=6), tiny_ds).eval()
    assert all(p.in_features == 6 for p in model.projections)
    assert model.features_0.shape[1] == 6 and model.features_1.shape[1] == 6
    # a checkpoint's weights fit a model rebuilt from the same config (the fitted tables agree)
    again = build_model(tiny_model_config.replace(feature_width=6), tiny_ds).eval()
    again.load_state_dict(model.state_dict())
    batch = _dense_batch(tiny_split, 8)
    with torch.no_grad():
        # exact: the same weights and the same fitted tables through the same ops
        assert torch.equal(again.full_sort_predict(batch), model.full_sort_predict(batch))
    with pytest.raises(ValueError, match="feature_width"):
        tiny_model_config.replace(feature_width=-1)


@pytest.mark.parametrize("mask_same_target", [True, False])
@pytest.mark.parametrize("with_groups", [True, False])
def test_contrastive_loss_equals_the_written_out_infonce(mask_same_target, with_groups):
    # InfoNCE written out row by row: the diagonal is the positive; off-diagonal pairs with the
    # same target are out of the denominator (default) or at logit 0 (released); pairs of one
    # window (groups) are out of it in both cases
    from hm4sr_core.model import contrastive_loss

    g = torch.Generator().manual_seed(3)
    n, temperature = 12, 0.2
    a = torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 2, 1, 1, 4, 5, 2, 6, 7, 8, 1, 9])  # items 0 and 2: same target, one window
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]) if with_groups else None
    sim = F.cosine_similarity(a[:, None], b[None], dim=-1) / temperature
    rows = []
    for i in range(n):
        terms = [sim[i, i]]
        for j in range(n):
            if j == i or (groups is not None and groups[i] == groups[j]):
                continue
            if targets[i] == targets[j]:
                if not mask_same_target:
                    terms.append(sim[i, i] * 0)  # logit 0
                continue
            terms.append(sim[i, j])
        rows.append(torch.logsumexp(torch.stack(terms), 0) - sim[i, i])
    expected = torch.stack(rows).mean()
    got = contrastive_loss(a, b, targets, temperature, mask_same_target, groups)
    # float64 both: cosines of width 5, log-sum-exps over 12 logits up to 1 / temperature, a mean of 12
    terms = 5 + 3 + 2 * n + 4 + n
    assert_float_close(got, expected, terms, magnitude=1 / temperature, eps=FLOAT64_EPS)
    for got_grad, want_grad in zip(torch.autograd.grad(got, (a, b)), torch.autograd.grad(expected, (a, b))):
        assert_float_close(got_grad, want_grad, terms, magnitude=1 / temperature, eps=FLOAT64_EPS)
