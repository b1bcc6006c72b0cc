"""The released code's feature handling, initialisation and time storage as switches
(docs/model.md section 4, "Released behaviours that are not defects"): feature_transform,
interactive_gate_bias, timestamps=float32|minmax and padding_row=trained. Each test checks
what the switch changes and that the default leaves it as it was."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_float_close, float_tol, step_forward

from hm4sr_core.config import ModelConfig
from hm4sr_core.data.splits import SequenceBatch
from hm4sr_core.model import HM4SR, TimeEmbedding, build_model, rec_loss, transform_features

N, D = 40, 6


def _tables(seed=0):
    """Text and image tables with a strong shared mean direction (as the poster features),
    padding row 0 zero, and items 5..9 lacking the image."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(N + 1, D, generator=g)
    image = torch.randn(N + 1, D, generator=g) * 0.1 + torch.linspace(1, 3, D)
    text[0] = 0
    image[0] = 0
    avail_img = torch.ones(N + 1)
    avail_img[0] = 0
    avail_img[5:10] = 0
    image[5:10] = 0
    avail_txt = torch.ones(N + 1)
    avail_txt[0] = 0
    return {"text": text, "image": image}, {"text": avail_txt, "image": avail_img}


def _model(**changes) -> HM4SR:
    feats, avail = _tables()
    torch.manual_seed(0)
    config = ModelConfig.reference(hidden_size=16, num_heads=2, num_layers=1, inner_size=32, max_length=8,
                                   **changes)
    return HM4SR(config, N, feats, avail, torch.zeros(N + 1, 3), 1_000.0, 5_000.0)


def _batch(seed=1, B=6, T=8):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N + 1, (B, T), generator=g)
    lengths = torch.tensor([8, 7, 5, 4, 8, 2])
    for b, n in enumerate(lengths.tolist()):
        items[b, n:] = 0
    times = torch.cumsum(torch.randint(0, 900, (B, T), generator=g), 1) + 1_000
    times = torch.where(items > 0, times, torch.zeros_like(times))
    return SequenceBatch(items, times, lengths, torch.randint(1, N + 1, (B,), generator=g), torch.arange(B))


# --- feature_transform --------------------------------------------------------------


def test_centre_removes_the_mean_over_items_that_have_the_modality():
    feats, avail = _tables()
    out = transform_features(feats["image"], avail["image"], "centre")
    have = avail["image"].bool()
    assert float(feats["image"][have].mean(0).norm()) > 3  # the shared direction was there
    n, scale = int(have.sum()), float(feats["image"].abs().max())
    # a mean over the n rows, a subtraction, and the mean of the result: 2n + 2 steps at the features' scale
    assert_float_close(out[have].mean(0), torch.zeros(D), 2 * n + 2, magnitude=scale)
    assert torch.equal(out[~have], torch.zeros(int((~have).sum()), D))  # padding and missing stay zero
    shift = out[have] - feats["image"][have]  # one shift for every item: each row rounded twice
    assert_float_close(shift, shift[:1].expand(n, D), 4, magnitude=scale)


def test_standardise_and_l2():
    feats, avail = _tables()
    have = avail["image"].bool()
    st = transform_features(feats["image"], avail["image"], "standardise")
    # the mean and the variance (sums over n rows), a square root and a division, then the
    # statistics again (two more sums over n)
    n, terms = int(have.sum()), 4 * int(have.sum()) + 8
    assert_float_close(st[have].std(0, unbiased=False), torch.ones(D), terms)
    assert_float_close(st[have].mean(0), torch.zeros(D), terms, magnitude=float(st.abs().max()))
    l2 = transform_features(feats["image"], avail["image"], "l2")
    assert_float_close(l2[have].norm(dim=1), torch.ones(n), 2 * D + 4)  # D squares, a root, a division, again
    assert torch.equal(l2[0], torch.zeros(D))
    assert transform_features(feats["image"], avail["image"], "none") is feats["image"]
    pca = transform_features(feats["image"], avail["image"], "pca")
    centred = transform_features(feats["image"], avail["image"], "centre")
    # a rotation of the centred rows: same distances, decorrelated columns of falling variance
    # a float32 SVD of the n x D centred table errs by about n x D roundings of its scale
    p64, c64 = pca[have].double(), centred[have].double()
    svd_terms = n * D
    assert_float_close(torch.cdist(p64, p64), torch.cdist(c64, c64), svd_terms + 2 * D)
    cov = pca[have].double().T @ pca[have].double()
    assert_float_close(cov - torch.diag(torch.diag(cov)), torch.zeros(D, D, dtype=torch.float64), svd_terms + n,
                       magnitude=float(torch.diag(cov).max()))
    assert bool((torch.diag(cov)[:-1] >= torch.diag(cov)[1:]).all()) and torch.equal(pca[0], torch.zeros(D))


def test_feature_transform_reaches_only_the_named_modalities():
    model = _model(feature_transform="centre", feature_transform_modalities=("image",))
    plain = _model()
    feats, avail = _tables()
    assert torch.equal(model.features_0, plain.features_0)  # text as given
    assert not torch.allclose(model.features_1, plain.features_1)
    assert_float_close(model.features_1, transform_features(feats["image"], avail["image"], "centre"), 4)
    every = _model(feature_transform="centre")
    assert not torch.allclose(every.features_0, plain.features_0)
    with pytest.raises(ValueError, match="feature_transform_modalities names \\['audio'\\]"):
        _model(feature_transform="l2", feature_transform_modalities=("audio",))


def test_centring_then_768_columns_is_a_centred_pca():
    """With feature_width below the width, the fit keeps the leading directions of the centred
    table: the first one is the leading principal axis, not the mean direction."""
    feats, avail = _tables()
    model = _model(feature_transform="centre", feature_transform_modalities=("image",), feature_width=2)
    have = avail["image"].bool()
    centred = transform_features(feats["image"], avail["image"], "centre")[have].double()
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    kept = model.features_1[have].double()[:, 0]
    # the float32 fit's leading direction is off the float64 axis by at most its rounding
    # (n x D steps of the table's scale s[0]) over the gap to the next singular value
    angle = float_tol(float(s[0]), centred.numel()) / float(s[0] - s[1])
    assert abs(float(F.cosine_similarity(kept, centred @ vh[0], dim=0))) >= 1 - angle > 0.999


# --- interactive_gate_bias ----------------------------------------------------------


def test_gate_bias_uniform_as_nn_linear_default():
    assert torch.equal(_model().interactive.gate_bias.detach(), torch.zeros(3, 4))
    bias = _model(interactive_gate_bias="uniform").interactive.gate_bias.detach()
    bound = 1 / math.sqrt(16)
    assert float(bias.abs().max()) <= bound and float(bias.abs().min()) > 0
    assert float(bias.std()) > 0.3 * bound  # spread over the interval, not a constant


# --- timestamps ---------------------------------------------------------------------


def test_float32_timestamps_merge_gaps_under_the_float32_spacing():
    """At epoch seconds near 8.7e8 float32 steps by 64 s: a 30 s gap becomes 0 or 64."""
    t = torch.tensor([[874724710, 874724740, 874724770, 874728000]])
    real = torch.ones_like(t, dtype=torch.bool)
    exact = TimeEmbedding(8, 100.0, False, 0.0)
    f32 = TimeEmbedding(8, 100.0, False, 0.0, timestamps="float32")
    stored = f32.stored(t)
    assert torch.equal(stored, t.float().double())
    assert (stored[0, 1:] - stored[0, :-1]).tolist() == [0.0, 64.0, 3200.0]  # exact: 30, 30, 3230

    def bucket(gap):
        return int(exact.buckets(torch.tensor([[0, gap]]), real[:, :2])[0, 1])

    be, bf = exact.buckets(t, real), f32.buckets(t, real)
    assert be[0, 1:].tolist() == [bucket(30), bucket(30), bucket(3230)]
    assert bf[0, 1:].tolist() == [bucket(0), bucket(64), bucket(3200)]
    assert bucket(0) < bucket(30) < bucket(64)


def test_minmax_timestamps_read_as_a_zero_one_clock():
    model = _model(timestamps="minmax", normalise_time=False)
    t = torch.tensor([[1_000, 3_500, 6_000]])
    values = model.time.time_values(t)
    assert_float_close(values, torch.tensor([[0.0, 0.5, 1.0]]), 3, magnitude=1.0)  # (t - first) / span
    buckets = model.time.buckets(t, torch.ones_like(t, dtype=torch.bool))
    # a gap of half the data set's span: floor(100 * log2(1.5)) = 58 buckets above zero gap
    zero = int(model.time.buckets(torch.tensor([[7, 7]]), torch.ones(1, 2, dtype=torch.bool))[0, 1])
    assert int(buckets[0, 1]) - zero == math.floor(100 * math.log2(1.5))
    with pytest.raises(ValueError, match="needs normalise_time=false"):
        ModelConfig.hm4sr(timestamps="minmax")
    feats, avail = _tables()
    with pytest.raises(ValueError, match="time span"):
        HM4SR(ModelConfig.reference(timestamps="minmax"), N, feats, avail, torch.zeros(N + 1, 3), 0.0)


def test_build_model_passes_the_data_sets_time_span(tiny_ds):
    model = build_model(ModelConfig.reference(hidden_size=16, num_heads=2, max_length=10, timestamps="minmax"),
                        tiny_ds)
    span = tiny_ds.stats["last_timestamp"] - tiny_ds.stats["first_timestamp"]
    assert model.time.time_span == pytest.approx(span)


# --- padding_row --------------------------------------------------------------------


def test_trained_padding_row_is_initialised_scored_in_training_and_never_in_evaluation():
    plain, trained = _model(), _model(padding_row="trained")
    assert torch.equal(plain.item_embedding.weight[0].detach(), torch.zeros(16))
    assert float(trained.item_embedding.weight[0].detach().norm()) > 0.01
    batch = _batch()
    for model in (plain, trained):
        model.train()
        model.zero_grad()
        out = step_forward(model, batch, 3)
        out.losses["rec"].backward()
    # the training softmax has a padding column only in the trained mode ...
    assert float(plain.item_embedding.weight.grad[0].norm()) == 0.0
    assert float(trained.item_embedding.weight.grad[0].norm()) > 0.0
    # ... whose text/image part is the projection bias (the released zero feature row)
    tables = trained.item_tables()
    assert_float_close(tables[0, 1], trained.projections[0].bias.detach(), 8 + 1)  # a width-8 product with 0, + bias
    assert torch.equal(plain.item_tables()[0, 1], torch.zeros(16))
    trained.eval()
    with torch.no_grad():
        scores = trained.full_sort_predict(batch)
    assert bool(torch.isinf(scores[:, 0]).all())  # evaluation never ranks padding


def test_rec_loss_with_padding_is_the_plain_cross_entropy():
    g = torch.Generator().manual_seed(0)
    seq, items, targets = torch.randn(4, 8, generator=g), torch.randn(11, 8, generator=g), torch.tensor([1, 4, 10, 3])
    full = F.cross_entropy(seq @ items.T, targets)
    # logits of width 8, log-sum-exps over 11, a mean of 4
    assert_float_close(rec_loss(seq, items, targets, include_padding=True), full, 8 + 2 * 11 + 3 + 4,
                       magnitude=float((seq @ items.T).abs().max()))
    assert float(rec_loss(seq, items, targets)) < float(full)  # one column fewer in the denominator
    with pytest.raises(ValueError, match="padding_row='trained'"):
        ModelConfig.hm4sr(padding_row="trained", rec_loss="sampled")


def test_switches_are_validated():
    for key, bad in (("feature_transform", "whiten"), ("interactive_gate_bias", "normal"),
                     ("timestamps", "float16"), ("padding_row", "masked")):
        with pytest.raises(ValueError, match=key):
            ModelConfig.hm4sr(**{key: bad})


def test_data_facts_counts_zero_gaps_and_the_mean_direction(tiny_ds):
    from benchmarks.fidelity import data_facts
    text = data_facts(tiny_ds)
    inter = tiny_ds.interactions.sort_values(["user", "timestamp"], kind="stable")
    gaps = inter.groupby("user")["timestamp"].diff().dropna()
    assert f"zero gaps, exact seconds: {float((gaps == 0).mean()):.2%}" in text
    stored = inter["timestamp"].astype("float32").astype("float64")
    gaps32 = stored.groupby(inter["user"]).diff().dropna()
    assert f"zero gaps, float32 seconds: {float((gaps32 == 0).mean()):.2%}" in text
    for name in tiny_ds.modalities:
        assert f"{name} features" in text and "of the energy in the mean direction" in text


def test_table_rows_of_the_centring_question_are_named_only():
    from hm4sr_core.experiments import TABLE_MODELS, table_model_config
    centred = table_model_config("hm4sr_centred")
    assert centred.feature_transform == "centre" and centred.name == "hm4sr_centred"
    assert centred.replace(feature_transform="none", name="hm4sr") == table_model_config("hm4sr")
    assert table_model_config("hm4sr_standardised").feature_transform == "standardise"
    assert "hm4sr_centred" not in TABLE_MODELS  # the default table does not grow


def test_a_one_position_batch_gets_its_buckets(tiny_ds):
    """A batch of length-1 prefixes (bucket_by_length puts them together) is (B, 1) wide:
    the first-item bucket alone, in every timestamps mode."""
    t = torch.tensor([[874724710], [874724800]])
    real = torch.ones_like(t, dtype=torch.bool)
    for mode, span in (("exact", None), ("float32", None), ("minmax", 1e6)):
        emb = TimeEmbedding(8, 100.0, False, 874_000_000.0, timestamps=mode, time_span=span)
        tau, buckets, _ = emb(t, real)
        assert buckets.tolist() == [[1], [1]] and tau.shape == (2, 1, 16), mode


def test_temporal_views_refuse_a_model_that_reads_time_otherwise():
    from hm4sr_core.introspect.temporal import interval_table, temporal_gate_curve
    model = _model(timestamps="float32")
    with pytest.raises(ValueError, match="reads timestamps as 'float32'"):
        temporal_gate_curve(model, [60.0, 86400.0], [1e9])
    with pytest.raises(ValueError, match="reads timestamps as 'float32'"):
        interval_table(model, [2, 3])
    assert len(interval_table(_model(), [2, 3])) == 2
    with pytest.raises(ValueError, match="feature_transform_modalities=\\('image',\\) needs a feature_transform"):
        ModelConfig(feature_transform_modalities=("image",))
