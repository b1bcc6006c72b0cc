"""Tests for hm4sr_core.data.store and data.prepare: lossless round trip, atomic
replacement that never loses the previous folder, tamper detection by hash."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pandas as pd
import pytest

from hm4sr_core.config import PreprocessConfig, SplitConfig
from hm4sr_core.data import store
from hm4sr_core.data.prepare import format_stats, prepare
from hm4sr_core.data.preprocess import preprocess
from hm4sr_core.data.schema import DataError
from hm4sr_core.data.splits import build_split
from hm4sr_core.data.store import (cached_file_sha256, file_sha256, files_sha256, load_dataset, read_manifest,
                                   save_dataset)


def _assert_same_dataset(a, b):
    assert a.name == b.name
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    assert list(a.items.columns) == list(b.items.columns)
    for col in a.items.columns:
        if col == "categories":
            assert [list(c) for c in a.items[col]] == [list(c) for c in b.items[col]]
        else:
            assert a.items[col].tolist() == b.items[col].tolist(), col
    np.testing.assert_array_equal(a.user_tokens, b.user_tokens)
    assert a.category_names == b.category_names
    np.testing.assert_array_equal(a.categories, b.categories)
    assert a.categories.dtype == b.categories.dtype
    assert set(a.modalities) == set(b.modalities)
    for name, mod in a.modalities.items():
        np.testing.assert_array_equal(mod.features, b.modalities[name].features)
        np.testing.assert_array_equal(mod.available, b.modalities[name].available)
        assert mod.features.dtype == b.modalities[name].features.dtype
        assert mod.available.dtype == b.modalities[name].available.dtype
        assert json.loads(json.dumps(mod.provenance, default=store._json_default)) == b.modalities[name].provenance
    assert a.stats == b.stats
    assert json.loads(json.dumps(a.preprocessing)) == b.preprocessing


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_round_trip_is_lossless(tiny_ds, tmp_path):
    folder = save_dataset(tiny_ds, tmp_path / "tiny")
    assert folder == tmp_path / "tiny"
    back = load_dataset(folder)
    _assert_same_dataset(tiny_ds, back)
    assert back.interactions["item"].dtype == np.int64 and back.interactions["timestamp"].dtype == np.int64
    # what comes back splits identically
    cfg = SplitConfig(max_length=10)
    assert build_split(back, cfg).hash() == build_split(tiny_ds, cfg).hash()
    assert _leftovers(tmp_path, "tiny") == []


def test_round_trip_of_masked_modality(make_raw, make_modality, tmp_path):
    rows = [("u", "a", 1), ("u", "b", 2), ("v", "c", 3)]
    raw = make_raw(rows, modalities=[make_modality(["a", "c"], dim=2, optional=True)])
    ds = preprocess(raw, PreprocessConfig(user_core=0, item_core=0))
    back = load_dataset(save_dataset(ds, tmp_path / "masked"))
    _assert_same_dataset(ds, back)
    assert back.modalities["text"].available.tolist() == [False, True, False, True]


def test_failed_save_keeps_the_previous_folder(tiny_ds, tmp_path, monkeypatch):
    folder = save_dataset(tiny_ds, tmp_path / "tiny")
    before = _snapshot(folder)
    calls = []
    real_save = np.save

    def failing_save(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:  # categories and the first feature file are written, then disk full
            raise OSError("No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    changed = tiny_ds.interactions.copy()
    changed["timestamp"] += 1
    other = type(tiny_ds)(**{**tiny_ds.__dict__, "interactions": changed})
    with pytest.raises(OSError, match="No space left"):
        save_dataset(other, folder)
    monkeypatch.undo()
    assert len(calls) == 3
    assert _snapshot(folder) == before
    assert _leftovers(tmp_path, "tiny") == []
    _assert_same_dataset(tiny_ds, load_dataset(folder))


def test_failed_rename_keeps_the_previous_folder(tiny_ds, tmp_path, monkeypatch):
    folder = save_dataset(tiny_ds, tmp_path / "tiny")
    before = _snapshot(folder)
    real_replace = os.replace

    def failing_replace(src, dst):
        # the final move of the new folder into place fails (after the old one moved aside)
        if os.fspath(dst) == os.fspath(folder) and ".tmp-" in os.fspath(src):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_dataset(tiny_ds, folder)
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert _leftovers(tmp_path, "tiny") == []


def test_tampered_file_is_detected(tiny_ds, tmp_path):
    folder = save_dataset(tiny_ds, tmp_path / "tiny")
    original = (folder / "features_text.npy").read_bytes()
    feats = np.load(folder / "features_text.npy")
    feats[3, 0] += 1.0
    np.save(folder / "features_text.npy", feats)
    with pytest.raises(DataError, match=r"features_text\.npy: content hash differs from manifest\.json"):
        load_dataset(folder)
    assert load_dataset(folder, verify=False).modalities["text"].features[3, 0] == feats[3, 0]
    (folder / "features_text.npy").write_bytes(original)
    load_dataset(folder)  # intact again
    (folder / "users.parquet").unlink()
    with pytest.raises(DataError, match=r"users\.parquet: missing"):
        load_dataset(folder)


def test_unknown_dataset_and_old_format_raise(tiny_ds, tmp_path):
    with pytest.raises(DataError, match="no prepared dataset.*run `hm4sr prepare` first"):
        load_dataset(tmp_path / "nowhere")
    folder = save_dataset(tiny_ds, tmp_path / "tiny")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format_version 0, expected 1"):
        load_dataset(folder)


def test_data_hash_tracks_content(tiny_ds, tmp_path):
    a = read_manifest(save_dataset(tiny_ds, tmp_path / "a"))["data_hash"]
    b = read_manifest(save_dataset(tiny_ds, tmp_path / "b"))["data_hash"]
    changed = tiny_ds.interactions.copy()
    changed.loc[0, "timestamp"] -= 1
    other = type(tiny_ds)(**{**tiny_ds.__dict__, "interactions": changed})
    c = read_manifest(save_dataset(other, tmp_path / "c"))["data_hash"]
    assert a == b != c


def test_prepare_writes_folder_with_split_hashes(tmp_path):
    ds, folder = prepare("synthetic", name="tiny", out_root=tmp_path,
                         config=PreprocessConfig(max_length=10),
                         synthetic=dict(n_users=60, n_items=40, mean_length=12, text_dim=8, image_dim=8), seed=3)
    assert folder == tmp_path / "tiny" and ds.name == "tiny"
    manifest = read_manifest(folder)
    given = dict(n_users=60, n_items=40, mean_length=12, text_dim=8, image_dim=8)
    # the world is recorded whole: the values given, and every other parameter at its default
    defaults = {"n_categories": 8, "image_noise_share": 0.5, "long_gap_days": 30.0, "long_gap_share": 0.25,
                "regime_follow_prob": 0.9, "zipf_exponent": 0.8, "return_lag": 1}
    assert manifest["inputs"] == {"source": "synthetic", "files": {},
                                  "options": {"seed": 3, "world": {**given, **defaults}},
                                  "preprocessing": PreprocessConfig(max_length=10).to_dict()}
    for kind in ("leave_one_out", "temporal"):
        assert manifest["split_hashes"][kind] == build_split(ds, SplitConfig(kind=kind, max_length=10)).hash()
    _assert_same_dataset(ds, load_dataset(folder))
    text = format_stats(ds)
    assert "users        60" in text and "items        40" in text and "modality     text: 8-d" in text


def test_cached_file_sha256_never_serves_a_stale_digest(tmp_path):
    data = tmp_path / "reviews.json"
    data.write_bytes(b"a" * 1000)
    stat = data.stat()
    first = cached_file_sha256(data, tmp_path / "cache")
    assert first == file_sha256(data) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(list((tmp_path / "cache" / "input-sha256").iterdir())) == 1
    data.write_bytes(b"b" * 1000)  # same size, and the old modification time put back
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cached_file_sha256(data, tmp_path / "cache") == hashlib.sha256(b"b" * 1000).hexdigest()
    for entry in (tmp_path / "cache" / "input-sha256").iterdir():
        entry.write_text("garbage")
    assert cached_file_sha256(data, tmp_path / "cache") == file_sha256(data)  # an unreadable entry is recomputed
    images = [tmp_path / "B1.jpg", tmp_path / "B2.jpg"]
    for image, content in zip(images, (b"one", b"two")):
        image.write_bytes(content)
    group = files_sha256(images, tmp_path / "cache")
    assert group == files_sha256(images[::-1], tmp_path / "cache")  # order given does not matter
    images[1].rename(tmp_path / "B3.jpg")
    assert files_sha256([images[0], tmp_path / "B3.jpg"], tmp_path / "cache") != group  # names count
