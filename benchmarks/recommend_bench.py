"""The bench's ``recommend`` parts (issue 27): how fast `hm4sr recommend` lists the top-10 of
every ml-100k user, against RecBole 1.2.1's ``full_sort_topk`` for its SASRec on the same
data and threads in the same run, and how much memory ``--all`` takes over a 10^6-item
catalogue.

* ``recommend``: our side times :func:`hm4sr_core.recommend.recommend` (``at="test"``: each
  user's history without the test item, what RecBole's test loader holds; the DataFrame
  with titles and per-stream parts included) for HM4SR and our SASRec; the peer's side
  (``benchmarks/recbole_topk_runner.py`` in ``.bench/recbole-venv``) times
  ``recbole.utils.case_study.full_sort_topk(all test users, SASRec, test_data, k=10)``.
  Speed does not depend on the weights, so both sides rank with freshly initialised models
  (no training: this part takes about a minute). Medians of ``REPEATS`` calls after one
  warm-up, 2 threads each. ``hm4sr_recommend_vs_recbole_sasrec`` = ours / theirs.
* ``recommend_1m``: peak RSS of one process that ranks every ml-100k user (``at="end"``)
  against a synthetic 1,000,000-item catalogue (HM4SR, text and image streams of random
  64-d features, items with tokens, titles and categories) and writes the parquet file, as
  `hm4sr recommend --all --out` does.

    python -m benchmarks.run --only recommend       # one part, as JSON
    python -m benchmarks.run --only recommend_1m
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().with_name("recbole_topk_runner.py")
REPEATS = 5
THREADS = 2
CATALOGUE_1M = 1_000_000


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median_seconds(fn, repeats: int = REPEATS) -> tuple[float, list[float]]:
    fn()  # warm-up: first-call allocations and lazily built split parts
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def peer_topk(ds, name: str, *, threads: int = THREADS, repeats: int = REPEATS) -> dict:
    """RecBole's full_sort_topk timings from the peer environment (installed on first use by
    benchmarks.recbole_peer); ``recbole_sasrec_topk_skipped`` says why when it cannot run."""
    from benchmarks import recbole_peer
    try:
        py = recbole_peer.ensure_env()
        recbole_peer.write_atomic_inter(ds.interactions, recbole_peer.ATOMIC_PREFIX + name)
    except recbole_peer.PeerUnavailable as err:
        return {"recbole_sasrec_topk_skipped": str(err)}
    out = Path(tempfile.mkdtemp(prefix="topk-")) / "result.json"
    cmd = [str(py), str(RUNNER), "--data-path", str(recbole_peer.DATA_DIR), "--dataset",
           recbole_peer.ATOMIC_PREFIX + name, "--out", str(out), "--work-dir", str(recbole_peer.WORK_DIR),
           "--threads", str(threads), "--repeats", str(repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0 or not out.exists():
        return {"recbole_sasrec_topk_skipped": f"runner failed (exit {done.returncode}): {done.stderr[-1500:]}"}
    record = json.loads(out.read_text())
    return {"recbole_sasrec_topk_seconds": record["seconds_median"], "recbole_sasrec_topk_seconds_all": record["seconds_all"],
            "recbole_sasrec_topk_users": record["users"], "recbole_version": record["recbole_version"]}


def part_recommend(ds, name: str = "ml-100k") -> dict:
    """Top-10 of every test user: HM4SR and our SASRec through hm4sr_core.recommend, RecBole's
    SASRec through full_sort_topk, in this run."""
    from hm4sr_core import recommend as rec
    from hm4sr_core.config import ModelConfig, SplitConfig, TrainConfig
    from hm4sr_core.train import initial_model
    torch.set_num_threads(THREADS)
    out: dict = {}
    split = SplitConfig(max_length=50)
    batch = TrainConfig().eval_batch_size
    for key, cfg in (("hm4sr", ModelConfig()), ("sasrec", ModelConfig.sasrec())):
        model = initial_model(ds, cfg, 2025).eval()
        users = len(rec.recommend(model, ds, k=10, at="test", split_config=split, batch_size=batch)) // 10
        median, times = _median_seconds(lambda: rec.recommend(model, ds, k=10, at="test", split_config=split,
                                                               batch_size=batch))
        prefix = "" if key == "hm4sr" else "sasrec_"
        out.update({f"{prefix}recommend_top10_seconds": median, f"{prefix}recommend_top10_seconds_all": times,
                    f"{prefix}recommend_users": users})
    out.update(peer_topk(ds, name))
    theirs = out.get("recbole_sasrec_topk_seconds")
    out["hm4sr_recommend_vs_recbole_sasrec"] = out["recommend_top10_seconds"] / theirs if theirs else None
    out["sasrec_recommend_vs_recbole_sasrec"] = out["sasrec_recommend_top10_seconds"] / theirs if theirs else None
    return out


def catalogue_1m(ds, n_items: int = CATALOGUE_1M, seed: int = 0):
    """(model, dataset): HM4SR over ``n_items`` items with random 64-d text and image
    features, and ``ds``'s users whose item ids are mapped onto random items of it."""
    import dataclasses

    import pandas as pd

    from hm4sr_core.config import ModelConfig
    from hm4sr_core.model import HM4SR
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n_items + 1, 64, generator=g) for m in ("text", "image")}
    avail = {m: torch.ones(n_items + 1) for m in feats}
    model = HM4SR(ModelConfig(), n_items, feats, avail, torch.zeros(n_items + 1, 0),
                  float(ds.stats["first_timestamp"])).eval()
    ids = np.arange(1, n_items + 1)
    items = pd.DataFrame({"item": ids, "token": [f"i{i}" for i in ids], "text": [f"item {i}" for i in ids],
                          "categories": [("c",)] * n_items})
    remap = torch.randperm(n_items, generator=g).numpy()[: ds.num_items + 1] + 1
    remap[0] = 0
    inter = ds.interactions.assign(item=remap[ds.interactions["item"].to_numpy()])
    return model, dataclasses.replace(ds, items=items, interactions=inter)


def part_recommend_1m(ds) -> dict:
    """Peak RSS of --all over a 10^6-item catalogue, written as parquet."""
    from hm4sr_core import recommend as rec
    torch.set_num_threads(THREADS)
    model, big = catalogue_1m(ds)
    rss_before = _peak_rss_mb()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        frame = rec.recommend(model, big, k=10, at="end")
        rec.write_table(frame, Path(tmp) / "recs.parquet")
    return {"recommend_1m_seconds": time.perf_counter() - t, "recommend_1m_users": int(frame["user"].nunique()),
            "recommend_1m_peak_rss_mb": _peak_rss_mb(), "recommend_1m_rss_before_ranking_mb": rss_before}


if __name__ == "__main__":
    sys.exit("run it through benchmarks.run: python -m benchmarks.run --only recommend")
