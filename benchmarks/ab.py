"""A/B timing of hm4sr_core/model.py against the same file at another git revision.

Timings on shared machines drift by tens of percent within minutes, so a change is
judged by a ratio measured in one process: both models get the same weights and the
same batches, and their runs alternate (ABBA order). Two parts:

- ``step``: prefix-mode training steps (forward, backward, Adam) on ml-100k batches of
  1024 prefixes, length-bucketed as in training (``--mode dense``: dense-mode steps of 32
  windows, the default training layout);
- ``eval``: full ranking of ml-100k's 943 test users.

    python -m benchmarks.ab --rev 6723202             # both parts, 2 threads
    python -m benchmarks.ab --rev HEAD~3 --part eval --repeats 15
    python -m benchmarks.ab --rev HEAD~1 --part step --mode dense --batches 12

Only model.py and kernels.py (the execution paths, where the revision has the file) are
swapped: the data, split, evaluation and training code are this checkout's, so the old
files must still fit them (true across pure speed changes).
Prints per-run seconds, medians and the median of the paired ratios (new / old).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hm4sr_core import model as new_module
from hm4sr_core.config import ModelConfig, SplitConfig, TrainConfig
from hm4sr_core.data.splits import build_split, iterate_batches
from hm4sr_core.data.store import load_dataset
from hm4sr_core.evaluate import evaluate
from hm4sr_core.sampling import StepSampler

ROOT = Path(__file__).resolve().parent.parent


def _show(rev: str, path: str) -> str | None:
    """The text of ``path`` at ``rev``, or None when the revision has no such file."""
    done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def _load(name: str, text: str):
    """``text`` imported as the module hm4sr_core.``name`` (relative imports resolve inside hm4sr_core)."""
    with tempfile.TemporaryDirectory(prefix="hm4sr-ab-") as folder:  # read once, at import
        path = Path(folder) / f"{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"hm4sr_core.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def old_model_module(rev: str):
    """hm4sr_core/model.py as of ``rev``, imported as hm4sr_core._model_ab; with the
    kernels.py of the same revision where it has one (hm4sr_core._kernels_ab)."""
    text = _show(rev, "hm4sr_core/model.py")
    if text is None:
        raise SystemExit(f"git show {rev}:hm4sr_core/model.py failed")
    kernels = _show(rev, "hm4sr_core/kernels.py")
    if kernels is not None:
        _load("_kernels_ab", kernels)
        text = text.replace("from . import kernels\n", "from . import _kernels_ab as kernels\n")
    return _load("_model_ab", text)


def _pairs(n: int, run_old, run_new) -> tuple[list[float], list[float]]:
    old, new = [], []
    for i in range(n):
        order = ((old, run_old), (new, run_new)) if i % 2 == 0 else ((new, run_new), (old, run_old))
        for out, fn in order:
            t = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - t)
    return old, new


def _report(name: str, old: list[float], new: list[float], unit: str = "s") -> dict:
    ratios = [b / a for a, b in zip(old, new)]
    result = {"old_median": statistics.median(old), "new_median": statistics.median(new),
              "ratio_median": statistics.median(ratios), "old_all": old, "new_all": new}
    print(f"{name}: old {result['old_median']:.3f} {unit}, new {result['new_median']:.3f} {unit} (medians of "
          f"{len(old)}); new / old {result['ratio_median']:.3f} (median of paired ratios)")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="git revision whose model.py is the baseline (e.g. 6723202)")
    p.add_argument("--part", choices=("step", "eval", "both"), default="both", help="what to time (default both)")
    p.add_argument("--batches", type=int, default=10, help="batches per step round (default 10)")
    p.add_argument("--mode", choices=("prefix", "dense"), default="prefix",
                   help="layout of the timed training steps (default prefix: 1024 prefixes; dense: 32 windows)")
    p.add_argument("--repeats", type=int, default=9, help="evaluation repeats per model (default 9)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args()


    old_module = old_model_module(args.rev)
    torch.set_num_threads(args.threads)
    ds = load_dataset("ml-100k")
    config = ModelConfig()
    split = build_split(ds, SplitConfig(max_length=config.max_length))
    torch.manual_seed(0)
    old = old_module.build_model(config, ds)
    new = new_module.build_model(config, ds)
    try:
        new.load_state_dict(old.state_dict())
    except RuntimeError as err:
        raise SystemExit(f"the models at {args.rev} and here have different parameters, so they cannot share "
                         f"weights; pick a revision with the same parameter layout.\n{err}") from None
    print(f"baseline: model.py at {args.rev}; new: this checkout; {args.threads} threads")

    if args.part in ("eval", "both"):
        cfg = TrainConfig()
        a, b = evaluate(old, split.test, cfg), evaluate(new, split.test, cfg)  # warm-up, and a check
        gap = max(abs(a.metrics[k] - b.metrics[k]) for k in a.metrics)
        print(f"eval: largest metric difference between the two models {gap:.2e}")
        o, n = _pairs(args.repeats, lambda i: evaluate(old, split.test, cfg), lambda i: evaluate(new, split.test, cfg))
        r = _report("eval (943 test users)", o, n)
        print(f"eval: old {len(split.test) / r['old_median']:.0f} users/s, new {len(split.test) / r['new_median']:.0f} users/s")

    if args.part in ("step", "both"):
        gen = torch.Generator().manual_seed(1)
        batches = []
        size = TrainConfig().batch_size if args.mode == "prefix" else TrainConfig().dense_batch_size
        for batch in iterate_batches(split.train(args.mode), size, shuffle=True, generator=gen, bucket=True):
            batches.append(batch)
            if len(batches) == args.batches:
                break
        opts = {id(m): torch.optim.Adam(m.parameters(), lr=1e-3) for m in (old, new)}

        def step(model, i):
            model.train()
            batch, gen = batches[i % len(batches)], torch.Generator().manual_seed(i)
            if "draws" in inspect.signature(model.forward).parameters:  # draws handed in (issue 29 on)
                out = model(batch, StepSampler.for_model(model)(batch, gen))
            else:  # a revision whose model drew them itself
                out = model(batch, losses=True, generator=gen)
            opt = opts[id(model)]
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        step(old, 0), step(new, 0)  # warm-up (first-touch memory)
        o, n = _pairs(2 * len(batches), lambda i: step(old, i), lambda i: step(new, i))
        _report(f"{args.mode} training step (batch {size}, widths {[b.items.shape[1] for b in batches]})", o, n)


if __name__ == "__main__":
    main()
