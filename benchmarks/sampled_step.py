"""Seconds per training step, full vs sampled softmax, as the catalogue grows.

A random catalogue of N items with one 64-d feature modality and 5 categories, the
full HM4SR model at d = 64 (every loss on), prefix-mode batches of B random sequences
of length T; one step is forward, backward and Adam. The full softmax projects and
scores all N+1 items every step; the sampled one (``rec_loss="sampled"``) only the
batch's items and K negatives. Both configurations see the same batches and their
steps alternate (ABBA), so drift on a shared machine hits both alike.

    python -m benchmarks.sampled_step --items 10000,200000,1000000 --negatives 1024

Prints one line per N: the median seconds of each and the item-table rows a sampled
step computed (the union of inputs, targets and negatives).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hm4sr_core.config import ModelConfig
from hm4sr_core.data.splits import SequenceBatch
from hm4sr_core.model import HM4SR
from hm4sr_core.sampling import StepSampler


def _model(num_items: int, rec: str, negatives: int, seed: int) -> HM4SR:
    torch.manual_seed(seed)
    feats = torch.randn(num_items + 1, 64)
    feats[0] = 0.0
    avail = torch.ones(num_items + 1)
    avail[0] = 0.0
    cats = (torch.rand(num_items + 1, 5) < 0.3).float()
    config = ModelConfig(rec_loss=rec, num_negatives=negatives)
    return HM4SR(config, num_items, {"text": feats}, {"text": avail}, cats, 0.0).train()


def _batch(num_items: int, B: int, T: int, g: torch.Generator) -> SequenceBatch:
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    pos = torch.arange(T).view(1, T)
    pad = pos >= lengths.view(B, 1)
    items = torch.randint(1, num_items + 1, (B, T), generator=g).masked_fill(pad, 0)
    stamps = (pos * 3600 + 1_000_000).expand(B, T).masked_fill(pad, 0)
    return SequenceBatch(items, stamps, lengths, torch.randint(1, num_items + 1, (B,), generator=g), torch.arange(B))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="10000,200000", help="comma-separated catalogue sizes N")
    p.add_argument("--negatives", type=int, default=1024, help="K of the sampled softmax")
    p.add_argument("--batch", type=int, default=256, help="sequences per step")
    p.add_argument("--length", type=int, default=50, help="T")
    p.add_argument("--repeats", type=int, default=4, help="ABBA rounds (each: 2 steps of each)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for N in (int(x) for x in args.items.split(",") if x.strip()):
        models = {rec: _model(N, rec, args.negatives, 0) for rec in ("full", "sampled")}
        samplers = {rec: StepSampler.for_model(m) for rec, m in models.items()}
        opts = {rec: torch.optim.Adam(m.parameters(), lr=1e-3) for rec, m in models.items()}
        g, draws = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        times: dict[str, list[float]] = {"full": [], "sampled": []}
        rows = []
        original = models["sampled"].item_tables

        def counting(ids=None):
            out = original(ids)
            rows.append(out.shape[0])
            return out

        models["sampled"].item_tables = counting
        for r in range(args.repeats + 1):  # round 0 warms up and is not counted
            batch = _batch(N, args.batch, args.length, g)
            for rec in ("full", "sampled", "sampled", "full"):
                t0 = time.perf_counter()
                out = models[rec](batch, samplers[rec](batch, draws))
                opts[rec].zero_grad(set_to_none=True)
                out.loss.backward()
                opts[rec].step()
                if r:
                    times[rec].append(time.perf_counter() - t0)
        full, sampled = statistics.median(times["full"]), statistics.median(times["sampled"])
        print(f"N={N:>9,}  full {full:7.3f} s/step  sampled(K={args.negatives}) {sampled:7.3f} s/step  "
              f"ratio {full / sampled:5.1f}  sampled item rows {statistics.median(rows):,.0f} of {N + 1:,}",
              flush=True)


if __name__ == "__main__":
    main()
