"""What every introspection table shares: eval mode for the forward passes, the
model's device, the split parts by name, and the item lookup (titles, categories)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pandas as pd
import torch

from ..config import SplitConfig
from ..data.schema import Dataset
from ..data.splits import SplitPart, build_split
from ..data.timeunits import SECONDS_PER_DAY

PART_NAMES = ("test", "valid", "train")
TIME_MODES = ("real", "shuffled", "zeroed")


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off and no autograd for the block; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def resolve_part(dataset: Dataset, part, max_length: int) -> SplitPart:
    """A SplitPart as given, or one of ``PART_NAMES`` of a leave-one-out split of ``dataset``
    ("train" = the dense training windows: whole training sequences, one or more per user)."""
    if isinstance(part, SplitPart):
        return part
    if isinstance(part, str) and part in PART_NAMES:
        split = build_split(dataset, SplitConfig(max_length=max_length))
        return split.train_dense if part == "train" else getattr(split, part)
    raise ValueError(f"part must be a SplitPart or one of {PART_NAMES}, got {part!r}")


def item_lookup(dataset: Dataset) -> pd.DataFrame:
    """(N+1,) rows indexed by item id (row 0 = padding): token, title, first category name.

    Strings are categoricals so the long gate tables stay small."""
    items = dataset.items
    titles = items["title"] if "title" in items.columns else items["text"]
    first = [c[0] if len(c) else "(none)" for c in items["categories"]]
    frame = pd.DataFrame({
        "item_token": ["<pad>"] + items["token"].astype(str).tolist(),
        "title": ["<pad>"] + titles.astype(str).tolist(),
        "category": ["<pad>"] + first,
    })
    return frame.astype("category")
