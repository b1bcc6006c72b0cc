"""Amazon review data (McAuley lab) 2014, 2018 and 2023, plus a local image folder.

HM4SR evaluates on Amazon categories (paper Sec. 5.1). No Amazon data ships in any
package, so users bring the files as downloaded (docs/guide.md, "Data sources and licences"):

=======  ===========================================  ===================================
version  reviews (one record a line, plain or .gz)    metadata (one record a line)
=======  ===========================================  ===================================
2014     ``reviews_<Cat>_5.json.gz``: reviewerID,      ``meta_<Cat>.json.gz``: asin, title,
         asin, overall, unixReviewTime (s)             brand, categories [[path], ...], imUrl
2018     ``<Cat>_5.json.gz``: same fields as 2014      ``meta_<Cat>.json.gz``: asin, title,
                                                       brand, category [path], imageURL[HighRes]
2023     ``<Cat>.jsonl(.gz)``: user_id, parent_asin,   ``meta_<Cat>.jsonl(.gz)``: parent_asin,
         rating, timestamp (ms)                        title, store, categories [path], images
=======  ===========================================  ===================================

2014 lines are Python literals (``ast.literal_eval``; strict JSON is accepted too);
2018 and 2023 lines must be strict JSON. Gzip is detected from the file's magic bytes.

Reviews files run to tens of millions of lines (issue 13): :func:`read_reviews` streams
them in chunks of decompressed bytes, pyarrow parses only the user, item and time fields,
and ids become integer codes chunk by chunk. Any chunk pyarrow might read differently
from the line parser (:func:`_parse_line`, the reference) is read by the line parser,
so both accept the same files and bad input is reported at its exact line.

Give the two files, or the folder they were downloaded to: :func:`locate_amazon`
finds the pair by the release's official names, and asks for ``category`` when the
folder holds several categories.

Rules (the paper's recipe where it has one):

* Item text = "title | first category path | brand" (the full path, root included,
  since it reads naturally); an item without metadata keeps its interactions and
  its text is its asin (counted in ``source["missing_meta"]``).
* Item categories (the category loss's multi-hot) = the first category path: 2014
  ``categories[0]``, 2018 ``category``, 2023 ``categories``. The top-level root is
  dropped when every item with a non-empty path starts with the same one (e.g.
  "Video Games" in the Games file), because a column shared by all items says nothing.
* Metadata records repeating an asin (the 2018 dumps have some) keep the first and
  are counted in ``source["duplicate_meta"]``; lines for items never reviewed are
  skipped without being parsed (full dumps list millions of items).
* Images: optional. From ``image_dir`` holding ``<asin>.jpg|.jpeg|.png|.webp``
  (parent_asin for 2023); items without a file are marked unavailable. Without
  ``image_dir`` there is no image modality. Image URLs are kept as ``image_url``
  but never fetched (machines here have no internet).

Features are computed after filtering (RawModality encoders) and cached on disk in
resumable shards (:func:`hm4sr_core.data.features.encode_sharded`).
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pa_json
from PIL import Image, UnidentifiedImageError

from hm4sr_core.data.features import (
    TEXT_DIM,
    encode_texts_cached,
    load_image_encoder,
    text_encoder_name,
)
from hm4sr_core.data.readers.recbole import compose_item_text
from hm4sr_core.data.store import cached_file_sha256
from hm4sr_core.data.schema import DataError, RawDataset, RawModality
from hm4sr_core.data.timeunits import detect_unit, to_seconds

VERSIONS = ("2014", "2018", "2023")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # preference order when an asin has several
CHUNK_BYTES = 8 * 2**20  # decompressed review bytes parsed at once: bounds memory; larger was no faster
CITATIONS = {
    "2014": "McAuley et al., SIGIR 2015; He & McAuley, WWW 2016",
    "2018": "Ni, Li & McAuley, EMNLP 2019",
    "2023": "Hou et al., arXiv 2403.03952 (2024)",
}


@dataclass(frozen=True)
class _Schema:
    """Field names of one release."""

    user: str
    item: str
    time: str
    time_per_second: int  # 1000 when timestamps are milliseconds
    meta_item: str
    categories: str
    brand: str
    python_literals: bool  # 2014 lines may be Python dict literals


SCHEMAS = {
    "2014": _Schema("reviewerID", "asin", "unixReviewTime", 1, "asin", "categories", "brand", True),
    "2018": _Schema("reviewerID", "asin", "unixReviewTime", 1, "asin", "category", "brand", False),
    "2023": _Schema("user_id", "parent_asin", "timestamp", 1000, "parent_asin", "categories", "store", False),
}


# --------------------------------------------------------------------------- line records


def _parse_line(line: str, number: int, path: Path, python_literals: bool) -> dict | None:
    """One line -> its record dict; None for a blank line; DataError naming the line otherwise.

    The reference parser: the chunked reviews reader hands it every chunk pyarrow's
    reading might get wrong, so both paths accept and reject the same lines.
    """
    if not line.strip():
        return None
    expected = "one JSON object or Python dict literal" if python_literals else "one JSON object"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        if not python_literals:
            raise DataError(f"{path}: line {number}: expected {expected} per line ({error})") from None
        try:
            record = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as literal_error:
            raise DataError(f"{path}: line {number}: expected {expected} per line "
                            f"({type(literal_error).__name__}: {literal_error})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: line {number}: expected {expected}, found {type(record).__name__}")
    return record


def _is_gzip(path: Path) -> bool:
    """True when the file starts with gzip's magic bytes; DataError when there is no file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as probe:
        return probe.read(2) == b"\x1f\x8b"


def iter_records(
    path: Path, python_literals: bool, keep: Callable[[str], bool] | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, record dict) for each non-blank line of a plain or gzip file.

    ``keep(line)`` False skips a line unparsed (parsing dominates the run time).
    """
    gzipped = _is_gzip(path)
    number = 0
    try:
        # Bytes, decoded a line at a time: a text reader decodes ahead and names the wrong line.
        handle = gzip.open(path, "rb") if gzipped else open(path, "rb")
        with handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{path}: line {number}: not UTF-8 text ({error})") from None
                if not line.strip() or (keep is not None and not keep(line)):
                    continue
                record = _parse_line(line, number, path, python_literals)
                if record is not None:
                    yield number, record
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{path}: line {number + 1}: truncated or corrupt gzip data ({error})") from None


def _token(record: dict, field: str, path: Path, line: int) -> str:
    value = record.get(field)
    if value is None:
        raise DataError(f"{path}: line {line}: missing field {field!r}; found fields {sorted(record)}")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DataError(f"{path}: line {line}, field {field!r}: expected a non-empty id string, found {value!r}")
    return str(value).strip()


def _time_value(record: dict, field: str, per_second: int, path: Path, line: int) -> int | float:
    """The record's timestamp as written (a number >= 0; int when it is one). The unit
    is decided for the whole file later (:func:`hm4sr_core.data.timeunits.detect_unit`)."""
    value = record.get(field)
    if value is None:
        raise DataError(f"{path}: line {line}: missing field {field!r}; found fields {sorted(record)}")
    unit = "milliseconds" if per_second == 1000 else "seconds"
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise DataError(f"{path}: line {line}, field {field!r}: expected a finite number of {unit}, found {value!r}")
    if number < 0:
        raise DataError(f"{path}: line {line}, field {field!r}: expected {unit} >= 0, found {value!r}")
    return number if isinstance(number, int) and number < 2**62 else float(number)


def _seconds(record: dict, field: str, per_second: int, path: Path, line: int) -> int:
    """One record's timestamp in seconds, read in the format's own unit (the reference
    for a file whose unit is the format's)."""
    number = _time_value(record, field, per_second, path, line)
    return number // per_second if isinstance(number, int) else math.floor(number / per_second)


def _clean(value) -> str:
    """Metadata string: HTML entities decoded, whitespace collapsed; non-strings give ""."""
    if not isinstance(value, str):
        return ""
    return re.sub(r"\s+", " ", html.unescape(value)).strip()


def _category_path(record: dict, version: str, field: str, path: Path, line: int) -> list[str]:
    value = record.get(field)
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise DataError(f"{path}: line {line}, field {field!r}: expected a list, found {type(value).__name__}")
    if version == "2014" and isinstance(value[0], list):
        value = value[0]  # [[first path], [second path], ...]
    names = [_clean(v) for v in value]
    return [n for n in names if n]


def _image_url(record: dict, version: str) -> str:
    if version == "2014":
        return _clean(record.get("imUrl"))
    if version == "2018":
        for field in ("imageURLHighRes", "imageURL"):
            urls = record.get(field)
            if isinstance(urls, list) and urls:
                return _clean(urls[0])
        return ""
    images = [im for im in record.get("images") or [] if isinstance(im, dict)]
    images.sort(key=lambda im: im.get("variant") != "MAIN")  # the main photo first, stable otherwise
    for image in images:
        for field in ("hi_res", "large", "thumb"):
            if isinstance(image.get(field), str) and image[field]:
                return image[field]
    return ""


# --------------------------------------------------------------------------- files


def _line_chunks(path: Path, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based number of its first line, bytes) for runs of whole lines of a plain
    or gzip file, about ``chunk_bytes`` decompressed bytes each (more when one line is longer).

    Decompresses as it goes. When the gzip data ends early or is corrupt, the whole lines
    before the damage are yielded first, then DataError names the first line not read.
    """
    gzipped = _is_gzip(path)
    step = min(chunk_bytes, 2**20)  # read granularity: what a damaged gzip stream can lose
    line, pending = 1, b""
    with gzip.open(path, "rb") if gzipped else open(path, "rb") as handle:
        while True:
            parts, size, error, eof = [pending], len(pending), None, False
            try:
                while True:
                    part = handle.read1(step)
                    if not part:
                        eof = True
                        break
                    parts.append(part)
                    size += len(part)
                    if size >= chunk_bytes:
                        break
            except (EOFError, gzip.BadGzipFile, zlib.error) as damage:
                error = damage
            data = b"".join(parts)
            cut = len(data) if eof else data.rfind(b"\n") + 1
            if cut:
                yield line, data[:cut]
                line += data.count(b"\n", 0, cut)
            if error is not None:
                raise DataError(f"{path}: line {line}: truncated or corrupt gzip data ({error})") from None
            if eof:
                return
            pending = data[cut:]


def _object_lines(chunk: bytes) -> int | None:
    """The number of lines when every line of ``chunk`` starts with "{" and ends with "}"
    (before an optional "\\r"), else None. Such lines are not blank, so when pyarrow reads
    as many rows as there are lines, row k is line k: no line held two objects."""
    data = np.frombuffer(chunk, dtype=np.uint8)
    if len(data) == 0:
        return 0
    ends = np.flatnonzero(data == 10)
    if len(ends) == 0 or ends[-1] != len(data) - 1:
        ends = np.append(ends, len(data))  # the file's last line may have no newline
    starts = np.concatenate([[0], ends[:-1] + 1])
    last = ends - 1
    last[(last > starts) & (data[np.maximum(last, 0)] == 13)] -= 1  # "\r\n" line ends
    ok = (ends > starts) & (data[np.minimum(starts, len(data) - 1)] == ord("{")) & (last > starts)
    ok &= data[np.maximum(last, 0)] == ord("}")
    return len(ends) if ok.all() else None


class _TokenCodes:
    """Id strings -> dense int codes in order of first appearance, grown chunk by chunk.

    Holds each distinct id once; rows only ever hold codes.
    """

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}

    def encode(self, tokens: list[str]) -> np.ndarray:
        codes = self.codes
        return np.fromiter((codes.setdefault(t, len(codes)) for t in tokens), dtype=np.int32, count=len(tokens))

    def categorical(self, codes: list[np.ndarray]) -> pd.Categorical:
        tokens = np.fromiter(self.codes, dtype=object, count=len(self.codes))
        return pd.Categorical.from_codes(np.concatenate(codes), categories=pd.Index(tokens, dtype=object))


def _arrow_chunk(chunk: bytes, schema: _Schema, users: _TokenCodes, items: _TokenCodes
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(user codes, item codes, timestamps as written) of a chunk read by pyarrow; None when the chunk holds
    anything pyarrow might read otherwise than :func:`_parse_line` (a bad or blank line, a
    line not shaped "{...}", two objects on a line, a number as id, a float or string
    timestamp, a null, an empty id, a negative time, non-UTF-8 bytes): that chunk then goes
    to the line parser. Ids are stripped of surrounding whitespace as the line parser does."""
    lines = _object_lines(chunk)
    if lines is None:
        return None
    try:
        if not chunk.isascii():
            chunk.decode("utf-8")  # the line reader reads text: the same bytes must be valid here
        table = pa_json.read_json(pa.BufferReader(chunk), read_options=pa_json.ReadOptions(block_size=_ARROW_BLOCK),
                                  parse_options=_arrow_options(schema))
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    if table.num_rows != lines or any(column.null_count for column in table.columns):
        return None
    times = table.column(schema.time).to_numpy()
    if (times < 0).any():
        return None
    encoded = [table.column(field).combine_chunks().dictionary_encode() for field in (schema.user, schema.item)]
    distinct = [[t.strip() for t in e.dictionary.to_pylist()] for e in encoded]  # _token strips: so does this
    if not all(all(tokens) for tokens in distinct):
        return None  # an empty id: the line parser names its line
    return (users.encode(distinct[0])[encoded[0].indices.to_numpy()],
            items.encode(distinct[1])[encoded[1].indices.to_numpy()], times)


_ARROW_BLOCK = 4 * 2**20  # pyarrow's parse block: a longer line sends its chunk to the line parser


def _arrow_options(schema: _Schema) -> pa_json.ParseOptions:
    fields = [(schema.user, pa.string()), (schema.item, pa.string()), (schema.time, pa.int64())]
    return pa_json.ParseOptions(explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore")


def read_reviews(path: str | Path, version: str, *, chunk_bytes: int = CHUNK_BYTES) -> pd.DataFrame:
    """Reviews file -> DataFrame user, item (categorical: codes into the id strings, which
    are in order of first appearance, all used), timestamp (int64 s); rows in file order.
    The file's time unit is decided from its values (:mod:`hm4sr_core.data.timeunits`; row
    numbers in its messages count reviews) and said in ``frame.attrs["timestamp_unit"]``.

    Streams the file ``chunk_bytes`` decompressed bytes at a time: pyarrow parses only the
    three fields, and ids are coded to integers chunk by chunk, so memory grows with the
    number of distinct users and items, not with the file. A chunk pyarrow cannot read
    exactly as the line parser would is re-read line by line: the same records are
    accepted, and bad input raises DataError naming the line, the field and what was expected.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    path, schema = Path(path), SCHEMAS[version]
    users, items = _TokenCodes(), _TokenCodes()
    user_codes, item_codes, times = [], [], []
    for first, chunk in _line_chunks(path, chunk_bytes):
        coded = _arrow_chunk(chunk, schema, users, items)
        if coded is None:
            coded = _line_chunk(path, chunk, first, schema, users, items)
        user_codes.append(coded[0])
        item_codes.append(coded[1])
        times.append(coded[2])
    if not users.codes:
        raise DataError(f"{path}: no reviews")
    values = np.concatenate(times)
    unit = detect_unit(values, "milliseconds" if schema.time_per_second == 1000 else "seconds", str(path))
    frame = pd.DataFrame({"user": users.categorical(user_codes), "item": items.categorical(item_codes),
                          "timestamp": to_seconds(values, unit.unit)})
    frame.attrs["timestamp_unit"] = unit.note()
    return frame


def _line_chunk(path: Path, chunk: bytes, first: int, schema: _Schema, users: _TokenCodes, items: _TokenCodes
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_arrow_chunk`'s result, line by line with the reference parser."""
    user, item, times = [], [], []
    for number, raw in enumerate(chunk.split(b"\n"), start=first):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: line {number}: not UTF-8 text ({error})") from None
        record = _parse_line(text, number, path, schema.python_literals)
        if record is None:
            continue
        user.append(_token(record, schema.user, path, number))
        item.append(_token(record, schema.item, path, number))
        times.append(_time_value(record, schema.time, schema.time_per_second, path, number))
    values = np.asarray(times, dtype=np.int64 if all(isinstance(t, int) for t in times) else np.float64)
    return users.encode(user), items.encode(item), values


def read_meta(path: str | Path, version: str, wanted: set[str]) -> tuple[dict[str, dict], int]:
    """Metadata file -> ({asin: title, categories, brand, image_url} for asins in ``wanted``,
    number of repeated records of wanted asins skipped).

    Lines whose id visibly belongs to an unwanted item are skipped unparsed: full
    metadata dumps list millions of items, and ``ast.literal_eval`` costs ~0.3 ms a line.
    A line whose id the quick pattern cannot find is parsed and checked in full.
    """
    path, schema = Path(path), SCHEMAS[version]
    pattern = re.compile(r"""["']%s["']\s*:\s*["']([^"']+)["']""" % schema.meta_item)

    def keep(line: str) -> bool:
        match = pattern.search(line)
        return match is None or match.group(1).strip() in wanted

    meta: dict[str, dict] = {}
    duplicates = 0
    for line, record in iter_records(path, schema.python_literals, keep):
        asin = _token(record, schema.meta_item, path, line)
        if asin not in wanted:
            continue
        if asin in meta:
            duplicates += 1
            continue
        meta[asin] = {
            "title": _clean(record.get("title")),
            "path": _category_path(record, version, schema.categories, path, line),
            "brand": _clean(record.get(schema.brand)),
            "image_url": _image_url(record, version),
        }
    return meta, duplicates


def _shared_root(paths: list[list[str]]) -> str | None:
    """The first category if every non-empty path starts with it, else None."""
    roots = {p[0] for p in paths if p}
    return roots.pop() if len(roots) == 1 else None


def find_images(image_dir: str | Path) -> dict[str, Path]:
    """{asin: image file} for ``<asin>.<jpg|jpeg|png|webp>`` directly inside ``image_dir``."""
    directory = Path(image_dir)
    if not directory.is_dir():
        raise DataError(f"{directory}: image folder not found; expected files named <asin>.jpg|.jpeg|.png|.webp")
    rank = {s: i for i, s in enumerate(IMAGE_SUFFIXES)}
    found: dict[str, Path] = {}
    for file in sorted(directory.iterdir()):
        suffix = file.suffix.lower()
        if suffix not in rank or not file.is_file():
            continue
        best = found.get(file.stem)
        if best is None or rank[suffix] < rank[best.suffix.lower()]:
            found[file.stem] = file
    return found


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path}: not a readable image ({error}); fix or delete the file") from None


# --------------------------------------------------------------------------- modalities


def _text_modality() -> RawModality:
    def encode(items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        features = encode_texts_cached(items["text"].astype(str).tolist())
        return features, np.ones(len(items), dtype=bool)

    provenance = {
        "encoder": text_encoder_name(),
        "dim": TEXT_DIM,
        "input": "title | first category path | brand (the asin when the item has no metadata)",
        "synthetic": False,
    }
    return RawModality(name="text", provenance=provenance, encoder=encode)


def _image_modality(image_dir: Path, files: dict[str, Path], spec: str) -> RawModality:
    encoder = load_image_encoder(spec)

    def encode(items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        paths = [files.get(str(token)) for token in items["item"]]
        available = np.array([p is not None for p in paths], dtype=bool)
        present = [p for p in paths if p is not None]
        digests = [cached_file_sha256(p) for p in present]  # shard keys follow the image content, not the name
        features = np.zeros((len(items), encoder.dim), dtype=np.float32)
        if present:
            features[available] = encoder.encode_cached(
                "image-amazon", digests, lambda start, stop: [_open_rgb(p) for p in present[start:stop]],
                desc="item images",
            )
        return features, available

    provenance = {
        **encoder.provenance(),
        "spec": spec,
        "image_source": f"one local product image per item: <asin>.jpg|.jpeg|.png|.webp in {image_dir}",
        "synthetic": False,
    }
    return RawModality(name="image", provenance=provenance, encoder=encode, optional=True,
                       source=str(image_dir))


# --------------------------------------------------------------------------- the downloaded folder

# Official download names per release: (reviews pattern, metadata pattern, how to write them).
# ``cat`` is the category as spelled in the file name (Video_Games, Clothing_Shoes_and_Jewelry).
FILE_NAMES = {
    "2014": (re.compile(r"reviews_(?P<cat>.+?)(?:_5)?\.json(?:\.gz)?"),
             re.compile(r"meta_(?P<cat>.+)\.json(?:\.gz)?"),
             "reviews_<Cat>_5.json.gz + meta_<Cat>.json.gz"),
    "2018": (re.compile(r"(?!meta_)(?P<cat>.+?)(?:_5)?\.json(?:\.gz)?"),
             re.compile(r"meta_(?P<cat>.+)\.json(?:\.gz)?"),
             "<Cat>_5.json.gz (or <Cat>.json.gz) + meta_<Cat>.json.gz"),
    "2023": (re.compile(r"(?!meta_)(?P<cat>.+)\.jsonl(?:\.gz)?"),
             re.compile(r"meta_(?P<cat>.+)\.jsonl(?:\.gz)?"),
             "<Cat>.jsonl(.gz) + meta_<Cat>.jsonl(.gz)"),
}


def _by_category(folder: Path, pattern: re.Pattern) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for file in sorted(folder.iterdir()):
        match = pattern.fullmatch(file.name)
        if match and file.is_file():
            found.setdefault(match.group("cat"), []).append(file)
    return found


def _names(files: dict[str, list[Path]]) -> list[str]:
    return [f.name for group in files.values() for f in group]


def locate_amazon(
    path: str | Path, meta: str | Path | None = None, *, version: str, category: str | None = None
) -> tuple[Path, Path]:
    """(reviews file, metadata file) from the two files or from the folder they were downloaded to.

    ``path`` a file: the reviews, with ``meta`` its metadata; without ``meta`` the
    release's ``meta_<Cat>`` file beside it is used. ``path`` a folder: the one
    category holding both files under the release's official names (:data:`FILE_NAMES`),
    or the one ``category`` names. Raises DataError naming the folder, what it holds and
    how to choose when the folder has no such pair, several categories, or two
    reviews (or metadata) files for one category (the 5-core and the full dump, or a
    plain and a gzipped copy).
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    reviews_pattern, meta_pattern, layout = FILE_NAMES[version]
    path = Path(path)
    if path.is_file():
        if category is not None:
            raise DataError(f"{path}: --category picks a category inside a folder; --path is a file")
        if meta is not None:
            return path, Path(meta)
        match = reviews_pattern.fullmatch(path.name)
        beside = _by_category(path.parent, meta_pattern).get(match.group("cat"), []) if match else []
        if len(beside) == 1:
            return path, beside[0]
        expected = f"meta_{match.group('cat')}" if match else "meta_<Cat>"
        raise DataError(f"{path}: needs --meta, the metadata file; none found beside it as {expected}.* "
                        f"(Amazon {version} names: {layout})")
    if not path.is_dir():
        raise DataError(f"{path}: not found; expected the Amazon {version} reviews file or the folder "
                        f"holding {layout}")
    if meta is not None:
        raise DataError(f"{path}: a folder; --meta goes with --path REVIEWS_FILE, not with a folder")
    reviews = _by_category(path, reviews_pattern)
    metas = _by_category(path, meta_pattern)
    paired = sorted(set(reviews) & set(metas))
    if category is not None:
        if category not in paired:
            raise DataError(f"{path}: no category {category!r} with both files ({layout}); categories with "
                            f"both: {paired or 'none'}; reviews files: {_names(reviews) or 'none'}; "
                            f"metadata files: {_names(metas) or 'none'}")
        paired = [category]
    if not paired:
        others = sorted(f.name for f in path.iterdir())[:12]
        raise DataError(f"{path}: no Amazon {version} pair {layout}; reviews files: {_names(reviews) or 'none'}; "
                        f"metadata files: {_names(metas) or 'none'}; the folder holds {others}")
    if len(paired) > 1:
        raise DataError(f"{path}: {len(paired)} categories with both files: {', '.join(paired)}; pick one "
                        f"with --category (e.g. --category {paired[0]}), or give --path REVIEWS --meta META")
    cat = paired[0]
    for kind, group in (("reviews", reviews[cat]), ("metadata", metas[cat])):
        if len(group) > 1:
            raise DataError(f"{path}: {len(group)} {kind} files for {cat}: {[f.name for f in group]}; "
                            f"give the one you mean as --path REVIEWS --meta META")
    return reviews[cat][0], metas[cat][0]


def input_files(reviews_path: Path, meta_path: Path, image_dir: str | Path | None = None
                ) -> dict[str, Path | tuple[Path, ...]]:
    """What :func:`read_amazon` reads, by role: ``reviews``, ``meta`` and, with
    ``image_dir``, ``images`` (the image files :func:`find_images` picks, as a group)."""
    files: dict[str, Path | tuple[Path, ...]] = {"reviews": reviews_path, "meta": meta_path}
    for role, file in files.items():
        if not Path(file).is_file():
            raise DataError(f"{file}: file not found ({role})")
    if image_dir is not None:
        files["images"] = tuple(find_images(image_dir).values())
    return files


# --------------------------------------------------------------------------- reader


def default_name(reviews_path: Path, version: str) -> str:
    """"amazon<version>-<Cat>" from reviews_<Cat>_5.json.gz, <Cat>_5.json.gz or <Cat>.jsonl.gz."""
    stem = reviews_path.name
    for suffix in (".gz", ".jsonl", ".json"):
        stem = stem.removesuffix(suffix)
    stem = stem.removeprefix("reviews_").removesuffix("_5")
    return f"amazon{version}-{stem}"


def read_amazon(
    reviews_path: str | Path,
    meta_path: str | Path,
    *,
    version: str,
    image_dir: str | Path | None = None,
    image_encoder: str = "mobilenetv2",
    name: str | None = None,
) -> RawDataset:
    """Read one Amazon category (reviews + metadata [+ local images]) into a :class:`RawDataset`.

    ``version``: "2014", "2018" or "2023" (schemas in the module docstring).
    ``image_encoder``: a :func:`hm4sr_core.data.features.load_image_encoder` spec.
    Returns interactions (user, item: categorical id strings; timestamp: int64 s), items (item, text,
    categories, title, brand, image_url), a ``text`` modality (MiniLM, 384-d) and,
    with ``image_dir``, an optional ``image`` modality. Raises DataError on bad input.
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    interactions = read_reviews(reviews_path, version)
    # The categories are the item ids in order of first appearance, each reviewed at least once.
    tokens = np.asarray(interactions["item"].cat.categories, dtype=object)
    meta, duplicates = read_meta(meta_path, version, set(tokens))

    records = [meta.get(t) for t in tokens]
    paths = [r["path"] if r else [] for r in records]
    root = _shared_root(paths)
    items = pd.DataFrame({
        "item": tokens,
        "text": [compose_item_text(r["title"], r["path"], r["brand"]) or t if r else t
                 for t, r in zip(tokens, records)],
        "categories": [p[1:] if root is not None and p else list(p) for p in paths],
        "title": [r["title"] if r else "" for r in records],
        "brand": [r["brand"] if r else "" for r in records],
        "image_url": [r["image_url"] if r else "" for r in records],
    })
    no_meta = np.array([r is None for r in records], dtype=bool)

    modalities = [_text_modality()]
    image_files: dict[str, Path] = {}
    if image_dir is not None:
        image_dir = Path(image_dir)
        image_files = find_images(image_dir)
        modalities.append(_image_modality(image_dir, image_files, image_encoder))

    source = {
        "reader": "hm4sr_core.data.readers.amazon.read_amazon",
        "format": f"Amazon Reviews {version}",
        "version": version,
        "reviews_file": str(reviews_path),
        "meta_file": str(meta_path),
        "licence": f"Amazon review data (McAuley lab, UCSD), research use; cite {CITATIONS[version]}",
        "reviews": int(len(interactions)),
        "missing_meta": int(no_meta.sum()),
        "reviews_without_meta": int(no_meta[interactions["item"].cat.codes.to_numpy()].sum()),
        "duplicate_meta": int(duplicates),
        "dropped_root_category": root,
        "image_dir": str(image_dir) if image_dir is not None else None,
        "image_modality": (f"{image_encoder} on local files; items without a file are masked"
                           if image_dir is not None else "none: no image_dir given"),
        "items_with_image_file": int(sum(t in image_files for t in tokens)),
        "timestamp_unit": interactions.attrs.get("timestamp_unit", "seconds"),
    }
    return RawDataset(name=name or default_name(reviews_path, version), source=source,
                      interactions=interactions, items=items, modalities=modalities,
                      interactions_file=str(reviews_path))
