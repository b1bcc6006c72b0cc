"""Persist a :class:`Dataset` as a folder, atomically, and read it back.

Layout of ``data/processed/<name>/``::

    manifest.json          name, source, preprocessing, stats, modalities, file hashes, split hashes,
                           inputs (source, sha256 of each input file, options: see data.prepare)
    interactions.parquet   user, item, timestamp (sorted by user, timestamp, item)
    items.parquet          item, token, text, categories, reader extras
    users.parquet          user, token
    categories.npy         (N+1, C) float32 multi-hot
    features_<m>.npy       (N+1, D_m) float32, row 0 = padding
    available_<m>.npy      (N+1,) bool

The folder is written under a temporary name and renamed into place, so a failure
never leaves a half-written dataset and never destroys the previous one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .. import atomic
from ..paths import processed_root
from .features import cache_key_hash, default_cache_dir
from .schema import DataError, Dataset, ModalityFeatures

FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_file_sha256(path: str | Path, cache_dir: Path | None = None) -> str:
    """:func:`file_sha256`, remembered under ``<cache_dir>/input-sha256/`` (default
    :func:`hm4sr_core.data.features.default_cache_dir`).

    The entry is keyed by the resolved path, size, inode, mtime and ctime (ns): any
    write, replacement or rename gives a new key, so a stale digest is never served.
    Input files of ``hm4sr prepare`` (gigabytes for Amazon dumps) are read once.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = {"path": str(path), "size": stat.st_size, "inode": stat.st_ino,
           "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}
    entry = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "input-sha256" / cache_key_hash(key)
    try:
        digest = entry.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        digest = ""
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    digest = file_sha256(path)
    write_text_atomic(entry, digest + "\n")
    return digest


def files_sha256(paths: list[Path] | tuple[Path, ...], cache_dir: Path | None = None) -> str:
    """One digest for a group of files (a folder of item images): sha256 over
    "<name>\\t<sha256>" lines in name order, so renaming a file changes it too."""
    lines = sorted(f"{Path(p).name}\t{cached_file_sha256(p, cache_dir)}\n" for p in paths)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write bytes through a temporary file in the same folder, then rename
    (:func:`hm4sr_core.atomic.write_bytes_atomic`)."""
    atomic.write_bytes_atomic(path, data)


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`write_bytes_atomic`)."""
    atomic.write_text_atomic(path, text)


def resolve_dataset_path(name_or_path: str | Path) -> Path:
    """A folder path as given, or ``data/processed/<name>``."""
    p = Path(name_or_path)
    if (p / "manifest.json").exists():
        return p
    candidate = processed_root() / str(name_or_path)
    if (candidate / "manifest.json").exists():
        return candidate
    for folder in (p, candidate):
        if folder.name and folder.parent.is_dir() and any(
                entry.name.startswith(f".{folder.name}.old-") for entry in folder.parent.iterdir()):
            raise DataError(f"no prepared dataset at {folder}: a prepare was killed while replacing it and left "
                            f"it in {folder.parent}/.{folder.name}.old-*; run the same `hm4sr prepare` "
                            f"(--name {folder.name}) again to restore it")
    raise DataError(f"no prepared dataset at {p} or {candidate} (no manifest.json); "
                    f"run `hm4sr prepare` first")


def save_dataset(ds: Dataset, folder: str | Path | None = None, *, extra: dict | None = None) -> Path:
    """Write ``ds`` to ``folder`` (default ``data/processed/<ds.name>``) atomically.

    ``extra`` is merged into the manifest (split hashes, for instance).
    """
    target = Path(folder) if folder is not None else processed_root() / ds.name
    tmp = atomic.temp_folder_beside(target)
    try:
        ds.interactions.to_parquet(tmp / "interactions.parquet", index=False)
        items = ds.items.copy()
        items["categories"] = [list(map(str, c)) for c in items["categories"]]
        for col in items.columns:
            if items[col].dtype == object and col not in ("categories",):
                items[col] = items[col].astype(str)
        items.to_parquet(tmp / "items.parquet", index=False)
        pd.DataFrame({"user": np.arange(ds.num_users), "token": ds.user_tokens.astype(str)}).to_parquet(
            tmp / "users.parquet", index=False)
        np.save(tmp / "categories.npy", ds.categories)
        modalities = {}
        for name, mod in ds.modalities.items():
            np.save(tmp / f"features_{name}.npy", mod.features)
            np.save(tmp / f"available_{name}.npy", mod.available)
            modalities[name] = {"dim": mod.dim, "provenance": mod.provenance,
                                "features": f"features_{name}.npy", "available": f"available_{name}.npy"}
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        data_hash = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": ds.name,
            "source": ds.source,
            "preprocessing": ds.preprocessing,
            "stats": ds.stats,
            "category_names": ds.category_names,
            "modalities": modalities,
            "files": files,
            "data_hash": data_hash,
        }
        manifest.update(extra or {})
        write_json_atomic(tmp / "manifest.json", manifest)
        atomic.replace_folder(tmp, target)  # a failure here puts the previous folder back
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(name_or_path: str | Path) -> dict:
    """The manifest.json of a prepared dataset; DataError naming the file when it is damaged."""
    path = resolve_dataset_path(name_or_path) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        where = f" (line {error.lineno}, column {error.colno}: {error.msg})" if isinstance(
            error, json.JSONDecodeError) else ""
        raise DataError(f"{path}: damaged, not a JSON manifest{where}; expected the manifest `hm4sr prepare` "
                        f"writes: prepare the dataset again with --overwrite") from None
    if not isinstance(manifest, dict) or not {"files", "data_hash"} <= set(manifest):
        raise DataError(f"{path}: not a manifest written by `hm4sr prepare` (expected a JSON object with "
                        f"'files' and 'data_hash'); prepare the dataset again with --overwrite")
    return manifest


def load_dataset(name_or_path: str | Path, *, verify: bool = True) -> Dataset:
    """Read a folder written by :func:`save_dataset`; with ``verify`` check every file hash."""
    folder = resolve_dataset_path(name_or_path)
    manifest = read_manifest(folder)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{folder / 'manifest.json'}: format_version {manifest.get('format_version')!r}, "
                        f"expected {FORMAT_VERSION}; re-run `hm4sr prepare`")
    if verify:
        for fname, digest in manifest["files"].items():
            path = folder / fname
            if not path.exists():
                raise DataError(f"{path}: missing (listed in manifest.json)")
            if file_sha256(path) != digest:
                raise DataError(f"{path}: content hash differs from manifest.json; the file was "
                                f"changed after `hm4sr prepare` wrote it")
    items = pd.read_parquet(folder / "items.parquet")
    items["categories"] = [list(c) for c in items["categories"]]
    modalities = {
        name: ModalityFeatures(np.load(folder / m["features"]), np.load(folder / m["available"]),
                               m["provenance"])
        for name, m in manifest["modalities"].items()
    }
    return Dataset(
        name=manifest["name"],
        interactions=pd.read_parquet(folder / "interactions.parquet"),
        items=items,
        user_tokens=pd.read_parquet(folder / "users.parquet")["token"].to_numpy().astype(str),
        category_names=list(manifest["category_names"]),
        categories=np.load(folder / "categories.npy"),
        modalities=modalities,
        preprocessing=manifest["preprocessing"],
        source=manifest["source"],
        stats=manifest["stats"],
    )
