"""Serving export: a trained HM4SR (or SASRec) as an ONNX model (``hm4sr export``).

The exported graph takes a batch of histories as the model reads them (docs/model.md
section 1: item ids left-aligned with 0 as padding, timestamps in seconds, 0 at padding,
and each history's length) and returns either

* ``scores``: (batch, N+1) full-catalogue scores, column i = item id i, column 0
  (padding) = -inf; rank them as ``hm4sr recommend`` does (score descending, ties by the
  lower item id); or
* ``query``: (batch, S*d) query vectors; the item side is written beside the model as
  ``item_table.npy`` ((N+1, S*d) float32), and score = query @ item_table.T (late fusion:
  the slices of width d are the streams, in ``export.json``'s ``streams`` order).

Batch and history length are dynamic: from :data:`MIN_WIDTH` columns (a shorter history
is padded with zeros after its last item; ``lengths`` gives its real count) to the model's
``max_length`` (a longer history is cut to its last ``max_length`` items first). Like the model, the graph reads
only the times of the history, never the moment of the request.

The graph is obtained with ``torch.onnx.export(dynamo=True)`` on the model's stock
kernels (``HM4SR.use_cpu_kernels(False)``: the batched form the GPU runs, equal
to the CPU's stream-by-stream one up to float rounding, tests/test_kernels.py). onnx,
onnxscript and onnxruntime are an optional extra: ``pip install "hm4sr-workbench[onnx]"``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data.splits import SequenceBatch

OUTPUTS = ("scores", "query")
FORMATS = ("onnx",)
# Inputs are at least this many columns wide: a shorter history is padded with zeros (item 0,
# timestamp 0) after its last item, which changes nothing (``lengths`` gives the real count).
MIN_WIDTH = 3
EXTRA_HINT = 'pip install "hm4sr-workbench[onnx]" (onnx, onnxscript, onnxruntime)'


def _require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"ONNX export needs {', '.join(missing)}: {EXTRA_HINT}")


class ServingModel(nn.Module):
    """(items (B, T) int64, timestamps (B, T) int64, lengths (B,) int64) -> scores (B, N+1)
    or query (B, S*d), in eval mode, with the item side computed once and stored."""

    def __init__(self, model: nn.Module, output: str = "scores"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.model = model.eval()
        self.output = output
        with torch.no_grad():
            tables = model.item_tables().detach().clone()
        self.register_buffer("tables", tables)  # (N+1, S, d)
        self.register_buffer("padding", torch.arange(tables.shape[0]).view(1, -1) == 0)  # (1, N+1)

    def forward(self, items: torch.Tensor, timestamps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(lengths)
        query = self.model.encode(SequenceBatch(items, timestamps, lengths, zeros, zeros), self.tables).sequence
        if self.output == "query":
            return query  # (B, S*d)
        scores = query @ self.tables.reshape(self.tables.shape[0], -1).T  # (B, N+1)
        return scores.masked_fill(self.padding, float("-inf"))


@contextmanager
def _quiet_exporter():
    """The exporter's notes for other libraries (torchvision ops it skips) and its
    deprecation warnings stay out of the user's terminal; errors still raise."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        log.setLevel(level)


@contextmanager
def stock_kernels(model: nn.Module):
    """The model's batched forms (model.py) for the block, whatever the device; its own
    setting (``HM4SR.use_cpu_kernels``, kept alike in both modules) restored after."""
    saved = model.encoders.cpu_kernels
    model.use_cpu_kernels(False)
    try:
        yield
    finally:
        model.use_cpu_kernels(saved)


def export_onnx(model: nn.Module, dataset, out_dir: str | Path, *, output: str = "scores",
                overwrite: bool = False, metadata: dict | None = None) -> Path:
    """Write ``out_dir``/model.onnx, items.json (token, title, category per item id),
    export.json (inputs, outputs, streams, max_length, how to rank) and, for
    ``output="query"``, item_table.npy. The folder appears complete or not at all (written
    beside it, then renamed); an existing non-empty folder is refused unless ``overwrite``."""
    _require_onnx()
    if output not in OUTPUTS:
        raise ValueError(f"--output must be one of {OUTPUTS}, got {output!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ValueError(f"--out {out_dir}: exists and is not empty; choose another folder or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    serving = ServingModel(model, output).eval()
    T = int(model.config.max_length)
    if T < MIN_WIDTH:
        raise ValueError(f"ONNX export needs max_length >= {MIN_WIDTH}, this model has {T}")
    # A sample of batch 2 and MIN_WIDTH columns: sizes the exporter keeps symbolic (it
    # specialises on 0 and 1, and the gap of a 2-column input has one column).
    width = MIN_WIDTH
    sample = (torch.ones(2, width, dtype=torch.int64), torch.arange(2 * width, dtype=torch.int64).view(2, width) * 60,
              torch.full((2,), width, dtype=torch.int64))
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", min=MIN_WIDTH, max=T)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        with stock_kernels(model), _quiet_exporter(), torch.no_grad():
            # Strict tracing straight away: the non-strict mode torch.onnx tries first stops at the
            # Interactive MoE's torch.unique (a data-dependent size) and prints the graph it got.
            program = torch.export.export(serving, sample, strict=True, dynamic_shapes={
                "items": {0: batch, 1: length}, "timestamps": {0: batch, 1: length}, "lengths": {0: batch}})
            torch.onnx.export(program, sample, str(tmp / "model.onnx"), dynamo=True, verbose=False,
                              external_data=False, input_names=["items", "timestamps", "lengths"],
                              output_names=[output])
        items = dataset.items
        titles = items["title"] if "title" in items.columns else items["text"]
        (tmp / "items.json").write_text(json.dumps(
            [{"id": 0, "token": None, "title": None, "category": None}]
            + [{"id": int(i), "token": str(t), "title": str(x), "category": "|".join(c)}
               for i, t, x, c in zip(items["item"], items["token"], titles, items["categories"])], indent=1))
        if output == "query":
            np.save(tmp / "item_table.npy", serving.tables.reshape(serving.tables.shape[0], -1).numpy())
        (tmp / "export.json").write_text(json.dumps({
            "format": "onnx", "output": output, "streams": list(model.stream_names),
            "hidden_size": int(model.config.hidden_size), "max_length": T, "num_items": int(model.num_items),
            "inputs": {"items": f"(batch, length) int64 item ids, oldest first, left-aligned, 0 = padding; "
                                f"{MIN_WIDTH} <= length <= max_length columns (pad a shorter history with zeros)",
                       "timestamps": "(batch, length) int64 Unix seconds of each item, 0 at padding",
                       "lengths": "(batch,) int64 number of real items, 1..max_length"},
            "outputs": {"scores": "(batch, N+1) float32, column i = item id i, column 0 = -inf",
                        "query": "(batch, S*d) float32; score = query @ item_table.T"}[output],
            "ranking": "score descending, ties by the lower item id (as hm4sr recommend and evaluate)",
            "time": "only the times of the history are read, never the moment of the request",
            **(metadata or {})}, indent=2))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def onnx_session(folder: str | Path):
    """An onnxruntime InferenceSession of ``folder``/model.onnx (CPU)."""
    _require_onnx()
    import onnxruntime
    return onnxruntime.InferenceSession(str(Path(folder) / "model.onnx"), providers=["CPUExecutionProvider"])
