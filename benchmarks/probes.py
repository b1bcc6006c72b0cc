"""Small measurements quoted in the README's "Speed and memory" section (ml-100k, 2 threads).

    python -m benchmarks.probes parts-ab          # prefix steps in 1 part vs 4, alternating, one process
    python -m benchmarks.probes parts-memory      # peak RSS of wide prefix steps, 1 / 4 / 8 parts, 4 + recompute
    python -m benchmarks.probes attention         # attention block fwd+bwd as it is vs head by head (training)
    python -m benchmarks.probes gelu              # F.gelu against GELU written out with torch.erf

Timings drift on a shared host: each probe compares its variants inside one process and
reports medians or totals over alternating runs, never one figure against an older one.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _setup(batches: int, width: int | None = None):
    from hm4sr_core.config import ModelConfig, SplitConfig
    from hm4sr_core.data.splits import build_split, iterate_batches
    from hm4sr_core.data.store import load_dataset
    from hm4sr_core.model import build_model
    torch.set_num_threads(2)
    ds = load_dataset("ml-100k")
    split = build_split(ds, SplitConfig())
    torch.manual_seed(0)
    model = build_model(ModelConfig(), ds).train()
    gen = torch.Generator().manual_seed(1)
    chosen = [b for b in iterate_batches(split.train("prefix"), 1024, shuffle=True, generator=gen, bucket=True)
              if width is None or b.items.shape[1] == width][:batches]
    return model, chosen, torch.optim.Adam(model.parameters(), lr=1e-3)


def _step(model, opt, batch, parts: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt.zero_grad(set_to_none=True)
    if parts > 1:
        model.backward_in_parts(batch, parts, introspect=True, generator=gen)
    else:
        model(batch, losses=True, introspect=True, generator=gen).loss.backward()
    opt.step()


def parts_ab(args) -> dict:
    """Total seconds of the same prefix batches in one part and in ``--parts``, alternating."""
    model, batches, opt = _setup(args.batches)
    total = {1: 0.0, args.parts: 0.0}
    for i, b in enumerate(batches):
        for k in ((1, args.parts) if i % 2 else (args.parts, 1)):
            t = time.perf_counter()
            _step(model, opt, b, k, i)
            total[k] += time.perf_counter() - t
    return {"batch_widths": [b.items.shape[1] for b in batches], "seconds_one_part": total[1],
            f"seconds_{args.parts}_parts": total[args.parts], "ratio": total[args.parts] / total[1]}


def parts_memory_one(args) -> dict:
    model, batches, opt = _setup(4, width=50)
    model.recompute_activations(args.recompute)
    times = []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        _step(model, opt, b, args.parts, i)
        times.append(time.perf_counter() - t)
    return {"parts": args.parts, "recompute": args.recompute, "step_seconds_median": statistics.median(times[1:]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def parts_memory(args) -> dict:
    """Each setting in a fresh process (its peak RSS its own): 4 batches of width 50."""
    out = []
    for parts, rec in ((1, False), (4, False), (8, False), (4, True)):
        cmd = [sys.executable, "-m", "benchmarks.probes", "parts-memory-one", "--parts", str(parts)]
        proc = subprocess.run(cmd + (["--recompute"] if rec else []), cwd=ROOT, capture_output=True, text=True,
                              check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"runs": out}


def attention(args) -> dict:
    """A prefix batch's attention block (QKV, scores, dropout, output projection), forward
    and backward: the layout the model uses against heads taken as strided views."""
    from hm4sr_core.kernels import dropout_mask, score_bias
    torch.set_num_threads(2)
    B, H, T, dh = 1024, 2, 50, 32
    d = H * dh
    x = torch.randn(B * T, d)
    w_qkv, b_qkv = torch.randn(d, 3 * d, requires_grad=True), torch.zeros(3 * d, requires_grad=True)
    w_o, b_o = torch.randn(d, d, requires_grad=True), torch.zeros(d, requires_grad=True)
    bias = score_bias(None, T, H, x)
    mask = dropout_mask((B * H, T, T), 0.5, x)

    def as_is():
        q, k, v = (t.transpose(1, 2) for t in torch.addmm(b_qkv, x, w_qkv).view(B, T, 3, H, dh).unbind(2))
        s = torch.baddbmm(bias, q.reshape(B * H, T, dh), k.reshape(B * H, T, dh).transpose(1, 2), alpha=dh ** -0.5)
        a = torch.bmm(torch.softmax(s, -1) * mask, v.reshape(B * H, T, dh))
        return torch.addmm(b_o, a.view(B, H, T, dh).transpose(1, 2).reshape(B * T, d), w_o)

    def by_head():
        parts = torch.addmm(b_qkv, x, w_qkv).view(B, T, 3 * H, dh).unbind(2)
        m, out = mask.view(B, H, T, T), b_o
        for h in range(H):
            s = torch.baddbmm(bias, parts[h], parts[H + h].transpose(1, 2), alpha=dh ** -0.5)
            a = torch.bmm(torch.softmax(s, -1) * m[:, h], parts[2 * H + h])
            out = torch.addmm(out, a.view(B * T, dh), w_o[h * dh:(h + 1) * dh])
        return out

    g = torch.randn(B * T, d)
    with torch.no_grad():
        gap = float((as_is() - by_head()).abs().max())
    times = {"as_is": [], "by_head": []}
    for r in range(args.repeats):
        for name, f in (("as_is", as_is), ("by_head", by_head))[:: 1 if r % 2 else -1]:
            t = time.perf_counter()
            f().backward(g)
            times[name].append(time.perf_counter() - t)
    return {"largest_output_difference": gap,
            **{f"{k}_ms_median": 1000 * statistics.median(v[1:]) for k, v in times.items()}}


def gelu(args) -> dict:
    """F.gelu against 0.5 x (1 + erf(x / sqrt 2)) in place, on a (51200, 256) activation."""
    torch.set_num_threads(2)
    x = torch.randn(51200, 256)
    variants = {"F.gelu": lambda: F.gelu(x),
                "erf_in_place": lambda: torch.erf(x * (1 / math.sqrt(2))).add_(1).mul_(x).mul_(0.5)}
    times = {k: [] for k in variants}
    for r in range(args.repeats):
        for k, f in variants.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {f"{k}_ms_median": 1000 * statistics.median(v[1:]) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=("parts-ab", "parts-memory", "parts-memory-one", "attention", "gelu"))
    p.add_argument("--batches", type=int, default=16, help="parts-ab: prefix batches (default 16)")
    p.add_argument("--parts", type=int, default=4, help="parts-ab / parts-memory-one: micro_batches (default 4)")
    p.add_argument("--recompute", action="store_true", help="parts-memory-one: recompute_activations too")
    p.add_argument("--repeats", type=int, default=11, help="attention / gelu: alternating repeats (default 11)")
    args = p.parse_args()
    fn = {"parts-ab": parts_ab, "parts-memory": parts_memory, "parts-memory-one": parts_memory_one,
          "attention": attention, "gelu": gelu}[args.probe]
    print(json.dumps(fn(args)))


if __name__ == "__main__":
    main()
