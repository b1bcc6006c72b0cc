"""Synthetic Amazon Reviews 2023 files at any scale, for measuring data preparation (issue 13).

Writes ``<Cat>.jsonl.gz`` (reviews) and ``meta_<Cat>.jsonl.gz`` (metadata) in the raw 2023
schema, field for field, so that ``hm4sr prepare amazon2023 --path OUT`` reads them as it
reads a real download:

* reviews: rating, title, text, images, asin, parent_asin, user_id, timestamp (ms),
  helpful_vote, verified_purchase;
* meta: main_category, title, average_rating, rating_number, features, description, price,
  images, videos, store, categories, details, parent_asin, bought_together.

Shape: about ``interactions / 10`` items and ``interactions / 4`` users, both drawn with
power-law popularity (a few items and users hold most interactions, the tail has one or
two), timestamps uniform over 2010-2023, a few repeated (user, item) pairs as sampling
makes them. Real 2023 categories have 1.6-3 reviews a user; 4 keeps a useful share of
users through a 5-core. About 1% of reviewed items have no metadata record (counted as
``missing_meta`` by the reader). Review texts are word salad from a fixed vocabulary.

Deterministic by ``seed``: the same arguments give byte-identical files (gzip mtime 0).
Rows are generated with numpy and written chunk by chunk, so memory stays at a few
hundred MB for 10M interactions; files are written under a temporary name and renamed.
Never commit what it writes: use ``benchmarks/_work/`` (git-ignored) or /tmp.

    python -m benchmarks.amazon2023_synth --interactions 10000000 --out benchmarks/_work/amazon10m
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

CATEGORY = "Synthetic_Goods"
MAIN_CATEGORY = "Synthetic Goods"
ROWS_PER_CHUNK = 100_000  # lines formatted and written at once: bounds memory
ITEM_EXPONENT = 0.8  # item i (by popularity rank) is drawn with weight (i + 1) ** -ITEM_EXPONENT
USER_EXPONENT = 0.6  # the same for users
MISSING_META = 0.01  # share of items written without a metadata record
FIRST_MS = 1_262_304_000_000  # 2010-01-01 UTC
LAST_MS = 1_693_526_400_000  # 2023-09-01 UTC
GZIP_LEVEL = 1  # fastest: the files are throwaway and large
_ALPHABET = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
_WORDS = ("good bad great cheap solid sturdy flimsy bright dark small large light heavy quick slow "
          "fits broke works returned again daughter son gift box arrived late early price quality "
          "color size battery screen cable button sound game controller charger case cover sturdy "
          "would recommend not buy this one it was the and for with after week month year really "
          "very pretty easy hard setup manual instructions missing perfect okay fine disappointed "
          "happy love hate expected described").split()


def _tokens(prefix: bytes, index: np.ndarray, rng: np.random.Generator, random_chars: int,
            index_chars: int) -> list[str]:
    """Unique id strings: ``prefix`` + random [0-9A-Z] chars + the index in base 36 (unique)."""
    n = len(index)
    digits = (index[:, None] // 36 ** np.arange(index_chars - 1, -1, -1, dtype=np.int64)) % 36
    chars = np.concatenate([np.broadcast_to(np.frombuffer(prefix, np.uint8), (n, len(prefix))),
                            _ALPHABET[rng.integers(0, 36, size=(n, random_chars))],
                            _ALPHABET[digits]], axis=1)
    width = chars.shape[1]
    return np.ascontiguousarray(chars).view(f"S{width}").ravel().astype(f"U{width}").tolist()


def _power_law(n: int, exponent: float) -> np.ndarray:
    weights = (np.arange(n, dtype=np.float64) + 1.0) ** -exponent
    return weights / weights.sum()


def _phrases(rng: np.random.Generator, count: int, mean_words: float) -> list[str]:
    """``count`` JSON-encoded strings of random words (lengths log-normal around ``mean_words``)."""
    lengths = np.maximum(1, rng.lognormal(np.log(mean_words), 0.8, size=count).astype(int))
    return [json.dumps(" ".join(rng.choice(_WORDS, size=k)).capitalize() + ".") for k in lengths]


def _write_gzip_lines(path: Path, total: int, chunk_text, bar) -> None:
    """Write ``chunk_text(start, stop)`` for rows 0..total in chunks of ``ROWS_PER_CHUNK`` into
    ``path`` as gzip (no name or time in the header: the same text gives the same bytes),
    through a temp file renamed at the end; a failure leaves no file, not half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                   compresslevel=GZIP_LEVEL, mtime=0) as handle:
            for start in range(0, total, ROWS_PER_CHUNK):
                stop = min(total, start + ROWS_PER_CHUNK)
                handle.write(chunk_text(start, stop).encode("utf-8"))
                bar.update(stop - start)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_amazon2023(out: str | Path, *, interactions: int, items: int | None = None, users: int | None = None,
                     category: str = CATEGORY, seed: int = 0, progress: bool = True) -> tuple[Path, Path]:
    """Write ``<out>/<category>.jsonl.gz`` and ``<out>/meta_<category>.jsonl.gz``; return their paths.

    ``items`` defaults to interactions // 10 and ``users`` to interactions // 4 (each at least 1).
    """
    if interactions < 1:
        raise ValueError(f"interactions must be >= 1, got {interactions}")
    n_items = max(1, interactions // 10) if items is None else items
    n_users = max(1, interactions // 4) if users is None else users
    if n_items < 1 or n_users < 1:
        raise ValueError(f"items and users must be >= 1, got {n_items} and {n_users}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    # Popularity rank -> id: a random permutation, so popular ids are scattered like real ones.
    item_ids = _tokens(b"B0", rng.permutation(n_items), rng, 2, 6)
    user_ids = _tokens(b"A", rng.permutation(n_users), rng, 22, 5)
    titles = _phrases(rng, 1024, 5)
    texts = _phrases(rng, 4096, 40)
    item_draw = rng.choice(n_items, size=interactions, p=_power_law(n_items, ITEM_EXPONENT)).astype(np.int32)
    user_draw = rng.choice(n_users, size=interactions, p=_power_law(n_users, USER_EXPONENT)).astype(np.int32)

    reviews_path = out / f"{category}.jsonl.gz"
    meta_path = out / f"meta_{category}.jsonl.gz"

    def review_lines(start: int, stop: int) -> str:
        n = stop - start
        rating = rng.choice(5, size=n, p=[0.07, 0.05, 0.08, 0.15, 0.65]) + 1
        millis = rng.integers(FIRST_MS, LAST_MS, size=n)
        title = rng.integers(0, len(titles), size=n)
        text = rng.integers(0, len(texts), size=n)
        helpful = rng.geometric(0.6, size=n) - 1
        verified = rng.random(n) < 0.9
        lines = [
            f'{{"rating": {r}.0, "title": {titles[ti]}, "text": {texts[te]}, "images": [], '
            f'"asin": "B1{item_ids[i][2:]}", "parent_asin": "{item_ids[i]}", "user_id": "{user_ids[u]}", '
            f'"timestamp": {ms}, "helpful_vote": {h}, "verified_purchase": {"true" if v else "false"}}}\n'
            for r, ti, te, i, u, ms, h, v in zip(rating.tolist(), title.tolist(), text.tolist(),
                                                 item_draw[start:stop].tolist(),
                                                 user_draw[start:stop].tolist(), millis.tolist(),
                                                 helpful.tolist(), verified.tolist())]
        return "".join(lines)

    tree = [(f"Department {a}", f"Aisle {a}-{b}") for a in range(1, 13) for b in range(1, 9)]

    def meta_lines(start: int, stop: int) -> str:
        n = stop - start
        written = rng.random(n) >= MISSING_META
        leaf = rng.integers(0, len(tree) + len(tree) // 9, size=n)  # ~10% past the tree: no path
        title = rng.integers(0, len(titles), size=n)
        feature = rng.integers(0, len(texts), size=n)
        price = np.round(rng.lognormal(3.0, 0.9, size=n), 2)
        has_price = rng.random(n) < 0.7
        store = rng.integers(1, 5000, size=n)
        stars = np.round(rng.uniform(1.0, 5.0, size=n), 1)
        lines = []
        for k in np.flatnonzero(written).tolist():
            rank = start + k
            asin = item_ids[rank]
            path = (json.dumps([MAIN_CATEGORY, *tree[leaf[k]]]) if leaf[k] < len(tree) else "[]")
            url = f"https://m.media-amazon.com/images/I/{asin}"
            lines.append(
                f'{{"main_category": "{MAIN_CATEGORY}", "title": {titles[title[k]]}, '
                f'"average_rating": {stars[k]}, "rating_number": {int(counts[rank])}, '
                f'"features": [{texts[feature[k]]}], "description": [{texts[(feature[k] + 1) % len(texts)]}], '
                f'"price": {price[k] if has_price[k] else "null"}, '
                f'"images": [{{"thumb": "{url}._SS40_.jpg", "large": "{url}._SL500_.jpg", '
                f'"variant": "MAIN", "hi_res": "{url}._SL1500_.jpg"}}], "videos": [], '
                f'"store": "Store {store[k]}", "categories": {path}, '
                f'"details": {{"Brand": "Store {store[k]}", "Item Weight": "{price[k] / 10:.1f} ounces"}}, '
                f'"parent_asin": "{asin}", "bought_together": null}}\n')
        return "".join(lines)

    with tqdm(total=interactions + n_items, desc="synthetic Amazon 2023", unit="line", disable=not progress,
              unit_scale=True) as bar:
        _write_gzip_lines(reviews_path, interactions, review_lines, bar)
        counts = np.bincount(item_draw, minlength=n_items)  # meta_lines reads it
        del item_draw, user_draw
        _write_gzip_lines(meta_path, n_items, meta_lines, bar)
    return reviews_path, meta_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.amazon2023_synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--interactions", type=int, required=True, help="review lines to write (>= 1)")
    parser.add_argument("--out", required=True, help="folder to write into (use benchmarks/_work/ or /tmp)")
    parser.add_argument("--items", type=int, default=None, help="catalogue size (default interactions // 10)")
    parser.add_argument("--users", type=int, default=None, help="users (default interactions // 4)")
    parser.add_argument("--category", default=CATEGORY, help=f"<Cat> of the file names (default {CATEGORY})")
    parser.add_argument("--seed", type=int, default=0, help="same seed and arguments, same bytes")
    args = parser.parse_args(argv)
    try:
        reviews, meta = write_amazon2023(args.out, interactions=args.interactions, items=args.items,
                                         users=args.users, category=args.category, seed=args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in (reviews, meta):
        print(f"{path}  {path.stat().st_size / 2**20:,.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
