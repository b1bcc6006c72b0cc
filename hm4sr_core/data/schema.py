"""The canonical shapes data takes in the workbench.

Readers turn files into a :class:`RawDataset` (original string tokens, unfiltered);
:func:`hm4sr_core.data.preprocess.preprocess` turns that into a :class:`Dataset`
(dense integer ids, k-core filtered, features row-aligned with item ids, row 0 =
padding). Everything downstream (splits, model, notebooks) sees only ``Dataset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd


class DataError(ValueError):
    """Bad input. The message names the file, the row or column, and what was expected."""


# An encoder turns the surviving item table (columns ``item``, ``text``, ``categories``
# plus reader-specific extras) into (features (n, D) float32, available (n,) bool).
ItemEncoder = Callable[[pd.DataFrame], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class RawModality:
    """One feature modality as a reader found it.

    Either ``features`` + ``feature_items`` (precomputed, e.g. read from a file) or
    ``encoder`` (computed after filtering, so only surviving items are encoded).
    """

    name: str  # "text", "image", ...: becomes the stream's name in the model
    provenance: dict  # encoder, dimension, how the input was made, synthetic or not
    features: np.ndarray | None = None  # (n, D) float32, rows aligned with feature_items
    feature_items: np.ndarray | None = None  # (n,) item tokens (str)
    available: np.ndarray | None = None  # (n,) bool; None = all rows available
    encoder: ItemEncoder | None = None
    optional: bool = False  # items lacking it are masked instead of rejected
    source: str = ""  # file the features came from, for error messages

    def __post_init__(self) -> None:
        if (self.features is None) == (self.encoder is None):
            raise ValueError(f"modality {self.name!r}: give exactly one of features or encoder")
        if self.features is not None and self.feature_items is None:
            raise ValueError(f"modality {self.name!r}: features need feature_items")


@dataclass
class RawDataset:
    """What a reader returns: interactions and items keyed by their original tokens."""

    name: str
    source: dict  # reader, path, version, licence: recorded in the manifest
    interactions: pd.DataFrame  # user (str), item (str), timestamp (int64 seconds)
    items: pd.DataFrame  # item (str, unique), text (str), categories (list[str])
    modalities: list[RawModality] = field(default_factory=list)
    interactions_file: str = ""  # for error messages


@dataclass
class ModalityFeatures:
    """Features of one modality, row-aligned with item ids (row 0 = padding, zeros)."""

    features: np.ndarray  # (N+1, D) float32
    available: np.ndarray  # (N+1,) bool; row 0 False
    provenance: dict

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


@dataclass
class Dataset:
    """A preprocessed dataset: dense ids, filtered, sorted, ready for splitting.

    ``interactions`` is sorted by (user, timestamp, item): the item id breaks
    same-second ties, so the order is deterministic.
    """

    name: str
    interactions: pd.DataFrame  # user (int64, 0..U-1), item (int64, 1..N), timestamp (int64 s)
    items: pd.DataFrame  # item (1..N), token, text, categories (list[str]); row i-1 = item i
    user_tokens: np.ndarray  # (U,) original user tokens, index = user id
    category_names: list[str]
    categories: np.ndarray  # (N+1, C) float32 multi-hot, row 0 zeros
    modalities: dict[str, ModalityFeatures]
    preprocessing: dict  # the parameters that produced it
    source: dict
    stats: dict

    @property
    def num_items(self) -> int:
        """N: item ids run 1..N (0 is padding)."""
        return len(self.items)

    @property
    def num_users(self) -> int:
        return len(self.user_tokens)
