"""One call from any source to a prepared dataset folder: locate the inputs -> check the
target folder -> read -> preprocess -> split hashes -> atomic save. ``hm4sr prepare`` is
a thin wrapper around :func:`prepare_dataset`.

A prepared dataset is never replaced silently: checkpoints record its data hash. Each
manifest records ``inputs``, namely the source, a sha256 of every file read, the reader
options and the preprocessing. Before anything is read or written, a call compares its
own inputs with those of the folder it would write:

* no folder (or an empty one): prepare and write it;
* the same source and inputs: reuse the folder as it is, reading and writing nothing;
* another source, other files or options, or a folder that is not a prepared dataset:
  :class:`~hm4sr_core.data.schema.DataError` naming the folder and what made it, unless
  ``overwrite``. A manifest written before input records existed is compared by source
  alone; the same source is then rebuilt in place, as before.

With ``overwrite`` the old folder is replaced atomically (:func:`save_dataset`): a
failure on the way, while reading, encoding or writing, leaves it as it was.

The check and the write happen under a lock on the folder (:func:`hm4sr_core.atomic.target_lock`):
a second prepare of the same name waits for the first, then checks again. Under the lock,
what a killed prepare left is dealt with first: a folder half-way through replacement is
restored from its ``.<name>.old-*`` copy, ``.<name>.tmp-*`` folders are removed.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from ..atomic import check_name, recover_folder, target_lock
from ..config import PreprocessConfig, SplitConfig
from ..paths import processed_root
from .preprocess import preprocess
from .readers import amazon, hm4sr_folder, movielens, recbole
from .schema import DataError, Dataset, RawDataset
from .splits import build_split
from .synthetic import make_synthetic_world
from .store import FORMAT_VERSION, cached_file_sha256, files_sha256, load_dataset, save_dataset

SOURCES = ("ml-100k", "recbole", "hm4sr-folder", "amazon2014", "amazon2018", "amazon2023", "synthetic")
# Manifests from before ``inputs`` was recorded name their reader instead of the source.
_READER_SOURCES = {
    "hm4sr_core.data.readers.movielens.read_ml100k": "ml-100k",
    "hm4sr_core.data.readers.recbole.read_recbole": "recbole",
    "hm4sr_core.data.readers.hm4sr_folder.read_hm4sr_folder": "hm4sr-folder",
    "synthetic": "synthetic",
}
_AMAZON_READER = "hm4sr_core.data.readers.amazon.read_amazon"
_SHOWN_DIFFERENCES = 4  # a refusal lists this many differences, then counts the rest


@dataclass(frozen=True)
class SourceInputs:
    """What one call would read, found from file names alone (nothing is opened yet)."""

    source: str  # one of SOURCES
    name: str  # the default output name: "ml-100k", "recbole-<stem>", "amazon2018-<Cat>", ...
    files: dict[str, Path]  # role ("inter", "reviews", "u.data", ...) -> the file read
    folders: dict[str, tuple[Path, tuple[Path, ...]]]  # role -> (folder, the files read from it)
    options: dict  # reader options that change the result (JSON values)
    read: Callable[[], RawDataset] = field(repr=False, compare=False)

    def paths(self) -> list[str]:
        """Every input file and folder, for messages."""
        return [str(p) for p in self.files.values()] + [str(f) for f, _ in self.folders.values()]

    def record(self, config: PreprocessConfig) -> dict:
        """The manifest's ``inputs``: source, {role: path + sha256}, options, preprocessing.

        Hashes every input file (streamed, remembered by :func:`cached_file_sha256`)."""
        files = {role: {"path": os.path.abspath(path), "sha256": cached_file_sha256(path)}
                 for role, path in self.files.items()}
        for role, (folder, members) in self.folders.items():
            files[role] = {"path": os.path.abspath(folder), "sha256": files_sha256(members), "files": len(members)}
        return {"source": self.source, "files": files, "options": dict(self.options),
                "preprocessing": config.to_dict()}


@dataclass
class Prepared:
    """What :func:`prepare_dataset` did."""

    dataset: Dataset
    folder: Path
    action: Literal["written", "reused", "replaced"]  # reused: same inputs, nothing read or written
    previous: dict | None  # the manifest already in the folder (None when there was none)
    recovered: list[str] = field(default_factory=list)  # what an interrupted earlier prepare left, restored or removed


def _refuse_option(source: str, flag: str, value: object, sources: tuple[str, ...]) -> None:
    if value:
        raise ValueError(f"{flag} applies to {', '.join(sources)}, not to source {source!r}")


def locate_inputs(source: str, path: str | Path | None = None, *, dataset: str | None = None,
                  category: str | None = None, features: dict[str, str] | None = None,
                  optional_modalities: tuple[str, ...] = (), meta: str | Path | None = None,
                  image_dir: str | Path | None = None, image_encoder: str = "mobilenetv2", seed: int = 2025,
                  synthetic: dict | None = None) -> SourceInputs:
    """Find what ``source`` would read from ``path`` without reading it.

    ``dataset``: RecBole stem (recbole, hm4sr-folder) when the folder holds several
    ``.inter`` files; ``category``: Amazon category when the folder holds several;
    ``meta``: Amazon metadata file beside a reviews file. Raises DataError naming the
    file or folder when the inputs cannot be found, ValueError for an option the source
    does not take.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    amazons = tuple(s for s in SOURCES if s.startswith("amazon"))
    for flag, value, sources in (("--dataset", dataset, ("recbole", "hm4sr-folder")), ("--category", category, amazons),
                                 ("--meta", meta, amazons), ("--image-dir", image_dir, amazons),
                                 ("--feature", features, ("recbole",)),
                                 ("--optional-modality", optional_modalities, ("recbole",))):
        if source not in sources:
            _refuse_option(source, flag, value, sources)
    if source == "ml-100k":
        origin = {} if path is not None else {"origin": movielens.WIDEDEEP_REQUIREMENT}
        return SourceInputs(source, movielens.NAME, movielens.input_files(path), {}, origin,
                            lambda: movielens.read_ml100k(path))
    if source == "synthetic":
        params = dict(synthetic or {})
        # Recorded with every default filled in, so that `--users 300` and no flag (the same
        # world) compare equal.
        world = {k: p.default for k, p in inspect.signature(make_synthetic_world).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and k != "name"}
        world.update(params)
        return SourceInputs(source, "synthetic", {}, {}, {"seed": seed, "world": world},
                            lambda: make_synthetic_world(seed, **params))
    if path is None:
        raise DataError(f"source {source!r} needs --path (a folder or file)")
    if source == "recbole":
        inter_path, stem = recbole.locate_inter(path, dataset)
        files = recbole.input_files(inter_path, features)
        options = {"features": sorted(features or {}), "optional_modalities": sorted(optional_modalities)}
        return SourceInputs(source, recbole.default_name(stem), files, {}, options,
                            lambda: recbole.read_recbole(inter_path, features=features,
                                                         optional_modalities=optional_modalities))
    if source == "hm4sr-folder":
        files = hm4sr_folder.input_files(path, dataset)
        stem = files["inter"].stem
        return SourceInputs(source, hm4sr_folder.default_name(stem), files, {}, {},
                            lambda: hm4sr_folder.read_hm4sr_folder(path, stem))
    version = source.removeprefix("amazon")
    reviews, meta_path = amazon.locate_amazon(path, meta, version=version, category=category)
    files = amazon.input_files(reviews, meta_path)
    folders = {}
    if image_dir is not None:
        folders["images"] = (Path(image_dir), tuple(amazon.find_images(image_dir).values()))
    options = {"image_encoder": image_encoder if image_dir is not None else None}
    return SourceInputs(source, amazon.default_name(reviews, version), files, folders, options,
                        lambda: amazon.read_amazon(reviews, meta_path, version=version, image_dir=image_dir,
                                                   image_encoder=image_encoder))


# --------------------------------------------------------------------------- the target folder


def _check_name(name: str) -> str:
    return check_name(name, "--name")


def existing_manifest(folder: Path) -> dict | None:
    """The manifest in ``folder``; None when there is no folder or an empty one; ``{}``
    for a folder that holds something other than a prepared dataset."""
    if not folder.exists():
        return None
    if folder.is_dir() and not any(folder.iterdir()):
        return None
    try:
        with open(folder / "manifest.json", encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def source_of(manifest: dict) -> str | None:
    """The source (one of :data:`SOURCES`) a manifest was prepared from, None if unknown."""
    inputs = manifest.get("inputs")
    if isinstance(inputs, dict) and inputs.get("source"):
        return inputs["source"]
    reader = (manifest.get("source") or {}).get("reader")
    if reader == _AMAZON_READER:
        return f"amazon{manifest['source'].get('version', '')}"
    return _READER_SOURCES.get(reader)


def describe(manifest: dict) -> str:
    """One phrase for messages: what made the dataset in a folder."""
    if not manifest:
        return "something that is not a prepared dataset (no readable manifest.json)"
    inputs = manifest.get("inputs") or {}
    source = source_of(manifest) or f"an unknown reader ({(manifest.get('source') or {}).get('reader')})"
    if inputs:
        paths = [entry["path"] for entry in inputs.get("files", {}).values()]
        if not paths:
            paths = [f"{k} {v}" for k, v in inputs.get("options", {}).items()]
    else:
        recorded = manifest.get("source") or {}
        paths = [str(recorded[k]) for k in ("origin", "folder", "inter_file", "item_file", "reviews_file",
                                            "meta_file", "seed") if recorded.get(k) is not None]
    text = f"dataset {manifest.get('name')!r} prepared from source {source}"
    if paths:
        text += f" ({', '.join(paths[:3])}{f' and {len(paths) - 3} more' if len(paths) > 3 else ''})"
    if manifest.get("data_hash"):
        text += f", data hash {manifest['data_hash'][:12]}"
    return text


def _differences(old: dict, new: dict) -> list[str]:
    """How two ``inputs`` records differ, one phrase per file or option."""
    out = []
    if old.get("source") != new["source"]:
        out.append(f"source ({old.get('source')} there, {new['source']} now)")
    old_files, new_files = old.get("files", {}), new["files"]
    for role in sorted(set(old_files) | set(new_files)):
        was, now = old_files.get(role), new_files.get(role)
        if was is None or now is None:
            out.append(f"{role} file ({was['path'] if was else 'none'} there, {now['path'] if now else 'none'} now)")
        elif was.get("sha256") != now["sha256"]:
            out.append(f"{role} file content (sha256 {str(was.get('sha256'))[:12]} of {was['path']} there, "
                       f"{now['sha256'][:12]} of {now['path']} now)")
    for group in ("options", "preprocessing"):
        was, now = old.get(group, {}), new[group]
        for key in sorted(set(was) | set(now)):
            if was.get(key) != now.get(key):
                out.append(f"{key} ({was.get(key)!r} there, {now.get(key)!r} now)")
    return out


def _would(source: str, inputs: SourceInputs | None) -> str:
    paths = inputs.paths() if inputs is not None else []
    return f"it from source {source}" + (f" ({', '.join(paths[:3])})" if paths else "")


def _refusal(folder: Path, manifest: dict, would: str, differences: list[str]) -> DataError:
    shown = "; ".join(differences[:_SHOWN_DIFFERENCES])
    if len(differences) > _SHOWN_DIFFERENCES:
        shown += f"; and {len(differences) - _SHOWN_DIFFERENCES} more"
    return DataError(f"{folder} already holds {describe(manifest)}; this call would prepare {would}, which "
                     f"differs in {shown}. Nothing was prepared or written; pass --overwrite (overwrite=True) "
                     f"to replace it, or --name to prepare under another name")


def check_source(folder: Path, manifest: dict | None, source: str, inputs: SourceInputs | None = None) -> None:
    """DataError when ``folder`` holds a dataset from another source than ``source``, or
    something that is not a prepared dataset. Cheap: reads only the manifest."""
    if manifest is None or source_of(manifest) == source:
        return
    there = source_of(manifest) if manifest else "not a prepared dataset"
    raise _refusal(folder, manifest, _would(source, inputs), [f"source ({there} there, {source} now)"])


# --------------------------------------------------------------------------- prepare


def prepare_dataset(source: str, path: str | Path | None = None, *, name: str | None = None,
                    config: PreprocessConfig = PreprocessConfig(), out_root: str | Path | None = None,
                    overwrite: bool = False, **reader_options) -> Prepared:
    """Read ``source``, preprocess it and write ``<out_root>/<name>/`` atomically, unless
    that folder already holds the dataset these inputs make (then it is reused).

    ``name``: the output folder's name only (default: the reader's, see
    :class:`SourceInputs`); ``out_root`` defaults to ``data/processed``;
    ``reader_options``: see :func:`locate_inputs`. Raises DataError, before reading
    anything, when the folder holds a dataset made from other inputs and ``overwrite``
    is False (see the module docstring); on bad input raises DataError and writes nothing.
    """
    inputs = locate_inputs(source, path, **reader_options)
    name = _check_name(name or inputs.name)
    folder = (Path(out_root) if out_root is not None else processed_root()) / name
    # One writer per folder: a second prepare of the same name waits, then decides on what
    # the first one left (reuse it, or refuse to replace it), never on what it saw before.
    with target_lock(folder, "hm4sr prepare", wait=True):
        recovered = recover_folder(folder)
        done = _prepare_locked(source, inputs, name, folder, config, overwrite)
    done.recovered = recovered
    return done


def _prepare_locked(source: str, inputs: SourceInputs, name: str, folder: Path, config: PreprocessConfig,
                    overwrite: bool) -> Prepared:
    """:func:`prepare_dataset`'s check-then-write, under the folder's lock."""
    previous = existing_manifest(folder)
    if previous is not None and not overwrite:
        check_source(folder, previous, source, inputs)
    record = inputs.record(config)
    if previous is not None and not overwrite and isinstance(previous.get("inputs"), dict):
        differences = _differences(previous["inputs"], record)
        if differences:
            raise _refusal(folder, previous, _would(source, inputs), differences)
        if previous.get("format_version") == FORMAT_VERSION:
            try:
                return Prepared(load_dataset(folder), folder, "reused", previous)
            except DataError as error:
                raise DataError(f"{error}. It was prepared from these same inputs: pass --overwrite "
                                f"(overwrite=True) to rebuild it") from None
    raw = inputs.read()
    raw.name = name
    ds = preprocess(raw, config)
    hashes = {kind: build_split(ds, SplitConfig(kind=kind, max_length=config.max_length)).hash()
              for kind in ("leave_one_out", "temporal")}
    save_dataset(ds, folder, extra={"split_hashes": hashes, "inputs": record})
    return Prepared(ds, folder, "written" if previous is None else "replaced", previous)


def prepare(source: str, path: str | Path | None = None, *, name: str | None = None,
            config: PreprocessConfig = PreprocessConfig(), out_root: str | Path | None = None,
            overwrite: bool = False, **reader_options) -> tuple[Dataset, Path]:
    """:func:`prepare_dataset`, returning the dataset and its folder."""
    done = prepare_dataset(source, path, name=name, config=config, out_root=out_root, overwrite=overwrite,
                           **reader_options)
    return done.dataset, done.folder


def prepared_dataset(source: str | None, name: str, *, path: str | Path | None = None,
                     out_root: str | Path | None = None, reuse: bool = True, overwrite: bool = False,
                     **prepare_options) -> tuple[Dataset, Path]:
    """The dataset ``<out_root>/<name>`` (default ``data/processed/<name>``). Returns the
    dataset and its folder.

    ``reuse``: an existing dataset is loaded as it is, without re-reading its inputs,
    provided it was prepared from ``source`` (any source when ``source`` is None);
    one from another source raises DataError unless ``overwrite``, which rebuilds it.
    Otherwise (nothing there, or ``reuse`` False) the dataset is prepared by
    :func:`prepare`, which reuses a folder made from the same
    inputs and refuses to replace one made from others unless ``overwrite``."""
    folder = Path(out_root) / name if out_root is not None else processed_root() / name
    if reuse and (folder / "manifest.json").exists():
        manifest = existing_manifest(folder)
        if source is None or source_of(manifest) == source:
            return load_dataset(folder), folder
        if not overwrite:
            check_source(folder, manifest, source)
    if source is None:
        raise DataError(f"{folder}: no prepared dataset named {name!r} (no manifest.json), and no source "
                        f"to prepare it from; pass a source ({', '.join(SOURCES)}) or run `hm4sr prepare`")
    return prepare(source, path, name=name, out_root=folder.parent, overwrite=overwrite, **prepare_options)


def format_stats(ds: Dataset) -> str:
    """Human-readable statistics block (what ``hm4sr prepare`` prints)."""
    s = ds.stats
    q = s["length_quantiles"]
    lines = [
        f"dataset      {ds.name}  ({ds.source.get('reader', '?')})",
        f"users        {s['users']:,}",
        f"items        {s['items']:,}",
        f"interactions {s['interactions']:,}  (after {ds.preprocessing.get('user_core')}/"
        f"{ds.preprocessing.get('item_core')}-core, dedup={ds.preprocessing.get('dedup')})",
        f"sparsity     {s['sparsity']:.4%}",
        f"time span    {s['first_date']} .. {s['last_date']}",
        f"time unit    {ds.preprocessing.get('timestamp_unit', 'seconds')}",
        f"seq. length  min {q['min']:.0f}  median {q['p50']:.0f}  p90 {q['p90']:.0f}  max {q['max']:.0f}",
        f"zero gaps    {s['zero_gap_share']:.1%} of consecutive interactions share a second",
        f"categories   {len(ds.category_names)}",
    ]
    for mname, mod in ds.modalities.items():
        prov = mod.provenance
        flag = f"  [SYNTHETIC: {prov.get('input', 'generated data')}]" if prov.get("synthetic") else ""
        lines.append(f"modality     {mname}: {mod.dim}-d, {int(mod.available[1:].sum()):,}/{ds.num_items:,} items, "
                     f"{prov.get('encoder', '?')}{flag}")
    return "\n".join(lines)
