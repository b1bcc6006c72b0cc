"""Amazon Reviews 2014 / 2018 / 2023 -> RawDataset, on tiny hand-written files.

Each fixture follows its release's schema field for field (2014 metadata as Python
literal lines, 2018/2023 as strict JSON lines), written plain or gzipped, and a
small folder of real image files encoded by the real MobileNetV2.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import float_tol
from PIL import Image, ImageDraw

from benchmarks.amazon2023_synth import write_amazon2023
from hm4sr_core.config import PreprocessConfig
from hm4sr_core.data.preprocess import preprocess
from hm4sr_core.data.readers import amazon
from hm4sr_core.data.readers.amazon import locate_amazon, read_amazon
from hm4sr_core.data.schema import DataError

# Rounding steps of one MobileNetV2 forward (float_tol's terms): 17 blocks of 1x1 convolutions
# (expansion and projection, sums over 7 x the block's input channels, 16..160), 3x3 depthwise
# ones (9), the first and last convolutions (27, 320) and the 7 x 7 average pool: about 9,000
MOBILENET_TERMS = 9_000

ALL_ITEMS = PreprocessConfig(user_core=0, item_core=0)


def write_lines(path: Path, lines: list[str]) -> Path:
    text = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def review_2014(user: str, asin: str, seconds: int) -> dict:
    return {"reviewerID": user, "asin": asin, "reviewerName": "A. Gamer", "helpful": [0, 0],
            "reviewText": "Great game, couldn't stop.", "overall": 5.0, "summary": "Fun",
            "unixReviewTime": seconds, "reviewTime": "01 1, 2014"}


def review_2018(user: str, asin: str, seconds: int) -> dict:
    return {"overall": 4.0, "verified": True, "reviewTime": "07 14, 2017", "reviewerID": user,
            "asin": asin, "reviewerName": "Sam", "reviewText": "ok", "summary": "ok",
            "unixReviewTime": seconds}


def review_2023(user: str, parent: str, millis: int) -> dict:
    return {"rating": 5.0, "title": "Works", "text": "As described.", "images": [], "asin": parent + "-v",
            "parent_asin": parent, "user_id": user, "timestamp": millis, "helpful_vote": 0,
            "verified_purchase": True}


@pytest.fixture
def amazon_2014(tmp_path: Path) -> tuple[Path, Path]:
    reviews = [review_2014("U1", "A1", 1388534400), review_2014("U1", "A2", 1388620800),
               review_2014("U2", "A1", 1388707200), review_2014("U2", "A3", 1388793600),
               review_2014("U3", "A4", 1388880000)]  # A4 has no metadata
    meta = [
        {"asin": "A1", "title": "Zelda", "brand": "Nintendo", "price": 19.99, "imUrl": "http://x/A1.jpg",
         "categories": [["Video Games", "Nintendo 64", "Games"], ["Video Games", "More"]],
         "salesRank": {"Video Games": 12}},
        {"asin": "A2", "title": "Assassin's Creed", "categories": [["Video Games", "PC"]]},
        {"asin": "A3", "title": "Tom &amp; Jerry", "brand": "Warner", "categories": [["Video Games"]]},
        {"asin": "A9", "title": "Never reviewed", "categories": [["Video Games", "Xbox"]]},
    ]
    # The 2014 review dumps are JSON; the metadata dumps are Python literals (repr).
    reviews_path = write_lines(tmp_path / "reviews_Video_Games_5.json.gz", [json.dumps(r) for r in reviews])
    meta_path = write_lines(tmp_path / "meta_Video_Games.json.gz", [repr(m) for m in meta])
    return reviews_path, meta_path


def test_2014_reviews_meta_text_and_categories(amazon_2014):
    raw = read_amazon(*amazon_2014, version="2014")
    assert raw.name == "amazon2014-Video_Games"
    assert raw.interactions["user"].tolist() == ["U1", "U1", "U2", "U2", "U3"]
    assert raw.interactions["timestamp"].tolist() == [1388534400, 1388620800, 1388707200, 1388793600, 1388880000]
    items = raw.items.set_index("item")
    assert list(items.index) == ["A1", "A2", "A3", "A4"]  # A9 never reviewed: not kept
    # Every item's first path starts with "Video Games": dropped from categories, kept in text.
    assert raw.source["dropped_root_category"] == "Video Games"
    assert items.loc["A1", "categories"] == ["Nintendo 64", "Games"]  # categories[0] only
    assert items.loc["A3", "categories"] == []
    assert items.loc["A1", "text"] == "Zelda | Video Games, Nintendo 64, Games | Nintendo"
    assert items.loc["A2", "text"] == "Assassin's Creed | Video Games, PC"
    assert items.loc["A3", "title"] == "Tom & Jerry"  # HTML entity decoded
    assert items.loc["A4", "text"] == "A4" and items.loc["A4", "categories"] == []
    assert items.loc["A1", "image_url"] == "http://x/A1.jpg"
    assert raw.source["missing_meta"] == 1 and raw.source["reviews_without_meta"] == 1
    assert [m.name for m in raw.modalities] == ["text"]
    assert raw.source["image_modality"].startswith("none")
    assert raw.modalities[0].encoder is not None and raw.modalities[0].provenance["dim"] == 384


def test_2014_python_literal_reviews_plain_file(tmp_path: Path):
    reviews = write_lines(tmp_path / "reviews_Toys_5.json", [repr(review_2014("U1", "A1", 100)), "",
                                                              repr(review_2014("U2", "A1", 200))])
    meta = write_lines(tmp_path / "meta_Toys.json", [repr({"asin": "A1", "title": "Ball",
                                                            "categories": [["Toys", "Balls"]]})])
    raw = read_amazon(reviews, meta, version="2014", name="toys")
    assert raw.name == "toys"
    assert raw.interactions["timestamp"].tolist() == [100, 200]
    assert raw.items["categories"].tolist() == [["Balls"]]


def test_2018_flat_category_duplicates_and_no_shared_root(tmp_path: Path):
    reviews = write_lines(tmp_path / "Video_Games_5.json", [
        json.dumps(review_2018("U1", "B1", 1500000000)), json.dumps(review_2018("U1", "B2", 1500000100)),
        json.dumps(review_2018("U2", "B2", 1500000200))])
    meta = write_lines(tmp_path / "meta_Video_Games.json.gz", [
        json.dumps({"category": ["Video Games", "Xbox One", "Games"], "title": "Halo &amp; Friends",
                    "brand": "Microsoft", "imageURL": ["http://x/s.jpg"], "imageURLHighRes": ["http://x/L.jpg"],
                    "asin": "B1", "feature": [], "description": []}),
        json.dumps({"category": ["Toys & Games", "Puzzles"], "title": "Cube", "brand": "", "asin": "B2"}),
        json.dumps({"category": ["Video Games"], "title": "Halo duplicate", "asin": "B1"}),
    ])
    raw = read_amazon(reviews, meta, version="2018")
    items = raw.items.set_index("item")
    assert raw.source["duplicate_meta"] == 1
    assert items.loc["B1", "text"] == "Halo & Friends | Video Games, Xbox One, Games | Microsoft"  # first kept
    assert raw.source["dropped_root_category"] is None  # roots differ: paths kept whole
    assert items.loc["B1", "categories"] == ["Video Games", "Xbox One", "Games"]
    assert items.loc["B2", "categories"] == ["Toys & Games", "Puzzles"]
    assert items.loc["B1", "image_url"] == "http://x/L.jpg"
    assert raw.source["missing_meta"] == 0


def test_2023_parent_asin_milliseconds_store_and_images(tmp_path: Path):
    reviews = write_lines(tmp_path / "Video_Games.jsonl.gz", [
        json.dumps(review_2023("AGX1", "C1", 1588687728923)), json.dumps(review_2023("AGX2", "C1", 1588687729999)),
        json.dumps(review_2023("AGX2", "C2", 1588687800000))])
    meta = write_lines(tmp_path / "meta_Video_Games.jsonl", [
        json.dumps({"main_category": "Video Games", "title": "Spider-Man", "average_rating": 4.5,
                    "rating_number": 10, "features": [], "description": [], "price": None,
                    "images": [{"thumb": "t1", "large": "l1", "variant": "PT01", "hi_res": None},
                               {"thumb": "t0", "large": "l0", "variant": "MAIN", "hi_res": "h0"}],
                    "videos": [], "store": "Sony", "categories": ["Video Games", "PlayStation 4", "Games"],
                    "details": {}, "parent_asin": "C1", "bought_together": None}),
        json.dumps({"title": "Mouse", "store": "Logi", "categories": [], "images": [], "parent_asin": "C2"}),
    ])
    raw = read_amazon(reviews, meta, version="2023")
    assert raw.name == "amazon2023-Video_Games"
    assert raw.interactions["item"].tolist() == ["C1", "C1", "C2"]
    assert raw.interactions["timestamp"].tolist() == [1588687728, 1588687729, 1588687800]
    items = raw.items.set_index("item")
    assert items.loc["C1", "text"] == "Spider-Man | Video Games, PlayStation 4, Games | Sony"
    assert items.loc["C1", "categories"] == ["PlayStation 4", "Games"]  # only non-empty path: root shared
    assert items.loc["C2", "text"] == "Mouse | Logi" and items.loc["C2", "categories"] == []
    assert items.loc["C1", "image_url"] == "h0"  # the MAIN image


# --------------------------------------------------------------------------- bad input


def test_missing_file_is_named(amazon_2014, tmp_path: Path):
    with pytest.raises(DataError, match=r"meta_Nope\.json\.gz: file not found"):
        read_amazon(amazon_2014[0], tmp_path / "meta_Nope.json.gz", version="2014")


def test_unknown_version():
    with pytest.raises(ValueError, match="2014"):
        read_amazon("r", "m", version="2020")


def test_2018_rejects_python_literal_line(tmp_path: Path):
    reviews = write_lines(tmp_path / "r.json", [json.dumps(review_2018("U1", "B1", 1)), "",
                                                repr(review_2018("U2", "B1", 2))])
    meta = write_lines(tmp_path / "m.json", [json.dumps({"asin": "B1"})])
    with pytest.raises(DataError, match=r"r\.json: line 3: expected one JSON object per line"):
        read_amazon(reviews, meta, version="2018")


def test_2014_malformed_and_non_object_lines(tmp_path: Path):
    meta = write_lines(tmp_path / "m.json", [repr({"asin": "A1"})])
    broken = write_lines(tmp_path / "r.json.gz", [json.dumps(review_2014("U1", "A1", 1)), "{'asin': 'A1',"])
    with pytest.raises(DataError, match=r"r\.json\.gz: line 2: expected one JSON object or Python dict literal"):
        read_amazon(broken, meta, version="2014")
    listed = write_lines(tmp_path / "r2.json", ["[1, 2]"])
    with pytest.raises(DataError, match=r"r2\.json: line 1: expected .* found list"):
        read_amazon(listed, meta, version="2014")


def test_missing_required_field_names_field_file_line(tmp_path: Path):
    record = review_2023("U2", "C1", 5000)
    del record["parent_asin"]
    reviews = write_lines(tmp_path / "Games.jsonl", [json.dumps(review_2023("U1", "C1", 1000)), json.dumps(record)])
    meta = write_lines(tmp_path / "meta_Games.jsonl", [json.dumps({"parent_asin": "C1"})])
    with pytest.raises(DataError, match=r"Games\.jsonl: line 2: missing field 'parent_asin'"):
        read_amazon(reviews, meta, version="2023")
    meta_bad = write_lines(tmp_path / "meta_bad.jsonl", [json.dumps({"title": "no id"})])
    good = write_lines(tmp_path / "ok.jsonl", [json.dumps(review_2023("U1", "C1", 1000))])
    with pytest.raises(DataError, match=r"meta_bad\.jsonl: line 1: missing field 'parent_asin'"):
        read_amazon(good, meta_bad, version="2023")


@pytest.mark.parametrize("value, expected", [("yesterday", "finite number of seconds"),
                                             (-5, "seconds >= 0"), (None, "missing field")])
def test_bad_timestamp_names_file_line_value(tmp_path: Path, value, expected: str):
    record = review_2018("U2", "B1", 0)
    record["unixReviewTime"] = value
    reviews = write_lines(tmp_path / "r.json", [json.dumps(review_2018("U1", "B1", 10)), json.dumps(record)])
    meta = write_lines(tmp_path / "m.json", [json.dumps({"asin": "B1"})])
    with pytest.raises(DataError) as error:
        read_amazon(reviews, meta, version="2018")
    message = str(error.value)
    assert "r.json: line 2" in message and "'unixReviewTime'" in message and expected in message


def test_truncated_gzip(tmp_path: Path, amazon_2014):
    data = amazon_2014[0].read_bytes()
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.json\.gz: line \d+: truncated or corrupt gzip"):
        read_amazon(cut, amazon_2014[1], version="2014")


def test_missing_image_folder(amazon_2014, tmp_path: Path):
    with pytest.raises(DataError, match=r"no_images: image folder not found"):
        read_amazon(*amazon_2014, version="2014", image_dir=tmp_path / "no_images")


# --------------------------------------------------------------------------- images, real encoders


def draw_image(kind: str) -> Image.Image:
    """Three visibly different pictures: concentric rings, stripes, a gradient with a square."""
    image = Image.new("RGB", (160, 120), "white")
    draw = ImageDraw.Draw(image)
    if kind == "rings":
        for r in range(60, 0, -12):
            draw.ellipse([80 - r, 60 - r, 80 + r, 60 + r], fill=(200, 30 + 3 * r, 40))
    elif kind == "stripes":
        for x in range(0, 160, 16):
            draw.rectangle([x, 0, x + 7, 119], fill=(20, 60, 220))
    else:
        for y in range(120):
            draw.line([0, y, 159, y], fill=(0, 2 * y, 255 - 2 * y))
        draw.rectangle([50, 30, 110, 90], fill=(250, 250, 0))
    return image


def test_image_folder_encoded_with_mobilenetv2_and_masked(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HM4SR_CACHE_DIR", str(tmp_path / "cache"))
    reviews = write_lines(tmp_path / "Games_5.json", [
        json.dumps(review_2018(u, a, t)) for u, a, t in
        [("U1", "B1", 1), ("U1", "B2", 2), ("U2", "B3", 3), ("U2", "B4", 4), ("U3", "B5", 5), ("U3", "B1", 6)]])
    meta = write_lines(tmp_path / "meta_Games.json", [
        json.dumps({"asin": a, "title": t, "category": ["Video Games", c], "brand": "X"})
        for a, t, c in [("B1", "Rings", "PC"), ("B2", "Stripes", "Xbox"), ("B3", "Sunset", "PC"),
                        ("B4", "No photo", "Xbox"), ("B5", "Rings again", "PC")]])
    images = tmp_path / "images"
    images.mkdir()
    draw_image("rings").save(images / "B1.jpg")
    draw_image("stripes").save(images / "B2.png")
    draw_image("gradient").save(images / "B3.webp")
    shutil.copy(images / "B1.jpg", images / "B5.JPG")  # same picture, upper-case suffix
    (images / "notes.txt").write_text("not an image", encoding="utf-8")
    draw_image("stripes").save(images / "B9.jpg")  # an item nobody reviewed

    raw = read_amazon(reviews, meta, version="2018", image_dir=images)
    image = next(m for m in raw.modalities if m.name == "image")
    assert image.optional and image.provenance["dim"] == 1280
    assert "MobileNetV2" in image.provenance["encoder"]
    assert raw.source["items_with_image_file"] == 4

    ds = preprocess(raw, ALL_ITEMS)
    token_id = {t: i for i, t in zip(ds.items["item"], ds.items["token"])}
    features = ds.modalities["image"].features
    available = ds.modalities["image"].available
    assert features.shape == (6, 1280)
    assert {t: bool(available[i]) for t, i in token_id.items()} == \
        {"B1": True, "B2": True, "B3": True, "B4": False, "B5": True}
    assert not features[token_id["B4"]].any() and not features[0].any()
    rings, stripes, sunset = (features[token_id[t]] for t in ("B1", "B2", "B3"))
    assert min(np.abs(rings).sum(), np.abs(stripes).sum(), np.abs(sunset).sum()) > 0
    # B5 is B1's file at another place in the batch, where MobileNetV2 may sum in another
    # order; other images differ by far more than that rounding
    tol = float_tol(float(np.abs(rings).max()), MOBILENET_TERMS)
    np.testing.assert_allclose(features[token_id["B5"]], rings, rtol=0, atol=tol)
    assert np.abs(rings - stripes).max() > 100 * tol and np.abs(stripes - sunset).max() > 100 * tol

    text = ds.modalities["text"].features
    assert text.shape == (6, 384)
    np.testing.assert_allclose(np.linalg.norm(text[1:], axis=1), 1.0, rtol=0, atol=float_tol(1.0, 384 + 4))  # unit rows
    assert ds.items.set_index("token").loc["B4", "text"] == "No photo | Video Games, Xbox | X"

    # A second run is served from the cache (keyed by image content): same features, no new files.
    cached_files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    again = preprocess(read_amazon(reviews, meta, version="2018", image_dir=images), ALL_ITEMS)
    np.testing.assert_array_equal(again.modalities["image"].features, features)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached_files

    (images / "B2.png").write_bytes(b"not really a png")
    with pytest.raises(DataError, match=r"B2\.png: not a readable image"):
        preprocess(read_amazon(reviews, meta, version="2018", image_dir=images), ALL_ITEMS)


# --------------------------------------------------------------------------- the downloaded folder


def write_release(folder: Path, version: str, category: str = "Video_Games", reviews_name: str | None = None,
                  meta_name: str | None = None) -> tuple[Path, Path]:
    """One category of one release under its official download names, records in its exact
    schema: 2014 Python-literal lines, 2018 JSON lines, 2023 JSONL (ms timestamps, parent_asin)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [("U1", "A1", 0), ("U1", "A2", 1), ("U1", "A3", 2), ("U2", "A2", 3), ("U2", "A3", 4), ("U2", "A1", 5)]
    start = 1388534400
    if version == "2014":
        reviews = [repr(review_2014(u, a, start + 86400 * k)) for u, a, k in rows]
        meta = [repr({"asin": a, "title": f"Game {a}", "categories": [["Video Games", "PC"]], "imUrl": ""})
                for a in ("A1", "A2", "A3")]
        names = (f"reviews_{category}_5.json.gz", f"meta_{category}.json.gz")
    elif version == "2018":
        reviews = [json.dumps(review_2018(u, a, start + 86400 * k)) for u, a, k in rows]
        meta = [json.dumps({"asin": a, "title": f"Game {a}", "category": ["Video Games", "PC"], "brand": "X"})
                for a in ("A1", "A2", "A3")]
        names = (f"{category}_5.json.gz", f"meta_{category}.json.gz")
    else:
        reviews = [json.dumps(review_2023(u, a, (start + 86400 * k) * 1000 + 123)) for u, a, k in rows]
        meta = [json.dumps({"parent_asin": a, "title": f"Game {a}", "store": "X", "categories": ["Video Games"],
                            "images": []}) for a in ("A1", "A2", "A3")]
        names = (f"{category}.jsonl.gz", f"meta_{category}.jsonl")
    return (write_lines(folder / (reviews_name or names[0]), reviews),
            write_lines(folder / (meta_name or names[1]), meta))


@pytest.fixture
def fake_text(monkeypatch, tmp_path):
    """A cheap stand-in for MiniLM (384-d, one distinct row per text) and a private hash cache."""
    import hm4sr_core.data.readers.amazon as amazon

    monkeypatch.setenv("HM4SR_CACHE_DIR", str(tmp_path / "cache"))

    def encode(texts):
        out = np.zeros((len(texts), 384), dtype=np.float32)
        out[np.arange(len(texts)), [sum(map(ord, t)) % 384 for t in texts]] = 1.0
        return out

    monkeypatch.setattr(amazon, "encode_texts_cached", encode)


@pytest.mark.parametrize("version", ["2014", "2018", "2023"])
def test_folder_of_official_names_is_enough(tmp_path: Path, version: str, fake_text, capsys):
    from hm4sr_core.cli import main
    from hm4sr_core.data.store import load_dataset

    folder = tmp_path / "downloads"
    reviews, meta = write_release(folder, version)
    (folder / "README.txt").write_text("notes", encoding="utf-8")
    assert locate_amazon(folder, version=version) == (reviews, meta)
    code = main(["prepare", f"amazon{version}", "--path", str(folder), "--out-root", str(tmp_path / "out"),
                 "--user-core", "0", "--item-core", "0", "--max-length", "10"])
    assert code == 0, capsys.readouterr().err
    ds = load_dataset(tmp_path / "out" / f"amazon{version}-Video_Games")
    assert ds.source["reviews_file"] == str(reviews) and ds.source["meta_file"] == str(meta)
    assert ds.stats["interactions"] == 6 and ds.items.set_index("token").loc["A2", "text"].startswith("Game A2")
    assert ds.interactions["timestamp"].min() == 1388534400  # 2023: milliseconds floored to seconds


def test_2018_full_dump_name_and_both_dumps_of_one_category(tmp_path: Path):
    reviews, meta = write_release(tmp_path, "2018", reviews_name="Video_Games.json.gz")
    assert locate_amazon(tmp_path, version="2018") == (reviews, meta)
    write_release(tmp_path, "2018")  # Video_Games_5.json.gz beside the full dump
    with pytest.raises(DataError) as error:
        locate_amazon(tmp_path, version="2018")
    message = str(error.value)
    assert "2 reviews files for Video_Games" in message and "Video_Games.json.gz" in message
    assert "Video_Games_5.json.gz" in message and "--path REVIEWS --meta META" in message


def test_two_categories_are_an_error_naming_them_and_category_picks(tmp_path: Path, fake_text, capsys):
    from hm4sr_core.cli import main

    write_release(tmp_path / "dl", "2014", "Video_Games")
    toys = write_release(tmp_path / "dl", "2014", "Toys_and_Games")
    with pytest.raises(DataError) as error:
        locate_amazon(tmp_path / "dl", version="2014")
    message = str(error.value)
    assert "2 categories with both files: Toys_and_Games, Video_Games" in message and "--category" in message
    assert locate_amazon(tmp_path / "dl", version="2014", category="Toys_and_Games") == toys
    with pytest.raises(DataError, match=r"no category 'Toys' with both files .*categories with both: "
                                        r"\['Toys_and_Games', 'Video_Games'\]"):
        locate_amazon(tmp_path / "dl", version="2014", category="Toys")
    code = main(["prepare", "amazon2014", "--path", str(tmp_path / "dl"), "--category", "Toys_and_Games",
                 "--out-root", str(tmp_path / "out"), "--user-core", "0", "--item-core", "0"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "amazon2014-Toys_and_Games" / "manifest.json").is_file()
    code = main(["prepare", "amazon2014", "--path", str(tmp_path / "dl"), "--out-root", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--category" in err and err.count("\n") == 1


def test_folder_without_a_pair_lists_what_it_holds(tmp_path: Path):
    reviews, meta = write_release(tmp_path, "2018")
    meta.unlink()
    with pytest.raises(DataError) as error:
        locate_amazon(tmp_path, version="2018")
    message = str(error.value)
    assert "no Amazon 2018 pair <Cat>_5.json.gz (or <Cat>.json.gz) + meta_<Cat>.json.gz" in message
    assert "reviews files: ['Video_Games_5.json.gz']" in message and "metadata files: none" in message
    write_release(tmp_path / "new", "2023")  # a 2023 download handed to the 2018 reader
    with pytest.raises(DataError, match=r"no Amazon 2018 pair .* the folder holds \['Video_Games\.jsonl\.gz', "
                                        r"'meta_Video_Games\.jsonl'\]"):
        locate_amazon(tmp_path / "new", version="2018")


def test_file_form_finds_meta_beside_it_or_asks_for_it(tmp_path: Path):
    reviews, meta = write_release(tmp_path, "2023")
    assert locate_amazon(reviews, version="2023") == (reviews, meta)
    other = tmp_path / "elsewhere.jsonl"
    assert locate_amazon(reviews, other, version="2023") == (reviews, other)  # the two files, any names
    meta.unlink()
    with pytest.raises(DataError, match=r"Video_Games\.jsonl\.gz: needs --meta, the metadata file; none found "
                                        r"beside it as meta_Video_Games\.\*"):
        locate_amazon(reviews, version="2023")
    with pytest.raises(DataError, match="--category picks a category inside a folder"):
        locate_amazon(reviews, other, version="2023", category="Video_Games")
    with pytest.raises(DataError, match="--meta goes with --path REVIEWS_FILE"):
        locate_amazon(tmp_path, other, version="2023")


# --------------------------------------------------------------------------- chunked reading


def _reference_reviews(path: Path, version: str) -> pd.DataFrame:
    """The reviews as the line parser reads them, one record at a time: what the chunked
    reader must reproduce (it was the whole reader before chunks)."""
    schema = amazon.SCHEMAS[version]
    rows = [(amazon._token(r, schema.user, path, n), amazon._token(r, schema.item, path, n),
             amazon._seconds(r, schema.time, schema.time_per_second, path, n))
            for n, r in amazon.iter_records(path, schema.python_literals)]
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"]).astype({"timestamp": np.int64})


def _as_strings(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(user=frame["user"].astype(str), item=frame["item"].astype(str))


@pytest.fixture(scope="module")
def synthetic_2023(tmp_path_factory) -> tuple[Path, Path]:
    return write_amazon2023(tmp_path_factory.mktemp("synth"), interactions=3000, seed=3, progress=False)


@pytest.mark.parametrize("gzipped", [True, False])
def test_chunked_reader_gives_the_dataset_of_one_pass(synthetic_2023, tmp_path: Path, gzipped: bool):
    reviews, meta = synthetic_2023
    if not gzipped:
        plain = tmp_path / "Synthetic_Goods.jsonl"
        plain.write_bytes(gzip.decompress(reviews.read_bytes()))
        reviews = plain
    whole = amazon.read_reviews(reviews, "2023", chunk_bytes=2**30)
    chunked = amazon.read_reviews(reviews, "2023", chunk_bytes=4096)  # about 7 lines a chunk: 400+ chunks
    pd.testing.assert_frame_equal(chunked, whole)
    pd.testing.assert_frame_equal(_as_strings(chunked), _reference_reviews(reviews, "2023"))
    # Codes follow first appearance, so the item table keeps the file's order.
    assert list(whole["item"].cat.categories) == list(pd.unique(_reference_reviews(reviews, "2023")["item"]))

    raw = read_amazon(reviews, meta, version="2023")
    raw.modalities = []  # MiniLM is not what is compared here
    datasets = []
    for interactions in (chunked, _reference_reviews(reviews, "2023")):
        raw.interactions = interactions
        datasets.append(preprocess(raw, PreprocessConfig(user_core=2, item_core=2)))
    one, other = datasets
    assert 0 < one.stats["interactions"] < 3000  # the 2-core removed something and kept something
    pd.testing.assert_frame_equal(one.interactions, other.interactions)
    pd.testing.assert_frame_equal(one.items, other.items)
    np.testing.assert_array_equal(one.user_tokens, other.user_tokens)
    np.testing.assert_array_equal(one.categories, other.categories)


def test_chunks_pyarrow_cannot_read_alike_go_to_the_line_parser(tmp_path: Path):
    # Each of these lines is read by the line parser's rules (a float or string timestamp,
    # a numeric or padded id, a repeated key, a blank line, Windows line ends, no final
    # newline); the chunked reader must give exactly what it gives.
    good = [json.dumps(review_2023(f"U{k % 7}", f"C{k % 5}", 1_600_000_000_000 + 1000 * k)) for k in range(60)]
    odd = [
        '{"user_id": "U1", "parent_asin": "C1", "timestamp": 1600000000999.9}',
        '{"user_id": "U2", "parent_asin": "C2", "timestamp": "1600000001500"}',
        '{"user_id": 12345, "parent_asin": "C3", "timestamp": 1600000002000}',
        '{"user_id": "  U3 ", "parent_asin": "C1", "timestamp": 1600000003000}',
        '{"user_id": "U9", "user_id": "U4", "parent_asin": "C4", "timestamp": 1600000004000}',
        "",
        '   {"user_id": "U5", "parent_asin": "C\\u00e9", "timestamp": 1600000005000}',
    ]
    lines = good[:25] + odd + good[25:]
    text = "\r\n".join(lines[:40]) + "\n" + "\n".join(lines[40:])  # last line without newline
    path = tmp_path / "Odd.jsonl.gz"
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    expected = _reference_reviews(path, "2023")
    assert expected["user"].tolist()[25:32] == ["U1", "U2", "12345", "U3", "U4", "U5", "U4"]  # blank skipped
    for chunk_bytes in (1, 300, 2**20):
        pd.testing.assert_frame_equal(_as_strings(amazon.read_reviews(path, "2023", chunk_bytes=chunk_bytes)),
                                      expected)


@pytest.mark.parametrize("bad, expected", [
    ('{"user_id": "U", "parent_asin": "C1", "timestamp": 5}{"user_id": "V", "parent_asin": "C1", "timestamp": 6}',
     "expected one JSON object per line"),
    ('{"user_id": "U", "parent_asin": "C1"', "expected one JSON object per line"),
    ('{"user_id": "U", "parent_asin": "  ", "timestamp": 5}', "field 'parent_asin': expected a non-empty id"),
    ('{"user_id": "U", "parent_asin": "C1", "timestamp": -5}', "expected milliseconds >= 0"),
    ('{"user_id": "U", "parent_asin": "C1", "timestamp": null}', "missing field 'timestamp'"),
    ('["U", "C1", 5]', "expected one JSON object, found list"),
])
def test_bad_line_deep_in_a_chunked_gzip_file_is_named_exactly(tmp_path: Path, bad: str, expected: str):
    lines = [json.dumps(review_2023(f"U{k}", "C1", 1000 * k)) for k in range(2000)]
    lines[1536] = bad  # line 1537, many chunks in
    path = write_lines(tmp_path / "Big.jsonl.gz", lines)
    for chunk_bytes in (4096, 2**20):
        with pytest.raises(DataError) as error:
            amazon.read_reviews(path, "2023", chunk_bytes=chunk_bytes)
        assert str(error.value).startswith(f"{path}: line 1537") and expected in str(error.value)


def test_invalid_utf8_and_truncated_gzip_in_chunks_name_the_line(tmp_path: Path):
    lines = [json.dumps(review_2023(f"U{k}", "C1", 1000 * k)).encode() for k in range(300)]
    lines[200] = lines[200].replace(b'"text": "As described."', b'"text": "caf\xe9"')  # Latin-1, not UTF-8
    path = tmp_path / "Latin.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"Latin\.jsonl: line 201: not UTF-8 text"):
        amazon.read_reviews(path, "2023", chunk_bytes=2048)
    good = write_lines(tmp_path / "Cut.jsonl.gz", [json.dumps(review_2023(f"U{k}", "C1", k)) for k in range(20000)])
    good.write_bytes(good.read_bytes()[:-2000])
    with pytest.raises(DataError) as error:
        amazon.read_reviews(good, "2023", chunk_bytes=4096)
    message = str(error.value)
    assert "truncated or corrupt gzip data" in message
    line = int(re.search(r"line (\d+):", message).group(1))
    assert 10000 < line <= 20000  # the line after the last whole one read, near the end


def test_chunk_bytes_must_be_positive(synthetic_2023):
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1"):
        amazon.read_reviews(synthetic_2023[0], "2023", chunk_bytes=0)
