"""What a notebook's final cell records: named values, as one JSON file beside the
executed notebook (our replacement for the unmaintained scrapbook).

The tests and ``runs/<run-id>/manifest.json`` read these files, so values are made
plain JSON here once: numpy scalars and arrays become numbers and lists, DataFrames
become lists of row dicts, paths become strings, and a non-finite float becomes
``null`` (strict JSON has no NaN; a test that expects a number then fails loudly
rather than comparing against NaN).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data.store import write_json_atomic


def to_plain(value: Any) -> Any:
    """``value`` as plain JSON types (dict, list, str, int, float, bool, None).

    Raises TypeError naming the type when a value has no JSON form."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, pd.DataFrame):
        return [to_plain(row) for row in value.to_dict(orient="records")]
    if isinstance(value, pd.Series):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [to_plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_plain(v) for v in value]
    if hasattr(value, "to_dict"):  # config dataclasses
        return to_plain(value.to_dict())
    raise TypeError(f"cannot record a value of type {type(value).__name__}; "
                    f"convert it to numbers, strings, lists or dicts first")


def save_record(path: str | Path, **values: Any) -> Path:
    """Write ``values`` (name -> value) as JSON to ``path`` atomically; return the path.

    A notebook's last cell calls this once, e.g.
    ``save_record(output_dir / "02_train.json", test=result.test.metrics, ...)``."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"{path}: a record is a .json file")
    write_json_atomic(path, to_plain(values))
    return path


def read_record(path: str | Path) -> dict:
    """The values a notebook recorded (what :func:`save_record` wrote)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no record; run the notebook that writes it first")
    with open(path) as f:
        return json.load(f)
