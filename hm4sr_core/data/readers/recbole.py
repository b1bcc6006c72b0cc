"""RecBole atomic files (``.inter``, ``.item``) and precomputed item-feature files.

RecBole (Zhao et al., 2021) stores a dataset as tab-separated "atomic files" whose
header types every column, ``name:type`` with type one of token, token_seq, float,
float_seq. HM4SR's released code (paper Sec. 5.1) is built on RecBole 1.2, so the
authors' processed folders (see :mod:`.hm4sr_folder`) reuse this module's parsing.

Rules this reader applies, beyond the format itself:

* The dataset stem (``<stem>.inter``) is the one ``.inter`` file of the folder, or
  the one ``dataset=`` names when there are several; it is RecBole's name, not the
  prepared dataset's, which defaults to "recbole-<stem>".
* ``.inter`` must have ``user_id``, ``item_id`` and ``timestamp``; other columns
  (rating, ...) are ignored. Timestamps may be written as floats; they must be
  finite and >= 0 and are floored to int64 seconds.
* RecBole's internal item ids number items by **first appearance in the .inter
  file** (RecBole 1.2 remaps with ``pd.factorize``); :func:`first_appearance_order`
  reproduces that order, which feature matrices with a padding row 0 follow.
* ``.item`` (optional): ``item_id`` plus any of a title (``title`` or
  ``movie_title``), categories (``categories``, ``class`` or ``genre``) and ``brand``.
  A category value containing a comma is split on commas (Amazon-style
  ``categories`` such as "Video Games, PC, Games" whose names contain spaces);
  otherwise it is split on whitespace, RecBole's token_seq separator. Item text is
  "title | categories | brand" from whichever parts exist, else the item token.
* The item table holds the items of the interactions (in first-appearance order);
  ``.item`` rows for items never interacted with are counted, not kept.

Feature files (``features={"text": path, ...}``), rows aligned to item tokens by,
in this order of precedence:

a. a sidecar token list ``<file>.items.txt`` or ``<stem>.items.txt`` (one token a line);
b. exactly (#rows of the .item file) rows: the .item file's order;
c. exactly (#distinct items in the .inter) + 1 rows: row 0 is padding, rows 1..N
   follow RecBole's internal order (first appearance in the .inter);

or, for ``.parquet`` / ``.csv``, an ``item_id`` column plus numeric columns (or one
column holding a vector per row). UniSRec/MISSRec-style raw float32 files
(``<name>.feat1CLS`` etc., no header) are read with their ``<name>.item2index``
(``token<TAB>index`` a line), which fixes the row count and so the dimension:
row r belongs to the item whose index is r. Those repositories write the index
itself as the item token of their ``.inter`` files, so row r is keyed by the
token "r" unless every interaction item is one of item2index's original tokens.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hm4sr_core.data.schema import DataError, RawDataset, RawModality

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
INTER_REQUIRED = ("user_id", "item_id", "timestamp")
TITLE_FIELDS = ("title", "movie_title")
CATEGORY_FIELDS = ("categories", "class", "genre")
BRAND_FIELDS = ("brand",)
MATRIX_SUFFIXES = (".npy", ".pt", ".pth")
TABLE_SUFFIXES = (".parquet", ".csv")
# Characters around comma-separated category names in exported lists: "['A', 'B']".
_CATEGORY_STRIP = " \t'\"[]"


# --------------------------------------------------------------------------- text and categories


def compose_item_text(title: str | None, categories: list[str], brand: str | None) -> str:
    """The paper's item sentence, "title | first category path | brand", from the parts present.

    Returns "" when every part is empty, so callers choose their own fallback (the token).
    """
    parts = [(title or "").strip(), ", ".join(c for c in categories if c), (brand or "").strip()]
    return " | ".join(p for p in parts if p)


def split_categories(value: str) -> list[str]:
    """Split one category cell: on commas when it has any, else on whitespace (token_seq)."""
    value = value.strip()
    if not value:
        return []
    if "," in value:
        names = [part.strip(_CATEGORY_STRIP) for part in value.split(",")]
    else:
        names = value.split()
    return [n for n in names if n]


def first_appearance_order(items: pd.Series | np.ndarray) -> np.ndarray:
    """Distinct tokens in order of first appearance: RecBole's internal item ids 1..N."""
    return np.asarray(pd.unique(np.asarray(items, dtype=object)), dtype=object)


# --------------------------------------------------------------------------- atomic files


def not_utf8(path: Path) -> DataError:
    """DataError naming the first line of ``path`` that is not UTF-8, the byte and its column.

    Found by decoding line by line: decoders that read ahead in blocks (Python's text
    files, pandas) report a position in their block, not a line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return DataError(f"{path}: line {number}, column {error.start + 1}: byte 0x{raw[error.start]:02x} is "
                                 f"not UTF-8; expected UTF-8 text (convert the file, e.g. iconv -f latin1 -t utf-8)")
    return DataError(f"{path}: not UTF-8 text; expected UTF-8")


def read_utf8(path: Path) -> str:
    """The text of ``path``; DataError naming the line when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def _read_atomic(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read one atomic file as strings.

    Returns (frame, types): frame columns are the header's field names (types
    stripped) plus ``line`` (1-based line number in the file); blank lines dropped.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as handle:  # bytes: a text reader decodes 8 KB ahead and would blame line 1
        first = handle.readline()
    try:
        header = first.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if not header.strip():
        raise DataError(f"{path}: line 1: expected a tab-separated header 'field:type ...', found an empty line")
    types: dict[str, str] = {}
    for column, entry in enumerate(header.split("\t"), start=1):
        field, sep, kind = entry.strip().partition(":")
        if not sep or not field or kind not in ATOMIC_TYPES:
            raise DataError(
                f"{path}: line 1, column {column}: header entry {entry!r} must be 'name:type' with type "
                f"one of {', '.join(ATOMIC_TYPES)} (RecBole atomic file, tab-separated)"
            )
        if field in types:
            raise DataError(f"{path}: line 1: field {field!r} appears twice in the header")
        types[field] = kind
    try:
        frame = pd.read_csv(
            path, sep="\t", header=None, skiprows=1, names=list(types), dtype=str,
            keep_default_na=False, na_filter=False, quoting=csv.QUOTE_NONE,
            skip_blank_lines=False, encoding="utf-8",
        )
    except pd.errors.ParserError as error:
        # pandas names the file line ("Expected 3 fields in line 7, saw 4").
        raise DataError(f"{path}: {error}; expected {len(types)} tab-separated fields per line") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    frame["line"] = np.arange(2, len(frame) + 2)
    blank = (frame[list(types)] == "").all(axis=1)
    return frame.loc[~blank].reset_index(drop=True), types


def _require_fields(path: Path, types: dict[str, str], required: tuple[str, ...]) -> None:
    missing = [f for f in required if f not in types]
    if missing:
        found = ", ".join(f"{k}:{v}" for k, v in types.items())
        raise DataError(f"{path}: missing column(s) {missing}; expected {list(required)}; found: {found}")


def _require_tokens(path: Path, frame: pd.DataFrame, field: str) -> None:
    empty = (frame[field].str.strip() == "").to_numpy()
    if empty.any():
        line = int(frame["line"].iloc[int(np.flatnonzero(empty)[0])])
        raise DataError(f"{path}: line {line}, column {field!r}: expected a token, found an empty value")


def parse_timestamps(values: pd.Series, lines: pd.Series, path: Path | str, column: str = "timestamp") -> np.ndarray:
    """Strings -> int64 seconds (floored); each must be a finite number >= 0.

    ``lines`` holds each value's 1-based line number, reported on the first bad value.
    """
    numbers = pd.to_numeric(values.str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numbers)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: line {int(lines.iloc[row])}, column {column!r}: expected a finite number of "
                        f"seconds, found {values.iloc[row]!r}")
    negative = numbers < 0
    if negative.any():
        row = int(np.flatnonzero(negative)[0])
        raise DataError(f"{path}: line {int(lines.iloc[row])}, column {column!r}: expected seconds >= 0, "
                        f"found {values.iloc[row]!r}")
    return np.floor(numbers).astype(np.int64)


def read_inter(path: str | Path) -> pd.DataFrame:
    """Read a RecBole ``.inter`` file -> DataFrame user (str), item (str), timestamp (int64 s).

    Rows keep the file's order (first appearance fixes RecBole's item ids).
    """
    path = Path(path)
    frame, types = _read_atomic(path)
    _require_fields(path, types, INTER_REQUIRED)
    if frame.empty:
        raise DataError(f"{path}: no interactions below the header")
    for field in ("user_id", "item_id"):
        _require_tokens(path, frame, field)
    return pd.DataFrame({
        "user": frame["user_id"].str.strip().to_numpy(dtype=object),
        "item": frame["item_id"].str.strip().to_numpy(dtype=object),
        "timestamp": parse_timestamps(frame["timestamp"], frame["line"], path),
    })


def read_item_file(path: str | Path) -> pd.DataFrame:
    """Read a RecBole ``.item`` file -> item, text, categories (list[str]) [, title, brand].

    Raises DataError on a duplicate item id (naming both lines). Rows keep the file's order.
    """
    path = Path(path)
    frame, types = _read_atomic(path)
    _require_fields(path, types, ("item_id",))
    _require_tokens(path, frame, "item_id")
    tokens = frame["item_id"].str.strip()
    duplicated = tokens.duplicated().to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        first = int(frame["line"].iloc[int(np.flatnonzero((tokens == tokens.iloc[row]).to_numpy())[0])])
        raise DataError(f"{path}: line {int(frame['line'].iloc[row])}: duplicate item_id {tokens.iloc[row]!r} "
                        f"(first at line {first}); expected each item once")
    title_field = next((f for f in TITLE_FIELDS if f in types), None)
    category_field = next((f for f in CATEGORY_FIELDS if f in types), None)
    brand_field = next((f for f in BRAND_FIELDS if f in types), None)
    n = len(frame)
    titles = frame[title_field].str.strip().tolist() if title_field else [""] * n
    brands = frame[brand_field].str.strip().tolist() if brand_field else [""] * n
    categories = [split_categories(v) for v in frame[category_field]] if category_field else [[] for _ in range(n)]
    items = pd.DataFrame({
        "item": tokens.to_numpy(dtype=object),
        "text": [compose_item_text(t, c, b) or tok for t, c, b, tok in zip(titles, categories, brands, tokens)],
        "categories": categories,
    })
    if title_field:
        items["title"] = titles
    if brand_field:
        items["brand"] = brands
    return items


# --------------------------------------------------------------------------- feature files


def _to_float_matrix(values, path: Path) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2:
        raise DataError(f"{path}: expected a 2-D (items x dim) matrix, found shape {tuple(array.shape)}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DataError(f"{path}: expected numeric values, found dtype {array.dtype}")
    return array.astype(np.float32)


def load_matrix(path: str | Path) -> np.ndarray:
    """Load a ``.npy`` or ``.pt``/``.pth`` (torch tensor, ``weights_only=True``) -> (rows, D) float32."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise DataError(f"{path}: not a readable numeric .npy array ({error})") from None
        return _to_float_matrix(values, path)
    if suffix in (".pt", ".pth"):
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
            raise DataError(f"{path}: not a readable torch file of tensors ({error})") from None
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{path}: expected one 2-D tensor, found {type(value).__name__}")
        # float() first: bfloat16 has no numpy dtype.
        return _to_float_matrix(value.detach().float().numpy(), path)
    raise DataError(f"{path}: unsupported matrix suffix {suffix!r}; expected one of {MATRIX_SUFFIXES}")


def check_finite(features: np.ndarray, path: Path | str, row_label, columns: list[str] | None = None) -> None:
    """DataError naming the first row with a NaN or infinite value.

    ``row_label(i)`` describes row i; ``columns`` names the columns (default: their index).
    """
    bad = ~np.isfinite(features)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        column = repr(columns[col]) if columns is not None else str(col)
        raise DataError(f"{path}: {row_label(row)}, column {column}: found {float(features[row, col])}; "
                        f"expected finite numbers ({int(bad.any(axis=1).sum())} such rows)")


def _read_token_list(path: Path) -> np.ndarray:
    tokens = [t.strip() for t in read_utf8(path).splitlines()]
    while tokens and not tokens[-1]:
        tokens.pop()
    empty = [i for i, t in enumerate(tokens) if not t]
    if empty:
        raise DataError(f"{path}: line {empty[0] + 1}: expected an item token, found an empty line")
    return np.asarray(tokens, dtype=object)


def _sidecar(path: Path) -> Path | None:
    for candidate in (path.with_name(path.name + ".items.txt"), path.with_name(path.stem + ".items.txt")):
        if candidate.is_file():
            return candidate
    return None


def _read_feature_table(path: Path) -> tuple[np.ndarray, np.ndarray, str, list[str] | None]:
    """``item_id`` + numeric columns (or one vector column) -> (features, tokens, "line"/"row", column names)."""
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype={"item_id": str}, keep_default_na=False, na_values=[""])
            first_row, unit = 2, "line"
        else:
            frame = pd.read_parquet(path)
            first_row, unit = 1, "row"
    except (ValueError, OSError, pd.errors.ParserError) as error:
        raise DataError(f"{path}: not a readable {path.suffix} table ({error})") from None
    if "item_id" not in frame.columns:
        raise DataError(f"{path}: missing column 'item_id'; found {list(frame.columns)}")
    if frame.empty:
        raise DataError(f"{path}: no rows")
    tokens = frame["item_id"].astype(str).str.strip().to_numpy(dtype=object)
    value_columns = [c for c in frame.columns if c != "item_id"]
    if not value_columns:
        raise DataError(f"{path}: no feature columns besides 'item_id'")
    if len(value_columns) == 1 and isinstance(frame[value_columns[0]].iloc[0], (list, tuple, np.ndarray)):
        column = value_columns[0]
        lengths = frame[column].map(len).to_numpy()
        if (lengths != lengths[0]).any():
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise DataError(f"{path}: {unit} {row + first_row}, column {column!r}: vector of length "
                            f"{lengths[row]}, expected {lengths[0]} like the first row")
        return _to_float_matrix(np.stack(frame[column].to_numpy()), path), tokens, unit, None
    for column in value_columns:
        numbers = pd.to_numeric(frame[column], errors="coerce")
        # "nan" parses to NaN: let the finiteness check report it as such, not as text.
        spelled_nan = frame[column].astype(str).str.strip().str.lower().isin(["nan", "+nan", "-nan"])
        bad = (numbers.isna() & frame[column].notna() & ~spelled_nan).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: {unit} {row + first_row}, column {column!r}: expected a number, "
                            f"found {frame[column].iloc[row]!r}")
    matrix = frame[value_columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    return matrix.astype(np.float32), tokens, unit, [str(c) for c in value_columns]


def _read_unisrec(path: Path, inter_items: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Raw float32 ``<name>.featXXX`` + ``<name>.item2index`` -> (features, tokens, alignment)."""
    index_path = path.with_name(path.name.rsplit(".", 1)[0] + ".item2index")
    if not index_path.is_file():
        raise DataError(f"{path}: UniSRec-style raw float32 features need {index_path.name} beside them "
                        f"(token<TAB>index a line) to know the row count; not found")
    originals, indices = [], []
    for number, line in enumerate(read_utf8(index_path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].strip().isdigit():
            raise DataError(f"{index_path}: line {number}: expected 'token<TAB>index', found {line!r}")
        originals.append(fields[0].strip())
        indices.append(int(fields[1]))
    n = len(indices)
    if sorted(indices) != list(range(n)):
        raise DataError(f"{index_path}: indices must be 0..{n - 1}, each once")
    raw = np.fromfile(path, dtype=np.float32)
    if n == 0 or raw.size % n:
        raise DataError(f"{path}: {raw.size} float32 values do not split into {n} rows "
                        f"(one per line of {index_path.name})")
    features = raw.reshape(n, raw.size // n)
    by_index = np.empty(n, dtype=object)
    by_index[np.asarray(indices)] = originals
    if set(inter_items) <= set(originals):
        return features, by_index, f"UniSRec rows by {index_path.name} (original tokens)"
    return features, np.asarray([str(r) for r in range(n)], dtype=object), f"UniSRec rows by index ({index_path.name})"


def read_feature_file(
    path: str | Path,
    modality: str,
    inter_items: np.ndarray,
    item_file_tokens: np.ndarray | None = None,
    optional: bool = False,
) -> RawModality:
    """Read one precomputed feature file into a :class:`RawModality` (rows keyed by item token).

    ``inter_items``: distinct interaction items in first-appearance order (N,);
    ``item_file_tokens``: the .item file's tokens in file order, if there is one.
    Interaction items without a feature row raise DataError unless ``optional``,
    in which case they get a zero row marked unavailable.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file for modality {modality!r} not found")
    suffix = path.suffix.lower()
    n_inter = len(inter_items)
    if suffix in TABLE_SUFFIXES:
        features, tokens, unit, columns = _read_feature_table(path)
        offset = 2 if unit == "line" else 1
        check_finite(features, path, lambda r: f"{unit} {r + offset} (item {tokens[r]!r})", columns)
        alignment = "item_id column"
    elif suffix.startswith(".feat"):
        features, tokens, alignment = _read_unisrec(path, inter_items)
        check_finite(features, path, lambda r: f"row {r} (0-based, item {tokens[r]!r})")
    elif suffix in MATRIX_SUFFIXES:
        matrix = load_matrix(path)
        rows = len(matrix)
        sidecar = _sidecar(path)
        if sidecar is not None:
            tokens, alignment = _read_token_list(sidecar), f"sidecar {sidecar.name}"
            if len(tokens) != rows:
                raise DataError(f"{path}: {rows} rows but {sidecar} lists {len(tokens)} tokens; "
                                f"expected one row per token")
            features = matrix
            check_finite(features, path, lambda r: f"row {r} (0-based, item {tokens[r]!r})")
        elif item_file_tokens is not None and rows == len(item_file_tokens):
            tokens, features, alignment = item_file_tokens, matrix, ".item file order"
            check_finite(features, path, lambda r: f"row {r} (0-based, item {tokens[r]!r})")
        elif rows == n_inter + 1:
            check_finite(matrix, path, lambda r: f"row {r} (0-based; row 0 is padding)" if r == 0
                         else f"row {r} (0-based, item {inter_items[r - 1]!r})")
            tokens, features = inter_items, matrix[1:]
            alignment = "RecBole internal order (row 0 padding, then first appearance in .inter)"
        else:
            options = [f"{n_inter + 1} (distinct .inter items + padding row 0)"]
            if item_file_tokens is not None:
                options.insert(0, f"{len(item_file_tokens)} (rows of the .item file)")
            raise DataError(f"{path}: found {rows} rows; expected {' or '.join(options)}, or a sidecar "
                            f"{path.name}.items.txt listing one item token per row")
    else:
        raise DataError(f"{path}: unsupported feature file suffix {suffix!r}; expected "
                        f"{MATRIX_SUFFIXES + TABLE_SUFFIXES} or a UniSRec '.feat*' file")

    tokens = np.asarray(tokens, dtype=object)
    duplicated = pd.Index(tokens).duplicated()
    if duplicated.any():
        raise DataError(f"{path}: item {tokens[duplicated][0]!r} has more than one feature row")
    available = np.ones(len(tokens), dtype=bool)
    known = set(tokens)
    missing = np.asarray([t for t in inter_items if t not in known], dtype=object)
    if len(missing):
        if not optional:
            raise DataError(f"{path}: item {missing[0]!r} appears in the interactions but has no {modality} "
                            f"feature row ({len(missing)} of {n_inter} items lack one); expected every "
                            f"interacted item, or declare {modality!r} optional to mask them")
        features = np.vstack([features, np.zeros((len(missing), features.shape[1]), np.float32)])
        tokens = np.concatenate([tokens, missing])
        available = np.concatenate([available, np.zeros(len(missing), dtype=bool)])
    provenance = {
        "encoder": "unknown: precomputed file supplied by the user",
        "dim": int(features.shape[1]),
        "file": str(path),
        "row_alignment": alignment,
        "missing_items": int(len(missing)),
        "synthetic": False,
    }
    return RawModality(name=modality, provenance=provenance, features=features.astype(np.float32),
                       feature_items=tokens, available=None if available.all() else available,
                       optional=optional, source=str(path))


# --------------------------------------------------------------------------- reader


def locate_inter(path: str | Path, dataset: str | None = None) -> tuple[Path, str]:
    """(the .inter file, its stem) from a folder or a .inter path.

    ``dataset`` is RecBole's dataset stem: a folder must then hold ``<dataset>.inter``.
    Without it a folder must hold exactly one ``.inter`` file; several are an error
    listing them. The stem never depends on the output name of the prepared dataset.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".inter":
            raise DataError(f"{path}: expected a RecBole '.inter' file or a folder holding one")
        if dataset is not None and dataset != path.stem:
            raise DataError(f"{path}: the dataset stem {dataset!r} (--dataset) differs from the file's "
                            f"{path.stem!r}; give the folder, or drop --dataset")
        return path, path.stem
    if not path.is_dir():
        raise DataError(f"{path}: not found; expected a folder holding <stem>.inter, or the .inter file")
    found = sorted(p.name for p in path.glob("*.inter") if p.is_file())
    if dataset is not None:
        candidate = path / f"{dataset}.inter"
        if not candidate.is_file():
            raise DataError(f"{candidate}: file not found (--dataset {dataset}); .inter files in {path}: "
                            f"{found or 'none'}")
        return candidate, dataset
    if not found:
        raise DataError(f"{path}: no .inter file; expected RecBole atomic files <stem>.inter [+ <stem>.item]")
    if len(found) > 1:
        stems = [f.removesuffix(".inter") for f in found]
        raise DataError(f"{path}: {len(found)} .inter files {found}; pick one with --dataset STEM "
                        f"(one of {', '.join(stems)})")
    return path / found[0], found[0].removesuffix(".inter")


def default_name(stem: str) -> str:
    """The prepared dataset's default name, "recbole-<stem>": never the name another reader
    gives the same data (the MovieLens reader's "ml-100k", for instance)."""
    return f"recbole-{stem}"


def _feature_path(file: str | Path, folder: Path) -> Path:
    """A feature file as given, else relative to the dataset folder."""
    file = Path(file)
    if not file.exists() and not file.is_absolute() and (folder / file).exists():
        return folder / file
    return file


def input_files(inter_path: Path, features: dict[str, str | Path] | None = None) -> dict[str, Path]:
    """Every file :func:`read_recbole` reads for ``inter_path`` and ``features``, by role:
    ``inter``, ``item`` (when present), ``feature:<modality>`` and the row lists those
    files come with (sidecar ``.items.txt`` or UniSRec ``.item2index``).

    Raises DataError naming a feature file that does not exist.
    """
    files = {"inter": inter_path}
    item_path = inter_path.with_suffix(".item")
    if item_path.is_file():
        files["item"] = item_path
    for modality, given in (features or {}).items():
        file = _feature_path(given, inter_path.parent)
        if not file.is_file():
            raise DataError(f"{file}: feature file for modality {modality!r} not found")
        files[f"feature:{modality}"] = file
        if file.suffix.lower().startswith(".feat"):
            rows = file.with_name(file.name.rsplit(".", 1)[0] + ".item2index")
        else:
            rows = _sidecar(file)
        if rows is not None and rows.is_file():
            files[f"feature:{modality}:rows"] = rows
    return files


def read_recbole(
    path: str | Path,
    dataset: str | None = None,
    *,
    name: str | None = None,
    features: dict[str, str | Path] | None = None,
    optional_modalities: tuple[str, ...] = (),
) -> RawDataset:
    """Read RecBole atomic files (and optional feature files) into a :class:`RawDataset`.

    ``path``: a folder holding ``<stem>.inter`` (and optionally ``<stem>.item``) or
    the ``.inter`` file itself; ``dataset`` picks the stem in a folder holding several
    (see :func:`locate_inter`). ``name``: the dataset's name, default
    :func:`default_name` of the stem. ``features``: modality name -> file (relative
    paths are tried against the dataset folder too); see the module docstring for how
    rows are matched to items. Modalities named in ``optional_modalities`` mask
    items without a feature row instead of raising.
    """
    inter_path, stem = locate_inter(path, dataset)
    folder = inter_path.parent
    features = dict(features or {})
    unknown = sorted(set(optional_modalities) - set(features))
    if unknown:
        raise DataError(f"optional_modalities {unknown} name no feature file; features given: {sorted(features)}")

    interactions = read_inter(inter_path)
    inter_items = first_appearance_order(interactions["item"])

    item_path = inter_path.with_suffix(".item")
    item_table = read_item_file(item_path) if item_path.is_file() else None
    items = pd.DataFrame({"item": inter_items})
    if item_table is not None:
        items = items.merge(item_table, on="item", how="left")
        without_meta = items["text"].isna().to_numpy()
        items.loc[without_meta, "text"] = items.loc[without_meta, "item"]
        items["categories"] = [c if isinstance(c, list) else [] for c in items["categories"]]
        for extra in ("title", "brand"):
            if extra in items.columns:
                items[extra] = items[extra].fillna("")
        unused_item_rows = int((~item_table["item"].isin(set(inter_items))).sum())
    else:
        without_meta = np.ones(len(items), dtype=bool)
        items["text"] = items["item"]
        items["categories"] = [[] for _ in range(len(items))]
        unused_item_rows = 0

    modalities = []
    for modality, file in features.items():
        modalities.append(read_feature_file(
            _feature_path(file, folder), modality, inter_items,
            item_table["item"].to_numpy(dtype=object) if item_table is not None else None,
            optional=modality in optional_modalities,
        ))

    source = {
        "reader": "hm4sr_core.data.readers.recbole.read_recbole",
        "format": "RecBole atomic files",
        "dataset": stem,
        "inter_file": str(inter_path),
        "item_file": str(item_path) if item_table is not None else None,
        "feature_files": {m.name: m.source for m in modalities},
        "items_without_metadata": int(without_meta.sum()),
        "item_file_rows_without_interactions": unused_item_rows,
        "licence": "as supplied by the user",
    }
    return RawDataset(name=name or default_name(stem), source=source, interactions=interactions, items=items,
                      modalities=modalities, interactions_file=str(inter_path))
