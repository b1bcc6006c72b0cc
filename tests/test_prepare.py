"""``prepare`` and ``hm4sr prepare``: a prepared dataset is never replaced silently.

The set-up of issue 16, in miniature: ``ml-100k`` prepared by the MovieLens reader
from a tiny GroupLens folder (``u.data``, ``u.item``, ``u.genre``), and the same
interactions as RecBole atomic files (``ml-100k.inter``, ``ml-100k.item``) as
RecBole ships them. The MovieLens modalities are replaced by cheap fakes that count
their calls, so "refused before any work" can be checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hm4sr_core.cli import main
from hm4sr_core.config import PreprocessConfig
from hm4sr_core.data import prepare as prepare_module
from hm4sr_core.data.prepare import prepare, prepare_dataset, prepared_dataset
from hm4sr_core.data.readers import movielens, recbole
from hm4sr_core.data.schema import DataError, RawModality
from hm4sr_core.data import store
from hm4sr_core.data.store import read_manifest

ALL = PreprocessConfig(user_core=0, item_core=0, max_length=10)
CORES = ["--user-core", "0", "--item-core", "0", "--max-length", "10"]
# (user, movie, rating, seconds): 4 users x 4 ratings, distinct times.
RATINGS = [(u, m, 4, 881250000 + 1000 * u + 10 * k)
           for u, movies in {1: (10, 20, 30, 40), 2: (20, 30, 50, 10), 3: (30, 40, 10, 50), 4: (50, 20, 40, 30)}.items()
           for k, m in enumerate(movies)]
MOVIES = {10: ("Toy Story (1995)", ["Animation", "Comedy"]), 20: ("GoldenEye (1995)", ["Action"]),
          30: ("Four Rooms (1995)", ["Thriller"]), 40: ("Get Shorty (1995)", ["Comedy", "Drama"]),
          50: ("Copycat (1995)", ["Crime", "Drama"])}


def write_grouplens(folder: Path) -> Path:
    """The official ml-100k/ folder: u.data (tab), u.item and u.genre (pipe, latin-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in RATINGS))
    lines = []
    for movie, (title, genres) in MOVIES.items():
        flags = "|".join("1" if g in genres else "0" for g in movielens.GENRES)
        lines.append(f"{movie}|{title}|01-Jan-1995||http://us.imdb.com/M/title-exact?x|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(movielens.GENRES)) + "\n")
    return folder


def write_recbole_ml100k(folder: Path, ratings=RATINGS) -> Path:
    """ml-100k.inter and ml-100k.item exactly as RecBole 1.2 ships them (typed headers, tabs)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in ratings))
    (folder / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{m}\t{title[:-7]}\t1995\t{' '.join(genres)}\n" for m, (title, genres) in MOVIES.items()))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its exact bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path) -> None:
    """Input hashes are remembered under the test's own folder, not the repository's data/cache."""
    monkeypatch.setenv("HM4SR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def encoder_calls(monkeypatch) -> dict[str, int]:
    """Cheap MovieLens modalities (text 4-d, image 3-d) counting how often they encode."""
    calls = {"text": 0, "image": 0}

    def modality(name: str, dim: int) -> RawModality:
        def encode(items):
            calls[name] += 1
            values = np.asarray([[float(t)] * dim for t in items["item"]], dtype=np.float32)
            return values, np.ones(len(items), dtype=bool)
        return RawModality(name=name, provenance={"encoder": f"fake {name}", "dim": dim, "synthetic": False},
                           encoder=encode)

    monkeypatch.setattr(movielens, "_text_modality", lambda: modality("text", 4))
    monkeypatch.setattr(movielens, "_image_modality", lambda: modality("image", 3))
    return calls


@pytest.fixture
def demo(tmp_path, encoder_calls) -> Path:
    """data/processed/ml-100k as `make demo` leaves it (MovieLens reader, text + image)."""
    _, folder = prepare("ml-100k", write_grouplens(tmp_path / "grouplens" / "ml-100k"), config=ALL,
                        out_root=tmp_path / "processed")
    assert folder == tmp_path / "processed" / "ml-100k" and encoder_calls == {"text": 1, "image": 1}
    return folder


def forbid_work(monkeypatch) -> None:
    """Any read, encoding or preprocessing from here on fails the test."""
    def fail(*_, **__):
        raise AssertionError("work started before the target folder was checked")
    monkeypatch.setattr(recbole, "read_inter", fail)
    monkeypatch.setattr(movielens, "_read_grouplens", fail)
    monkeypatch.setattr(movielens, "_text_modality", fail)
    monkeypatch.setattr(movielens, "_image_modality", fail)
    monkeypatch.setattr(prepare_module, "preprocess", fail)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- the three reports


def test_recbole_into_the_movielens_name_is_refused_and_leaves_it_byte_identical(demo, tmp_path, capsys,
                                                                                 monkeypatch):
    before = snapshot(demo)
    folder = write_recbole_ml100k(tmp_path / "recbole-files")
    forbid_work(monkeypatch)
    code, out, err = run(capsys, "prepare", "recbole", "--path", folder, "--name", "ml-100k",
                         "--out-root", tmp_path / "processed", *CORES)
    assert code == 2 and out == ""
    assert err.count("\n") == 1  # one line
    assert str(demo) in err and "source ml-100k" in err and "(ml-100k there, recbole now)" in err
    assert "u.data" in err and "--overwrite" in err and "ml-100k.inter" in err
    assert snapshot(demo) == before
    assert sorted(p.name for p in demo.parent.iterdir()) == ["ml-100k"]  # no temp folder either


def test_recbole_default_name_is_source_plus_stem_beside_movielens(demo, tmp_path, capsys):
    before = snapshot(demo)
    folder = write_recbole_ml100k(tmp_path / "recbole-files")
    code, out, err = run(capsys, "prepare", "recbole", "--path", folder, "--out-root", tmp_path / "processed",
                         *CORES)
    assert code == 0, err
    written = tmp_path / "processed" / "recbole-ml-100k"
    assert f"written      {written}" in out
    manifest = read_manifest(written)
    assert manifest["name"] == "recbole-ml-100k" and manifest["inputs"]["source"] == "recbole"
    assert set(manifest["inputs"]["files"]) == {"inter", "item"}
    assert snapshot(demo) == before
    # Both readers saw the same 16 interactions.
    assert manifest["stats"]["interactions"] == read_manifest(demo)["stats"]["interactions"] == 16


def test_name_is_only_the_output_name(tmp_path, capsys):
    folder = write_recbole_ml100k(tmp_path / "files")
    code, out, err = run(capsys, "prepare", "recbole", "--path", folder, "--name", "my-ml", "--out-root",
                         tmp_path / "out", *CORES)
    assert code == 0, err
    manifest = read_manifest(tmp_path / "out" / "my-ml")
    assert manifest["name"] == "my-ml" and manifest["source"]["dataset"] == "ml-100k"
    assert manifest["source"]["inter_file"] == str(folder / "ml-100k.inter")


# --------------------------------------------------------------------------- reuse, refuse, overwrite


def test_same_inputs_again_reuse_the_folder_without_reading(demo, tmp_path, capsys, monkeypatch):
    before = snapshot(demo)
    mtime = (demo / "manifest.json").stat().st_mtime_ns
    forbid_work(monkeypatch)
    code, out, err = run(capsys, "prepare", "ml-100k", "--path", tmp_path / "grouplens" / "ml-100k",
                         "--out-root", tmp_path / "processed", *CORES)
    assert code == 0, err
    assert f"reused       {demo}" in out and "users        4" in out
    assert snapshot(demo) == before and (demo / "manifest.json").stat().st_mtime_ns == mtime


def test_other_inputs_of_the_same_source_are_refused_before_encoding(demo, tmp_path, encoder_calls):
    before = snapshot(demo)
    u_data = tmp_path / "grouplens" / "ml-100k" / "u.data"
    u_data.write_text(u_data.read_text().replace("881251010", "881251011"))  # one timestamp, one second later
    with pytest.raises(DataError) as error:
        prepare("ml-100k", u_data.parent, config=ALL, out_root=tmp_path / "processed")
    message = str(error.value)
    assert "u.data file content" in message and str(u_data) in message and "overwrite=True" in message
    with pytest.raises(DataError, match=r"user_core \(0 there, 5 now\)"):
        prepare("ml-100k", u_data.parent, config=PreprocessConfig(max_length=10), out_root=tmp_path / "processed")
    assert encoder_calls == {"text": 1, "image": 1}  # only the demo's own preparation
    assert snapshot(demo) == before

    done = prepare_dataset("ml-100k", u_data.parent, config=ALL, out_root=tmp_path / "processed", overwrite=True)
    assert done.action == "replaced" and done.previous["data_hash"] != read_manifest(demo)["data_hash"]
    assert read_manifest(demo)["inputs"]["files"]["u.data"]["sha256"] != \
        json.loads(before["manifest.json"])["inputs"]["files"]["u.data"]["sha256"]


def test_overwrite_that_fails_leaves_the_old_dataset_intact(demo, tmp_path, monkeypatch):
    before = snapshot(demo)
    folder = write_recbole_ml100k(tmp_path / "recbole-files")

    def bad_file(path):
        raise DataError(f"{path}: line 3: bad")

    def disk_full(*_):
        raise OSError("disk full")

    read_inter = recbole.read_inter
    monkeypatch.setattr(recbole, "read_inter", bad_file)  # fails while reading
    with pytest.raises(DataError, match="line 3: bad"):
        prepare("recbole", folder, name="ml-100k", config=ALL, out_root=tmp_path / "processed", overwrite=True)
    assert snapshot(demo) == before
    monkeypatch.setattr(recbole, "read_inter", read_inter)
    monkeypatch.setattr(store, "write_json_atomic", disk_full)  # fails with the new folder all but written
    with pytest.raises(OSError, match="disk full"):
        prepare("recbole", folder, name="ml-100k", config=ALL, out_root=tmp_path / "processed", overwrite=True)
    assert snapshot(demo) == before
    assert sorted(p.name for p in demo.parent.iterdir()) == ["ml-100k"]  # the temporary folder is gone


def test_manifest_without_inputs_is_compared_by_source(demo, tmp_path):
    manifest = json.loads((demo / "manifest.json").read_text())
    del manifest["inputs"]  # as written before input records existed
    (demo / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(demo)
    with pytest.raises(DataError, match=r"source ml-100k .*\(ml-100k there, recbole now\)"):
        prepare("recbole", write_recbole_ml100k(tmp_path / "r"), name="ml-100k", config=ALL,
                out_root=tmp_path / "processed")
    assert snapshot(demo) == before
    done = prepare_dataset("ml-100k", tmp_path / "grouplens" / "ml-100k", config=ALL,
                           out_root=tmp_path / "processed")
    assert done.action == "replaced" and "inputs" in read_manifest(demo)
    assert read_manifest(demo)["data_hash"] == manifest["data_hash"]  # same source, same data


def test_a_folder_that_is_not_a_dataset_is_refused(tmp_path, encoder_calls):
    target = tmp_path / "processed" / "ml-100k"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare("ml-100k", write_grouplens(tmp_path / "g"), config=ALL, out_root=tmp_path / "processed")
    assert (target / "notes.txt").read_text() == "mine" and encoder_calls == {"text": 0, "image": 0}
    (target / "notes.txt").unlink()  # an empty folder is free
    assert prepare_dataset("ml-100k", tmp_path / "g", config=ALL, out_root=tmp_path / "processed").action == "written"


def test_prepared_dataset_refuses_another_source_unless_overwrite(demo, tmp_path, monkeypatch):
    before = snapshot(demo)
    folder = write_recbole_ml100k(tmp_path / "r")
    with pytest.raises(DataError, match="overwrite"):
        prepared_dataset("recbole", "ml-100k", path=folder, out_root=tmp_path / "processed", config=ALL)
    assert snapshot(demo) == before
    same, _ = prepared_dataset("ml-100k", "ml-100k", out_root=tmp_path / "processed")  # reuse: no inputs read
    assert same.source["reader"].endswith("read_ml100k")
    rebuilt, _ = prepared_dataset("recbole", "ml-100k", path=folder, out_root=tmp_path / "processed", config=ALL,
                                  overwrite=True)
    assert rebuilt.source["reader"].endswith("read_recbole") and read_manifest(demo)["inputs"]["source"] == "recbole"


def test_name_must_be_a_folder_name(tmp_path):
    with pytest.raises(ValueError, match="expected a folder name"):
        prepare("synthetic", name="../elsewhere", out_root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_options_of_other_sources_are_refused_before_any_work(tmp_path, capsys):
    folder = write_recbole_ml100k(tmp_path / "r")
    code, out, err = run(capsys, "prepare", "recbole", "--path", folder, "--category", "Video_Games",
                         "--out-root", tmp_path / "out")
    assert code == 2 and "--category applies to amazon2014, amazon2018, amazon2023, not to source 'recbole'" in err
    code, out, err = run(capsys, "prepare", "amazon2018", "--path", folder, "--dataset", "ml-100k",
                         "--out-root", tmp_path / "out")
    assert code == 2 and "--dataset applies to recbole, hm4sr-folder" in err
    assert not (tmp_path / "out").exists()


def test_prepare_help_explains_names_and_folder_forms(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # however argparse wrapped it
    for needle in ("--name NAME", "the output folder's name, nothing else", "--dataset STEM", "--category CAT",
                   "--overwrite", "reviews_<Cat>_5.json.gz + meta_<Cat>.json.gz",
                   "<Cat>_5.json.gz (or <Cat>.json.gz) + meta_<Cat>.json.gz", "<Cat>.jsonl(.gz) + meta_<Cat>.jsonl(.gz)",
                   "--path REVIEWS --meta META", "<Name>.inter, txt_emb.pt, img_emb.pt, cat.pt", "is reused"):
        assert needle in text, needle


def test_the_default_synthetic_world_spelled_out_is_the_same_inputs(tmp_path):
    """`hm4sr prepare synthetic` and `--users 300 --items 200` (the defaults) name one world:
    the second reuses the first; another size is refused."""
    root = tmp_path / "processed"
    first = prepare_dataset("synthetic", out_root=root)
    assert first.action == "written"
    again = prepare_dataset("synthetic", out_root=root, synthetic={"n_users": 300, "n_items": 200})
    assert again.action == "reused" and again.dataset.num_users == first.dataset.num_users
    with pytest.raises(DataError, match="n_users"):
        prepare_dataset("synthetic", out_root=root, synthetic={"n_users": 50})
