"""The HM4SR authors' processed dataset folder (``dataset/<Name>/`` in their release).

The released code (paper Sec. 5.1; RecBole 1.2) reads, per dataset:

* ``<Name>.inter``: RecBole atomic interactions, sorted by (user, time);
* ``txt_emb.pt``, ``img_emb.pt``: (N+1, D) torch tensors (paper: BERT-base text,
  ViT-B/16 CLIP image), row 0 the zero padding row, rows 1..N in RecBole's internal
  item order, i.e. the order in which item tokens first appear in ``<Name>.inter``;
* ``cat.pt``: (N+1, C) multi-hot categories over the first category path, same rows;
* ``interval_num``: a pickled float the released model uses to size its interval
  table; this workbench derives intervals itself, so it is ignored (never unpickled).

The ``.inter`` stem is the folder's only ``.inter`` file (or ``dataset=``), never
the prepared dataset's name, which defaults to "hm4sr-folder-<Name>".

Category columns carry no names in ``cat.pt``; they become ``cat_<j>``, with ``j``
zero-padded to the width of C-1 so that sorting the names keeps the authors'
column order. Items have no titles here, so an item's text is its token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hm4sr_core.data.readers.recbole import (
    check_finite,
    first_appearance_order,
    load_matrix,
    locate_inter,
    read_inter,
)
from hm4sr_core.data.schema import DataError, RawDataset, RawModality

AUTHORS_ENCODER = "as shipped by the HM4SR authors (BERT-base text, ViT-B/16 CLIP image per the paper)"
FEATURE_FILES = {"text": "txt_emb.pt", "image": "img_emb.pt"}
CATEGORY_FILE = "cat.pt"
ROW_ORDER = "row 0 padding, rows 1..N in RecBole's internal order (first appearance in the .inter file)"


def _padded_matrix(path: Path, tokens: np.ndarray, inter_path: Path) -> np.ndarray:
    """Load an (N+1, D) matrix, checking the row count and that every value is finite."""
    matrix = load_matrix(path)
    n = len(tokens)
    if len(matrix) != n + 1:
        raise DataError(f"{path}: found {len(matrix)} rows; expected {n + 1} (row 0 padding + one row for "
                        f"each of the {n} distinct items in {inter_path.name})")
    check_finite(matrix, path, lambda r: "row 0 (padding)" if r == 0
                 else f"row {r} (item {tokens[r - 1]!r})")
    return matrix


def category_names(count: int) -> list[str]:
    """Names for the C unnamed multi-hot columns: cat_0.., zero-padded so they sort in column order."""
    width = len(str(max(count - 1, 0)))
    return [f"cat_{j:0{width}d}" for j in range(count)]


def default_name(stem: str) -> str:
    """The prepared dataset's default name, "hm4sr-folder-<stem>"."""
    return f"hm4sr-folder-{stem}"


def input_files(path: str | Path, dataset: str | None = None) -> dict[str, Path]:
    """The files :func:`read_hm4sr_folder` reads, by role: ``inter`` (``<Name>.inter``,
    the folder's only .inter file unless ``dataset`` names the stem), then
    ``txt_emb.pt``, ``img_emb.pt`` and ``cat.pt``.

    Raises DataError naming the folder and what is missing.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; expected the HM4SR authors' dataset/<Name>/ folder")
    inter_path, _ = locate_inter(folder, dataset)
    missing = [f for f in (*FEATURE_FILES.values(), CATEGORY_FILE) if not (folder / f).is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir())
        raise DataError(f"{folder}: missing {missing}; the authors' folder holds {inter_path.name}, "
                        f"txt_emb.pt, img_emb.pt and cat.pt; found {found}")
    return {"inter": inter_path, **{f: folder / f for f in (*FEATURE_FILES.values(), CATEGORY_FILE)}}


def read_hm4sr_folder(path: str | Path, dataset: str | None = None, *, name: str | None = None) -> RawDataset:
    """Read the authors' processed folder into a :class:`RawDataset`.

    ``path``: the ``dataset/<Name>/`` folder; ``dataset``: the ``<Name>`` stem of its
    ``.inter`` file, needed only when the folder holds several; ``name``: the
    dataset's name, default :func:`default_name` of the stem. Returns interactions
    (file order), items (token, text = token, categories ``cat_<j>``) and the
    ``text`` / ``image`` modalities exactly as shipped (rows 1..N).
    Raises DataError on missing files, wrong row counts or non-finite values.
    """
    folder = Path(path)
    inter_path = input_files(folder, dataset)["inter"]

    interactions = read_inter(inter_path)
    tokens = first_appearance_order(interactions["item"])

    modalities = []
    for modality, file in FEATURE_FILES.items():
        matrix = _padded_matrix(folder / file, tokens, inter_path)
        provenance = {
            "encoder": AUTHORS_ENCODER,
            "dim": int(matrix.shape[1]),
            "file": str(folder / file),
            "row_alignment": ROW_ORDER,
            "synthetic": False,
        }
        modalities.append(RawModality(name=modality, provenance=provenance, features=matrix[1:],
                                      feature_items=tokens, source=str(folder / file)))

    cat_path = folder / CATEGORY_FILE
    multi_hot = _padded_matrix(cat_path, tokens, inter_path)
    negative = multi_hot < 0
    if negative.any():
        row, col = (int(v) for v in np.argwhere(negative)[0])
        raise DataError(f"{cat_path}: row {row}, column {col}: found {multi_hot[row, col]!r}; "
                        f"expected a multi-hot 0/1 matrix")
    names = category_names(multi_hot.shape[1])
    categories = [[names[j] for j in np.flatnonzero(row)] for row in multi_hot[1:]]
    items = pd.DataFrame({"item": tokens, "text": tokens, "categories": categories})

    source = {
        "reader": "hm4sr_core.data.readers.hm4sr_folder.read_hm4sr_folder",
        "format": "HM4SR authors' processed folder",
        "folder": str(folder),
        "dataset": inter_path.stem,
        "inter_file": str(inter_path),
        "feature_files": {m: str(folder / f) for m, f in FEATURE_FILES.items()},
        "category_file": str(cat_path),
        "category_columns": len(names),
        "ignored": [f for f in ("interval_num",) if (folder / f).exists()],
        "licence": "as distributed by the HM4SR authors (underlying Amazon review data: research use)",
    }
    return RawDataset(name=name or default_name(inter_path.stem), source=source, interactions=interactions, items=items,
                      modalities=modalities, interactions_file=str(inter_path))
