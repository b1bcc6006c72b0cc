"""bf16 autocast against float32 on this CPU, interleaved in one process.

A training step in prefix mode (batch 1024, the paper's layout, uniformly random batches), or
with ``--mode dense`` in dense mode (32 windows, length-bucketed as in training), and
an evaluation of the validation users, each timed in float32 and under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (what ``--set amp=true`` does in training),
alternating so that both see the same load on a shared host. Prints the medians and their ratio.
Accuracy is not measured here (that needs full trainings over several seeds).

    python -m benchmarks.amp_step                 # 1 thread, 3 rounds
    python -m benchmarks.amp_step --threads 2 --rounds 5
    python -m benchmarks.amp_step --mode dense --steps 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hm4sr_core.config import ModelConfig, SplitConfig, TrainConfig
from hm4sr_core.data.splits import build_split, iterate_batches
from hm4sr_core.data.store import load_dataset
from hm4sr_core.evaluate import evaluate
from hm4sr_core.model import build_model
from hm4sr_core.sampling import StepSampler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml-100k", help="prepared dataset (default ml-100k)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (fp32, bf16) pairs (default 3)")
    p.add_argument("--steps", type=int, default=2, help="training steps per precision and round (default 2)")
    p.add_argument("--mode", choices=("prefix", "dense"), default="prefix",
                   help="training layout of the timed steps (default prefix: batch 1024; dense: 32 windows)")
    args = p.parse_args(argv)
    if args.rounds < 2 or args.steps < 1:
        p.error("--rounds must be >= 2 (the first is a warm-up) and --steps >= 1")

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    split = build_split(ds, SplitConfig())
    torch.manual_seed(2025)
    model = build_model(ModelConfig(), ds)
    sampler = StepSampler.for_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    size, bucket = (TrainConfig().batch_size, False) if args.mode == "prefix" else (TrainConfig().dense_batch_size, True)
    batches = [b for _, b in zip(range(args.steps), iterate_batches(split.train(args.mode), size, shuffle=True,
                                                                     generator=gen, bucket=bucket))]
    step = {False: [], True: []}
    ev = {False: [], True: []}
    for r in range(args.rounds):
        for amp in (False, True):
            model.train()
            for batch in batches:
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    out = model(batch, sampler(batch, gen))
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                if r:  # round 0 warms up
                    step[amp].append(time.perf_counter() - t0)
            model.eval()
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                evaluate(model, split.valid, TrainConfig())
            if r:
                ev[amp].append(time.perf_counter() - t0)
    for name, table in ((f"training step ({args.mode}, batch {size})", step), ("evaluation (validation users)", ev)):
        f32, b16 = statistics.median(table[False]), statistics.median(table[True])
        print(f"{name}: float32 median {f32:.3f} s, bf16 autocast median {b16:.3f} s, ratio {b16 / f32:.3f} "
              f"({len(table[False])} timings each, {args.threads} thread(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
