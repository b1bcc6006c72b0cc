"""benchmarks/amazon2023_synth.py: raw Amazon 2023 schema, determinism, and the real reader reads it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.amazon2023_synth import main, write_amazon2023
from hm4sr_core.data.readers.amazon import locate_amazon, read_amazon

REVIEW_FIELDS = {"rating", "title", "text", "images", "asin", "parent_asin", "user_id", "timestamp",
                 "helpful_vote", "verified_purchase"}
META_FIELDS = {"main_category", "title", "average_rating", "rating_number", "features", "description", "price",
               "images", "videos", "store", "categories", "details", "parent_asin", "bought_together"}


def _records(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    return write_amazon2023(tmp_path_factory.mktemp("synth"), interactions=5000, seed=7, progress=False)


def test_files_have_the_2023_schema_field_for_field(files):
    reviews, meta = files
    assert (reviews.name, meta.name) == ("Synthetic_Goods.jsonl.gz", "meta_Synthetic_Goods.jsonl.gz")
    review_rows, meta_rows = _records(reviews), _records(meta)
    assert len(review_rows) == 5000 and all(set(r) == REVIEW_FIELDS for r in review_rows)
    assert all(set(m) == META_FIELDS for m in meta_rows)
    first = review_rows[0]
    assert isinstance(first["timestamp"], int) and first["timestamp"] > 1_000_000_000_000  # milliseconds
    assert first["rating"] in (1.0, 2.0, 3.0, 4.0, 5.0) and isinstance(first["verified_purchase"], bool)
    assert len(first["user_id"]) == 28 and len(first["parent_asin"]) == 10
    parents = {r["parent_asin"] for r in review_rows}
    assert 300 < len(parents) <= 500  # about 10 reviews an item
    counts = np.bincount(np.unique([r["parent_asin"] for r in review_rows], return_inverse=True)[1])
    assert counts.max() > 20 * np.median(counts)  # power law: a few items hold many reviews
    with_meta = {m["parent_asin"] for m in meta_rows}
    assert 0 < len(parents - with_meta) < 0.05 * len(parents)  # about 1% written without metadata
    main_image = meta_rows[0]["images"][0]
    assert main_image["variant"] == "MAIN" and main_image["hi_res"].endswith(".jpg")


def test_same_seed_same_bytes_other_seed_other_bytes(files, tmp_path: Path):
    again = write_amazon2023(tmp_path / "again", interactions=5000, seed=7, progress=False)
    other = write_amazon2023(tmp_path / "other", interactions=5000, seed=8, progress=False)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in files]
    assert other[0].read_bytes() != files[0].read_bytes()
    assert not list((tmp_path / "again").glob("*.tmp"))  # written under a temporary name, then renamed


def test_the_amazon_2023_reader_reads_the_folder(files):
    reviews, meta = files
    assert locate_amazon(reviews.parent, version="2023") == (reviews, meta)
    raw = read_amazon(reviews, meta, version="2023")
    rows = _records(reviews)
    assert raw.source["reviews"] == 5000
    assert raw.interactions["timestamp"].tolist() == [r["timestamp"] // 1000 for r in rows]
    assert set(raw.items["item"]) == {r["parent_asin"] for r in rows}
    assert raw.source["missing_meta"] > 0 and raw.source["dropped_root_category"] == "Synthetic Goods"
    assert raw.items["categories"].map(len).max() == 2  # "Department a", "Aisle a-b" under the shared root


def test_cli_writes_and_refuses_nonsense(tmp_path: Path, capsys):
    assert main(["--interactions", "200", "--out", str(tmp_path / "small")]) == 0
    assert "Synthetic_Goods.jsonl.gz" in capsys.readouterr().out
    assert main(["--interactions", "0", "--out", str(tmp_path / "none")]) == 2
    assert "interactions must be >= 1" in capsys.readouterr().err


def test_prepare_large_measures_every_stage_on_the_generated_files(files):
    from benchmarks.prepare_large import measure
    from hm4sr_core.config import PreprocessConfig, SplitConfig
    from hm4sr_core.data.preprocess import preprocess
    from hm4sr_core.data.splits import build_split

    result = measure(str(files[0].parent), "2023", user_core=2, item_core=2)
    assert set(result["stages"]) == set(result["cpu_seconds"]) == {"read", "preprocess", "splits", "save"}
    assert result["reviews"] == 5000 and result["meta_seconds"] > 0
    # peak_rss_mb is rounded to whole MB; the peak can be the read itself now that hashing the
    # splits builds no part, so compare like with like
    assert result["peak_rss_mb"] >= round(result["rss_after_read_mb"]) > 0
    raw = read_amazon(*files, version="2023")
    raw.modalities = []
    ds = preprocess(raw, PreprocessConfig(user_core=2, item_core=2))
    assert result["interactions"] == ds.stats["interactions"] and result["items"] == ds.num_items
    assert result["split_hashes"]["temporal"] == build_split(ds, SplitConfig(kind="temporal")).hash()
