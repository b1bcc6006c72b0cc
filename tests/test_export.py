"""Tests for hm4sr_core.export and ``hm4sr export``: the ONNX model, run in onnxruntime,
ranks every test user of the synthetic world as PyTorch does, at any batch size and
history length; the query form with its item table gives the same scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hm4sr_core import recommend as rec
from hm4sr_core.cli import main
from hm4sr_core.config import SplitConfig
from hm4sr_core.data.splits import build_split, iterate_batches

from conftest import TINY_T

pytest.importorskip("onnxruntime", reason='the onnx extra: pip install "hm4sr-workbench[onnx]"')
pytest.importorskip("onnxscript", reason='the onnx extra: pip install "hm4sr-workbench[onnx]"')
from hm4sr_core.export import export_onnx, onnx_session  # noqa: E402

EPS32 = float(torch.finfo(torch.float32).eps)


@pytest.fixture(scope="module")
def exported(tiny_run, tiny_ds, tmp_path_factory):
    model = tiny_run[0].model.eval()
    folder = export_onnx(model, tiny_ds, tmp_path_factory.mktemp("onnx") / "scores")
    return model, folder


def _bound(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(B, N) rounding bound of two float32 dot products of K terms differing: 2 K eps |q| |v|
    (each within K eps sum |q_i v_i| <= K eps |q| |v| of the exact value). The two runtimes'
    queries differ by the encoder's own rounding too, far below this at these sizes (about
    1e-6 against 1e-4 here); a wrong graph moves scores by orders of magnitude more."""
    return 2 * q.shape[1] * EPS32 * np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(v, axis=1)[None, :]


def _top10(scores: np.ndarray) -> np.ndarray:
    """Score descending, ties by the lower item id (column 0, padding, is -inf)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def test_onnxruntime_ranks_every_test_user_as_pytorch(exported, tiny_ds):
    model, folder = exported
    session = onnx_session(folder)
    test = build_split(tiny_ds, SplitConfig(max_length=TINY_T)).test
    want = rec.recommend(model, tiny_ds, at="test", k=10, split_config=SplitConfig(max_length=TINY_T))
    want = want["item_id"].to_numpy().reshape(-1, 10)
    item_matrix = model.item_matrix().detach().double()
    got_lists, exacts, bounds, n_seen = [], [], [], 0
    # Dynamic batch and length: batches of 7 users, each trimmed to its own longest history.
    for batch in iterate_batches(test, 7):
        scores = session.run(None, {"items": batch.items.numpy(), "timestamps": batch.timestamps.numpy(),
                                    "lengths": batch.lengths.numpy()})[0]
        assert scores.shape == (batch.size, tiny_ds.num_items + 1) and np.isneginf(scores[:, 0]).all()
        with torch.no_grad():
            q = model.query(batch).double()
        exact = (q @ item_matrix.T).numpy()
        # Both float32 dot products of K terms are within K * eps * |q| |v| of the float64 value.
        bound = q.shape[1] * EPS32 * q.norm(dim=1, keepdim=True).numpy() * item_matrix.norm(dim=1).numpy()[None, :]
        assert np.all(np.abs(scores[:, 1:] - exact[:, 1:]) <= 2 * bound[:, 1:])
        got_lists.append(_top10(scores))
        exacts.append(exact)
        bounds.append(bound)
        n_seen += batch.size
    got = np.concatenate(got_lists)
    assert n_seen == len(test) == len(want)
    # The same top-10 for every test user, but for swaps between two items whose exact scores lie
    # within the rounding bound of each other (none on this world, on the CPUs seen so far)
    exact, bound, rows = np.concatenate(exacts), np.concatenate(bounds), np.arange(len(got))[:, None]
    swapped = got != want
    assert np.all(np.abs(exact[rows, got] - exact[rows, want])[swapped]
                  <= 2 * (bound[rows, got] + bound[rows, want])[swapped])
    assert swapped.any(axis=1).mean() <= 0.1


def test_query_output_with_its_item_table(exported, tiny_ds, tmp_path):
    model, scores_folder = exported
    folder = export_onnx(model, tiny_ds, tmp_path / "query", output="query")
    meta = json.loads((folder / "export.json").read_text())
    assert meta["output"] == "query" and meta["streams"] == ["id", "text", "image"] and meta["max_length"] == TINY_T
    items = json.loads((folder / "items.json").read_text())
    assert len(items) == tiny_ds.num_items + 1 and items[1]["token"] == str(tiny_ds.items["token"].iloc[0])
    table = np.load(folder / "item_table.npy")
    history = rec.user_history(tiny_ds, "u3").last(TINY_T)
    feed = {"items": history.items[None], "timestamps": history.timestamps[None],
            "lengths": np.array([len(history)], dtype=np.int64)}
    query = onnx_session(folder).run(None, feed)[0]
    scores = onnx_session(scores_folder).run(None, feed)[0]
    assert query.shape == (1, table.shape[1])
    assert np.all(np.abs((query @ table.T)[0, 1:] - scores[0, 1:]) <= _bound(query, table[1:])[0])
    # A history of two items, padded with zeros to the graph's minimum width of 3 columns.
    short = rec.History(history.items[-2:], history.timestamps[-2:])
    padded = {"items": np.pad(short.items, (0, 1))[None], "timestamps": np.pad(short.timestamps, (0, 1))[None],
              "lengths": np.array([2], dtype=np.int64)}
    got = onnx_session(scores_folder).run(None, padded)[0]
    with torch.no_grad():
        q = model.query(rec._batch([short], TINY_T)).numpy()
    want = q.astype(np.float64) @ table[1:].astype(np.float64).T
    assert np.all(np.abs(got[0, 1:] - want[0]) <= _bound(q, table[1:])[0])


def test_cli_export_and_refusals(exported, tmp_path, capsys):
    model, _ = exported
    code = main(["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "x")])
    assert code == 2 and "no such run folder or checkpoint" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_onnx(model, None, busy)
    assert (busy / "keep.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
