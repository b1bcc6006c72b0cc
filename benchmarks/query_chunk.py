"""How the query chunk of evaluation and `hm4sr recommend` moves their time (issue 27).

Both compute the queries of a batch with :func:`hm4sr_core.evaluate.query_by_length`, which
encodes ``chunk`` length-sorted sequences at a time (``evaluate.QUERY_CHUNK``, 256). This times
it on the 943 ml-100k test histories with freshly initialised HM4SR (the time does not depend on
the weights), 2 threads, for several chunk sizes, interleaved round by round so that a change of
the machine's load falls on every size alike; prints the median and every time per size.

    python -m benchmarks.query_chunk                    # chunks 256 512 1024, 10 rounds
    python -m benchmarks.query_chunk --chunks 128 256 2048 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hm4sr_core.config import ModelConfig, SplitConfig
from hm4sr_core.data.prepare import prepared_dataset
from hm4sr_core.data.splits import build_split, iterate_batches
from hm4sr_core.evaluate import query_by_length
from hm4sr_core.train import initial_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024], help="chunk sizes (default 256 512 1024)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds, each size once per round (default 10)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the bench's)")
    args = p.parse_args()
    if args.rounds < 1 or args.threads < 1 or min(args.chunks) < 1:
        p.error("--rounds, --threads and every chunk must be >= 1")
    torch.set_num_threads(args.threads)
    ds, _ = prepared_dataset("ml-100k", "ml-100k")
    model = initial_model(ds, ModelConfig(), 2025).eval()
    batch = next(iterate_batches(build_split(ds, SplitConfig()).test, 2048))
    with torch.no_grad():
        tables = model.item_tables()
        for chunk in args.chunks:  # warm-up
            query_by_length(model, batch, chunk=chunk, tables=tables)
        times: dict[int, list[float]] = {c: [] for c in args.chunks}
        for _ in range(args.rounds):
            for chunk in args.chunks:
                t = time.perf_counter()
                query_by_length(model, batch, chunk=chunk, tables=tables)
                times[chunk].append(time.perf_counter() - t)
    print(json.dumps({"users": batch.size, "threads": args.threads,
                      "seconds_median": {c: statistics.median(v) for c, v in times.items()},
                      "seconds_all": times}, indent=1))


if __name__ == "__main__":
    main()
