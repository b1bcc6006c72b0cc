"""Time RecBole 1.2.1's ``full_sort_topk`` for its SASRec over every test user; write JSON.

Runs INSIDE the peer environment (``.bench/recbole-venv``), started by
:func:`benchmarks.recommend_bench.peer_topk`. The dataset, the SASRec configuration and the
numpy-2 aliases are those of :mod:`benchmarks.recbole_runner` (the training peer). The model is
freshly initialised (speed does not depend on the weights) and in eval mode. One call ranks
every user of the test loader: ``full_sort_topk(uid_series, model, test_data, k=10)``, which
gathers each user's test history, runs ``SASRec.full_sort_predict`` over the whole catalogue,
masks padding and takes ``torch.topk``; one warm-up call, then the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recbole_runner, beside this file
from recbole_runner import _write_json_atomic, recbole_data  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    recbole, config, _cfg, (_train, _valid, test_data) = recbole_data(args, seed=2025, max_epochs=1)
    import torch
    from recbole.model.sequential_recommender.sasrec import SASRec
    from recbole.utils.case_study import full_sort_topk

    model = SASRec(config, test_data._dataset).eval()
    uid_field = test_data._dataset.uid_field
    users = torch.unique(test_data._dataset.inter_feat[uid_field]).numpy()
    with torch.no_grad():
        _, top = full_sort_topk(users, model, test_data, k=10)  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            full_sort_topk(users, model, test_data, k=10)
            times.append(time.perf_counter() - t)
    return {"recbole_version": recbole.__version__, "torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "users": int(len(users)), "k": int(top.shape[1]), "seconds_all": times,
            "seconds_median": statistics.median(times)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="folder holding <dataset>/<dataset>.inter")
    p.add_argument("--dataset", required=True, help="the atomic dataset's name")
    p.add_argument("--out", required=True, help="JSON file to write (atomically)")
    p.add_argument("--work-dir", required=True, help="RecBole's working folder")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up (default 5)")
    args = p.parse_args(argv)
    _write_json_atomic(Path(args.out), run(args))


if __name__ == "__main__":
    main()
