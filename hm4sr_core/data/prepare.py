"""One call from any source to a prepared dataset folder: read -> preprocess -> split
hashes -> atomic save. ``hm4sr prepare`` is a thin wrapper around :func:`prepare`."""

from __future__ import annotations

from pathlib import Path

from ..config import PreprocessConfig, SplitConfig
from .preprocess import preprocess
from .schema import DataError, Dataset, RawDataset
from .splits import build_split
from .store import save_dataset

SOURCES = ("ml-100k", "recbole", "hm4sr-folder", "amazon2014", "amazon2018", "amazon2023", "synthetic")


def read_source(source: str, path: str | Path | None = None, *, name: str | None = None,
                features: dict[str, str] | None = None, optional_modalities: tuple[str, ...] = (),
                meta: str | Path | None = None, image_dir: str | Path | None = None,
                image_encoder: str = "mobilenetv2", seed: int = 2025,
                synthetic: dict | None = None) -> RawDataset:
    """Dispatch to the reader for ``source`` (one of :data:`SOURCES`)."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if source == "ml-100k":
        from .readers.movielens import read_ml100k
        return read_ml100k(path)
    if source == "synthetic":
        from .synthetic import make_synthetic_world
        return make_synthetic_world(seed, name=name or "synthetic", **(synthetic or {}))
    if path is None:
        raise DataError(f"source {source!r} needs --path")
    if source == "recbole":
        from .readers.recbole import read_recbole
        return read_recbole(path, name=name, features=features, optional_modalities=optional_modalities)
    if source == "hm4sr-folder":
        from .readers.hm4sr_folder import read_hm4sr_folder
        return read_hm4sr_folder(path, name=name)
    from .readers.amazon import read_amazon
    if meta is None:
        raise DataError(f"source {source!r} needs --meta (the meta_<Category> file) beside --path (the reviews)")
    return read_amazon(path, meta, version=source.removeprefix("amazon"), image_dir=image_dir,
                       image_encoder=image_encoder, name=name)


def prepare(source: str, path: str | Path | None = None, *, name: str | None = None,
            config: PreprocessConfig = PreprocessConfig(), out_root: str | Path | None = None,
            **reader_options) -> tuple[Dataset, Path]:
    """Read ``source``, preprocess it and write ``<out_root>/<name>/`` atomically.

    Returns the dataset and its folder. On bad input raises DataError and writes nothing.
    """
    raw = read_source(source, path, name=name, **reader_options)
    if name:
        raw.name = name
    ds = preprocess(raw, config)
    hashes = {kind: build_split(ds, SplitConfig(kind=kind, max_length=config.max_length)).hash()
              for kind in ("leave_one_out", "temporal")}
    folder = save_dataset(ds, None if out_root is None else Path(out_root) / ds.name,
                          extra={"split_hashes": hashes})
    return ds, folder


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
