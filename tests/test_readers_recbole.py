"""RecBole atomic files and the HM4SR authors' processed folder -> RawDataset.

Fixtures are tiny hand-written files in exactly the formats users bring
(docs/guide.md, "Data sources and licences"): typed tab-separated .inter/.item headers, .npy/.pt matrices,
and the authors' (N+1)-row tensors in RecBole's first-appearance item order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import float_tol

from hm4sr_core.config import PreprocessConfig
from hm4sr_core.data.readers.hm4sr_folder import AUTHORS_ENCODER, read_hm4sr_folder
from hm4sr_core.data.readers.recbole import read_recbole, split_categories
from hm4sr_core.data.schema import DataError, RawModality

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
# Sorted by (user, time) like the authors' files. First appearance of items:
# B3, B1, B2, B4, B5 -> RecBole's internal ids 1..5.
INTER_ROWS = [
    ("1", "B3", "5", "100"),
    ("1", "B1", "4", "200"),
    ("1", "B2", "3", "300.9"),  # float seconds are floored
    ("2", "B1", "5", "150"),
    ("2", "B4", "2", "250"),
    ("2", "B3", "1", "260"),
    ("3", "B5", "4", "120"),
    ("3", "B2", "4", "130"),
    ("3", "B4", "3", "140"),
]
FIRST_APPEARANCE = ["B3", "B1", "B2", "B4", "B5"]
ITEM_ROWS = [  # deliberately in another order than first appearance
    ("B1", "Mario Kart", "Racing,Kart Games", "Nintendo"),
    ("B2", "Halo", "Shooter Action", "Microsoft"),
    ("B3", "Zelda", "Action Adventure", "Nintendo"),
    ("B4", "Tetris", "Puzzle", ""),
    ("B5", "Doom", "Shooter", "id"),
]
CATEGORY_OF = {
    "B1": ["Racing", "Kart Games"], "B2": ["Shooter", "Action"], "B3": ["Action", "Adventure"],
    "B4": ["Puzzle"], "B5": ["Shooter"],
}


def write_inter(path: Path, rows=INTER_ROWS, header: str = INTER_HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *("\t".join(r) for r in rows)]) + "\n", encoding="utf-8")
    return path


def write_item(path: Path, rows=ITEM_ROWS) -> Path:
    header = "item_id:token\ttitle:token_seq\tcategories:token_seq\tbrand:token"
    path.write_text("\n".join([header, *("\t".join(r) for r in rows)]) + "\n", encoding="utf-8")
    return path


def features_by_token(modality: RawModality) -> dict[str, np.ndarray]:
    return {str(t): modality.features[i] for i, t in enumerate(modality.feature_items)}


def token_vectors(dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t: rng.normal(size=dim).astype(np.float32) for t in FIRST_APPEARANCE}


@pytest.fixture
def games(tmp_path: Path) -> Path:
    folder = tmp_path / "Games"
    write_inter(folder / "Games.inter")
    write_item(folder / "Games.item")
    return folder


# --------------------------------------------------------------------------- happy paths


def test_split_categories_rule():
    assert split_categories("Action Adventure") == ["Action", "Adventure"]
    assert split_categories("Video Games, PC ,Games") == ["Video Games", "PC", "Games"]
    assert split_categories("['Video Games', 'PC']") == ["Video Games", "PC"]
    assert split_categories("  ") == []


def test_reads_interactions_items_and_text(games: Path):
    raw = read_recbole(games)
    assert raw.name == "recbole-Games" and raw.source["dataset"] == "Games"
    inter = raw.interactions
    assert list(inter.columns) == ["user", "item", "timestamp"]
    assert inter["timestamp"].dtype == np.int64
    assert inter["timestamp"].tolist() == [100, 200, 300, 150, 250, 260, 120, 130, 140]
    assert inter["item"].tolist() == [r[1] for r in INTER_ROWS]  # file order kept
    assert raw.items["item"].tolist() == FIRST_APPEARANCE
    by_item = raw.items.set_index("item")
    assert by_item.loc["B1", "categories"] == ["Racing", "Kart Games"]  # comma rule
    assert by_item.loc["B3", "categories"] == ["Action", "Adventure"]  # token_seq rule
    assert by_item.loc["B1", "text"] == "Mario Kart | Racing, Kart Games | Nintendo"
    assert by_item.loc["B4", "text"] == "Tetris | Puzzle"  # empty brand omitted
    assert raw.interactions_file.endswith("Games.inter")
    assert raw.source["items_without_metadata"] == 0


def test_inter_file_path_and_no_item_file(tmp_path: Path):
    inter = write_inter(tmp_path / "x" / "mini.inter")
    raw = read_recbole(inter)
    assert raw.name == "recbole-mini"
    assert raw.items["text"].tolist() == FIRST_APPEARANCE  # no .item: text is the token
    assert all(c == [] for c in raw.items["categories"])


def test_movielens_style_item_header(tmp_path: Path):
    """ml-100k.item as RecBole ships it: movie_title and class (token_seq genres)."""
    folder = tmp_path / "ml"
    write_inter(folder / "ml.inter", rows=[("196", "242", "3", "881250949"), ("186", "302", "3", "891717742")])
    (folder / "ml.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "242\tKolya\t1996\tComedy\n302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
        "999\tUnrated\t1990\tDrama\n",
        encoding="utf-8",
    )
    raw = read_recbole(folder)
    assert raw.items.set_index("item").loc["302", "categories"] == ["Crime", "Film-Noir", "Mystery", "Thriller"]
    assert raw.items.set_index("item").loc["242", "text"] == "Kolya | Comedy"
    assert raw.source["item_file_rows_without_interactions"] == 1
    assert "999" not in set(raw.items["item"])


def test_three_matrix_alignments_give_the_same_features(games: Path):
    vectors = token_vectors(4, seed=0)
    item_order = [r[0] for r in ITEM_ROWS]
    # (b) .npy in .item order
    np.save(games / "by_item.npy", np.stack([vectors[t] for t in item_order]))
    # (c) .pt with padding row 0 then first appearance in .inter
    torch.save(torch.from_numpy(np.stack([np.zeros(4, np.float32)] + [vectors[t] for t in FIRST_APPEARANCE])),
               games / "recbole_order.pt")
    # (a) sidecar tokens, reversed order, one item the interactions never use
    sidecar_order = ["B9", *reversed(FIRST_APPEARANCE)]
    extra = np.ones(4, np.float32)
    np.save(games / "side.npy", np.stack([extra] + [vectors[t] for t in sidecar_order[1:]]))
    (games / "side.items.txt").write_text("\n".join(sidecar_order) + "\n", encoding="utf-8")

    raw = read_recbole(games, features={"b": "by_item.npy", "c": "recbole_order.pt", "a": games / "side.npy"})
    mods = {m.name: m for m in raw.modalities}
    assert "item file order" in mods["b"].provenance["row_alignment"]
    assert "first appearance" in mods["c"].provenance["row_alignment"]
    assert "sidecar" in mods["a"].provenance["row_alignment"]
    for name in ("a", "b", "c"):
        got = features_by_token(mods[name])
        for token in FIRST_APPEARANCE:
            np.testing.assert_array_equal(got[token], vectors[token], err_msg=f"{name}/{token}")
        assert mods[name].features.dtype == np.float32
        assert mods[name].available is None
    np.testing.assert_array_equal(features_by_token(mods["a"])["B9"], extra)


def test_feature_tables_csv_and_parquet(games: Path):
    vectors = token_vectors(3, seed=1)
    frame = pd.DataFrame({"item_id": FIRST_APPEARANCE[::-1],
                          **{f"f{j}": [float(vectors[t][j]) for t in FIRST_APPEARANCE[::-1]] for j in range(3)}})
    frame.to_csv(games / "feat.csv", index=False)
    pd.DataFrame({"item_id": FIRST_APPEARANCE,
                  "embedding": [vectors[t].tolist() for t in FIRST_APPEARANCE]}).to_parquet(games / "feat.parquet")
    raw = read_recbole(games, features={"csv": "feat.csv", "parquet": "feat.parquet"})
    for modality in raw.modalities:
        got = features_by_token(modality)
        for token in FIRST_APPEARANCE:
            # read back as float32: each value rounded once from what the file holds
            np.testing.assert_allclose(got[token], vectors[token], rtol=float_tol(1.0, 1), atol=0)


def test_unisrec_raw_float32_features(tmp_path: Path):
    """UniSRec writes <name>.feat1CLS (raw float32) and <name>.item2index; .inter tokens are the indices."""
    folder = tmp_path / "Sci"
    write_inter(folder / "Sci.inter", rows=[("u1", "1", "5", "10"), ("u1", "0", "5", "20"), ("u2", "2", "5", "5")])
    (folder / "Sci.item2index").write_text("A0\t0\nA1\t1\nA2\t2\n", encoding="utf-8")
    matrix = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    matrix.tofile(folder / "Sci.feat1CLS")
    raw = read_recbole(folder, features={"text": "Sci.feat1CLS"})
    got = features_by_token(raw.modalities[0])
    np.testing.assert_array_equal(got["2"], matrix[2])
    np.testing.assert_array_equal(got["0"], matrix[0])


# --------------------------------------------------------------------------- bad input


def test_missing_folder_and_missing_inter(tmp_path: Path):
    with pytest.raises(DataError, match="nowhere"):
        read_recbole(tmp_path / "nowhere")
    (tmp_path / "Empty").mkdir()
    with pytest.raises(DataError, match=r"Empty: no \.inter file"):
        read_recbole(tmp_path / "Empty")


def test_missing_column_names_file_and_lists_found(tmp_path: Path):
    inter = write_inter(tmp_path / "d" / "d.inter", rows=[("1", "B1", "5")],
                        header="user_id:token\titem_id:token\trating:float")
    with pytest.raises(DataError) as error:
        read_recbole(inter)
    message = str(error.value)
    assert "d.inter" in message and "'timestamp'" in message and "rating:float" in message


def test_untyped_header_is_rejected(tmp_path: Path):
    inter = write_inter(tmp_path / "d" / "d.inter", rows=[("1", "B1", "5")], header="user_id\titem_id\ttimestamp")
    with pytest.raises(DataError, match=r"d\.inter: line 1, column 1: .*name:type"):
        read_recbole(inter)


@pytest.mark.parametrize("value, expected", [("abc", "finite number"), ("inf", "finite number"),
                                             ("-5", "seconds >= 0"), ("", "finite number")])
def test_bad_timestamp_names_file_line_and_value(tmp_path: Path, value: str, expected: str):
    rows = [("1", "B1", "5", "10"), ("1", "B2", "5", "20"), ("1", "B3", "5", value)]
    inter = write_inter(tmp_path / "d" / "d.inter", rows=rows)
    with pytest.raises(DataError) as error:
        read_recbole(inter)
    message = str(error.value)
    assert "d.inter: line 4, column 'timestamp'" in message  # header is line 1
    assert expected in message and repr(value) in message


def test_wrong_field_count_names_the_line(tmp_path: Path):
    rows = [("1", "B1", "5", "10"), ("1", "B2", "5", "20", "extra")]
    inter = write_inter(tmp_path / "d" / "d.inter", rows=rows)
    with pytest.raises(DataError, match=r"d\.inter: .*line 3"):
        read_recbole(inter)


def test_duplicate_item_id_names_file_line_and_id(games: Path):
    write_item(games / "Games.item", rows=[*ITEM_ROWS, ("B2", "Halo again", "Shooter", "")])
    with pytest.raises(DataError) as error:
        read_recbole(games)
    message = str(error.value)
    assert "Games.item: line 7" in message and "'B2'" in message and "first at line 3" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_feature_names_file_and_row(games: Path, bad: float):
    matrix = np.ones((6, 3), np.float32)  # padding + 5 items in first-appearance order
    matrix[4, 2] = bad  # row 4 = 4th item to appear = B4
    np.save(games / "img.npy", matrix)
    with pytest.raises(DataError) as error:
        read_recbole(games, features={"image": "img.npy"})
    message = str(error.value)
    assert "img.npy" in message and "row 4" in message and "'B4'" in message and "column 2" in message


def test_nan_in_feature_table_names_line_and_column(games: Path):
    (games / "f.csv").write_text("item_id,f0,f1\nB1,1,2\nB2,3,nan\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"f\.csv: line 3 \(item 'B2'\), column 'f1': found nan"):
        read_recbole(games, features={"text": "f.csv"})


def test_non_numeric_feature_column_names_line(games: Path):
    pd.DataFrame({"item_id": ["B1", "B2"], "f0": ["0.5", "oops"]}).to_csv(games / "f.csv", index=False)
    with pytest.raises(DataError, match=r"f\.csv: line 3, column 'f0': expected a number, found 'oops'"):
        read_recbole(games, features={"text": "f.csv"})


def test_wrong_row_count_states_expected_and_found(games: Path):
    np.save(games / "img.npy", np.ones((3, 2), np.float32))
    with pytest.raises(DataError) as error:
        read_recbole(games, features={"image": "img.npy"})
    message = str(error.value)
    assert "img.npy: found 3 rows" in message
    assert "5 (rows of the .item file)" in message and "6 (distinct .inter items + padding row 0)" in message


def test_sidecar_length_mismatch(games: Path):
    np.save(games / "img.npy", np.ones((2, 2), np.float32))
    (games / "img.items.txt").write_text("B1\nB2\nB3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"img\.npy: 2 rows but .*img\.items\.txt lists 3 tokens"):
        read_recbole(games, features={"image": "img.npy"})


def test_items_without_features_error_or_masked_when_optional(games: Path):
    tokens = ["B1", "B2", "B3", "B5"]  # B4 has no image
    np.save(games / "img.npy", np.arange(8, dtype=np.float32).reshape(4, 2) + 1)
    (games / "img.items.txt").write_text("\n".join(tokens), encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_recbole(games, features={"image": "img.npy"})
    assert "img.npy" in str(error.value) and "'B4'" in str(error.value) and "1 of 5" in str(error.value)

    raw = read_recbole(games, features={"image": "img.npy"}, optional_modalities=("image",))
    image = raw.modalities[0]
    assert image.optional
    available = dict(zip(image.feature_items, image.available))
    assert available == {"B1": True, "B2": True, "B3": True, "B5": True, "B4": False}
    np.testing.assert_array_equal(features_by_token(image)["B4"], [0.0, 0.0])

    from hm4sr_core.data.preprocess import preprocess

    ds = preprocess(raw, PreprocessConfig(user_core=0, item_core=0))
    mask = ds.modalities["image"].available
    tokens_by_id = ds.items["token"].tolist()
    assert [tokens_by_id[i - 1] for i in np.flatnonzero(~mask[1:]) + 1] == ["B4"]


def test_optional_name_without_file_is_rejected(games: Path):
    with pytest.raises(DataError, match="optional_modalities"):
        read_recbole(games, optional_modalities=("image",))


def test_feature_file_not_found(games: Path):
    with pytest.raises(DataError, match=r"missing\.npy.*'text'.*not found"):
        read_recbole(games, features={"text": "missing.npy"})


# --------------------------------------------------------------------------- the authors' folder


def write_authors_folder(folder: Path, text: dict, image: dict, categories: dict, names: list[str]) -> None:
    """dataset/<Name>/ as the HM4SR release lays it out (rows = padding + first appearance)."""
    write_inter(folder / f"{folder.name}.inter", header="user_id:token\titem_id:token\ttimestamp:float",
                rows=[(u, i, t) for u, i, _, t in INTER_ROWS])

    def padded(vectors: dict) -> torch.Tensor:
        dim = len(next(iter(vectors.values())))
        return torch.from_numpy(np.stack([np.zeros(dim, np.float32)] + [vectors[t] for t in FIRST_APPEARANCE]))

    torch.save(padded(text), folder / "txt_emb.pt")
    torch.save(padded(image), folder / "img_emb.pt")
    multi_hot = torch.zeros(len(FIRST_APPEARANCE) + 1, len(names), dtype=torch.long)
    for row, token in enumerate(FIRST_APPEARANCE, start=1):
        for name in categories[token]:
            multi_hot[row, names.index(name)] = 1
    torch.save(multi_hot, folder / "cat.pt")
    (folder / "interval_num").write_bytes(b"\x80\x04G@1\x00\x00\x00\x00\x00\x00.")  # pickled float


def test_authors_folder_reads_features_categories_and_provenance(tmp_path: Path):
    names = [f"cat_{j:02d}" for j in range(12)]
    cats = {"B3": ["cat_00", "cat_11"], "B1": ["cat_02"], "B2": [], "B4": ["cat_11"], "B5": ["cat_03", "cat_04"]}
    text, image = token_vectors(6, 2), token_vectors(5, 3)
    write_authors_folder(tmp_path / "Games", text, image, cats, names)
    raw = read_hm4sr_folder(tmp_path / "Games")
    assert raw.name == "hm4sr-folder-Games"
    assert raw.items["item"].tolist() == FIRST_APPEARANCE
    assert dict(zip(raw.items["item"], raw.items["categories"])) == cats
    mods = {m.name: m for m in raw.modalities}
    assert set(mods) == {"text", "image"}
    assert mods["text"].provenance["encoder"] == AUTHORS_ENCODER
    assert mods["image"].features.shape == (5, 5)
    for token in FIRST_APPEARANCE:
        np.testing.assert_array_equal(features_by_token(mods["text"])[token], text[token])
    assert raw.source["ignored"] == ["interval_num"]


def test_recbole_and_authors_folder_agree(tmp_path: Path):
    """Same interactions, features and categories through both readers -> the same data."""
    names = [f"cat_{j}" for j in range(4)]
    cats = {"B3": ["cat_0", "cat_2"], "B1": ["cat_1"], "B2": ["cat_1", "cat_3"], "B4": ["cat_0"], "B5": ["cat_3"]}
    text, image = token_vectors(8, 4), token_vectors(6, 5)
    write_authors_folder(tmp_path / "authors" / "Games", text, image, cats, names)

    folder = tmp_path / "recbole" / "Games"
    write_inter(folder / "Games.inter", header="user_id:token\titem_id:token\ttimestamp:float",
                rows=[(u, i, t) for u, i, _, t in INTER_ROWS])
    item_order = ["B5", "B2", "B1", "B4", "B3"]
    (folder / "Games.item").write_text(
        "item_id:token\tcategories:token_seq\n" + "".join(f"{t}\t{' '.join(cats[t])}\n" for t in item_order),
        encoding="utf-8",
    )
    np.save(folder / "text.npy", np.stack([text[t] for t in item_order]))  # .item order
    sidecar = ["B4", "B3", "B1", "B5", "B2"]
    torch.save(torch.from_numpy(np.stack([image[t] for t in sidecar])), folder / "image.pt")
    (folder / "image.pt.items.txt").write_text("\n".join(sidecar) + "\n", encoding="utf-8")

    authors = read_hm4sr_folder(tmp_path / "authors" / "Games")
    recbole = read_recbole(folder, features={"text": "text.npy", "image": "image.pt"})

    pd.testing.assert_frame_equal(authors.interactions, recbole.interactions)
    assert (dict(zip(authors.items["item"], authors.items["categories"]))
            == dict(zip(recbole.items["item"], recbole.items["categories"])))
    for name in ("text", "image"):
        a = features_by_token(next(m for m in authors.modalities if m.name == name))
        r = features_by_token(next(m for m in recbole.modalities if m.name == name))
        assert a.keys() == r.keys()
        for token in a:
            np.testing.assert_array_equal(a[token], r[token])

    from hm4sr_core.data.preprocess import preprocess

    config = PreprocessConfig(user_core=0, item_core=0)
    left, right = preprocess(authors, config), preprocess(recbole, config)
    pd.testing.assert_frame_equal(left.interactions, right.interactions)
    assert left.items["token"].tolist() == right.items["token"].tolist()
    assert left.category_names == right.category_names == names
    np.testing.assert_array_equal(left.categories, right.categories)
    for name in ("text", "image"):
        np.testing.assert_array_equal(left.modalities[name].features, right.modalities[name].features)
        np.testing.assert_array_equal(left.modalities[name].available, right.modalities[name].available)


def test_authors_folder_missing_file(tmp_path: Path):
    folder = tmp_path / "Games"
    write_authors_folder(folder, token_vectors(2, 0), token_vectors(2, 1), {t: [] for t in FIRST_APPEARANCE},
                         ["cat_0"])
    (folder / "cat.pt").unlink()
    with pytest.raises(DataError) as error:
        read_hm4sr_folder(folder)
    assert "Games" in str(error.value) and "['cat.pt']" in str(error.value)


def test_authors_folder_row_count_and_nan(tmp_path: Path):
    folder = tmp_path / "Games"
    write_authors_folder(folder, token_vectors(2, 0), token_vectors(2, 1), {t: [] for t in FIRST_APPEARANCE},
                         ["cat_0"])
    torch.save(torch.zeros(5, 2), folder / "txt_emb.pt")  # N rows, padding row forgotten
    with pytest.raises(DataError) as error:
        read_hm4sr_folder(folder)
    assert "txt_emb.pt: found 5 rows; expected 6" in str(error.value) and "Games.inter" in str(error.value)

    torch.save(torch.zeros(6, 2), folder / "txt_emb.pt")
    broken = torch.ones(6, 2)
    broken[3, 1] = float("nan")
    torch.save(broken, folder / "img_emb.pt")
    with pytest.raises(DataError) as error:
        read_hm4sr_folder(folder)
    message = str(error.value)
    assert "img_emb.pt" in message and "row 3 (item 'B2')" in message and "column 1" in message


def test_authors_folder_not_a_tensor(tmp_path: Path):
    folder = tmp_path / "Games"
    write_authors_folder(folder, token_vectors(2, 0), token_vectors(2, 1), {t: [] for t in FIRST_APPEARANCE},
                         ["cat_0"])
    torch.save({"weight": torch.zeros(6, 2)}, folder / "txt_emb.pt")
    with pytest.raises(DataError, match=r"txt_emb\.pt: expected one 2-D tensor, found dict"):
        read_hm4sr_folder(folder)


# --------------------------------------------------------------------------- the dataset stem


def test_folder_with_several_inter_files_needs_dataset(tmp_path: Path):
    folder = tmp_path / "downloads"
    write_inter(folder / "Games.inter")
    write_inter(folder / "Toys.inter", rows=INTER_ROWS[:3])
    with pytest.raises(DataError) as error:
        read_recbole(folder)
    message = str(error.value)
    assert str(folder) in message and "['Games.inter', 'Toys.inter']" in message and "--dataset" in message
    toys = read_recbole(folder, "Toys")
    assert toys.name == "recbole-Toys" and len(toys.interactions) == 3
    with pytest.raises(DataError, match=r"Sports\.inter: file not found \(--dataset Sports\); \.inter files in "
                                        r".*\['Games\.inter', 'Toys\.inter'\]"):
        read_recbole(folder, "Sports")


def test_stem_comes_from_the_only_inter_file_not_the_folder_or_the_name(tmp_path: Path):
    folder = tmp_path / "recbole-download"
    write_inter(folder / "ml-100k.inter")
    raw = read_recbole(folder, name="my-ml")
    assert raw.name == "my-ml" and raw.source["dataset"] == "ml-100k"
    assert raw.interactions_file == str(folder / "ml-100k.inter")
    with pytest.raises(DataError, match=r"the dataset stem 'ml-1m' \(--dataset\) differs from the file's 'ml-100k'"):
        read_recbole(folder / "ml-100k.inter", "ml-1m")


def test_authors_folder_stem_is_the_inter_file_whatever_the_name(tmp_path: Path, capsys, monkeypatch):
    from hm4sr_core.cli import main

    monkeypatch.setenv("HM4SR_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "dataset" / "ML"
    write_authors_folder(folder, token_vectors(4, 0), token_vectors(3, 1), {t: ["cat_0"] for t in FIRST_APPEARANCE},
                         ["cat_0"])
    cores = ["--user-core", "0", "--item-core", "0", "--max-length", "10", "--out-root", tmp_path / "out"]
    assert main([str(a) for a in ["prepare", "hm4sr-folder", "--path", folder, "--name", "anything-else", *cores]]) == 0
    manifest = json.loads((tmp_path / "out" / "anything-else" / "manifest.json").read_text())
    assert manifest["source"]["dataset"] == "ML" and manifest["source"]["inter_file"] == str(folder / "ML.inter")
    assert set(manifest["inputs"]["files"]) == {"inter", "txt_emb.pt", "img_emb.pt", "cat.pt"}
    assert main([str(a) for a in ["prepare", "hm4sr-folder", "--path", folder, *cores]]) == 0
    assert (tmp_path / "out" / "hm4sr-folder-ML" / "manifest.json").is_file()  # the default name

    write_inter(folder / "ML-old.inter", header="user_id:token\titem_id:token\ttimestamp:float",
                rows=[(u, i, t) for u, i, _, t in INTER_ROWS])
    capsys.readouterr()
    assert main([str(a) for a in ["prepare", "hm4sr-folder", "--path", folder, "--name", "x", *cores]]) == 2
    err = capsys.readouterr().err
    assert "['ML-old.inter', 'ML.inter']" in err and "--dataset STEM" in err
    raw = read_hm4sr_folder(folder, "ML")
    assert raw.name == "hm4sr-folder-ML" and raw.interactions_file == str(folder / "ML.inter")
