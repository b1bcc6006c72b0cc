"""hm4sr_core.record: what a notebook's last cell writes, as plain JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hm4sr_core.config import TrainConfig
from hm4sr_core.record import read_record, save_record, to_plain


def test_to_plain_makes_json_values():
    frame = pd.DataFrame({"task": ["rec", "category"], "share": [np.float32(0.75), 0.25]})
    value = {"n": np.int64(3), "flag": np.bool_(True), "x": np.float64(0.5), "nan": float("nan"),
             "inf": np.float32("inf"), "path": Path("/a/b"), "array": np.arange(3), "frame": frame,
             "series": pd.Series({"a": 1.0}), "tuple": (1, 2), 7: "int key", "config": TrainConfig(epochs=2)}
    plain = to_plain(value)
    assert plain["n"] == 3 and type(plain["n"]) is int and plain["flag"] is True
    assert plain["nan"] is None and plain["inf"] is None  # strict JSON has no NaN
    assert plain["path"] == "/a/b" and plain["array"] == [0, 1, 2] and plain["tuple"] == [1, 2]
    assert plain["frame"] == [{"task": "rec", "share": 0.75}, {"task": "category", "share": 0.25}]
    assert plain["series"] == {"a": 1.0} and plain["7"] == "int key" and plain["config"]["epochs"] == 2
    json.dumps(plain, allow_nan=False)
    with pytest.raises(TypeError, match="cannot record a value of type object"):
        to_plain({"bad": object()})


def test_save_and_read_a_record(tmp_path):
    path = save_record(tmp_path / "deep" / "02_train.json", test={"ndcg@10": np.float64(0.25)}, epochs=3)
    assert read_record(path) == {"test": {"ndcg@10": 0.25}, "epochs": 3}
    assert [p.name for p in path.parent.iterdir()] == ["02_train.json"]  # no temporary file left
    with pytest.raises(ValueError, match="a record is a .json file"):
        save_record(tmp_path / "record.txt", x=1)
    with pytest.raises(FileNotFoundError, match="run the notebook that writes it first"):
        read_record(tmp_path / "missing.json")
